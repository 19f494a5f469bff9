package broker

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"google.golang.org/protobuf/proto"

	"github.com/kiteq/kiteq/protocol"
)

// session is one client connection. Its reader goroutine decodes packets
// and hands them to the server; its outbox writes everything the broker
// sends. The reader never waits for the store or for a consumer: stores run
// in their own goroutines and deliveries are tracked by opaque.
type session struct {
	srv    *Server
	conn   net.Conn
	remote string
	log    *zap.Logger
	out    *outbox

	groupId string     // set once by the handshake
	perms   *groupAuth // what the group may do; set with groupId
	group   *group

	opaque   atomic.Uint32
	pubSlots chan struct{} // bounds publishes being stored at once
	refusals logLimiter    // lines the client can repeat (logRepeated)

	mu       sync.Mutex // guards inflight, closed and saving
	inflight map[uint32]*inflightDelivery
	closed   bool
	saving   map[string]chan struct{} // saves in progress, by message id
}

type inflightDelivery struct {
	d        *delivery
	deadline time.Time
}

// errClientClosed ends a session quietly: the client closed its end.
var errClientClosed = errors.New("closed by client")

// fatalError is a protocol violation: the session logs it and closes.
type fatalError struct{ reason string }

func (e *fatalError) Error() string { return e.reason }

func fatalf(format string, args ...any) error {
	return &fatalError{reason: fmt.Sprintf(format, args...)}
}

func newSession(srv *Server, conn net.Conn) *session {
	remote := conn.RemoteAddr().String()
	return &session{
		srv: srv, conn: conn, remote: remote,
		log:      srv.log.With(zap.String("remote", remote)),
		out:      newOutbox(conn, srv.opts.WriteTimeout),
		pubSlots: make(chan struct{}, srv.opts.MaxPendingPublishes),
		inflight: make(map[uint32]*inflightDelivery),
		saving:   make(map[string]chan struct{}),
	}
}

// startSave records that the message id is being saved; endSave ends it.
func (s *session) startSave(id string) chan struct{} {
	ch := make(chan struct{})
	s.mu.Lock()
	s.saving[id] = ch
	s.mu.Unlock()
	return ch
}

func (s *session) endSave(id string, ch chan struct{}) {
	s.mu.Lock()
	if s.saving[id] == ch {
		delete(s.saving, id)
	}
	s.mu.Unlock()
	close(ch)
}

// pendingSave returns a channel closed when the save of id that this
// session started ends, or nil when none runs.
func (s *session) pendingSave(id string) chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.saving[id]
}

// serve runs the session until the connection ends.
func (s *session) serve() {
	go s.out.run()
	err := s.readLoop()
	s.close(err)
}

func (s *session) readLoop() error {
	opts := s.srv.opts
	r := protocol.NewReader(s.conn, opts.MaxBody)

	s.conn.SetReadDeadline(time.Now().Add(opts.HandshakeTimeout))
	if s.srv.stopping.Load() { // after our deadline: Stop's past one wins
		return errServerStopping
	}
	p, err := r.ReadPacket()
	if err != nil {
		return s.readError(err, "before CONN_META")
	}
	if s.srv.stopping.Load() {
		return errServerStopping
	}
	if err := s.srv.handshake(s, p); err != nil {
		return err
	}

	lastDeadline := time.Time{}
	for {
		// Refreshing the deadline costs a timer update: do it at most once
		// a second.
		if now := time.Now(); now.Sub(lastDeadline) > time.Second {
			s.conn.SetReadDeadline(now.Add(opts.IdleTimeout))
			lastDeadline = now
		}
		// Stop sets stopping, then a past deadline. Checked after our
		// SetReadDeadline, so a deadline we set never outlives Stop's.
		if s.srv.stopping.Load() {
			return errServerStopping
		}
		// Each packet is decoded before the next is read: its memory is
		// reused.
		p, err := r.ReadReused()
		if err != nil {
			return s.readError(err, "")
		}
		if err := s.srv.handle(s, p); err != nil {
			return err
		}
	}
}

// readError turns a read failure into the reason the session ends.
func (s *session) readError(err error, when string) error {
	var fe *protocol.FrameError
	switch {
	case errors.Is(err, io.EOF):
		if when != "" {
			return fatalf("closed by client %s", when)
		}
		return errClientClosed
	case errors.As(err, &fe):
		return fatalf("bad frame: %v", fe)
	case errors.Is(err, os.ErrDeadlineExceeded):
		if s.srv.stopping.Load() {
			return errServerStopping
		}
		if when != "" {
			return fatalf("no CONN_META within %s", s.srv.opts.HandshakeTimeout)
		}
		return fatalf("idle for %s", s.srv.opts.IdleTimeout)
	case errors.Is(err, net.ErrClosed):
		return errServerStopping
	}
	return fatalf("read: %v", err)
}

// send queues a packet for the writer. It reports false when the session is
// closing.
func (s *session) send(opaque uint32, cmd protocol.CmdType, msg proto.Message) bool {
	buf := getBuf()
	b, err := protocol.AppendMessage(buf.b[:0], opaque, cmd, msg)
	if err != nil {
		putBuf(buf)
		s.log.Error("cannot encode packet", zap.Stringer("cmd", cmd), zap.Error(err))
		return false
	}
	ok := s.out.append(b)
	buf.b = b
	putBuf(buf)
	return ok
}

// deliver sends d to this session's consumer and waits for the
// DELIVER_ACK by opaque. It reports false when the session is closed.
func (s *session) deliver(d *delivery) bool {
	opaque := s.opaque.Add(1)
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return false
	}
	s.inflight[opaque] = &inflightDelivery{d: d, deadline: s.srv.engine.now().Add(s.srv.opts.DeliverTimeout)}
	s.mu.Unlock()
	if !s.send(opaque, d.f.msg.Cmd, d.f.msg.Protocol()) {
		s.mu.Lock()
		_, mine := s.inflight[opaque]
		delete(s.inflight, opaque)
		s.mu.Unlock()
		// When close took it first, close requeues it. Otherwise the
		// writer is gone: leave the group now, or the requeue in
		// group.send picks this session again, and again.
		if mine {
			d.g.removeSession(s)
		}
		return !mine
	}
	s.srv.stats.Delivered.Add(1)
	return true
}

// isClosed reports whether the session has closed.
func (s *session) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// takeDelivery removes and returns the delivery waiting for opaque.
func (s *session) takeDelivery(opaque uint32) *delivery {
	s.mu.Lock()
	defer s.mu.Unlock()
	in := s.inflight[opaque]
	if in == nil {
		return nil
	}
	delete(s.inflight, opaque)
	return in.d
}

// expired removes and returns the deliveries past their deadline.
func (s *session) expired(now time.Time) []*delivery {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []*delivery
	for opaque, in := range s.inflight {
		if now.After(in.deadline) {
			out = append(out, in.d)
			delete(s.inflight, opaque)
		}
	}
	return out
}

// close ends the session: it leaves its group first, so that no new
// delivery picks it, then hands its unacknowledged deliveries to the
// group's other consumers at once.
func (s *session) close(reason error) {
	var fe *fatalError
	switch {
	case errors.As(reason, &fe):
		// s.log names the group (clipped) once the handshake is done.
		s.log.Warn("closing connection", zap.String("reason", clipTo(fe.reason, feedbackClipBytes)))
	case errors.Is(reason, errServerStopping):
	default:
		s.log.Debug("connection closed", zap.Error(reason))
	}
	if n, last := s.refusals.pending(); n > 0 {
		s.log.Info("connection closed with lines not logged (one a second past the first ones)",
			zap.Int64("notLogged", n), zap.String("lastReason", last))
	}
	if s.group != nil {
		s.group.removeSession(s)
	}
	s.mu.Lock()
	s.closed = true
	lost := make(map[*group][]*delivery)
	for _, in := range s.inflight {
		lost[in.d.g] = append(lost[in.d.g], in.d)
	}
	s.inflight = nil
	s.mu.Unlock()
	for g, ds := range lost {
		s.srv.stats.Redirected.Add(int64(len(ds)))
		g.requeue(ds)
	}
	// Stores in progress still answer their producers before the
	// connection closes.
	for range cap(s.pubSlots) {
		s.pubSlots <- struct{}{}
	}
	s.out.close()
	s.out.wait(time.After(s.srv.opts.WriteTimeout))
	s.conn.Close()
	s.srv.removeSession(s)
}

// bufPool recycles encode buffers.
type pooledBuf struct{ b []byte }

var bufPool = sync.Pool{New: func() any { return &pooledBuf{b: make([]byte, 0, 1024)} }}

func getBuf() *pooledBuf { return bufPool.Get().(*pooledBuf) }

func putBuf(p *pooledBuf) {
	if cap(p.b) <= 64<<10 {
		bufPool.Put(p)
	}
}
