package tests

import (
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	client "github.com/kiteq/kiteq/client-go"
	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/registry/binding"
)

// The tests of this file play a hostile or careless client against the
// real kiteq process: each is a way in which, before the broker checked
// it, one client forged, took or decided another's messages.

// authFile writes an auth file of lines and returns the -auth-file flag.
func authFile(t *testing.T, lines ...string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "auth")
	if err := os.WriteFile(path, []byte(strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return "-auth-file=" + path
}

// startWithAuth starts a kiteq process on the memory store that requires
// the groups of lines, and logs its stderr when the test fails.
func startWithAuth(t *testing.T, lines ...string) (addr string, stderr *syncBuffer) {
	t.Helper()
	addr = freePort(t)
	_, stderr, _ = startKiteq(t, buildKiteq(t), addr, "-db=memory://", authFile(t, lines...))
	t.Cleanup(func() {
		if t.Failed() {
			t.Log(stderr.String())
		}
	})
	return addr, stderr
}

// startAuthClient starts a client-go client with its secret.
func startAuthClient(t *testing.T, addr, group, secret string, l client.IListener, topics []string, bs ...*binding.Binding) *client.KiteQClient {
	t.Helper()
	c := client.NewKiteQClient("static://"+addr, group, secret, l)
	c.SetTopics(topics)
	c.SetBindings(bs)
	if err := c.Start(); err != nil {
		t.Fatalf("start %s: %v", group, err)
	}
	t.Cleanup(c.Destroy)
	return c
}

// rawLogin sends CONN_META as group with secret and returns the CONN_AUTH.
func rawLogin(t *testing.T, addr, group, secret string) (*rawConn, *protocol.ConnAuthAck) {
	t.Helper()
	c := dialRaw(t, addr)
	b, err := protocol.AppendMessage(nil, 1, protocol.CmdConnMeta,
		&protocol.ConnMeta{GroupId: proto.String(group), SecretKey: proto.String(secret)})
	if err != nil {
		t.Fatal(err)
	}
	c.write(b)
	c.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	p, err := protocol.NewReader(c.conn, 0).ReadPacket()
	if err != nil || p.Cmd != protocol.CmdConnAuth {
		t.Fatalf("login as %q: %v %v", group, p, err)
	}
	var ack protocol.ConnAuthAck
	if err := p.DecodeInto(&ack); err != nil {
		t.Fatal(err)
	}
	return c, &ack
}

// sendPacket writes one packet on a raw connection.
func (c *rawConn) sendPacket(opaque uint32, cmd protocol.CmdType, msg proto.Message) {
	c.t.Helper()
	b, err := protocol.AppendMessage(nil, opaque, cmd, msg)
	if err != nil {
		c.t.Fatal(err)
	}
	c.write(b)
}

// readStoreAcks reads store-acks until it has n, skipping other packets.
func (c *rawConn) readStoreAcks(n int) map[uint32]*protocol.MessageStoreAck {
	c.t.Helper()
	r := protocol.NewReader(c.conn, 0)
	out := make(map[uint32]*protocol.MessageStoreAck)
	c.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	for len(out) < n {
		p, err := r.ReadPacket()
		if err != nil {
			c.t.Fatalf("after %d of %d store-acks: %v", len(out), n, err)
		}
		if p.Cmd != protocol.CmdMessageStoreAck {
			continue
		}
		var ack protocol.MessageStoreAck
		if err := p.DecodeInto(&ack); err != nil {
			c.t.Fatal(err)
		}
		out[p.Opaque] = &ack
	}
	return out
}

// oldStyleNextIDs returns the ids that the message-id scheme before this
// change would have given after id: the same 8-byte process part, the
// next counters, in this second or the few after it.
func oldStyleNextIDs(id string, n int) []string {
	raw, _ := hex.DecodeString(id)
	counter := binary.BigEndian.Uint32(raw[12:16])
	now := uint32(time.Now().Unix())
	var out []string
	for sec := now; sec <= now+3; sec++ {
		for i := 1; i <= n; i++ {
			next := append([]byte(nil), raw...)
			binary.BigEndian.PutUint32(next[0:4], sec)
			binary.BigEndian.PutUint32(next[12:16], counter+uint32(i))
			out = append(out, hex.EncodeToString(next))
		}
	}
	return out
}

// TestForgedIdsCannotTakeOverAnotherProducersMessages: client A, a
// tenant allowed on the topic, sees one of producer B's message ids and
// publishes uncommitted messages under the ids that would come next (the
// old ids were seconds, a per-process part and a counter). B's next sends
// must all be stored as B's and reach B's consumer with B's bodies; and a
// send under an id that another producer already used is refused with a
// reason, never acknowledged as stored.
func TestForgedIdsCannotTakeOverAnotherProducersMessages(t *testing.T) {
	addr, _ := startWithAuth(t, "shop:shop-secret", "billing:billing-secret", "attacker:attacker-secret")

	consumer := newRecorder("billing")
	startAuthClient(t, addr, "billing", "billing-secret", consumer, nil, binding.Bind_Direct("billing", "trade", "pay-succ", 1000, true))
	spy := newRecorder("attacker")
	startAuthClient(t, addr, "attacker", "attacker-secret", spy, []string{"trade"}, binding.Bind_Fanout("attacker", "trade", 1000, false))
	shop := startAuthClient(t, addr, "shop", "shop-secret", newRecorder("shop"), []string{"trade"})

	first := newMessage("trade", "pay-succ", "order #0")
	first.Header.GroupId = proto.String("shop")
	if err := shop.SendStringMessage(first); err != nil {
		t.Fatal(err)
	}
	var seen string
	eventually(t, 5*time.Second, "the attacker sees one of shop's ids", func() bool {
		for id := range spy.snapshot() {
			seen = id
			return true
		}
		return false
	})

	// The attacker pre-publishes uncommitted messages under the ids it
	// predicts for shop.
	forged := oldStyleNextIDs(seen, 60)
	a, ack := rawLogin(t, addr, "attacker", "attacker-secret")
	if !ack.GetStatus() {
		t.Fatalf("attacker refused: %s", ack.GetFeedback())
	}
	for i, id := range forged {
		// Built by hand: newMessage would draw ids, and with the old
		// scheme move shop's counter past the predicted ones.
		h := proto.CloneOf(first.GetHeader())
		h.MessageId = proto.String(id)
		h.GroupId = proto.String("attacker")
		h.Commit = proto.Bool(false)
		a.sendPacket(uint32(100+i), protocol.CmdStringMessage, &protocol.StringMessage{Header: h, Body: proto.String("forged")})
	}
	a.readStoreAcks(len(forged))

	const sends = 50
	want := map[string]string{}
	for i := 1; i <= sends; i++ {
		m := newMessage("trade", "pay-succ", fmt.Sprintf("order #%d", i))
		m.Header.GroupId = proto.String("shop")
		if err := shop.SendStringMessage(m); err != nil {
			t.Fatalf("shop's send %d: %v", i, err)
		}
		want[m.GetHeader().GetMessageId()] = m.GetBody()
	}
	eventually(t, 10*time.Second, "billing receives every one of shop's messages", func() bool {
		got := consumer.snapshot()
		for id := range want {
			if got[id] == 0 {
				return false
			}
		}
		return true
	})

	// An id that is taken, by the attacker's committed message, is refused
	// to shop with a reason, not acknowledged as a duplicate.
	// Delayed, so that the ids stay taken: a finished message frees its id.
	later := proto.Int64(time.Now().Add(30 * time.Minute).UnixMilli())
	taken := newMessage("trade", "pay-succ", "the attacker's")
	taken.Header.GroupId = proto.String("attacker")
	taken.Header.DeliverAt = later
	a.sendPacket(1, protocol.CmdStringMessage, taken)
	if ack := a.readStoreAcks(1)[1]; !ack.GetStatus() {
		t.Fatalf("attacker's own message refused: %s", ack.GetFeedback())
	}
	mine := newMessage("trade", "pay-succ", "shop's")
	mine.Header.MessageId = proto.String(taken.GetHeader().GetMessageId())
	mine.Header.GroupId = proto.String("shop")
	err := shop.SendStringMessage(mine)
	if err == nil || !strings.Contains(err.Error(), "conflict") {
		t.Fatalf("shop's send under a taken id: %v, want a conflict refusal", err)
	}
	// The same content from another producer group is another message.
	again := newMessage("trade", "pay-succ", "sent twice")
	again.Header.GroupId = proto.String("shop")
	again.Header.DeliverAt = later
	a.sendPacket(2, protocol.CmdStringMessage, again)
	a.readStoreAcks(1)
	if err := shop.SendStringMessage(again); err == nil || !strings.Contains(err.Error(), "conflict") {
		t.Fatalf("shop's copy of the attacker's message (same content, other group): %v, want a conflict refusal", err)
	}
	// The same message sent twice by its producer is one message: the
	// second is a retry. Uncommitted, it stays stored meanwhile.
	retry := newMessage("trade", "order", "retried")
	retry.Header.GroupId = proto.String("shop")
	retry.Header.Commit = proto.Bool(false)
	r, ack := rawLogin(t, addr, "shop", "shop-secret")
	if !ack.GetStatus() {
		t.Fatal(ack.GetFeedback())
	}
	r.sendPacket(1, protocol.CmdStringMessage, retry)
	r.sendPacket(2, protocol.CmdStringMessage, retry)
	acks := r.readStoreAcks(2)
	for opaque, ack := range acks {
		if !ack.GetStatus() {
			t.Fatalf("send %d of the same message by its producer: %s", opaque, ack.GetFeedback())
		}
	}
	if f1, f2 := acks[1].GetFeedback(), acks[2].GetFeedback(); !strings.Contains(f1+f2, "stored") || !strings.Contains(f1+f2, "duplicate") {
		t.Fatalf("two sends of the same message: %q and %q, want one stored and one duplicate", f1, f2)
	}
}

// txAck sends a producer's decision on a raw connection.
func (c *rawConn) txAck(id string, status protocol.TxStatus) {
	c.t.Helper()
	h := newMessage("trade", "pay-succ", "").GetHeader()
	h.MessageId = proto.String(id)
	c.sendPacket(7, protocol.CmdTxAck, &protocol.TxACKPacket{Header: h, Status: proto.Int32(int32(status)), Feedback: proto.String("")})
}

// TestTxDecisionsOnlyFromTheProducerGroup: another group's TX_ACK commit
// or rollback for shop's undecided transactions changes nothing: the
// message shop rolls back is never delivered, the one shop commits is.
func TestTxDecisionsOnlyFromTheProducerGroup(t *testing.T) {
	addr, stderr := startWithAuth(t, "shop:shop-secret", "billing:billing-secret", "attacker:attacker-secret")
	consumer := newRecorder("billing")
	startAuthClient(t, addr, "billing", "billing-secret", consumer, nil, binding.Bind_Fanout("billing", "trade", 1000, true))
	shop := startAuthClient(t, addr, "shop", "shop-secret", newRecorder("shop"), []string{"trade"})
	attacker, ack := rawLogin(t, addr, "attacker", "attacker-secret")
	if !ack.GetStatus() {
		t.Fatal(ack.GetFeedback())
	}

	// doTx runs once the message is stored: the attacker decides first,
	// then shop's own decision goes.
	tx := func(body string, forged protocol.TxStatus, decide bool) string {
		m := newMessage("trade", "pay-succ", body)
		m.Header.GroupId = proto.String("shop")
		id := m.GetHeader().GetMessageId()
		err := shop.SendTxStringMessage(m, func(*protocol.StringMessage) (bool, error) {
			attacker.txAck(id, forged)
			time.Sleep(700 * time.Millisecond) // time for the forged decision to act, if it could
			if forged == protocol.TxCommit && consumer.count(id) != 0 {
				t.Errorf("%s: delivered on another group's commit, before its producer decided", body)
			}
			return decide, nil
		})
		if err != nil {
			t.Fatalf("%s: %v", body, err)
		}
		return id
	}
	rolledBack := tx("shop rolls back", protocol.TxCommit, false)
	committed := tx("shop commits", protocol.TxRollback, true)

	eventually(t, 5*time.Second, "the message shop committed is delivered", func() bool { return consumer.count(committed) == 1 })
	time.Sleep(500 * time.Millisecond)
	if n := consumer.count(rolledBack); n != 0 {
		t.Fatalf("the message shop rolled back was delivered %d times", n)
	}
	eventually(t, 5*time.Second, "both refusals logged", func() bool {
		return strings.Count(stderr.String(), "transaction decision refused") == 2
	})
}

// TestAuthRefusesUnknownGroupsAndWrongSecrets: with an auth file, a group
// that is not in it is refused whatever its secret (an empty one too), so
// is a known group with a wrong secret, in the same words; the right
// secret is accepted.
func TestAuthRefusesUnknownGroupsAndWrongSecrets(t *testing.T) {
	bin := buildKiteq(t)
	addr := freePort(t)
	_, stderr, _ := startKiteq(t, bin, addr, "-db=memory://", authFile(t, "# shop's producers", "shop:s3cret"))
	for _, c := range []struct{ group, secret string }{{"stranger", ""}, {"stranger", "s3cret"}, {"shop", ""}, {"shop", "S3cret"}} {
		conn, ack := rawLogin(t, addr, c.group, c.secret)
		if ack.GetStatus() || ack.GetFeedback() != "unknown group or wrong secretKey" {
			t.Errorf("%q with secret %q: status %t %q, want refused", c.group, c.secret, ack.GetStatus(), ack.GetFeedback())
		}
		conn.expectClosed()
	}
	if _, ack := rawLogin(t, addr, "shop", "s3cret"); !ack.GetStatus() {
		t.Fatalf("shop with its secret refused: %s", ack.GetFeedback())
	}
	log := stderr.String()
	if !strings.Contains(log, "group is not in the auth file") || !strings.Contains(log, "wrong secretKey") {
		t.Fatalf("the log does not say why each login failed:\n%s", log)
	}
}

// TestAuthRequiredByDefault: a broker started without an auth file does
// not start open: it exits with an error that names the fix. -auth=open
// (make run) is for loopback only, and says so in its log.
func TestAuthRequiredByDefault(t *testing.T) {
	bin := buildKiteq(t)
	out, err := runKiteq(bin, "-bind="+freePort(t), "-pport=0", "-db=memory://")
	if err == nil || !strings.Contains(out, "-auth-file") || !strings.Contains(out, "-auth=open") {
		t.Fatalf("without an auth file: %v\n%s", err, out)
	}
	out, err = runKiteq(bin, "-bind=0.0.0.0:0", "-pport=0", "-db=memory://", "-auth=open")
	if err == nil || !strings.Contains(out, "loopback") {
		t.Fatalf("-auth=open on 0.0.0.0: %v\n%s", err, out)
	}
	_, stderr, _ := startKiteq(t, bin, freePort(t), "-db=memory://", "-auth=open")
	eventually(t, 5*time.Second, "the open broker's warning", func() bool {
		return strings.Contains(stderr.String(), "-auth=open: any client may connect as any group")
	})
}

// runKiteq runs the broker to its exit, which a bad flag makes quick.
func runKiteq(bin string, args ...string) (string, error) {
	cmd := exec.Command(bin, args...)
	done := make(chan struct{})
	var out []byte
	var err error
	go func() {
		out, err = cmd.CombinedOutput()
		close(done)
	}()
	select {
	case <-done:
		return string(out), err
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		<-done
		return string(out), fmt.Errorf("still running after 10 s")
	}
}

// TestRogueConsumerCannotJoinAGroup: a client that claims group "shop"
// without its secret gets none of shop's orders, and a tenant whose auth
// line does not let it consume the topic cannot bind it: every one of 100
// orders goes to shop's own consumer.
func TestRogueConsumerCannotJoinAGroup(t *testing.T) {
	addr, _ := startWithAuth(t, "shop:shop-secret sub=orders pub=", "web:web-secret pub=orders sub=", "feed:feed-secret sub=news pub=news")
	orders := newRecorder("shop")
	startAuthClient(t, addr, "shop", "shop-secret", orders, nil, binding.Bind_Fanout("shop", "orders", 1000, true))

	rogue := client.NewKiteQClient("static://"+addr, "shop", "guessed", newRecorder("rogue"))
	rogue.SetBindings([]*binding.Binding{binding.Bind_Fanout("shop", "orders", 1000, true)})
	if err := rogue.Start(); err == nil || !strings.Contains(err.Error(), "wrong secretKey") {
		t.Fatalf("rogue consumer of shop: %v, want refused", err)
	}
	rogue.Destroy()
	tenant := client.NewKiteQClient("static://"+addr, "feed", "feed-secret", newRecorder("feed"))
	tenant.SetBindings([]*binding.Binding{binding.Bind_Fanout("feed", "orders", 1000, true)})
	if err := tenant.Start(); err == nil || !strings.Contains(err.Error(), `may not consume topic "orders"`) {
		t.Fatalf("feed binding orders: %v, want refused", err)
	}
	tenant.Destroy()
	feed := startAuthClient(t, addr, "feed", "feed-secret", newRecorder("feed"), []string{"orders"})
	if err := feed.SendStringMessage(newMessage("orders", "new", "forged order")); err == nil ||
		!strings.Contains(err.Error(), `may not publish to topic "orders"`) {
		t.Fatalf("feed publishing an order: %v, want refused", err)
	}

	web := startAuthClient(t, addr, "web", "web-secret", newRecorder("web"), []string{"orders"})
	var ids []string
	for i := range 100 {
		m := newMessage("orders", "new", fmt.Sprintf("order %d", i))
		if err := web.SendStringMessage(m); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, m.GetHeader().GetMessageId())
	}
	eventually(t, 10*time.Second, "shop's consumer gets all 100 orders", func() bool {
		for _, id := range ids {
			if orders.count(id) == 0 {
				return false
			}
		}
		return true
	})
}
