package broker

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/storage"
)

func TestTxCheckDelayDoublesToItsCap(t *testing.T) {
	o := DefaultOptions()
	o.Auth = AuthOpen // loopback tests
	var got []string
	for n := int32(1); n <= 8; n++ {
		got = append(got, o.txCheckDelay(n).String())
	}
	want := "10s 20s 40s 1m20s 2m40s 2m40s 2m40s 2m40s"
	if strings.Join(got, " ") != want {
		t.Fatalf("waits after checks 1..8: %s, want %s", strings.Join(got, " "), want)
	}
}

func TestTokenBucketBoundsTheRate(t *testing.T) {
	start := time.Unix(1_700_000_000, 0)
	b := newTokenBucket(100, start)
	// Over 10 s of attempts every millisecond: one second's burst, then
	// 100 per second.
	taken := 0
	for ms := range 10_000 {
		if b.take(start.Add(time.Duration(ms) * time.Millisecond)) {
			taken++
		}
	}
	if taken < 1000 || taken > 1100 {
		t.Fatalf("%d tokens in 10 s at 100/s with a burst of 100, want 1000..1100", taken)
	}
	// A clock that goes back gives nothing.
	b = newTokenBucket(1, start)
	if !b.take(start) || b.take(start.Add(-time.Hour)) {
		t.Fatal("a clock going back refilled the bucket")
	}
}

// undecided publishes an uncommitted message from prod and returns it.
func undecided(t *testing.T, prod *testConn, body string) *protocol.StringMessage {
	t.Helper()
	m := newMessage("trade", "t", body)
	m.Header.Commit = proto.Bool(false)
	if ack := prod.publish(m); !ack.GetStatus() {
		t.Fatalf("store-ack: %s", ack.GetFeedback())
	}
	return m
}

// expectCheck reads the next packet of c, which must be a check of m.
func expectCheck(t *testing.T, c *testConn, m *protocol.StringMessage) uint32 {
	t.Helper()
	p := c.expect(protocol.CmdTxAck)
	var tx protocol.TxACKPacket
	c.decode(p, &tx)
	if tx.GetHeader().GetMessageId() != m.Header.GetMessageId() || protocol.TxStatus(tx.GetStatus()) != protocol.TxUnknown {
		t.Fatalf("check: message %s status %d, want %s status unknown", tx.GetHeader().GetMessageId(), tx.GetStatus(),
			m.Header.GetMessageId())
	}
	return p.Opaque
}

// A producer that does not decide is asked, and its answer decides: a
// commit delivers, a rollback deletes. The check goes to the connection
// that sent the message while it is open, and to another connection of the
// group once it is closed.
func TestTxCheckAsksTheProducerGroup(t *testing.T) {
	b := startBroker(t, func(o *Options) { o.TxCheckDelay = 100 * time.Millisecond })
	cons := connect(t, b.Addr(), "c")
	cons.bind("c", bindDirect("c", "trade", "t", 10, true))
	other := connect(t, b.Addr(), "p") // a second producer of the group
	prod := connect(t, b.Addr(), "p")

	undecided(t, prod, "commit-me")
	roll := undecided(t, prod, "roll-me-back")
	start := time.Now()
	for range 2 {
		op := prod.expect(protocol.CmdTxAck)
		var tx protocol.TxACKPacket
		prod.decode(op, &tx)
		status := protocol.TxCommit
		if tx.GetHeader().GetMessageId() == roll.Header.GetMessageId() {
			status = protocol.TxRollback
		}
		prod.sendOpaque(op.Opaque, protocol.CmdTxAck, &protocol.TxACKPacket{Header: tx.Header,
			Status: proto.Int32(int32(status)), Feedback: proto.String("decided on check")})
	}
	if el := time.Since(start); el < 50*time.Millisecond {
		t.Fatalf("checked %v after the store-ack, before the 100ms delay", el)
	}
	op, m := cons.receive()
	if m.GetBody() != "commit-me" {
		t.Fatalf("delivered %q, want the committed message", m.GetBody())
	}
	cons.ack(op, m, "c", true)
	other.expectNothing(300 * time.Millisecond) // the origin was open: it got the checks
	eventually(t, "both transactions ended", func() bool { return storeCount(t, b.store) == 0 })

	// The origin closes: the next check goes to the other connection.
	lost := undecided(t, prod, "origin-gone")
	prod.conn.Close()
	opaque := expectCheck(t, other, lost)
	other.sendOpaque(opaque, protocol.CmdTxAck, &protocol.TxACKPacket{Header: lost.Header,
		Status: proto.Int32(int32(protocol.TxCommit)), Feedback: proto.String("")})
	op, m = cons.receive()
	if m.GetBody() != "origin-gone" {
		t.Fatalf("delivered %q", m.GetBody())
	}
	cons.ack(op, m, "c", true)
	if st := b.Stats(); st.TxChecks < 3 || st.Committed != 2 || st.RolledBack != 1 {
		t.Fatalf("stats: %+v", st)
	}
}

// An answer of unknown leaves the message undecided; it is asked again,
// later each time, and dead-lettered after the last check, with the reason.
func TestTxCheckBacksOffThenDeadLetters(t *testing.T) {
	b := startBroker(t, func(o *Options) {
		o.TxCheckDelay = 40 * time.Millisecond
		o.TxCheckMaxDelay = 160 * time.Millisecond
		o.TxCheckLimit = 4
	})
	prod := connect(t, b.Addr(), "p")
	m := undecided(t, prod, "never-decided")
	var at []time.Time
	for range 4 {
		opaque := expectCheck(t, prod, m)
		at = append(at, time.Now())
		prod.sendOpaque(opaque, protocol.CmdTxAck, &protocol.TxACKPacket{Header: m.Header,
			Status: proto.Int32(int32(protocol.TxUnknown)), Feedback: proto.String("still running")})
	}
	// Waits after checks 1, 2, 3: 80, 160, 160 ms (the checker passes every 10 ms).
	for i, want := range []time.Duration{80 * time.Millisecond, 160 * time.Millisecond, 160 * time.Millisecond} {
		if gap := at[i+1].Sub(at[i]); gap < want-20*time.Millisecond {
			t.Errorf("check %d came %v after check %d, want at least about %v", i+2, gap, i+1, want)
		}
	}
	eventually(t, "dead-lettered after 4 checks", func() bool {
		dl, err := b.store.DeadLetters(context.Background(), "", 10)
		return err == nil && len(dl) == 1 && dl[0].Reason == "no transaction decision after 4 checks"
	})
	prod.expectNothing(300 * time.Millisecond)
	if _, err := b.store.Get(context.Background(), m.Header.GetMessageId()); err == nil {
		t.Fatal("the dead-lettered message is still live")
	}
	if st := b.Stats(); st.TxChecks != 4 || st.TxDeadLettered != 1 {
		t.Fatalf("stats: %+v", st)
	}
}

// Checks of one group go out no faster than the rate, however many
// transactions are due, and every one is checked in the end. (A message
// checked early may be checked again before the last is: every check
// counts against the rate.)
func TestTxCheckRateIsBoundedPerGroup(t *testing.T) {
	const n, rate = 60, 20
	b := startBroker(t, func(o *Options) {
		o.TxCheckDelay = 500 * time.Millisecond // after every publish is answered
		o.TxCheckMaxDelay = time.Hour           // one check each within the test
		o.TxCheckRate = rate
	})
	prod := connect(t, b.Addr(), "p")
	want := make(map[string]bool)
	for i := range n {
		want[undecided(t, prod, fmt.Sprint("tx-", i)).Header.GetMessageId()] = true
	}
	var start time.Time
	var times []time.Duration
	for len(want) > 0 {
		p, err := prod.read(5 * time.Second)
		if err != nil {
			t.Fatalf("%d checks, then %v", len(times), err)
		}
		if p.Cmd != protocol.CmdTxAck {
			continue
		}
		var tx protocol.TxACKPacket
		prod.decode(p, &tx)
		delete(want, tx.GetHeader().GetMessageId())
		if start.IsZero() {
			start = time.Now()
		}
		times = append(times, time.Since(start))
	}
	// A burst of one second's worth, then the rate: check k (from 0) no
	// sooner than (k - rate) / rate seconds after the first.
	for k, at := range times {
		if min := time.Duration(float64(k-rate) / rate * float64(time.Second)); at < min-50*time.Millisecond {
			t.Fatalf("check %d at %v, before %v: over %d per second", k, at, min, rate)
		}
	}
	if st := b.Stats(); st.TxChecks < n {
		t.Fatalf("%d checks sent, want at least %d", st.TxChecks, n)
	}
}

// An uncommitted message names the producer group that decides it: a
// header of another group is refused, since nobody would be asked.
func TestUncommittedMessageOfAnotherGroupIsRefused(t *testing.T) {
	b := startBroker(t, nil)
	prod := connect(t, b.Addr(), "p")
	m := newMessage("trade", "t", "x")
	m.Header.Commit = proto.Bool(false)
	m.Header.GroupId = proto.String("someone-else")
	ack := prod.publish(m)
	if ack.GetStatus() || !strings.Contains(ack.GetFeedback(), `must be the producer's group "p"`) {
		t.Fatalf("store-ack %v %q, want a refusal naming the group", ack.GetStatus(), ack.GetFeedback())
	}
	if n := storeCount(t, b.store); n != 0 {
		t.Fatalf("%d messages stored", n)
	}
}

// The first check is the store's: an uncommitted message is stored with
// its first check due TxCheckDelay after it arrived.
func TestUncommittedMessageIsStoredWithItsFirstCheck(t *testing.T) {
	b := startBroker(t, func(o *Options) { o.TxCheckDelay, o.TxCheckMaxDelay = time.Hour, time.Hour })
	prod := connect(t, b.Addr(), "p")
	before := time.Now()
	m := undecided(t, prod, "x")
	got, err := b.store.Get(context.Background(), m.Header.GetMessageId())
	if err != nil {
		t.Fatal(err)
	}
	if d := got.NextDeliverTime.Sub(before); d < time.Hour-time.Second || d > time.Hour+5*time.Second {
		t.Fatalf("first check due %v after the publish, want 1h", d)
	}
	page, err := b.store.Due(context.Background(), storage.DueQuery{Kind: storage.DueTxCheck, Before: time.Now()})
	if err != nil || len(page) != 0 {
		t.Fatalf("due checks now: %d (%v), want none", len(page), err)
	}
}
