package broker

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/storage"
)

func TestHeartbeatEcho(t *testing.T) {
	b := startBroker(t, nil)
	c := connect(t, b.Addr(), "g")
	op := c.send(protocol.CmdHeartbeat, &protocol.HeartBeat{Version: proto.Int64(42)})
	p := c.expect(protocol.CmdHeartbeat)
	var hb protocol.HeartBeat
	c.decode(p, &hb)
	if p.Opaque != op || hb.GetVersion() != 42 {
		t.Fatalf("echo opaque %d version %d, want %d and 42", p.Opaque, hb.GetVersion(), op)
	}
}

func TestAuth(t *testing.T) {
	auth := filepath.Join(t.TempDir(), "auth")
	if err := os.WriteFile(auth, []byte("# groups\ngood:s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	b := startBroker(t, func(o *Options) { o.Auth, o.AuthFile = AuthRequired, auth })

	if ack := dial(t, b.Addr()).handshake("good", "s3cret"); !ack.GetStatus() {
		t.Fatalf("right secret refused: %s", ack.GetFeedback())
	}
	c := dial(t, b.Addr())
	ack := c.handshake("good", "wrong")
	if ack.GetStatus() || !strings.Contains(ack.GetFeedback(), "wrong secretKey") {
		t.Fatalf("wrong secret: status %t feedback %q", ack.GetStatus(), ack.GetFeedback())
	}
	if _, err := c.read(2 * time.Second); err == nil {
		t.Fatal("connection still open after a refused handshake")
	}
	if ack := dial(t, b.Addr()).handshake("unknown", "s3cret"); ack.GetStatus() {
		t.Fatal("unknown group accepted")
	}
}

func TestFirstPacketMustBeConnMeta(t *testing.T) {
	b := startBroker(t, nil)
	c := dial(t, b.Addr())
	c.send(protocol.CmdHeartbeat, &protocol.HeartBeat{Version: proto.Int64(1)})
	if _, err := c.read(2 * time.Second); err == nil {
		t.Fatal("broker answered a packet before CONN_META")
	}
}

func TestPublishValidation(t *testing.T) {
	b := startBroker(t, func(o *Options) { o.Topics = []string{"trade"} })
	c := connect(t, b.Addr(), "producer")

	ok := newMessage("trade", "pay-succ", "x")
	if ack := c.publish(ok); !ack.GetStatus() || ack.GetMessageId() != ok.GetHeader().GetMessageId() {
		t.Fatalf("valid message refused: %s", ack.GetFeedback())
	}
	cases := map[string]func(m *protocol.StringMessage){
		"invalid messageId": func(m *protocol.StringMessage) { m.Header.MessageId = proto.String("ABC") },
		"not served":        func(m *protocol.StringMessage) { m.Header.Topic = proto.String("other") },
		"empty messageType": func(m *protocol.StringMessage) { m.Header.MessageType = proto.String("") },
		"expired": func(m *protocol.StringMessage) {
			m.Header.ExpiredTime = proto.Int64(time.Now().Add(-time.Minute).Unix())
		},
		"fly message must be committed": func(m *protocol.StringMessage) {
			m.Header.Fly = proto.Bool(true)
			m.Header.Commit = proto.Bool(false)
		},
	}
	for want, mutate := range cases {
		m := newMessage("trade", "pay-succ", "x")
		mutate(m)
		ack := c.publish(m)
		if ack.GetStatus() || !strings.Contains(ack.GetFeedback(), want) {
			t.Errorf("%s: status %t feedback %q", want, ack.GetStatus(), ack.GetFeedback())
		}
	}

	// A body that is not a message is refused, and the connection stays.
	c.write(protocol.AppendPacket(nil, &protocol.Packet{Opaque: 99, Cmd: protocol.CmdStringMessage, Body: []byte{0xff, 0xff}}))
	p := c.expect(protocol.CmdMessageStoreAck)
	var ack protocol.MessageStoreAck
	c.decode(p, &ack)
	if p.Opaque != 99 || ack.GetStatus() || !strings.Contains(ack.GetFeedback(), "malformed") {
		t.Fatalf("malformed body: opaque %d status %t feedback %q", p.Opaque, ack.GetStatus(), ack.GetFeedback())
	}
	if ack := c.publish(newMessage("trade", "pay-succ", "after")); !ack.GetStatus() {
		t.Fatal("connection unusable after a malformed body")
	}
	if got := b.Stats().Stored; got != 2 {
		t.Fatalf("stored %d, want 2", got)
	}
}

func TestDuplicatePublishStoredOnce(t *testing.T) {
	b := startBroker(t, nil)
	cons := connect(t, b.Addr(), "c")
	cons.bind("c", bindDirect("c", "trade", "t", 10, true))
	prod := connect(t, b.Addr(), "p")
	m := newMessage("trade", "t", "once")
	if ack := prod.publish(m); !ack.GetStatus() {
		t.Fatal(ack.GetFeedback())
	}
	if ack := prod.publish(m); !ack.GetStatus() || !strings.Contains(ack.GetFeedback(), "duplicate") {
		t.Fatalf("duplicate: status %t feedback %q", ack.GetStatus(), ack.GetFeedback())
	}
	op, got := cons.receive()
	if got.GetBody() != "once" {
		t.Fatalf("body %q", got.GetBody())
	}
	cons.expectNothing(200 * time.Millisecond)
	cons.ack(op, got, "c", true)
	eventually(t, "message finished", func() bool { return b.Stats().Finished == 1 })
	if st := b.Stats(); st.Stored != 1 || st.Duplicates != 1 {
		t.Fatalf("stored %d duplicates %d, want 1 and 1", st.Stored, st.Duplicates)
	}
}

// TestPublishUnderATakenIdIsRefused: a publish is a duplicate only of the
// same message from the same producer group; other content, or the same
// content from another group, under a stored id is refused (conflict),
// and the stored message is the first one. A retry that leaves createTime
// out, as the first send did, is the same message.
func TestPublishUnderATakenIdIsRefused(t *testing.T) {
	b := startBroker(t, nil)
	cons := connect(t, b.Addr(), "c")
	cons.bind("c", bindDirect("c", "trade", "t", 10, true))
	prod := connect(t, b.Addr(), "p")
	other := connect(t, b.Addr(), "q")
	m := newMessage("trade", "t", "first")
	m.Header.CreateTime = nil
	if ack := prod.publish(m); !ack.GetStatus() {
		t.Fatal(ack.GetFeedback())
	}
	forged := proto.CloneOf(m)
	forged.Body = proto.String("second")
	for who, c := range map[string]struct {
		conn *testConn
		msg  *protocol.StringMessage
	}{"other content": {prod, forged}, "another group": {other, m}} {
		ack := c.conn.publish(c.msg)
		if ack.GetStatus() || !strings.Contains(ack.GetFeedback(), "conflict: message id "+m.GetHeader().GetMessageId()) {
			t.Errorf("%s: status %t feedback %q, want a conflict refusal", who, ack.GetStatus(), ack.GetFeedback())
		}
	}
	if ack := prod.publish(m); !ack.GetStatus() || !strings.Contains(ack.GetFeedback(), "duplicate") {
		t.Fatalf("retry: status %t feedback %q", ack.GetStatus(), ack.GetFeedback())
	}
	op, got := cons.receive()
	if got.GetBody() != "first" {
		t.Fatalf("delivered %q, want the first message", got.GetBody())
	}
	cons.ack(op, got, "c", true)
	cons.expectNothing(200 * time.Millisecond)
	if st := b.Stats(); st.Stored != 1 || st.Duplicates != 1 || st.Conflicts != 2 {
		t.Fatalf("stored %d duplicates %d conflicts %d, want 1, 1 and 2", st.Stored, st.Duplicates, st.Conflicts)
	}
}

func TestDeliverAckRetryAndFinish(t *testing.T) {
	b := startBroker(t, nil)
	cons := connect(t, b.Addr(), "c")
	cons.bind("c", bindDirect("c", "trade", "t", 10, true))
	prod := connect(t, b.Addr(), "p")
	m := newMessage("trade", "t", "hello")
	prod.publish(m)

	op, got := cons.receive()
	if got.GetHeader().GetMessageId() != m.GetHeader().GetMessageId() || got.GetBody() != "hello" {
		t.Fatalf("delivered %v", got)
	}
	cons.ack(op, got, "c", false) // a consumer that returns false gets it again
	op2, again := cons.receive()
	if again.GetHeader().GetMessageId() != m.GetHeader().GetMessageId() || op2 == op {
		t.Fatalf("redelivery: id %s opaque %d", again.GetHeader().GetMessageId(), op2)
	}
	stored, err := b.store.Get(context.Background(), m.GetHeader().GetMessageId())
	if err != nil || stored.DeliverCount != 1 || len(stored.FailGroups) != 1 {
		t.Fatalf("recorded delivery: %+v, %v", stored, err)
	}
	cons.ack(op2, again, "c", true)
	eventually(t, "message deleted", func() bool {
		_, err := b.store.Get(context.Background(), m.GetHeader().GetMessageId())
		return errors.Is(err, storage.ErrNotFound)
	})
	if st := b.Stats(); st.DeliverFailed != 1 || st.DeliverAcked != 1 || st.Finished != 1 {
		t.Fatalf("stats %+v", st)
	}
}

func TestDeliverTimeoutRetries(t *testing.T) {
	b := startBroker(t, func(o *Options) { o.DeliverTimeout = 200 * time.Millisecond })
	cons := connect(t, b.Addr(), "c")
	cons.bind("c", bindDirect("c", "trade", "t", 10, true))
	prod := connect(t, b.Addr(), "p")
	prod.publish(newMessage("trade", "t", "slow"))
	cons.receive() // never acknowledged
	start := time.Now()
	op, m := cons.receive()
	if waited := time.Since(start); waited < 150*time.Millisecond {
		t.Fatalf("redelivered after %s, before the deliver timeout", waited)
	}
	cons.ack(op, m, "c", true)
	eventually(t, "finished", func() bool { return b.Stats().Finished == 1 })
	if b.Stats().DeliverTimeouts < 1 {
		t.Fatal("no timeout counted")
	}
}

func TestDeliveryLimitDeadLetters(t *testing.T) {
	b := startBroker(t, nil)
	cons := connect(t, b.Addr(), "c")
	cons.bind("c", bindDirect("c", "trade", "t", 10, true))
	prod := connect(t, b.Addr(), "p")
	m := newMessage("trade", "t", "doomed")
	m.Header.DeliveryLimit = proto.Int32(2)
	prod.publish(m)
	for range 2 {
		op, got := cons.receive()
		cons.ack(op, got, "c", false)
	}
	cons.expectNothing(300 * time.Millisecond)
	eventually(t, "dead-lettered", func() bool {
		dl, err := b.store.DeadLetters(context.Background(), "", 10)
		return err == nil && len(dl) == 1 && strings.Contains(dl[0].Reason, "delivery limit 2")
	})
}

func TestClosedConsumerHandsOverAtOnce(t *testing.T) {
	b := startBroker(t, func(o *Options) { o.RetrySchedule = []time.Duration{time.Minute} })
	first := connect(t, b.Addr(), "c")
	first.bind("c", bindDirect("c", "trade", "t", 10, true))
	prod := connect(t, b.Addr(), "p")
	prod.publish(newMessage("trade", "t", "handover"))
	first.receive()
	second := connect(t, b.Addr(), "c")
	first.conn.Close()
	op, m := second.receive() // well before the one-minute retry delay
	if m.GetBody() != "handover" {
		t.Fatalf("body %q", m.GetBody())
	}
	second.ack(op, m, "c", true)
	eventually(t, "finished", func() bool { return b.Stats().Finished == 1 })
}

func TestWatermarkBoundsInFlight(t *testing.T) {
	b := startBroker(t, nil)
	cons := connect(t, b.Addr(), "c")
	cons.bind("c", bindDirect("c", "trade", "t", 3, true))
	prod := connect(t, b.Addr(), "p")
	for i := range 10 {
		prod.publish(newMessage("trade", "t", string(rune('a'+i))))
	}
	var held []uint32
	var msgs []*protocol.StringMessage
	for range 3 {
		op, m := cons.receive()
		held = append(held, op)
		msgs = append(msgs, m)
	}
	cons.expectNothing(200 * time.Millisecond)
	cons.ack(held[0], msgs[0], "c", true)
	cons.receive() // one more, no more
	cons.expectNothing(200 * time.Millisecond)
}

func TestPersistentAndNonPersistentWithoutConsumer(t *testing.T) {
	b := startBroker(t, nil)
	setup := connect(t, b.Addr(), "keep")
	setup.bind("keep", bindDirect("keep", "trade", "t", 10, true))
	setup2 := connect(t, b.Addr(), "skip")
	setup2.bind("skip", bindDirect("skip", "trade", "t", 10, false))
	setup.conn.Close()
	setup2.conn.Close()
	eventually(t, "consumers gone", func() bool { return b.Stats().Connections == 0 })

	prod := connect(t, b.Addr(), "p")
	prod.publish(newMessage("trade", "t", "offline"))
	time.Sleep(100 * time.Millisecond)

	keep := connect(t, b.Addr(), "keep")
	op, m := keep.receive()
	keep.ack(op, m, "keep", true)
	skip := connect(t, b.Addr(), "skip")
	skip.expectNothing(300 * time.Millisecond)
	eventually(t, "finished", func() bool { return b.Stats().Finished == 1 })
}

func TestTransactionCommitAndRollback(t *testing.T) {
	b := startBroker(t, nil)
	cons := connect(t, b.Addr(), "c")
	cons.bind("c", bindDirect("c", "trade", "t", 10, true))
	prod := connect(t, b.Addr(), "p")

	commit := newMessage("trade", "t", "commit-me")
	commit.Header.Commit = proto.Bool(false)
	rollback := newMessage("trade", "t", "roll-me-back")
	rollback.Header.Commit = proto.Bool(false)
	prod.publish(commit)
	prod.publish(rollback)
	cons.expectNothing(200 * time.Millisecond) // uncommitted: never delivered

	prod.send(protocol.CmdTxAck, &protocol.TxACKPacket{Header: rollback.Header, Status: proto.Int32(int32(protocol.TxRollback)), Feedback: proto.String("")})
	prod.send(protocol.CmdTxAck, &protocol.TxACKPacket{Header: commit.Header, Status: proto.Int32(int32(protocol.TxCommit)), Feedback: proto.String("")})
	op, m := cons.receive()
	if m.GetBody() != "commit-me" {
		t.Fatalf("delivered %q", m.GetBody())
	}
	cons.ack(op, m, "c", true)
	// A repeated commit delivers nothing more.
	prod.send(protocol.CmdTxAck, &protocol.TxACKPacket{Header: commit.Header, Status: proto.Int32(int32(protocol.TxCommit)), Feedback: proto.String("")})
	cons.expectNothing(300 * time.Millisecond)
	eventually(t, "rolled back and finished", func() bool { return storeCount(t, b.store) == 0 })
}

func TestReadingNeverWaitsForDelivery(t *testing.T) {
	b := startBroker(t, nil)
	// A consumer that never reads its socket: its deliveries pile up.
	stuck := connect(t, b.Addr(), "c")
	stuck.bind("c", bindDirect("c", "trade", "t", 100000, true))
	prod := connect(t, b.Addr(), "p")
	body := strings.Repeat("x", 16<<10)
	for range 200 {
		prod.send(protocol.CmdStringMessage, newMessage("trade", "t", body))
	}
	for range 200 {
		prod.expect(protocol.CmdMessageStoreAck)
	}
	// Heartbeats and publishes on the producer's connection still flow.
	start := time.Now()
	prod.send(protocol.CmdHeartbeat, &protocol.HeartBeat{Version: proto.Int64(1)})
	prod.expect(protocol.CmdHeartbeat)
	if ack := prod.publish(newMessage("trade", "t", "more")); !ack.GetStatus() {
		t.Fatal(ack.GetFeedback())
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("producer waited %s behind a stuck consumer", d)
	}
}

func TestStopAnswersPublishesInFlight(t *testing.T) {
	b := startBroker(t, nil)
	prod := connect(t, b.Addr(), "p")
	const n = 500
	for range n {
		prod.send(protocol.CmdStringMessage, newMessage("trade", "t", "x"))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	go b.Stop(ctx)
	acks := 0
	for {
		p, err := prod.read(5 * time.Second)
		if err != nil {
			break
		}
		if p.Cmd == protocol.CmdMessageStoreAck {
			acks++
		}
	}
	// Every publish the broker read was stored and answered; the rest were
	// never read and are the producer's to resend.
	if st := b.Stats(); int64(acks) != st.Published || st.Stored != st.Published {
		t.Fatalf("%d acks, broker read %d and stored %d", acks, st.Published, st.Stored)
	}
}
