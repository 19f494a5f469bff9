package broker

import (
	"context"
	"net"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"google.golang.org/protobuf/proto"

	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/registry/static"
	"github.com/kiteq/kiteq/storage"
	"github.com/kiteq/kiteq/storage/memory"
)

// testBroker is a broker on 127.0.0.1:0 over the memory store.
type testBroker struct {
	*Server
	store *memory.Store
}

func startBroker(t *testing.T, mutate func(*Options)) *testBroker {
	t.Helper()
	o := DefaultOptions()
	o.Auth = AuthOpen // loopback tests
	o.Bind = "127.0.0.1:0"
	o.PPort = 0
	o.RetrySchedule = []time.Duration{50 * time.Millisecond, 100 * time.Millisecond, 200 * time.Millisecond}
	o.DeliverTimeout = time.Second
	if mutate != nil {
		mutate(&o)
	}
	store := memory.New(10000)
	reg, err := static.NewServer("")
	if err != nil {
		t.Fatal(err)
	}
	log := zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel))
	s, err := New(o, store, reg, log)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := s.Stop(ctx); err != nil {
			t.Errorf("stop: %v", err)
		}
		store.Close()
	})
	return &testBroker{Server: s, store: store}
}

// testConn is a raw protocol connection with send/expect helpers.
type testConn struct {
	t      *testing.T
	conn   net.Conn
	r      *protocol.Reader
	opaque uint32
}

func dial(t *testing.T, addr string) *testConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &testConn{t: t, conn: c, r: protocol.NewReader(c, 0)}
}

// connect dials and completes the handshake as groupId.
func connect(t *testing.T, addr, groupId string) *testConn {
	t.Helper()
	c := dial(t, addr)
	ack := c.handshake(groupId, "secret")
	if !ack.GetStatus() {
		t.Fatalf("handshake refused: %s", ack.GetFeedback())
	}
	return c
}

func (c *testConn) handshake(groupId, secret string) *protocol.ConnAuthAck {
	c.t.Helper()
	op := c.send(protocol.CmdConnMeta, &protocol.ConnMeta{GroupId: &groupId, SecretKey: &secret})
	p := c.expect(protocol.CmdConnAuth)
	if p.Opaque != op {
		c.t.Fatalf("CONN_AUTH opaque %d, want %d", p.Opaque, op)
	}
	var ack protocol.ConnAuthAck
	c.decode(p, &ack)
	return &ack
}

func (c *testConn) send(cmd protocol.CmdType, msg proto.Message) uint32 {
	c.t.Helper()
	c.opaque++
	return c.sendOpaque(c.opaque, cmd, msg)
}

func (c *testConn) sendOpaque(opaque uint32, cmd protocol.CmdType, msg proto.Message) uint32 {
	c.t.Helper()
	b, err := protocol.AppendMessage(nil, opaque, cmd, msg)
	if err != nil {
		c.t.Fatal(err)
	}
	c.write(b)
	return opaque
}

func (c *testConn) write(b []byte) {
	c.t.Helper()
	c.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.conn.Write(b); err != nil {
		c.t.Fatal(err)
	}
}

// read returns the next packet, or nil after timeout.
func (c *testConn) read(timeout time.Duration) (*protocol.Packet, error) {
	c.conn.SetReadDeadline(time.Now().Add(timeout))
	return c.r.ReadPacket()
}

// expect reads packets until one of cmd arrives, answering heartbeats.
func (c *testConn) expect(cmd protocol.CmdType) *protocol.Packet {
	c.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		p, err := c.read(time.Until(deadline))
		if err != nil {
			c.t.Fatalf("waiting for %s: %v", cmd, err)
		}
		if p.Cmd == cmd {
			return p
		}
		c.t.Fatalf("got %s, want %s", p.Cmd, cmd)
	}
	c.t.Fatalf("no %s within 5s", cmd)
	return nil
}

// expectNothing checks that nothing arrives for d.
func (c *testConn) expectNothing(d time.Duration) {
	c.t.Helper()
	p, err := c.read(d)
	if err == nil {
		c.t.Fatalf("got %s (opaque %d), want nothing", p.Cmd, p.Opaque)
	}
}

func (c *testConn) decode(p *protocol.Packet, msg proto.Message) {
	c.t.Helper()
	if err := p.DecodeInto(msg); err != nil {
		c.t.Fatal(err)
	}
}

// publish sends a message and returns its store-ack.
func (c *testConn) publish(msg protocol.Message) *protocol.MessageStoreAck {
	c.t.Helper()
	op := c.send(protocol.MessageCmd(msg), msg)
	p := c.expect(protocol.CmdMessageStoreAck)
	if p.Opaque != op {
		c.t.Fatalf("store-ack opaque %d, want %d", p.Opaque, op)
	}
	var ack protocol.MessageStoreAck
	c.decode(p, &ack)
	return &ack
}

// bind sends the bindings of groupId and checks the ack.
func (c *testConn) bind(groupId string, bs ...*protocol.Binding) {
	c.t.Helper()
	op := c.send(protocol.CmdBindings, &protocol.BindingsPacket{GroupId: &groupId, Bindings: bs})
	p := c.expect(protocol.CmdBindingsAck)
	var ack protocol.BindingsAck
	c.decode(p, &ack)
	if p.Opaque != op || !ack.GetStatus() {
		c.t.Fatalf("bindings refused: %s", ack.GetFeedback())
	}
}

// receive waits for a delivery and returns its opaque and message.
func (c *testConn) receive() (uint32, *protocol.StringMessage) {
	c.t.Helper()
	p := c.expect(protocol.CmdStringMessage)
	var m protocol.StringMessage
	c.decode(p, &m)
	return p.Opaque, &m
}

func (c *testConn) ack(opaque uint32, m *protocol.StringMessage, group string, ok bool) {
	c.t.Helper()
	h := m.GetHeader()
	c.sendOpaque(opaque, protocol.CmdDeliverAck, &protocol.DeliverAck{
		MessageId: h.MessageId, Topic: h.Topic, MessageType: h.MessageType,
		GroupId: &group, Status: &ok,
	})
}

func bindDirect(group, topic, messageType string, watermark int32, persistent bool) *protocol.Binding {
	return &protocol.Binding{GroupId: &group, Topic: &topic, MessageType: &messageType,
		BindType: proto.Int32(protocol.BindDirect), Watermark: &watermark, Persistent: &persistent}
}

func newMessage(topic, messageType, body string) *protocol.StringMessage {
	return &protocol.StringMessage{
		Header: &protocol.Header{
			MessageId: proto.String(protocol.MessageId()), Topic: &topic, MessageType: &messageType,
			ExpiredTime: proto.Int64(time.Now().Add(time.Hour).Unix()), DeliveryLimit: proto.Int32(-1),
			GroupId: proto.String("p"), Commit: proto.Bool(true), Fly: proto.Bool(false),
		},
		Body: &body,
	}
}

// eventually polls cond until it holds or 5 s pass.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting: %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func storeCount(t *testing.T, s storage.Store) int {
	t.Helper()
	ms, err := s.Due(context.Background(), storage.DueQuery{Kind: storage.DueDelivery, Before: time.Now().Add(100 * 365 * 24 * time.Hour), Limit: 100000})
	if err != nil {
		t.Fatal(err)
	}
	tx, err := s.Due(context.Background(), storage.DueQuery{Kind: storage.DueTxCheck, Before: time.Now().Add(100 * 365 * 24 * time.Hour), Limit: 100000})
	if err != nil {
		t.Fatal(err)
	}
	return len(ms) + len(tx)
}
