package client_test

import (
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	client "github.com/kiteq/kiteq/client-go"
	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/registry/binding"
)

const (
	producerGroup = "pb-test"
	consumerGroup = "s-test"
)

// listener calls its functions, or acknowledges and errs when they are nil.
type listener struct {
	onMessage func(*protocol.StringMessage) bool
	onCheck   func(*protocol.TxResponse) error
}

func (l *listener) OnMessage(m *protocol.StringMessage) bool {
	if l.onMessage == nil {
		return true
	}
	return l.onMessage(m)
}

func (l *listener) OnMessageCheck(tx *protocol.TxResponse) error {
	if l.onCheck == nil {
		return errors.New("no check function")
	}
	return l.onCheck(tx)
}

type bytesListener struct {
	listener
	onBytes func(*protocol.BytesMessage) bool
}

func (l *bytesListener) OnBytesMessage(m *protocol.BytesMessage) bool { return l.onBytes(m) }

// newClient returns a client of the broker at addr that logs to t and is
// destroyed at the end of the test.
func newClient(tb testing.TB, addr, group, secret string, l client.IListener, topics []string, bs []*binding.Binding) *client.KiteQClient {
	tb.Helper()
	c := client.NewKiteQClient("static://"+addr, group, secret, l)
	c.SetLogger(func(format string, args ...any) { tb.Logf(format, args...) })
	c.SetSendTimeout(3 * time.Second)
	c.SetTopics(topics)
	c.SetBindings(bs)
	tb.Cleanup(c.Destroy)
	return c
}

func startClient(tb testing.TB, addr, group string, l client.IListener, topics []string, bs []*binding.Binding) *client.KiteQClient {
	tb.Helper()
	c := newClient(tb, addr, group, "secret", l, topics, bs)
	if err := c.Start(); err != nil {
		tb.Fatalf("Start: %v", err)
	}
	return c
}

func producer(tb testing.TB, addr string) *client.KiteQClient {
	tb.Helper()
	return startClient(tb, addr, producerGroup, &listener{}, []string{"trade"}, nil)
}

func consumer(tb testing.TB, addr string, l client.IListener) *client.KiteQClient {
	tb.Helper()
	bs := []*binding.Binding{binding.Bind_Direct(consumerGroup, "trade", "pay-succ", 100, true)}
	return startClient(tb, addr, consumerGroup, l, nil, bs)
}

// newHeader returns a complete header; each prop becomes a property key.
func newHeader(topic, messageType string, props ...string) *protocol.Header {
	h := &protocol.Header{
		MessageId:     new(protocol.MessageId()),
		Topic:         new(topic),
		MessageType:   new(messageType),
		ExpiredTime:   new(time.Now().Add(time.Hour).Unix()),
		DeliveryLimit: new(int32(-1)),
		GroupId:       new(producerGroup),
		Commit:        new(true),
		Fly:           new(false),
	}
	for _, p := range props {
		h.Properties = append(h.Properties, &protocol.Entry{Key: new(p), Value: new("1")})
	}
	return h
}

func newMsg(body string, props ...string) *protocol.StringMessage {
	return &protocol.StringMessage{Header: newHeader("trade", "pay-succ", props...), Body: new(body)}
}

func TestHandshakeSendsMetaAndBindings(t *testing.T) {
	fb := startFakeBroker(t, "127.0.0.1:0")
	consumer(t, fb.addr, &listener{})
	fc := fb.conn(t, consumerGroup, true)

	fb.mu.Lock()
	defer fb.mu.Unlock()
	if len(fb.metas) != 1 {
		t.Fatalf("got %d CONN_META, want 1", len(fb.metas))
	}
	m := fb.metas[0]
	if m.GetGroupId() != consumerGroup || m.GetSecretKey() != "secret" || m.WarmingupSec == nil || m.GetWarmingupSec() != 0 {
		t.Errorf("CONN_META = %v", m)
	}
	want := binding.Bind_Direct(consumerGroup, "trade", "pay-succ", 100, true)
	if fb.bindingsSeen != 1 || len(fc.bindings) != 1 || !fc.bindings[0].Equal(want) {
		t.Errorf("broker got %d BINDINGS, bindings %v; want 1, %v", fb.bindingsSeen, fc.bindings, want)
	}
}

func TestStartAuthRefused(t *testing.T) {
	fb := startFakeBroker(t, "127.0.0.1:0")
	c := newClient(t, fb.addr, producerGroup, "bad", nil, []string{"trade"}, nil)
	err := c.Start()
	if !errors.Is(err, client.ErrAuth) || !strings.Contains(err.Error(), "bad secret key") {
		t.Fatalf("Start = %v, want ErrAuth with the broker's feedback", err)
	}
	if err := c.Start(); !errors.Is(err, client.ErrClosed) {
		t.Errorf("Start after a failed Start = %v, want ErrClosed", err)
	}
	if err := c.SendStringMessage(newMsg("x")); !errors.Is(err, client.ErrClosed) {
		t.Errorf("send after a failed Start = %v, want ErrClosed", err)
	}
}

func TestStartBindingsRefused(t *testing.T) {
	fb := startFakeBroker(t, "127.0.0.1:0")
	bs := []*binding.Binding{binding.Bind_Direct(consumerGroup, "trade", "refuse-me", 100, true)}
	c := newClient(t, fb.addr, consumerGroup, "secret", &listener{}, nil, bs)
	if err := c.Start(); !errors.Is(err, client.ErrBindingsRefused) || !strings.Contains(err.Error(), "refused by test") {
		t.Fatalf("Start = %v, want ErrBindingsRefused with the broker's feedback", err)
	}
}

func TestStartErrors(t *testing.T) {
	fb := startFakeBroker(t, "127.0.0.1:0")
	direct := binding.Bind_Direct(consumerGroup, "trade", "pay-succ", 100, true)
	tests := []struct {
		name   string
		uri    string
		topics []string
		bs     []*binding.Binding
		is     error
		says   string
	}{
		{name: "unknown scheme", uri: "ftp://" + fb.addr, topics: []string{"trade"}, says: "unknown scheme"},
		{name: "no hosts", uri: "static://", topics: []string{"trade"}, says: "no hosts"},
		{name: "zk", uri: "zk://127.0.0.1:2181", topics: []string{"trade"}, is: client.ErrRegistryUnavailable, says: "static://"},
		{name: "bare host list is zk", uri: "127.0.0.1:2181", topics: []string{"trade"}, is: client.ErrRegistryUnavailable, says: "ZooKeeper"},
		{name: "nothing to do", uri: "static://" + fb.addr, says: "no topics and no bindings"},
		{name: "empty topic", uri: "static://" + fb.addr, topics: []string{""}, says: "empty topic"},
		{name: "bad regx", uri: "static://" + fb.addr, bs: []*binding.Binding{binding.Bind_Regx(consumerGroup, "trade", "(", 1, true)}, says: "regular expression"},
		{name: "other group", uri: "static://" + fb.addr, bs: []*binding.Binding{binding.Bind_Direct("other", "trade", "x", 1, true)}, says: "not the client's"},
		{name: "nil binding", uri: "static://" + fb.addr, bs: []*binding.Binding{direct, nil}, says: "nil binding"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := client.NewKiteQClient(tt.uri, consumerGroup, "secret", &listener{})
			defer c.Destroy()
			c.SetTopics(tt.topics)
			c.SetBindings(tt.bs)
			err := c.Start()
			if err == nil || tt.is != nil && !errors.Is(err, tt.is) || !strings.Contains(err.Error(), tt.says) {
				t.Fatalf("Start = %v, want an error saying %q", err, tt.says)
			}
		})
	}
	if n := fb.connCount(); n != 0 {
		t.Errorf("a failed Start left %d connections", n)
	}
}

func TestSend(t *testing.T) {
	fb := startFakeBroker(t, "127.0.0.1:0")
	c := producer(t, fb.addr)

	msg := newMsg("hello")
	if err := c.SendStringMessage(msg); err != nil {
		t.Fatalf("SendStringMessage: %v", err)
	}
	if h := fb.storedHeader(msg.Header.GetMessageId()); h == nil || !h.GetCommit() {
		t.Errorf("stored header = %v, want the committed message", h)
	}
	bm := &protocol.BytesMessage{Header: newHeader("trade", "pay-succ"), Body: []byte{0, 1, 2}}
	if err := c.SendBytesMessage(bm); err != nil {
		t.Fatalf("SendBytesMessage: %v", err)
	}
	if fb.storedHeader(bm.Header.GetMessageId()) == nil {
		t.Error("bytes message not stored")
	}
}

func TestSendStoreRefused(t *testing.T) {
	fb := startFakeBroker(t, "127.0.0.1:0")
	c := producer(t, fb.addr)
	msg := newMsg("x", "fail")
	err := c.SendStringMessage(msg)
	var se *client.StoreError
	if !errors.As(err, &se) || se.MessageId != msg.Header.GetMessageId() || se.Feedback != "refused by test" {
		t.Fatalf("send = %v, want *StoreError for %s with the broker's feedback", err, msg.Header.GetMessageId())
	}
	if n := fb.seenCount(msg.Header.GetMessageId()); n != 1 {
		t.Errorf("a refused message was sent %d times, want 1", n)
	}
}

func TestSendTimeout(t *testing.T) {
	fb := startFakeBroker(t, "127.0.0.1:0")
	c := producer(t, fb.addr)
	const timeout = 300 * time.Millisecond
	c.SetSendTimeout(timeout)
	start := time.Now()
	err := c.SendStringMessage(newMsg("x", "drop"))
	elapsed := time.Since(start)
	if !errors.Is(err, client.ErrTimeout) || !strings.Contains(err.Error(), `"trade"`) {
		t.Fatalf("send = %v, want ErrTimeout naming the topic", err)
	}
	if elapsed < timeout || elapsed > timeout+time.Second {
		t.Errorf("send returned after %v, want about %v", elapsed, timeout)
	}
}

func TestSendInvalid(t *testing.T) {
	fb := startFakeBroker(t, "127.0.0.1:0")
	bs := []*binding.Binding{binding.Bind_Direct(producerGroup, "feed", "x", 1, false)}
	c := startClient(t, fb.addr, producerGroup, &listener{}, []string{"trade"}, bs)

	badId := newMsg("x")
	badId.Header.MessageId = new("NOT-AN-ID")
	noFly := newMsg("x")
	noFly.Header.Fly = nil
	noBody := newMsg("x")
	noBody.Body = nil
	tooBig := newMsg(strings.Repeat("x", protocol.DefaultMaxBody+1))
	tests := []struct {
		name string
		msg  *protocol.StringMessage
		is   error
	}{
		{"nil message", nil, client.ErrInvalidMessage},
		{"no header", &protocol.StringMessage{Body: new("x")}, client.ErrInvalidMessage},
		{"bad id", badId, client.ErrInvalidMessage},
		{"empty topic", &protocol.StringMessage{Header: newHeader("", "x"), Body: new("x")}, client.ErrInvalidMessage},
		{"topic not published", &protocol.StringMessage{Header: newHeader("other", "x"), Body: new("x")}, client.ErrUnknownTopic},
		{"topic of a binding only", &protocol.StringMessage{Header: newHeader("feed", "x"), Body: new("x")}, client.ErrUnknownTopic},
		{"missing required field", noFly, client.ErrInvalidMessage},
		{"no body", noBody, client.ErrInvalidMessage},
		{"too large", tooBig, client.ErrInvalidMessage},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := c.SendStringMessage(tt.msg); !errors.Is(err, tt.is) {
				t.Errorf("send = %v, want %v", err, tt.is)
			}
		})
	}
	if err := c.SendStringMessage(newMsg("still fine")); err != nil {
		t.Errorf("send after invalid ones: %v", err)
	}
}

func TestSendBeforeStart(t *testing.T) {
	c := client.NewKiteQClient("static://127.0.0.1:1", producerGroup, "secret", nil)
	defer c.Destroy()
	c.SetTopics([]string{"trade"})
	if err := c.SendStringMessage(newMsg("x")); !errors.Is(err, client.ErrNotStarted) {
		t.Fatalf("send = %v, want ErrNotStarted", err)
	}
}

// freeAddr returns a loopback address where nothing listens.
func freeAddr(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

func TestUnreachableBrokerRetriedInBackground(t *testing.T) {
	addr := freeAddr(t)
	c := newClient(t, addr, producerGroup, "secret", nil, []string{"trade"}, nil)
	if err := c.Start(); err != nil {
		t.Fatalf("Start with an unreachable broker = %v, want nil", err)
	}
	c.SetSendTimeout(200 * time.Millisecond)
	start := time.Now()
	err := c.SendStringMessage(newMsg("x"))
	if !errors.Is(err, client.ErrNoBroker) || !strings.Contains(err.Error(), `"trade"`) {
		t.Fatalf("send = %v, want ErrNoBroker naming the topic", err)
	}
	if elapsed := time.Since(start); elapsed > 2*time.Second {
		t.Errorf("send took %v", elapsed)
	}

	startFakeBroker(t, addr)
	c.SetSendTimeout(5 * time.Second)
	if err := c.SendStringMessage(newMsg("x")); err != nil {
		t.Fatalf("send once the broker is up: %v", err)
	}
}

// pushDelivery pushes a STRING_MESSAGE to the consumer and returns the
// client's DELIVER_ACK.
func pushDelivery(t *testing.T, fb *fakeBroker, fc *fakeConn, cmd protocol.CmdType, msg protocol.Message) *protocol.DeliverAck {
	t.Helper()
	body, err := protocol.Marshal(msg)
	if err != nil {
		t.Fatal(err)
	}
	p, op, err := fb.pushRawOpaque(fc, cmd, body)
	if err != nil {
		t.Fatal(err)
	}
	if p.Cmd != protocol.CmdDeliverAck || p.Opaque != op {
		t.Fatalf("answer %s opaque %d, want DELIVER_ACK opaque %d", p.Cmd, p.Opaque, op)
	}
	ack := &protocol.DeliverAck{}
	if err := p.DecodeInto(ack); err != nil {
		t.Fatal(err)
	}
	return ack
}

func TestDelivery(t *testing.T) {
	tests := []struct {
		name       string
		onMessage  func(*protocol.StringMessage) bool
		wantStatus bool
		feedback   string
	}{
		{"acknowledged", func(*protocol.StringMessage) bool { return true }, true, ""},
		{"refused", func(*protocol.StringMessage) bool { return false }, false, ""},
		{"panic", func(*protocol.StringMessage) bool { panic("boom") }, false, "boom"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fb := startFakeBroker(t, "127.0.0.1:0")
			got := make(chan *protocol.StringMessage, 1)
			consumer(t, fb.addr, &listener{onMessage: func(m *protocol.StringMessage) bool {
				got <- m
				return tt.onMessage(m)
			}})
			fc := fb.conn(t, consumerGroup, true)
			msg := newMsg("hello")
			ack := pushDelivery(t, fb, fc, protocol.CmdStringMessage, msg)
			m := <-got
			if m.GetBody() != "hello" || m.Header.GetMessageId() != msg.Header.GetMessageId() {
				t.Errorf("OnMessage got %v", m)
			}
			if ack.GetMessageId() != msg.Header.GetMessageId() || ack.GetTopic() != "trade" ||
				ack.GetMessageType() != "pay-succ" || ack.GetGroupId() != consumerGroup ||
				ack.GetStatus() != tt.wantStatus || !strings.Contains(ack.GetFeedback(), tt.feedback) {
				t.Errorf("DELIVER_ACK = %v, want status %v feedback %q", ack, tt.wantStatus, tt.feedback)
			}
		})
	}
}

func TestDeliveryDoesNotBlockReader(t *testing.T) {
	fb := startFakeBroker(t, "127.0.0.1:0")
	release := make(chan struct{})
	var calls atomic.Int32
	consumer(t, fb.addr, &listener{onMessage: func(m *protocol.StringMessage) bool {
		if calls.Add(1) == 1 {
			<-release // the first delivery blocks until the second is acknowledged
		}
		return true
	}})
	fc := fb.conn(t, consumerGroup, true)
	slow, _ := protocol.Marshal(newMsg("slow"))
	first := make(chan *protocol.Packet, 1)
	go func() {
		p, _ := fb.pushRaw(fc, protocol.CmdStringMessage, slow)
		first <- p
	}()
	waitFor(t, "the first delivery", func() bool { return calls.Load() == 1 })
	if ack := pushDelivery(t, fb, fc, protocol.CmdStringMessage, newMsg("fast")); !ack.GetStatus() {
		t.Errorf("second delivery: %v", ack)
	}
	close(release)
	ack := &protocol.DeliverAck{}
	if p := <-first; p == nil || p.DecodeInto(ack) != nil || !ack.GetStatus() {
		t.Errorf("first delivery: %v %v", p, ack)
	}
}

func TestBytesDelivery(t *testing.T) {
	fb := startFakeBroker(t, "127.0.0.1:0")
	gotBytes := make(chan []byte, 1)
	gotString := make(chan string, 1)
	consumer(t, fb.addr, &bytesListener{
		listener: listener{onMessage: func(m *protocol.StringMessage) bool { gotString <- m.GetBody(); return true }},
		onBytes:  func(m *protocol.BytesMessage) bool { gotBytes <- m.GetBody(); return true },
	})
	fc := fb.conn(t, consumerGroup, true)
	bm := &protocol.BytesMessage{Header: newHeader("trade", "pay-succ"), Body: []byte("raw")}
	if ack := pushDelivery(t, fb, fc, protocol.CmdBytesMessage, bm); !ack.GetStatus() {
		t.Errorf("DELIVER_ACK = %v", ack)
	}
	if b := <-gotBytes; string(b) != "raw" {
		t.Errorf("OnBytesMessage got %q", b)
	}
	sm := newMsg("text")
	if ack := pushDelivery(t, fb, fc, protocol.CmdStringMessage, sm); !ack.GetStatus() {
		t.Errorf("DELIVER_ACK = %v", ack)
	}
	if s := <-gotString; s != "text" {
		t.Errorf("OnMessage got %q", s)
	}
}

func TestBytesDeliveryFallsBackToOnMessage(t *testing.T) {
	fb := startFakeBroker(t, "127.0.0.1:0")
	got := make(chan string, 1)
	consumer(t, fb.addr, &listener{onMessage: func(m *protocol.StringMessage) bool { got <- m.GetBody(); return true }})
	fc := fb.conn(t, consumerGroup, true)
	bm := &protocol.BytesMessage{Header: newHeader("trade", "pay-succ"), Body: []byte("raw")}
	if ack := pushDelivery(t, fb, fc, protocol.CmdBytesMessage, bm); !ack.GetStatus() || ack.GetMessageId() != bm.Header.GetMessageId() {
		t.Errorf("DELIVER_ACK = %v", ack)
	}
	if s := <-got; s != "raw" {
		t.Errorf("OnMessage got %q, want the bytes as a string", s)
	}
}

// txAck waits for the producer's TX_ACK of id.
func txAck(t *testing.T, fb *fakeBroker, id string) *protocol.TxACKPacket {
	t.Helper()
	var ack *protocol.TxACKPacket
	waitFor(t, "TX_ACK of "+id, func() bool {
		fb.mu.Lock()
		defer fb.mu.Unlock()
		for _, a := range fb.txAcks {
			if a.GetHeader().GetMessageId() == id {
				ack = a
				return true
			}
		}
		return false
	})
	return ack
}

func TestSendTx(t *testing.T) {
	errLocal := errors.New("local transaction failed")
	tests := []struct {
		name    string
		doTx    func() (bool, error)
		status  protocol.TxStatus
		wantErr string
	}{
		{"commit", func() (bool, error) { return true, nil }, protocol.TxCommit, ""},
		{"rollback", func() (bool, error) { return false, nil }, protocol.TxRollback, ""},
		{"error", func() (bool, error) { return true, errLocal }, protocol.TxRollback, "transaction rolled back"},
		{"panic", func() (bool, error) { panic("db gone") }, protocol.TxUnknown, "db gone"},
	}
	fb := startFakeBroker(t, "127.0.0.1:0")
	c := producer(t, fb.addr)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			msg := newMsg("tx")
			id := msg.Header.GetMessageId()
			var ran *protocol.StringMessage
			err := c.SendTxStringMessage(msg, func(m *protocol.StringMessage) (bool, error) {
				ran = m
				if h := fb.storedHeader(id); h == nil || h.GetCommit() {
					t.Errorf("doTx ran before the message was stored uncommitted: %v", h)
				}
				return tt.doTx()
			})
			if tt.wantErr == "" && err != nil || tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)) {
				t.Fatalf("SendTxStringMessage = %v, want error %q", err, tt.wantErr)
			}
			if tt.name == "error" && !errors.Is(err, errLocal) {
				t.Errorf("error %v does not wrap doTx's", err)
			}
			if ran != msg {
				t.Errorf("doTx got %p, want the caller's message %p", ran, msg)
			}
			if !msg.Header.GetCommit() {
				t.Error("the caller's header was changed")
			}
			ack := txAck(t, fb, id)
			if protocol.TxStatus(ack.GetStatus()) != tt.status || ack.GetHeader().GetCommit() {
				t.Errorf("TX_ACK = %v, want status %v and commit=false", ack, tt.status)
			}
		})
	}

	t.Run("bytes", func(t *testing.T) {
		bm := &protocol.BytesMessage{Header: newHeader("trade", "pay-succ"), Body: []byte("tx")}
		if err := c.SendTxBytesMessage(bm, func(*protocol.BytesMessage) (bool, error) { return true, nil }); err != nil {
			t.Fatal(err)
		}
		if ack := txAck(t, fb, bm.Header.GetMessageId()); protocol.TxStatus(ack.GetStatus()) != protocol.TxCommit {
			t.Errorf("TX_ACK = %v", ack)
		}
	})

	t.Run("header of another group", func(t *testing.T) {
		msg := newMsg("tx")
		msg.Header.GroupId = new("someone-else")
		ran := false
		err := c.SendTxStringMessage(msg, func(*protocol.StringMessage) (bool, error) { ran = true; return true, nil })
		if !errors.Is(err, client.ErrInvalidMessage) || !strings.Contains(err.Error(), `"someone-else"`) || ran {
			t.Errorf("SendTx = %v, doTx ran %v; want ErrInvalidMessage naming the group, and no doTx", err, ran)
		}
		if fb.storedHeader(msg.Header.GetMessageId()) != nil {
			t.Error("the message was sent to the broker")
		}
	})

	t.Run("store refused", func(t *testing.T) {
		ran := false
		err := c.SendTxStringMessage(newMsg("tx", "fail"), func(*protocol.StringMessage) (bool, error) { ran = true; return true, nil })
		var se *client.StoreError
		if !errors.As(err, &se) || ran {
			t.Errorf("SendTx = %v, doTx ran %v; want *StoreError and no doTx", err, ran)
		}
	})
}

func TestCheckBack(t *testing.T) {
	fb := startFakeBroker(t, "127.0.0.1:0")
	startClient(t, fb.addr, producerGroup, &listener{onCheck: func(tx *protocol.TxResponse) error {
		switch tx.Header.GetMessageType() {
		case "commit":
			tx.Commit()
		case "rollback":
			tx.Rollback()
		case "error":
			return errors.New("cannot tell")
		case "panic":
			panic("check exploded")
		}
		return nil
	}}, []string{"trade"}, nil)
	fc := fb.conn(t, producerGroup, false)

	tests := []struct {
		decide   string
		status   protocol.TxStatus
		feedback string
	}{
		{"commit", protocol.TxCommit, ""},
		{"rollback", protocol.TxRollback, ""},
		{"undecided", protocol.TxUnknown, ""},
		{"error", protocol.TxUnknown, "cannot tell"},
		{"panic", protocol.TxUnknown, "check exploded"},
	}
	for _, tt := range tests {
		t.Run(tt.decide, func(t *testing.T) {
			h := newHeader("trade", tt.decide)
			h.Commit = new(false)
			p, op, err := fb.pushTx(fc, h)
			if err != nil {
				t.Fatal(err)
			}
			ack := &protocol.TxACKPacket{}
			if p.Cmd != protocol.CmdTxAck || p.Opaque != op || p.DecodeInto(ack) != nil {
				t.Fatalf("answer %s opaque %d, want TX_ACK opaque %d", p.Cmd, p.Opaque, op)
			}
			if protocol.TxStatus(ack.GetStatus()) != tt.status || ack.GetHeader().GetMessageId() != h.GetMessageId() ||
				!strings.Contains(ack.GetFeedback(), tt.feedback) {
				t.Errorf("TX_ACK = %v, want status %v feedback %q", ack, tt.status, tt.feedback)
			}
		})
	}
}

func TestBrokerRestart(t *testing.T) {
	fb := startFakeBroker(t, "127.0.0.1:0")
	bs := []*binding.Binding{binding.Bind_Direct(producerGroup, "trade", "pay-succ", 100, true)}
	c := startClient(t, fb.addr, producerGroup, &listener{}, []string{"trade"}, bs)
	if err := c.SendStringMessage(newMsg("before")); err != nil {
		t.Fatal(err)
	}
	fb.Close()

	fb2 := startFakeBroker(t, fb.addr)
	msg := newMsg("after")
	if err := c.SendStringMessage(msg); err != nil {
		t.Fatalf("send after the restart: %v", err)
	}
	if fb2.storedHeader(msg.Header.GetMessageId()) == nil {
		t.Error("the restarted broker did not store the message")
	}
	fc := fb2.conn(t, producerGroup, true)
	fb2.mu.Lock()
	defer fb2.mu.Unlock()
	if fb2.bindingsSeen != 1 || !fc.bindings[0].Equal(bs[0]) {
		t.Errorf("restarted broker got %d BINDINGS %v, want 1", fb2.bindingsSeen, fc.bindings)
	}
}

func TestSendRetriedAfterConnectionLoss(t *testing.T) {
	fb := startFakeBroker(t, "127.0.0.1:0")
	c := producer(t, fb.addr)
	msg := newMsg("retry", "drop-first")
	id := msg.Header.GetMessageId()
	done := make(chan error, 1)
	go func() { done <- c.SendStringMessage(msg) }()
	waitFor(t, "the first copy", func() bool { return fb.seenCount(id) == 1 })
	fb.kick()
	if err := <-done; err != nil {
		t.Fatalf("send = %v, want it stored after a retry", err)
	}
	if n := fb.seenCount(id); n != 2 || fb.storedHeader(id) == nil {
		t.Errorf("broker saw the message %d times, want 2 with the same id", n)
	}
}

func TestRoundRobinAndFailover(t *testing.T) {
	fb1 := startFakeBroker(t, "127.0.0.1:0")
	fb2 := startFakeBroker(t, "127.0.0.1:0")
	c := startClient(t, fb1.addr+","+fb2.addr, producerGroup, nil, []string{"trade"}, nil)
	for range 20 {
		if err := c.SendStringMessage(newMsg("rr")); err != nil {
			t.Fatal(err)
		}
	}
	fb1.mu.Lock()
	n1 := fb1.storedCount
	fb1.mu.Unlock()
	fb2.mu.Lock()
	n2 := fb2.storedCount
	fb2.mu.Unlock()
	if n1 == 0 || n2 == 0 || n1+n2 != 20 {
		t.Errorf("brokers stored %d and %d messages, want both some of 20", n1, n2)
	}
	fb1.Close()
	for range 10 {
		if err := c.SendStringMessage(newMsg("failover")); err != nil {
			t.Fatalf("send with one broker down: %v", err)
		}
	}
}

func TestDestroyDuringSend(t *testing.T) {
	fb := startFakeBroker(t, "127.0.0.1:0")
	c := producer(t, fb.addr)
	msg := newMsg("pending", "drop")
	done := make(chan error, 1)
	start := time.Now()
	go func() { done <- c.SendStringMessage(msg) }()
	waitFor(t, "the message", func() bool { return fb.seenCount(msg.Header.GetMessageId()) == 1 })
	c.Destroy()
	if err := <-done; !errors.Is(err, client.ErrClosed) {
		t.Fatalf("send = %v, want ErrClosed", err)
	}
	if elapsed := time.Since(start); elapsed > 2*time.Second {
		t.Errorf("send returned after %v, want at Destroy", elapsed)
	}
	c.Destroy() // idempotent
	if err := c.SendStringMessage(newMsg("late")); !errors.Is(err, client.ErrClosed) {
		t.Errorf("send after Destroy = %v, want ErrClosed", err)
	}
}

func TestDestroyWaitsForListener(t *testing.T) {
	fb := startFakeBroker(t, "127.0.0.1:0")
	entered := make(chan struct{})
	var finished atomic.Bool
	c := consumer(t, fb.addr, &listener{onMessage: func(*protocol.StringMessage) bool {
		close(entered)
		time.Sleep(100 * time.Millisecond)
		finished.Store(true)
		return true
	}})
	fc := fb.conn(t, consumerGroup, true)
	body, _ := protocol.Marshal(newMsg("x"))
	fc.writeRaw(1, protocol.CmdStringMessage, body)
	fc.flush()
	<-entered
	c.Destroy()
	if !finished.Load() {
		t.Error("Destroy returned while the listener was running")
	}
}

func TestIdleConnectionReconnects(t *testing.T) {
	fb := startFakeBroker(t, "127.0.0.1:0")
	c := newClient(t, fb.addr, producerGroup, "secret", nil, []string{"trade"}, nil)
	c.SetHeartbeat(30*time.Millisecond, 400*time.Millisecond)
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	metas := func() int {
		fb.mu.Lock()
		defer fb.mu.Unlock()
		return len(fb.metas)
	}
	time.Sleep(600 * time.Millisecond) // heartbeats echoed: the connection stays
	if n := metas(); n != 1 {
		t.Fatalf("%d connections while heartbeats were echoed, want 1", n)
	}
	fb.setMuted(true)
	waitFor(t, "a reconnect of the idle connection", func() bool { return metas() >= 2 })
	fb.setMuted(false)
	if err := c.SendStringMessage(newMsg("x")); err != nil {
		t.Fatal(err)
	}
}

func TestConcurrentSends(t *testing.T) {
	fb := startFakeBroker(t, "127.0.0.1:0")
	c := producer(t, fb.addr)
	const workers, each = 16, 50
	var wg sync.WaitGroup
	errs := make(chan error, workers*each)
	for range workers {
		wg.Go(func() {
			for range each {
				if err := c.SendStringMessage(newMsg("c")); err != nil {
					errs <- err
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	fb.mu.Lock()
	defer fb.mu.Unlock()
	if fb.storedCount != workers*each {
		t.Errorf("stored %d, want %d", fb.storedCount, workers*each)
	}
}

func TestDestroyWithoutStart(t *testing.T) {
	c := client.NewKiteQClient("static://127.0.0.1:1", producerGroup, "secret", nil)
	c.Destroy()
	c.Destroy()
	c.SetTopics([]string{"trade"})
	if err := c.Start(); !errors.Is(err, client.ErrClosed) {
		t.Errorf("Start after Destroy = %v, want ErrClosed", err)
	}
}

func TestStoreErrorMessage(t *testing.T) {
	err := error(&client.StoreError{MessageId: "abc", Feedback: "full"})
	if got := fmt.Sprint(err); !strings.Contains(got, "abc") || !strings.Contains(got, "full") {
		t.Errorf("StoreError = %q", got)
	}
}
