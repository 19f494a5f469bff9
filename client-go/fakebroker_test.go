package client_test

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/registry/binding"
)

// fakeBroker speaks enough of the broker's side of the protocol to test the
// client over real sockets:
//   - CONN_META: CONN_AUTH status true, or false (and close) for secret "bad";
//   - BINDINGS: BINDINGS_ACK, status false when a binding is invalid or its
//     messageType is "refuse-me";
//   - HEARTBEAT: echoed, unless muted;
//   - a message: MESSAGE_STORE_ACK status true, false when the header has the
//     property "fail", none when it has "drop" (or "drop-first" and the id is
//     new); a committed message goes to one connection of every group whose
//     bindings match it;
//   - TX_ACK and DELIVER_ACK: recorded, or handed to the push that waits for
//     them.
type fakeBroker struct {
	ln   net.Listener
	addr string
	keep bool // record the messages it stores

	mu           sync.Mutex
	closed       bool
	conns        map[*fakeConn]bool
	metas        []*protocol.ConnMeta
	bindingsSeen int
	seen         map[string]int // times a message id was received
	stored       map[string]*protocol.Header
	storedCount  int
	txAcks       []*protocol.TxACKPacket
	deliverAcks  []*protocol.DeliverAck
	muted        bool // no heartbeat echo

	done chan struct{} // closed by Close
	wg   sync.WaitGroup
}

type fakeConn struct {
	fb     *fakeBroker
	nc     net.Conn
	opaque atomic.Uint32

	wmu sync.Mutex
	bw  *bufio.Writer

	// guarded by fb.mu
	group    string
	authed   bool
	bindings []*binding.Binding
	replies  map[uint32]chan *protocol.Packet
}

// startFakeBroker listens on addr ("127.0.0.1:0" for any port). Listening
// on the port of a broker just closed is retried for a while.
func startFakeBroker(tb testing.TB, addr string) *fakeBroker {
	tb.Helper()
	fb, err := newFakeBroker(addr, true)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(fb.Close)
	return fb
}

func newFakeBroker(addr string, keep bool) (*fakeBroker, error) {
	var ln net.Listener
	var err error
	for range 100 {
		if ln, err = net.Listen("tcp", addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		return nil, fmt.Errorf("fake broker: %w", err)
	}
	fb := &fakeBroker{ln: ln, addr: ln.Addr().String(), keep: keep,
		conns: map[*fakeConn]bool{}, stored: map[string]*protocol.Header{}, seen: map[string]int{}, done: make(chan struct{})}
	fb.wg.Add(1)
	go fb.accept()
	return fb, nil
}

// Close closes the listener and every connection, and waits for them.
func (fb *fakeBroker) Close() {
	fb.mu.Lock()
	if !fb.closed {
		close(fb.done)
	}
	fb.closed = true
	fb.ln.Close()
	for fc := range fb.conns {
		fc.nc.Close()
	}
	fb.mu.Unlock()
	fb.wg.Wait()
}

func (fb *fakeBroker) accept() {
	defer fb.wg.Done()
	for {
		nc, err := fb.ln.Accept()
		if err != nil {
			return
		}
		fc := &fakeConn{fb: fb, nc: nc, bw: bufio.NewWriterSize(nc, 64<<10), replies: map[uint32]chan *protocol.Packet{}}
		fc.opaque.Store(1 << 31) // far from the client's opaques
		fb.mu.Lock()
		if fb.closed {
			fb.mu.Unlock()
			nc.Close()
			return
		}
		fb.conns[fc] = true
		fb.wg.Add(1)
		fb.mu.Unlock()
		go fb.serve(fc)
	}
}

func (fb *fakeBroker) serve(fc *fakeConn) {
	defer fb.wg.Done()
	defer func() {
		fb.mu.Lock()
		delete(fb.conns, fc)
		fb.mu.Unlock()
		fc.nc.Close()
	}()
	br := bufio.NewReaderSize(fc.nc, 64<<10)
	rd := protocol.NewReader(br, 0)
	for {
		p, err := rd.ReadPacket()
		if err != nil {
			return
		}
		if !fb.handle(fc, p) {
			fc.flush()
			return
		}
		if br.Buffered() == 0 {
			fc.flush()
		}
	}
}

// handle answers one packet; false closes the connection.
func (fb *fakeBroker) handle(fc *fakeConn, p *protocol.Packet) bool {
	switch p.Cmd {
	case protocol.CmdConnMeta:
		meta := &protocol.ConnMeta{}
		if p.DecodeInto(meta) != nil {
			return false
		}
		ok := meta.GetSecretKey() != "bad"
		fb.mu.Lock()
		fb.metas = append(fb.metas, meta)
		fc.group, fc.authed = meta.GetGroupId(), ok
		fb.mu.Unlock()
		feedback := "welcome"
		if !ok {
			feedback = "bad secret key"
		}
		fc.writePacket(protocol.NewPacket(p.Opaque, protocol.CmdConnAuth, &protocol.ConnAuthAck{Status: new(ok), Feedback: new(feedback)}))
		return ok

	case protocol.CmdBindings:
		req := &protocol.BindingsPacket{}
		if p.DecodeInto(req) != nil {
			return false
		}
		bs, err := binding.FromProto(req.GetBindings())
		for _, b := range bs {
			if b.MessageType == "refuse-me" {
				err = errors.New("binding refused by test")
			}
		}
		feedback := "ok"
		if err != nil {
			feedback = err.Error()
		}
		fb.mu.Lock()
		fb.bindingsSeen++
		if err == nil {
			fc.bindings = bs
		}
		fb.mu.Unlock()
		fc.writePacket(protocol.NewPacket(p.Opaque, protocol.CmdBindingsAck, &protocol.BindingsAck{Status: new(err == nil), Feedback: new(feedback)}))

	case protocol.CmdHeartbeat:
		fb.mu.Lock()
		muted := fb.muted
		fb.mu.Unlock()
		if !muted {
			fc.writeRaw(p.Opaque, p.Cmd, p.Body)
		}

	case protocol.CmdStringMessage, protocol.CmdBytesMessage:
		msg, err := p.Decode()
		if err != nil {
			return false
		}
		h := msg.(protocol.Message).GetHeader()
		status, feedback := true, "stored"
		first := true
		if fb.keep {
			fb.mu.Lock()
			fb.seen[h.GetMessageId()]++
			first = fb.seen[h.GetMessageId()] == 1
			fb.mu.Unlock()
		}
		for _, e := range h.GetProperties() {
			switch e.GetKey() {
			case "drop":
				return true
			case "drop-first":
				if first {
					return true
				}
			case "fail":
				status, feedback = false, "refused by test"
			}
		}
		if status {
			fb.mu.Lock()
			fb.storedCount++
			if fb.keep {
				fb.stored[h.GetMessageId()] = h
			}
			fb.mu.Unlock()
		}
		fc.writePacket(protocol.NewPacket(p.Opaque, protocol.CmdMessageStoreAck,
			&protocol.MessageStoreAck{MessageId: new(h.GetMessageId()), Status: new(status), Feedback: new(feedback)}))
		if status && h.GetCommit() {
			fb.route(p.Cmd, h, p.Body)
		}

	case protocol.CmdTxAck, protocol.CmdDeliverAck:
		fb.mu.Lock()
		ch, waited := fc.replies[p.Opaque]
		delete(fc.replies, p.Opaque)
		if !waited && p.Cmd == protocol.CmdTxAck {
			ack := &protocol.TxACKPacket{}
			if p.DecodeInto(ack) == nil {
				fb.txAcks = append(fb.txAcks, ack)
			}
		}
		fb.mu.Unlock()
		if waited {
			ch <- p
		}
	}
	return true
}

// route delivers a stored message to one connection of every group whose
// bindings match it.
func (fb *fakeBroker) route(cmd protocol.CmdType, h *protocol.Header, body []byte) {
	fb.mu.Lock()
	defer fb.mu.Unlock()
	groups := map[string]bool{}
	for fc := range fb.conns {
		if groups[fc.group] {
			continue
		}
		for _, b := range fc.bindings {
			if b.Matches(h.GetTopic(), h.GetMessageType()) {
				groups[fc.group] = true
				fb.wg.Add(1)
				go func() {
					defer fb.wg.Done()
					if p, err := fb.pushRaw(fc, cmd, body); err == nil {
						ack := &protocol.DeliverAck{}
						if p.DecodeInto(ack) == nil {
							fb.mu.Lock()
							fb.deliverAcks = append(fb.deliverAcks, ack)
							fb.mu.Unlock()
						}
					}
				}()
				break
			}
		}
	}
}

// push sends msg to the client on fc with a fresh opaque and returns the
// client's answer with that opaque (DELIVER_ACK or TX_ACK).
func (fb *fakeBroker) push(fc *fakeConn, cmd protocol.CmdType, msg protocol.Message) (*protocol.Packet, error) {
	body, err := protocol.Marshal(msg)
	if err != nil {
		return nil, err
	}
	return fb.pushRaw(fc, cmd, body)
}

// pushTx sends a TX_ACK check-back for h and returns the client's answer.
func (fb *fakeBroker) pushTx(fc *fakeConn, h *protocol.Header) (*protocol.Packet, uint32, error) {
	body, err := protocol.Marshal(&protocol.TxACKPacket{Header: h, Status: new(int32(0)), Feedback: new("check")})
	if err != nil {
		return nil, 0, err
	}
	return fb.pushRawOpaque(fc, protocol.CmdTxAck, body)
}

func (fb *fakeBroker) pushRaw(fc *fakeConn, cmd protocol.CmdType, body []byte) (*protocol.Packet, error) {
	p, _, err := fb.pushRawOpaque(fc, cmd, body)
	return p, err
}

func (fb *fakeBroker) pushRawOpaque(fc *fakeConn, cmd protocol.CmdType, body []byte) (*protocol.Packet, uint32, error) {
	op := fc.opaque.Add(1)
	ch := make(chan *protocol.Packet, 1)
	fb.mu.Lock()
	fc.replies[op] = ch
	fb.mu.Unlock()
	fc.writeRaw(op, cmd, body)
	fc.flush()
	select {
	case p := <-ch:
		return p, op, nil
	case <-fb.done:
		return nil, op, errors.New("fake broker: closed")
	case <-time.After(5 * time.Second):
		fb.mu.Lock()
		delete(fc.replies, op)
		fb.mu.Unlock()
		return nil, op, errors.New("fake broker: no answer within 5s")
	}
}

// writePacket queues p; call it as fc.writePacket(protocol.NewPacket(…)).
func (fc *fakeConn) writePacket(p *protocol.Packet, err error) {
	if err != nil {
		panic(err) // a bug of the fake broker
	}
	fc.writeRaw(p.Opaque, p.Cmd, p.Body)
}

func (fc *fakeConn) writeRaw(opaque uint32, cmd protocol.CmdType, body []byte) {
	fc.wmu.Lock()
	defer fc.wmu.Unlock()
	fc.bw.Write(protocol.AppendPacket(nil, &protocol.Packet{Opaque: opaque, Cmd: cmd, Body: body}))
}

func (fc *fakeConn) flush() {
	fc.wmu.Lock()
	defer fc.wmu.Unlock()
	fc.bw.Flush()
}

// conn waits for an authenticated connection of group (with bindings when
// withBindings) and returns it.
func (fb *fakeBroker) conn(tb testing.TB, group string, withBindings bool) *fakeConn {
	tb.Helper()
	var found *fakeConn
	waitFor(tb, "a connection of group "+group, func() bool {
		fb.mu.Lock()
		defer fb.mu.Unlock()
		for fc := range fb.conns {
			if fc.authed && fc.group == group && (!withBindings || len(fc.bindings) > 0) {
				found = fc
				return true
			}
		}
		return false
	})
	return found
}

// kick closes every connection but keeps listening.
func (fb *fakeBroker) kick() {
	fb.mu.Lock()
	defer fb.mu.Unlock()
	for fc := range fb.conns {
		fc.nc.Close()
	}
}

func (fb *fakeBroker) seenCount(id string) int {
	fb.mu.Lock()
	defer fb.mu.Unlock()
	return fb.seen[id]
}

func (fb *fakeBroker) connCount() int {
	fb.mu.Lock()
	defer fb.mu.Unlock()
	return len(fb.conns)
}

func (fb *fakeBroker) storedHeader(id string) *protocol.Header {
	fb.mu.Lock()
	defer fb.mu.Unlock()
	return fb.stored[id]
}

func (fb *fakeBroker) setMuted(m bool) {
	fb.mu.Lock()
	fb.muted = m
	fb.mu.Unlock()
}

// waitFor polls cond for up to 5 seconds.
func waitFor(tb testing.TB, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
