// Package broker is the KiteQ broker: it accepts producers and consumers
// over TCP, stores what producers publish, and delivers every committed
// message to each consumer group whose binding matches it, until the group
// acknowledges it.
package broker

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"google.golang.org/protobuf/proto"

	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/registry"
	"github.com/kiteq/kiteq/registry/binding"
	"github.com/kiteq/kiteq/storage"
)

var errServerStopping = errors.New("broker stopping")

// Server is a broker.
type Server struct {
	opts      Options
	log       *zap.Logger
	store     storage.Store
	reg       registry.Server
	auth      *authorizer
	stats     Stats
	engine    *engine
	txcheck   *txChecker
	decisions decisionLocks // txcheck.go

	ln       net.Listener
	http     *http.Server
	stopping atomic.Bool

	// pendingBytes counts the bytes of publishes waiting for the store.
	pendingBytes atomic.Int64

	mu       sync.Mutex
	sessions map[*session]struct{}

	// loops counts the accept loop, the sweeper, the admin server and the
	// sessions. A session ends only after each of its publishes has been
	// stored and answered.
	loops     sync.WaitGroup
	stopLoops chan struct{}
}

// New returns a broker over store and reg. It does not listen until Start.
func New(opts Options, store storage.Store, reg registry.Server, log *zap.Logger) (*Server, error) {
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	auth, err := newAuthorizer(opts)
	if err != nil {
		return nil, err
	}
	s := &Server{
		opts: opts, log: log, store: store, reg: reg, auth: auth,
		sessions:  make(map[*session]struct{}),
		stopLoops: make(chan struct{}),
	}
	s.engine = newEngine(log, store, opts, &s.stats)
	s.txcheck = newTxChecker(s)
	return s, nil
}

// Start listens on Options.Bind (and the admin port), loads the bindings
// the registry has, and delivers again what the store holds.
func (s *Server) Start(ctx context.Context) error {
	topics := s.opts.Topics
	s.reg.WatchBindings(func(topic string, bs []*binding.Binding) {
		if s.serves(topic) {
			s.engine.updateRoutes(topic, s.permitted(topic, bs))
		}
	})
	for _, t := range topics {
		s.engine.updateRoutes(t, s.permitted(t, s.reg.Bindings(t)))
	}

	ln, err := net.Listen("tcp", s.opts.Bind)
	if err != nil {
		return fmt.Errorf("broker: listen: %w", err)
	}
	s.ln = ln
	if s.opts.PPort > 0 {
		if err := s.startAdmin(); err != nil {
			ln.Close()
			return err
		}
	}
	if err := s.reg.PublishServer(ctx, s.Addr(), topics); err != nil {
		s.closeListeners()
		return fmt.Errorf("broker: register: %w", err)
	}
	s.engine.startScan() // delivers what the store holds, as memory allows
	s.loops.Add(3)
	go s.acceptLoop()
	go s.sweepLoop()
	go func() {
		defer s.loops.Done()
		s.txcheck.run(s.stopLoops, min(max(s.opts.TxCheckDelay/4, 10*time.Millisecond), 250*time.Millisecond))
	}()
	s.log.Info("broker started", zap.String("addr", s.Addr()), zap.Strings("topics", topics),
		zap.String("auth", s.auth.describe()))
	if s.auth.open {
		s.log.Warn("-auth=open: any client may connect as any group; for production list the groups in -auth-file")
	}
	return nil
}

// Addr is the address clients connect to.
func (s *Server) Addr() string { return s.ln.Addr().String() }

// Stats returns the broker's counters.
func (s *Server) Stats() StatsSnapshot {
	st := s.stats.snapshot()
	n, bytes := s.engine.inMemory()
	st.InFlight, st.DeliveryBytes = int64(n), bytes
	return st
}

// Stop stops accepting connections and reading packets, waits until every
// publish being stored has been answered, closes the connections and waits
// for the store calls it started. It does not close the store.
func (s *Server) Stop(ctx context.Context) error {
	if s.stopping.Swap(true) {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, s.opts.ShutdownTimeout)
	defer cancel()
	if s.http != nil {
		// Admin requests in progress (a put back) finish before the
		// engine stops.
		if err := s.http.Shutdown(ctx); err != nil {
			s.log.Warn("admin server shutdown", zap.Error(err))
		}
	}
	s.closeListeners()
	if err := s.reg.UnpublishServer(ctx, s.Addr(), s.opts.Topics); err != nil {
		s.log.Warn("unregister", zap.Error(err))
	}
	// Wake every reader: it sees the deadline and ends without reading more.
	s.mu.Lock()
	for sess := range s.sessions {
		sess.conn.SetReadDeadline(time.Now())
	}
	s.mu.Unlock()

	done := make(chan struct{})
	go func() {
		s.loops.Wait()
		close(done)
	}()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		err = fmt.Errorf("broker: stop: %w", ctx.Err())
		s.mu.Lock()
		for sess := range s.sessions {
			sess.conn.Close()
		}
		s.mu.Unlock()
		<-done
	}
	s.engine.stop()
	st := s.Stats()
	s.log.Info("broker stopped", zap.Int64("published", st.Published), zap.Int64("delivered", st.Delivered),
		zap.Int64("inFlight", st.InFlight))
	return err
}

func (s *Server) closeListeners() {
	if s.ln != nil {
		s.ln.Close()
	}
	if s.http != nil {
		s.http.Close()
	}
	select {
	case <-s.stopLoops:
	default:
		close(s.stopLoops)
	}
}

func (s *Server) acceptLoop() {
	defer s.loops.Done()
	var delay time.Duration
	for {
		conn, err := s.ln.Accept()
		if err != nil {
			if s.stopping.Load() || errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors and the like: back off, keep serving.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			s.log.Error("accept", zap.Error(err), zap.Duration("retryIn", delay))
			time.Sleep(delay)
			continue
		}
		delay = 0
		if tc, ok := conn.(*net.TCPConn); ok {
			tc.SetNoDelay(true)
		}
		sess := newSession(s, conn)
		s.mu.Lock()
		if s.stopping.Load() {
			s.mu.Unlock()
			conn.Close()
			return
		}
		s.sessions[sess] = struct{}{}
		s.loops.Add(1)
		s.mu.Unlock()
		s.stats.Connections.Add(1)
		go sess.serve()
	}
}

func (s *Server) removeSession(sess *session) {
	s.mu.Lock()
	_, ok := s.sessions[sess]
	delete(s.sessions, sess)
	s.mu.Unlock()
	if ok {
		s.stats.Connections.Add(-1)
		s.loops.Done()
	}
}

// sweepLoop fails deliveries whose DELIVER_ACK did not come in time.
func (s *Server) sweepLoop() {
	defer s.loops.Done()
	every := min(s.opts.DeliverTimeout/4, 250*time.Millisecond)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-s.stopLoops:
			return
		case <-t.C:
			now := s.engine.now()
			s.engine.workers.trim(time.Now())
			s.mu.Lock()
			sessions := make([]*session, 0, len(s.sessions))
			for sess := range s.sessions {
				sessions = append(sessions, sess)
			}
			s.mu.Unlock()
			s.engine.expireQueued(now)
			for _, sess := range sessions {
				for _, d := range sess.expired(now) {
					s.stats.DeliverTimeouts.Add(1)
					d.g.done()
					d.f.groupResult(d, resultFailed, "no DELIVER_ACK within "+s.opts.DeliverTimeout.String())
				}
			}
		}
	}
}

// serves reports whether this broker accepts messages of topic.
func (s *Server) serves(topic string) bool {
	return len(s.opts.Topics) == 0 || slices.Contains(s.opts.Topics, topic)
}

// handshake checks the first packet of a connection: CONN_META with a
// known secret.
func (s *Server) handshake(sess *session, p *protocol.Packet) error {
	if p.Cmd != protocol.CmdConnMeta {
		return fatalf("first packet is %s, want CONN_META", p.Cmd)
	}
	var meta protocol.ConnMeta
	if err := p.DecodeInto(&meta); err != nil {
		return fatalf("bad CONN_META: %v", err)
	}
	group := meta.GetGroupId()
	perms, feedback, why := s.auth.authenticate(group, meta.GetSecretKey())
	if perms == nil {
		s.stats.Denied.Add(1)
		sess.send(p.Opaque, protocol.CmdConnAuth, &protocol.ConnAuthAck{Status: ptr(false), Feedback: &feedback})
		return fatalf("authentication failed for group %q: %s", clipForLog(group), why)
	}
	sess.groupId = group
	sess.perms = perms
	sess.log = sess.log.With(zap.String("group", clipForLog(group)))
	sess.send(p.Opaque, protocol.CmdConnAuth, &protocol.ConnAuthAck{Status: ptr(true), Feedback: ptr("ok")})
	sess.group = s.engine.group(group)
	sess.group.addSession(sess)
	sess.log.Debug("connection authenticated")
	return nil
}

// handle runs one packet of an authenticated connection. An error closes
// the connection.
func (s *Server) handle(sess *session, p *protocol.Packet) error {
	switch p.Cmd {
	case protocol.CmdHeartbeat:
		sess.out.append(p.Encode())
		return nil
	case protocol.CmdStringMessage, protocol.CmdBytesMessage:
		return s.publish(sess, p)
	case protocol.CmdDeliverAck:
		return s.deliverAck(sess, p)
	case protocol.CmdTxAck:
		return s.txAck(sess, p)
	case protocol.CmdBindings:
		return s.bindings(sess, p)
	}
	return fatalf("unexpected %s from a client", p.Cmd)
}

// publish validates and stores a message, then answers MESSAGE_STORE_ACK.
// The store runs in its own goroutine, so the connection keeps reading.
func (s *Server) publish(sess *session, p *protocol.Packet) error {
	s.stats.Published.Add(1)
	var msg protocol.Message
	if p.Cmd == protocol.CmdStringMessage {
		msg = &protocol.StringMessage{}
	} else {
		msg = &protocol.BytesMessage{}
	}
	if err := p.DecodeInto(msg); err != nil {
		// The frame is intact, so the stream is too: refuse this message
		// and keep the connection.
		s.storeAck(sess, p.Opaque, "", false, "malformed message: "+err.Error())
		return nil
	}
	h := msg.GetHeader()
	now := s.engine.now()
	if reason := s.validate(h, now); reason != "" {
		s.storeAck(sess, p.Opaque, h.GetMessageId(), false, reason)
		return nil
	}
	if !sess.perms.pub.allows(h.GetTopic()) {
		s.stats.Denied.Add(1)
		s.storeAck(sess, p.Opaque, h.GetMessageId(), false, fmt.Sprintf(
			"permission denied: group %q may not publish to topic %q (its pub= in the auth file: %s)",
			clipForLog(sess.groupId), clipForLog(h.GetTopic()), sess.perms.pub))
		return nil
	}
	// Before createTime is filled in: a retry that left it out is the
	// same message.
	digest := storage.Digest(sess.groupId, msg)
	if !h.GetCommit() && h.GetGroupId() != sess.groupId {
		s.storeAck(sess, p.Opaque, h.GetMessageId(), false, fmt.Sprintf(
			"an uncommitted message's header groupId %q must be the producer's group %q: that group is asked for the decision",
			clipForLog(h.GetGroupId()), clipForLog(sess.groupId)))
		return nil
	}
	// A consumer may trust the header's groupId as the producer's: it is
	// the connection's, whatever the producer wrote (v1 producers write
	// their own).
	h.GroupId = &sess.groupId
	if !hasCreateTime(h) { // none, or 0 (validateTimes)
		h.CreateTime = ptr(now.Unix())
	}
	n := proto.Size(msg)
	if n > s.opts.MaxBody {
		s.storeAck(sess, p.Opaque, h.GetMessageId(), false,
			fmt.Sprintf("message of %d bytes (with createTime) is over the %d-byte limit", n, s.opts.MaxBody))
		return nil
	}
	m := storage.NewMessage(msg, now)
	m.Digest = digest
	if !m.Committed {
		m.NextDeliverTime = now.Add(s.opts.TxCheckDelay) // the first check
	} else if at := deliverAt(h); at.After(now) {
		m.NextDeliverTime = at // held until then, across restarts too
	}
	if h.GetFly() {
		s.storeAck(sess, p.Opaque, h.GetMessageId(), true, "fly: not stored")
		s.engine.dispatch(m, true, false)
		return nil
	}

	size := int64(n)
	if pending := s.pendingBytes.Add(size); pending > s.opts.MaxPendingBytes {
		s.pendingBytes.Add(-size)
		s.stats.Overloaded.Add(1)
		s.storeAck(sess, p.Opaque, m.ID(), false, fmt.Sprintf(
			"overload: %d bytes of publishes are waiting for the store, the most this broker holds (-max-pending-bytes); retry later",
			pending-size))
		return nil
	}
	sess.pubSlots <- struct{}{}
	var saved chan struct{}
	if !m.Committed {
		saved = sess.startSave(m.ID()) // its decision waits for it (txAck)
	}
	// A committed message is claimed before it is saved: the scanner,
	// which may read it as soon as it is stored, leaves it to this
	// dispatch.
	claimed := m.Committed && s.engine.claim(m.ID())
	opaque := p.Opaque // p is the reader's, reused by its next read
	s.engine.workers.Go(func() {
		defer func() {
			if saved != nil {
				sess.endSave(m.ID(), saved)
			}
			<-sess.pubSlots
			s.pendingBytes.Add(-size)
		}()
		stored, err := s.store.Save(s.engine.deadline.get(), m)
		if err != nil {
			if claimed {
				s.engine.unclaim(m.ID())
			}
			if errors.Is(err, storage.ErrConflict) {
				s.stats.Conflicts.Add(1)
				s.storeAck(sess, opaque, m.ID(), false, "conflict: message id "+m.ID()+
					" is already stored for another message (another producer group or other content); send it with a new id")
				return
			}
			s.storeAck(sess, opaque, m.ID(), false, "store: "+err.Error())
			return
		}
		if !stored {
			s.stats.Duplicates.Add(1)
			s.storeAck(sess, opaque, m.ID(), true, "duplicate: already stored")
			if claimed {
				s.engine.dropClaim(m.ID())
			}
			return
		}
		s.stats.Stored.Add(1)
		if !m.Committed {
			s.txcheck.sent(m.ID(), sess)
		}
		s.storeAck(sess, opaque, m.ID(), true, "stored")
		switch {
		case claimed:
			s.engine.dispatch(m, false, false) // errNoRoom: it waits in the store
		case m.Committed:
			// A flight of an earlier copy of this id held the claim, and
			// ended meanwhile: its end must not hide this one.
			s.engine.deliverStored(s.engine.deadline.get(), m.ID())
		}
	})
	return nil
}

// validate returns why a message cannot be accepted, or "". The client's
// strings it quotes are clipped: the reason goes to the log and back to
// the client.
func (s *Server) validate(h *protocol.Header, now time.Time) string {
	switch {
	case !protocol.ValidMessageId(h.GetMessageId()):
		return fmt.Sprintf("invalid messageId %q: want %d lowercase hex characters", clipForLog(h.GetMessageId()), protocol.MessageIdLen)
	case h.GetTopic() == "":
		return "empty topic"
	case !s.serves(h.GetTopic()):
		return fmt.Sprintf("topic %q is not served by this broker (serves: %s)", clipForLog(h.GetTopic()), strings.Join(s.opts.Topics, ","))
	case h.GetMessageType() == "":
		return "empty messageType"
	case h.GetFly() && !h.GetCommit():
		return "a fly message must be committed: it is never stored"
	}
	return validateTimes(h, now, s.opts.MaxClockSkew, s.opts.MaxLifetime)
}

// storeAck answers a publish. A refusal is logged through the
// connection's limiter, and its feedback, which may quote the client's
// strings, is clipped for the log and the client alike.
func (s *Server) storeAck(sess *session, opaque uint32, id string, ok bool, feedback string) {
	feedback = clipTo(feedback, feedbackClipBytes)
	if !ok {
		s.stats.Rejected.Add(1)
		sess.logRepeated(zap.InfoLevel, "message refused", feedback, zap.String("id", clipForLog(id)))
	}
	sess.send(opaque, protocol.CmdMessageStoreAck,
		&protocol.MessageStoreAck{MessageId: &id, Status: &ok, Feedback: &feedback})
}

// deliverAck ends the delivery that opaque names.
func (s *Server) deliverAck(sess *session, p *protocol.Packet) error {
	var ack protocol.DeliverAck
	if err := p.DecodeInto(&ack); err != nil {
		return fatalf("bad DELIVER_ACK: %v", err)
	}
	d := sess.takeDelivery(p.Opaque)
	if d == nil {
		// Late: the delivery timed out or was given to another consumer.
		sess.log.Debug("DELIVER_ACK for no delivery in flight", zap.Uint32("opaque", p.Opaque),
			zap.String("id", clipForLog(ack.GetMessageId())))
		return nil
	}
	d.g.done()
	if ack.GetStatus() {
		s.stats.DeliverAcked.Add(1)
		d.f.groupResult(d, resultAcked, "")
	} else {
		s.stats.DeliverFailed.Add(1)
		reason := clipTo(ack.GetFeedback(), feedbackClipBytes) // kept with the message, and logged if it dead-letters
		if reason == "" {
			reason = "consumer returned false"
		}
		d.f.groupResult(d, resultFailed, reason)
	}
	return nil
}

// txAck takes a producer's decision on an uncommitted message.
func (s *Server) txAck(sess *session, p *protocol.Packet) error {
	var tx protocol.TxACKPacket
	if err := p.DecodeInto(&tx); err != nil {
		return fatalf("bad TX_ACK: %v", err)
	}
	id := tx.GetHeader().GetMessageId()
	// A decision follows its message: wait for a save of it that this
	// connection started and that is still running. The save ends within
	// its own deadline; the decision's store calls get theirs after it.
	saved := sess.pendingSave(id)
	waitSaved := func(ctx context.Context) context.Context {
		if saved == nil {
			return ctx
		}
		<-saved
		return s.engine.deadline.get()
	}
	switch protocol.TxStatus(tx.GetStatus()) {
	case protocol.TxCommit:
		s.engine.storeAsync("commit", func(ctx context.Context) error {
			ctx = waitSaved(ctx)
			unlock := s.lockDecision(id)
			if err := s.mayDecide(ctx, sess, id); err != nil {
				unlock()
				return s.refuseDecision(sess, "commit", id, err)
			}
			err := s.store.Commit(ctx, id)
			unlock()
			if err != nil {
				return fmt.Errorf("commit %s: %w", id, err)
			}
			s.txcheck.decided(id)
			s.stats.Committed.Add(1)
			return s.engine.deliverStored(ctx, id)
		})
	case protocol.TxRollback:
		s.engine.storeAsync("rollback", func(ctx context.Context) error {
			ctx = waitSaved(ctx)
			unlock := s.lockDecision(id)
			if err := s.mayDecide(ctx, sess, id); err != nil {
				unlock()
				return s.refuseDecision(sess, "rollback", id, err)
			}
			err := s.store.Rollback(ctx, id)
			unlock()
			if err != nil {
				return fmt.Errorf("rollback %s: %w", id, err)
			}
			s.txcheck.decided(id)
			s.stats.RolledBack.Add(1)
			return nil
		})
	default:
		sess.logRepeated(zap.InfoLevel, "transaction undecided", tx.GetFeedback(), zap.String("id", clipForLog(id)))
	}
	return nil
}

// errNotProducer: a TX_ACK from a connection of another group than the
// message's producer group, which alone decides its transaction.
var errNotProducer = errors.New("not the message's producer group")

// mayDecide returns nil when sess may decide the transaction of message
// id: its connection belongs to the producer group the message names (an
// uncommitted message's header groupId is its producer's, see publish).
// A message the store does not have is left to the store call, which
// knows what that means for the decision.
func (s *Server) mayDecide(ctx context.Context, sess *session, id string) error {
	if origin := s.txcheck.origin(id); origin != nil && origin.groupId == sess.groupId {
		return nil // the connection that published it, or one of its group
	}
	m, err := s.store.Get(ctx, id)
	switch {
	case errors.Is(err, storage.ErrNotFound):
		return nil
	case err != nil:
		return fmt.Errorf("read %s to check its producer: %w", id, err)
	case m.Header.GetGroupId() != sess.groupId:
		return errNotProducer
	}
	return nil
}

// refuseDecision logs a decision that mayDecide refused. A producer's
// TX_ACK has no answer in the protocol: the log and the counter are
// where it shows.
func (s *Server) refuseDecision(sess *session, op, id string, err error) error {
	if !errors.Is(err, errNotProducer) {
		return fmt.Errorf("%s %s: %w", op, id, err)
	}
	s.stats.Denied.Add(1)
	sess.logRepeated(zap.WarnLevel, "transaction decision refused", "the connection is not of the message's producer group",
		zap.String("op", op), zap.String("id", clipForLog(id)))
	return nil
}

// permitted returns the bindings of topic whose groups may consume it:
// a binding stored before the auth file took that right away routes
// nothing.
func (s *Server) permitted(topic string, bs []*binding.Binding) []*binding.Binding {
	if s.auth.open {
		return bs
	}
	out := bs[:0:0]
	for _, b := range bs {
		if s.auth.canSubscribe(b.GroupId, topic) {
			out = append(out, b)
		} else {
			s.log.Warn("binding ignored: its group may not consume the topic (auth file)",
				zap.String("group", clipForLog(b.GroupId)), zap.String("topic", clipForLog(topic)))
		}
	}
	return out
}

// bindings takes the bindings a consumer sends over its connection and
// hands them to the registry, which tells the router.
func (s *Server) bindings(sess *session, p *protocol.Packet) error {
	var pkt protocol.BindingsPacket
	if err := p.DecodeInto(&pkt); err != nil {
		return fatalf("bad BINDINGS: %v", err)
	}
	reply := func(ok bool, feedback string) error {
		feedback = clipTo(feedback, feedbackClipBytes) // it may quote the client's strings
		sess.send(p.Opaque, protocol.CmdBindingsAck, &protocol.BindingsAck{Status: &ok, Feedback: &feedback})
		return nil
	}
	if pkt.GetGroupId() != sess.groupId {
		return reply(false, fmt.Sprintf("bindings of group %q on a connection of group %q", clipForLog(pkt.GetGroupId()), clipForLog(sess.groupId)))
	}
	bs, err := binding.FromProto(pkt.GetBindings())
	if err != nil {
		return reply(false, err.Error())
	}
	served := bs[:0:0]
	for _, b := range bs {
		if !sess.perms.sub.allows(b.Topic) {
			s.stats.Denied.Add(1)
			return reply(false, fmt.Sprintf("permission denied: group %q may not consume topic %q (its sub= in the auth file: %s)",
				clipForLog(sess.groupId), clipForLog(b.Topic), sess.perms.sub))
		}
		if s.serves(b.Topic) {
			served = append(served, b)
		}
	}
	if err := s.reg.PublishBindings(context.Background(), sess.groupId, served); err != nil {
		return reply(false, err.Error())
	}
	sess.log.Info("bindings", zap.Int("count", len(served)), zap.String("bindings", clipForLog(fmt.Sprint(served))))
	return reply(true, "ok")
}

func ptr[T any](v T) *T { return &v }
