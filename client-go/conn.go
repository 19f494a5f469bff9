package client

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kiteq/kiteq/protocol"
)

// broker keeps one connection to one broker address: it dials, handshakes,
// sends heartbeats, and reconnects with backoff until stopped.
type broker struct {
	c      *KiteQClient
	addr   string
	ctx    context.Context
	cancel context.CancelFunc

	cur atomic.Pointer[conn] // the ready connection, or nil

	firstDone chan struct{} // closed after the first connection attempt
	firstErr  error         // its result; read after firstDone
}

func newBroker(c *KiteQClient, addr string) *broker {
	ctx, cancel := context.WithCancel(c.ctx)
	return &broker{c: c, addr: addr, ctx: ctx, cancel: cancel, firstDone: make(chan struct{})}
}

func (b *broker) stop() { b.cancel() }

func (b *broker) run() {
	defer b.c.wg.Done()
	first := true
	report := func(err error) {
		if first {
			first = false
			b.firstErr = err
			close(b.firstDone)
		}
	}
	defer report(ErrClosed)

	var bo backoff
	failures := 0
	for {
		cn, err := b.connect()
		if err != nil {
			report(err)
		}
		if b.ctx.Err() != nil {
			if cn != nil {
				cn.close(ErrClosed)
				cn.wg.Wait()
			}
			return
		}
		if err != nil {
			failures++
			refused := errors.Is(err, ErrAuth) || errors.Is(err, ErrBindingsRefused)
			if failures == 1 || refused {
				b.c.logf("connect to %s failed, retrying in the background: %v", b.addr, err)
			}
			delay := bo.next()
			if refused {
				delay = maxBackoff // a refusal will not go away soon: do not hammer
			}
			if !sleep(b.ctx, delay) {
				return
			}
			continue
		}
		if failures > 0 {
			b.c.logf("connected to %s after %d failed attempts", b.addr, failures)
		}
		failures = 0
		bo.reset()

		b.cur.Store(cn)
		b.c.notifyReady()
		report(nil) // Start returns once the connection can be used
		err = b.serve(cn)
		b.cur.Store(nil)
		cn.close(err)
		cn.wg.Wait()
		if b.ctx.Err() != nil {
			return
		}
		b.c.logf("connection to %s lost, reconnecting: %v", b.addr, cn.err)
		if !sleep(b.ctx, bo.next()) {
			return
		}
	}
}

// monoBase anchors monoNow: durations since it use the monotonic clock, so
// a step of the wall clock neither drops live connections nor keeps dead
// ones.
var monoBase = time.Now()

func monoNow() int64 { return int64(time.Since(monoBase)) }

// serve keeps cn alive with heartbeats until it closes, goes idle for the
// heartbeat timeout, or the broker is stopped.
func (b *broker) serve(cn *conn) error {
	c := b.c
	beat := time.NewTicker(c.hbInterval)
	defer beat.Stop()
	check := time.NewTicker(max(c.hbTimeout/4, time.Millisecond))
	defer check.Stop()
	for {
		select {
		case <-cn.closed:
			return cn.err
		case <-b.ctx.Done():
			return ErrClosed
		case <-check.C:
			if idle := time.Duration(monoNow() - cn.lastRead.Load()); idle > c.hbTimeout {
				return fmt.Errorf("nothing read for %v", idle.Round(time.Millisecond))
			}
		case now := <-beat.C:
			// The echo is not awaited: any packet read refreshes lastRead.
			cn.writeMsg(cn.nextOpaque(), protocol.CmdHeartbeat, &protocol.HeartBeat{Version: new(now.UnixMilli())})
		}
	}
}

// connect dials the broker and completes the handshake: CONN_META and
// CONN_AUTH, then BINDINGS and BINDINGS_ACK if the client has bindings. The
// whole of it is bounded by the send timeout.
func (b *broker) connect() (*conn, error) {
	c := b.c
	ctx, cancel := context.WithTimeout(b.ctx, c.timeout())
	defer cancel()
	var d net.Dialer
	nc, err := d.DialContext(ctx, "tcp", b.addr)
	if err != nil {
		return nil, fmt.Errorf("kiteq: dial %s: %w", b.addr, err)
	}
	cn := newConn(c, b.addr, nc)

	// The handshake runs before the reader and writer goroutines exist.
	deadline, _ := ctx.Deadline()
	nc.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { nc.SetDeadline(time.Unix(1, 0)) })
	auth, err := cn.authenticate()
	if !stop() || err != nil {
		nc.Close()
		switch {
		case b.ctx.Err() != nil:
			err = ErrClosed
		case err == nil:
			err = ctx.Err()
		}
		return nil, fmt.Errorf("kiteq: handshake with %s: %w", b.addr, err)
	}
	nc.SetDeadline(time.Time{})
	if !auth.GetStatus() {
		nc.Close()
		return nil, fmt.Errorf("kiteq: broker %s refused group %q: %w: %s", b.addr, c.groupId, ErrAuth, auth.GetFeedback())
	}
	cn.start()

	if c.bindingsMsg != nil {
		ack := &protocol.BindingsAck{}
		err := cn.roundTrip(ctx, protocol.CmdBindings, c.bindingsMsg, ack)
		if err == nil && !ack.GetStatus() {
			err = fmt.Errorf("%w: %s", ErrBindingsRefused, ack.GetFeedback())
		}
		if err != nil {
			cn.close(err)
			cn.wg.Wait()
			return nil, fmt.Errorf("kiteq: bindings of group %q at %s: %w", c.groupId, b.addr, err)
		}
	}
	return cn, nil
}

// sleep waits d or until ctx ends; it reports whether d passed.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// backoff is 100ms doubling to 5s, each delay jittered by ±25%.
type backoff struct{ n uint }

func (b *backoff) next() time.Duration {
	d := maxBackoff
	if b.n < 16 {
		d = min(minBackoff<<b.n, maxBackoff)
		b.n++
	}
	return d*3/4 + rand.N(d/2)
}

func (b *backoff) reset() { b.n = 0 }

var errConnClosed = errors.New("connection closed")

// conn is one TCP connection to a broker. Packets go out through a write
// buffer that one writer goroutine flushes, so concurrent writers never
// interleave bytes and, under load, many small packets share a syscall.
// A reader goroutine dispatches what comes in.
type conn struct {
	c      *KiteQClient
	addr   string
	nc     net.Conn
	rd     *protocol.Reader
	opaque atomic.Uint32

	lastRead atomic.Int64 // monoNow() of the last read

	wmu  sync.Mutex
	wbuf []byte        // packets waiting for the writer
	wake chan struct{} // the writer has something to flush

	pmu     sync.Mutex
	pending map[uint32]chan *protocol.Packet // requests waiting for their response

	closeOnce sync.Once
	closed    chan struct{}
	isClosed  atomic.Bool
	err       error // why it closed; read after closed

	wg sync.WaitGroup // reader and writer
}

func newConn(c *KiteQClient, addr string, nc net.Conn) *conn {
	cn := &conn{
		c:       c,
		addr:    addr,
		nc:      nc,
		rd:      protocol.NewReader(nc, 0),
		wake:    make(chan struct{}, 1),
		pending: map[uint32]chan *protocol.Packet{},
		closed:  make(chan struct{}),
	}
	cn.lastRead.Store(monoNow())
	return cn
}

func (cn *conn) nextOpaque() uint32 { return cn.opaque.Add(1) }

// authenticate sends CONN_META and reads CONN_AUTH, synchronously.
func (cn *conn) authenticate() (*protocol.ConnAuthAck, error) {
	meta := &protocol.ConnMeta{GroupId: new(cn.c.groupId), SecretKey: new(cn.c.secretKey), WarmingupSec: new(int32(0))}
	pkt, err := protocol.AppendMessage(nil, cn.nextOpaque(), protocol.CmdConnMeta, meta)
	if err != nil {
		return nil, err
	}
	if _, err := cn.nc.Write(pkt); err != nil {
		return nil, err
	}
	p, err := cn.rd.ReadPacket()
	if err != nil {
		return nil, err
	}
	if p.Cmd != protocol.CmdConnAuth {
		return nil, fmt.Errorf("expected %s, got %s", protocol.CmdConnAuth, p.Cmd)
	}
	ack := &protocol.ConnAuthAck{}
	if err := p.DecodeInto(ack); err != nil {
		return nil, err
	}
	cn.lastRead.Store(monoNow())
	return ack, nil
}

func (cn *conn) start() {
	cn.wg.Add(2)
	go cn.readLoop()
	go cn.writeLoop()
}

// close closes the connection once; err says why.
func (cn *conn) close(err error) {
	cn.closeOnce.Do(func() {
		if err == nil {
			err = errConnClosed
		}
		cn.err = err
		cn.isClosed.Store(true)
		close(cn.closed)
		cn.nc.Close()
	})
}

func (cn *conn) readLoop() {
	defer cn.wg.Done()
	c := cn.c
	for {
		p, err := cn.rd.ReadPacket()
		if err != nil {
			cn.close(fmt.Errorf("read: %w", err))
			return
		}
		cn.lastRead.Store(monoNow())
		switch p.Cmd {
		case protocol.CmdMessageStoreAck, protocol.CmdBindingsAck, protocol.CmdHeartbeat:
			cn.complete(p)
		case protocol.CmdStringMessage, protocol.CmdBytesMessage:
			// The client's wait group outlives this reader: its broker loop
			// waits for the reader before it ends.
			c.wg.Add(1)
			go c.deliver(cn, p)
		case protocol.CmdTxAck:
			c.wg.Add(1)
			go c.checkBack(cn, p)
		default:
			c.ignored.Add(1)
		}
	}
}

// maxIdleBuf bounds the write buffer kept between bursts.
const maxIdleBuf = 1 << 20

func (cn *conn) writeLoop() {
	defer cn.wg.Done()
	var spare []byte
	for {
		select {
		case <-cn.wake:
		case <-cn.closed:
			return
		}
		protocol.Gather(cn.queued) // under load, one write for many packets
		cn.wmu.Lock()
		buf := cn.wbuf
		cn.wbuf = spare[:0]
		cn.wmu.Unlock()
		if len(buf) > 0 {
			if _, err := cn.nc.Write(buf); err != nil {
				cn.close(fmt.Errorf("write: %w", err))
				return
			}
		}
		if cap(buf) > maxIdleBuf {
			buf = nil
		}
		spare = buf
	}
}

// queued is the number of bytes waiting for the writer.
func (cn *conn) queued() int {
	cn.wmu.Lock()
	defer cn.wmu.Unlock()
	return len(cn.wbuf)
}

// writeMsg queues one packet. It fails with errConnClosed once the
// connection is closed, or with ErrInvalidMessage when msg cannot be
// encoded.
func (cn *conn) writeMsg(opaque uint32, cmd protocol.CmdType, msg any) error {
	cn.wmu.Lock()
	if cn.isClosed.Load() {
		cn.wmu.Unlock()
		return errConnClosed
	}
	start := len(cn.wbuf)
	out, err := appendMsg(cn.wbuf, opaque, cmd, msg)
	if err == nil && len(out)-start-protocol.HeaderLen > protocol.DefaultMaxBody {
		err = fmt.Errorf("%s body of %d bytes exceeds the limit of %d", cmd, len(out)-start-protocol.HeaderLen, protocol.DefaultMaxBody)
	}
	if err != nil {
		cn.wbuf = out[:start]
		cn.wmu.Unlock()
		return fmt.Errorf("%w: %w", ErrInvalidMessage, err)
	}
	cn.wbuf = out
	cn.wmu.Unlock()
	if start == 0 {
		select {
		case cn.wake <- struct{}{}:
		default:
		}
	}
	return nil
}

// appendMsg encodes msg as a packet. The type switch lets this package
// pass messages to protocol.AppendMessage without importing protobuf.
func appendMsg(dst []byte, opaque uint32, cmd protocol.CmdType, msg any) ([]byte, error) {
	switch m := msg.(type) {
	case protocol.Message:
		return protocol.AppendMessage(dst, opaque, cmd, m)
	case *protocol.DeliverAck:
		return protocol.AppendMessage(dst, opaque, cmd, m)
	case *protocol.TxACKPacket:
		return protocol.AppendMessage(dst, opaque, cmd, m)
	case *protocol.HeartBeat:
		return protocol.AppendMessage(dst, opaque, cmd, m)
	case *protocol.BindingsPacket:
		return protocol.AppendMessage(dst, opaque, cmd, m)
	}
	return dst, fmt.Errorf("cannot encode %T", msg)
}

var chanPool = sync.Pool{New: func() any { return make(chan *protocol.Packet, 1) }}

// register makes ch wait for the response with opaque.
func (cn *conn) register(opaque uint32) chan *protocol.Packet {
	ch := chanPool.Get().(chan *protocol.Packet)
	cn.pmu.Lock()
	cn.pending[opaque] = ch
	cn.pmu.Unlock()
	return ch
}

// complete hands a response to the request waiting for it, if any.
func (cn *conn) complete(p *protocol.Packet) {
	cn.pmu.Lock()
	ch, ok := cn.pending[p.Opaque]
	delete(cn.pending, p.Opaque)
	cn.pmu.Unlock()
	if ok {
		ch <- p // buffered, and complete is its only sender
	}
}

// received returns ch to the pool after its response was received.
func received(ch chan *protocol.Packet) { chanPool.Put(ch) }

// cancel stops waiting for opaque. It returns the response if it came
// meanwhile.
func (cn *conn) cancel(opaque uint32, ch chan *protocol.Packet) *protocol.Packet {
	cn.pmu.Lock()
	_, waiting := cn.pending[opaque]
	delete(cn.pending, opaque)
	cn.pmu.Unlock()
	var p *protocol.Packet
	if !waiting {
		p = <-ch // complete took it and sends at once
	}
	chanPool.Put(ch)
	return p
}

// roundTrip sends req and decodes the response into resp.
func (cn *conn) roundTrip(ctx context.Context, cmd protocol.CmdType, req any, resp interface{ GetStatus() bool }) error {
	op := cn.nextOpaque()
	ch := cn.register(op)
	if err := cn.writeMsg(op, cmd, req); err != nil {
		cn.cancel(op, ch)
		return err
	}
	var p *protocol.Packet
	select {
	case p = <-ch:
		received(ch)
	case <-cn.closed:
		if p = cn.cancel(op, ch); p == nil {
			return cn.err
		}
	case <-ctx.Done():
		if p = cn.cancel(op, ch); p == nil {
			return ctx.Err()
		}
	}
	return decodeResponse(p, resp)
}

// decodeResponse decodes the body of a response packet into one of the
// acks this client waits for.
func decodeResponse(p *protocol.Packet, resp any) error {
	switch r := resp.(type) {
	case *protocol.BindingsAck:
		return p.DecodeInto(r)
	case *protocol.MessageStoreAck:
		return p.DecodeInto(r)
	}
	return fmt.Errorf("cannot decode into %T", resp)
}
