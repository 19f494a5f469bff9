package broker

// Regression tests: each one pins down a concurrency or lifecycle bug that
// the broker once had, described above the test.

import (
	"context"
	"errors"
	"net"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/fx"
	"go.uber.org/fx/fxtest"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"google.golang.org/protobuf/proto"

	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/registry/binding"
	"github.com/kiteq/kiteq/registry/static"
	"github.com/kiteq/kiteq/storage"
	"github.com/kiteq/kiteq/storage/memory"
)

// startOn starts a broker over a given store and registry, the way a
// restarted process would find them. The caller closes the store.
func startOn(t *testing.T, store storage.Store, reg *static.Server, mutate func(*Options)) *Server {
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
	s, err := New(o, store, reg, zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		s.Stop(ctx)
	})
	return s
}

// Bug (fixed): the restart only dispatched messages whose NextDeliverTime
// had already come, and nothing looked at the store again. A message whose
// retry is pending when the broker stops (its NextDeliverTime, written by
// RecordDelivery, is in the future) was never delivered by the restarted
// broker. The scanner (scan.go) now finds it when it comes due.
func TestRestartDeliversMessageWaitingForRetry(t *testing.T) {
	store := memory.New(100)
	t.Cleanup(func() { store.Close() })
	dir := t.TempDir()
	retry := func(o *Options) { o.RetrySchedule = []time.Duration{time.Second} }

	reg1, err := static.NewServer(dir)
	if err != nil {
		t.Fatal(err)
	}
	b1 := startOn(t, store, reg1, retry)
	cons := connect(t, b1.Addr(), "c")
	cons.bind("c", bindDirect("c", "trade", "t", 10, true))
	prod := connect(t, b1.Addr(), "p")
	m := newMessage("trade", "t", "retry-me")
	if ack := prod.publish(m); !ack.GetStatus() {
		t.Fatal(ack.GetFeedback())
	}
	op, got := cons.receive()
	cons.ack(op, got, "c", false) // fails once: retry due in 1 s
	id := m.GetHeader().GetMessageId()
	eventually(t, "failure recorded", func() bool {
		sm, err := store.Get(context.Background(), id)
		return err == nil && sm.DeliverCount == 1
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := b1.Stop(ctx); err != nil {
		t.Fatal(err)
	}

	// Restart on the same store and the same bindings.
	reg2, err := static.NewServer(dir)
	if err != nil {
		t.Fatal(err)
	}
	b2 := startOn(t, store, reg2, retry)
	cons2 := connect(t, b2.Addr(), "c")
	cons2.bind("c", bindDirect("c", "trade", "t", 10, true))
	p, err := cons2.read(4 * time.Second) // the retry was due 1 s after the failure
	if err != nil {
		sm, _ := store.Get(context.Background(), id)
		t.Fatalf("restarted broker never delivered the message in retry backoff (%v); still in the store: next due %s",
			err, sm.NextDeliverTime.Format(time.RFC3339Nano))
	}
	if p.Cmd != protocol.CmdStringMessage {
		t.Fatalf("got %s", p.Cmd)
	}
}

// The same with the default store, -db=file://: SIGTERM while a delivery
// waits for its retry, restart, and the message never comes.
func TestFileStoreRestartDeliversMessageWaitingForRetry(t *testing.T) {
	o := DefaultOptions()
	o.Auth = AuthOpen // loopback tests
	o.Bind, o.PPort, o.DB = "127.0.0.1:0", 0, "file://"+t.TempDir()
	o.RetrySchedule = []time.Duration{time.Second}
	m := newMessage("trade", "t", "retry-me")
	id := m.GetHeader().GetMessageId()
	for round := range 2 {
		opts, err := AppOptions(o, zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)))
		if err != nil {
			t.Fatal(err)
		}
		var s *Server
		var store storage.Store
		app := fxtest.New(t, opts, fx.Populate(&s, &store))
		app.RequireStart()
		cons := connect(t, s.Addr(), "c")
		cons.bind("c", bindDirect("c", "trade", "t", 10, true))
		if round == 0 {
			if ack := connect(t, s.Addr(), "p").publish(m); !ack.GetStatus() {
				t.Fatal(ack.GetFeedback())
			}
			op, got := cons.receive()
			cons.ack(op, got, "c", false)
			eventually(t, "failure recorded", func() bool {
				sm, err := store.Get(context.Background(), id)
				return err == nil && sm.DeliverCount == 1
			})
		} else if _, err := cons.read(4 * time.Second); err != nil {
			t.Fatalf("after a restart on the file store the message in retry backoff never came: %v", err)
		}
		app.RequireStop()
	}
}

// maxSizeMessage returns a message whose encoded body is exactly max bytes,
// as a producer may send it (no createTime: client-go never sets it).
func maxSizeMessage(t *testing.T, max int) *protocol.StringMessage {
	m := newMessage("trade", "t", "")
	for n := max - proto.Size(m); ; n-- {
		m.Body = proto.String(strings.Repeat("x", n))
		if s := proto.Size(m); s == max {
			return m
		} else if s < max {
			t.Fatalf("cannot build a message of %d bytes", max)
		}
	}
}

// Bug: publish (server.go, h.CreateTime = ptr(now.Unix())) adds createTime
// to a message that was accepted at the size limit, so the delivery is
// 6 bytes larger than the 2 MiB every v1 reader (client-go included)
// accepts. The consumer's reader fails, its connection drops, the session
// close hands the delivery to the next consumer without counting an
// attempt, and so on forever: a poison message that is never delivered nor
// dead-lettered.
func TestPublishOverLimitWithCreateTimeRefused(t *testing.T) {
	b := startBroker(t, nil)
	cons := connect(t, b.Addr(), "c")
	cons.bind("c", bindDirect("c", "trade", "t", 10, true))
	prod := connect(t, b.Addr(), "p")
	m := maxSizeMessage(t, protocol.DefaultMaxBody)
	if ack := prod.publish(m); !ack.GetStatus() {
		return // refused: fine
	}
	// Read with a generous limit to see what a v1 client would get.
	big := protocol.NewReader(cons.conn, 4*protocol.DefaultMaxBody)
	cons.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	p, err := big.ReadPacket()
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Body) > protocol.DefaultMaxBody {
		t.Fatalf("accepted a %d-byte message and delivers it as %d bytes, over the %d-byte limit of v1 readers",
			protocol.DefaultMaxBody, len(p.Body), protocol.DefaultMaxBody)
	}
}

// Bug: expiry is checked only when a delivery fails (flight.groupResult).
// A delivery that waits in a group's queue (persistent binding, no live
// consumer, or a full watermark) never expires: it is delivered long after
// its expiredTime, and its flight, the store entry and the memory stay
// until a consumer comes (MaxLifetime never applies to it).
func TestQueuedMessageExpires(t *testing.T) {
	b := startBroker(t, nil)
	setup := connect(t, b.Addr(), "c")
	setup.bind("c", bindDirect("c", "trade", "t", 10, true))
	setup.conn.Close()
	eventually(t, "consumer gone", func() bool { return b.Stats().Connections == 0 })

	prod := connect(t, b.Addr(), "p")
	m := newMessage("trade", "t", "short-lived")
	m.Header.ExpiredTime = proto.Int64(time.Now().Unix() + 1)
	if ack := prod.publish(m); !ack.GetStatus() {
		t.Fatal(ack.GetFeedback())
	}
	time.Sleep(time.Until(time.Unix(m.Header.GetExpiredTime()+1, 0)) + 300*time.Millisecond)

	cons := connect(t, b.Addr(), "c")
	if p, err := cons.read(500 * time.Millisecond); err == nil {
		t.Fatalf("got %s for a message that expired %s ago; dead-lettered %d",
			p.Cmd, time.Since(time.Unix(m.Header.GetExpiredTime(), 0)).Round(time.Millisecond), b.Stats().DeadLettered)
	}
}

// slowSaveStore delays Save, as a real store under load does.
type slowSaveStore struct {
	*memory.Store
	delay time.Duration
}

func (s *slowSaveStore) Save(ctx context.Context, m *storage.Message) (bool, error) {
	time.Sleep(s.delay)
	return s.Store.Save(ctx, m)
}

// Bug: publish stores in its own goroutine and txAck commits in another
// (server.go publish / txAck): a TX_ACK that follows its message on the
// same connection can reach the store first. Commit then fails with
// ErrNotFound (only logged), the message is saved uncommitted afterwards and
// is never delivered (the broker has no check-back). A rollback that
// overtakes its publish leaves the message in the store for ever.
func TestTxAckWaitsForItsPublish(t *testing.T) {
	mem := memory.New(100)
	t.Cleanup(func() { mem.Close() })
	reg, err := static.NewServer("")
	if err != nil {
		t.Fatal(err)
	}
	b := startOn(t, &slowSaveStore{Store: mem, delay: 200 * time.Millisecond}, reg, nil)
	cons := connect(t, b.Addr(), "c")
	cons.bind("c", bindDirect("c", "trade", "t", 10, true))
	prod := connect(t, b.Addr(), "p")

	m := newMessage("trade", "t", "tx")
	m.Header.Commit = proto.Bool(false)
	prod.send(protocol.CmdStringMessage, m)
	prod.send(protocol.CmdTxAck, &protocol.TxACKPacket{Header: m.Header,
		Status: proto.Int32(int32(protocol.TxCommit)), Feedback: proto.String("")})
	prod.expect(protocol.CmdMessageStoreAck)

	if p, err := cons.read(2 * time.Second); err != nil {
		sm, gerr := mem.Get(context.Background(), m.GetHeader().GetMessageId())
		committed := gerr == nil && sm.Committed
		t.Fatalf("committed message never delivered (%v); stored committed=%t, store errors %d",
			err, committed, b.Stats().StoreErrors)
	} else if p.Cmd != protocol.CmdStringMessage {
		t.Fatalf("got %s", p.Cmd)
	}
}

type slowTopicStore struct {
	*memory.Store
	topic string
	delay time.Duration
}

func (s *slowTopicStore) Save(ctx context.Context, m *storage.Message) (bool, error) {
	if m.Header.GetTopic() == s.topic {
		time.Sleep(s.delay)
	}
	return s.Store.Save(ctx, m)
}

// Bug: session.deliver (session.go) returns false when its outbox refuses
// the packet because the writer died (write error), but the session stays in
// its group until its reader notices. group.send then requeues, pumpLocked
// picks the same session, deliver fails again: unbounded recursion
// (send -> requeue -> send ...) for as long as the reader is busy, here
// waiting for a publish slot behind a slow store (a consumer that also
// publishes). The stack grows by hundreds of MiB a second (264 MiB in 1.4 s
// without -race); with a store stalled for its 30 s timeout the broker dies
// of a stack overflow.
func TestDeadWriterLeavesGroup(t *testing.T) {
	mem := memory.New(100)
	t.Cleanup(func() { mem.Close() })
	reg, err := static.NewServer("")
	if err != nil {
		t.Fatal(err)
	}
	b := startOn(t, &slowTopicStore{Store: mem, topic: "slow", delay: 1500 * time.Millisecond}, reg,
		func(o *Options) { o.MaxPendingPublishes = 1 })
	x := connect(t, b.Addr(), "c")
	x.bind("c", bindDirect("c", "trade", "t", 10, true))
	x.send(protocol.CmdStringMessage, newMessage("slow", "t", "1"))
	x.send(protocol.CmdStringMessage, newMessage("slow", "t", "2"))
	time.Sleep(100 * time.Millisecond) // x's reader now waits for a publish slot
	x.conn.(*net.TCPConn).SetLinger(0)
	x.conn.Close() // RST: the broker's next write to x fails

	var ms0 runtime.MemStats
	p := connect(t, b.Addr(), "p")
	p.publish(newMessage("trade", "t", "first")) // written to x: the write fails
	time.Sleep(50 * time.Millisecond)
	runtime.ReadMemStats(&ms0)
	t.Logf("StackInuse before %d KiB", ms0.StackInuse>>10)
	p.publish(newMessage("trade", "t", "second"))
	var ms runtime.MemStats
	var maxStack uint64
	for end := time.Now().Add(1500 * time.Millisecond); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		runtime.ReadMemStats(&ms)
		maxStack = max(maxStack, ms.StackInuse)
	}
	t.Logf("max StackInuse %d MiB", maxStack>>20)
	if maxStack > ms0.StackInuse+16<<20 {
		t.Fatalf("stack grew to %d MiB: group.send and requeue recurse on a session whose writer died", maxStack>>20)
	}
}

// Bug: Server.Stop never applies Options.ShutdownTimeout; it waits for the
// context fx gives it, StopTimeout = ShutdownTimeout+5s (fx.go). A graceful
// stop that stalls (a session close waits up to WriteTimeout, 30 s, to flush
// a consumer that stopped reading) uses the whole fx budget, and fx then
// skips the remaining stop hooks: the registry and the store are never
// closed.
func TestStopHonoursShutdownTimeoutAndClosesStore(t *testing.T) {
	o := DefaultOptions()
	o.Auth = AuthOpen // loopback tests
	o.Bind, o.PPort, o.DB = "127.0.0.1:0", 0, "memory://"
	o.ShutdownTimeout = time.Second
	opts, err := AppOptions(o, zaptest.NewLogger(t, zaptest.Level(zap.ErrorLevel)))
	if err != nil {
		t.Fatal(err)
	}
	var s *Server
	var store storage.Store
	app := fx.New(opts, fx.Populate(&s, &store))
	if err := app.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })

	// A consumer that stops reading: its writer blocks in Write.
	cons := connect(t, s.Addr(), "c")
	cons.bind("c", bindDirect("c", "trade", "t", 1000, true))
	prod := connect(t, s.Addr(), "p")
	body := strings.Repeat("x", 1<<20)
	for range 32 {
		prod.publish(newMessage("trade", "t", body))
	}
	eventually(t, "deliveries queued", func() bool { return s.Stats().Delivered == 32 })

	ctx, cancel := context.WithTimeout(context.Background(), app.StopTimeout())
	defer cancel()
	start := time.Now()
	stopErr := app.Stop(ctx)
	took := time.Since(start)
	_, getErr := store.Get(context.Background(), protocol.MessageId())
	if took > o.ShutdownTimeout+2*time.Second || !errors.Is(getErr, storage.ErrClosed) {
		t.Fatalf("stop took %s with -shutdown-timeout %s (err %v); store closed: %t",
			took.Round(time.Millisecond), o.ShutdownTimeout, stopErr, errors.Is(getErr, storage.ErrClosed))
	}
}

// slowGetStore delays the answer of every Get after the first one.
type slowGetStore struct {
	*memory.Store
	gets  atomic.Int32
	delay time.Duration
}

func (s *slowGetStore) Get(ctx context.Context, id string) (*storage.Message, error) {
	m, err := s.Store.Get(ctx, id)
	if s.gets.Add(1) > 1 {
		time.Sleep(s.delay)
	}
	return m, err
}

// Bug: the commit path (server.go txAck) reads the message with Get and
// only then asks dispatch whether a flight is registered. A repeated commit
// whose Get ran before the first flight's Delete, and whose dispatch runs
// after finish forgot the flight, starts a second flight: the group gets the
// acknowledged message again. finish keeps the flight registered until the
// Delete precisely to prevent this, but the check comes too late.
func TestRepeatedCommitDoesNotRedeliver(t *testing.T) {
	mem := memory.New(100)
	t.Cleanup(func() { mem.Close() })
	reg, err := static.NewServer("")
	if err != nil {
		t.Fatal(err)
	}
	b := startOn(t, &slowGetStore{Store: mem, delay: 300 * time.Millisecond}, reg, nil)
	cons := connect(t, b.Addr(), "c")
	cons.bind("c", bindDirect("c", "trade", "t", 10, true))
	prod := connect(t, b.Addr(), "p")
	m := newMessage("trade", "t", "once")
	m.Header.Commit = proto.Bool(false)
	if ack := prod.publish(m); !ack.GetStatus() {
		t.Fatal(ack.GetFeedback())
	}
	commit := &protocol.TxACKPacket{Header: m.Header, Status: proto.Int32(int32(protocol.TxCommit)), Feedback: proto.String("")}
	prod.send(protocol.CmdTxAck, commit)
	op, got := cons.receive()
	prod.send(protocol.CmdTxAck, commit) // the producer repeats its decision
	time.Sleep(50 * time.Millisecond)
	cons.ack(op, got, "c", true)
	if p, err := cons.read(time.Second); err == nil {
		t.Fatalf("acknowledged message delivered again (%s) after a repeated commit", p.Cmd)
	}
}

// Bug: engine.after (delivery.go) runs a retry that fired just before stop
// outside the engine's WaitGroup, so engine.stop (and Server.Stop) return
// while it still runs; the store calls it starts (finish, RecordDelivery)
// come after Stop, on a store the application is closing, and e.wg.Add runs
// concurrently with (or after) e.wg.Wait.
func TestStopWaitsForRunningRetry(t *testing.T) {
	store := memory.New(10)
	t.Cleanup(func() { store.Close() })
	e := newEngine(zap.NewNop(), store, DefaultOptions(), &Stats{})
	started := make(chan struct{})
	var stored atomic.Bool
	e.after(time.Millisecond, func() {
		close(started)
		time.Sleep(100 * time.Millisecond)
		e.storeAsync("late", func(context.Context) error { stored.Store(true); return nil })
	})
	<-started
	e.stop()
	if !stored.Load() {
		time.Sleep(200 * time.Millisecond)
		t.Fatalf("engine.stop returned while a retry was running; its store call ran after stop: %t", stored.Load())
	}
}

// Bug (delivery.go dispatch): a message redelivered after a restart
// started every failed group's attempts at 0, so a message with a delivery
// limit of 3 that had failed twice before the restart was tried 3 more
// times. The stored DeliverCount of the failed groups counts.
func TestDeliveryLimitCountsFailuresBeforeARestart(t *testing.T) {
	ctx := context.Background()
	mem, reg := storeAndBindings(t, "c")
	msg := newMessage("trade", "t", "failed twice already")
	msg.Header.DeliveryLimit = proto.Int32(3)
	m := storage.NewMessage(msg, time.Now())
	m.DeliverCount, m.FailGroups = 2, []string{"c"}
	if _, err := mem.Save(ctx, m); err != nil {
		t.Fatal(err)
	}
	b := startOn(t, mem, reg, nil)
	cons := connect(t, b.Addr(), "c")
	op, got := cons.receive()
	cons.ack(op, got, "c", false)
	cons.expectNothing(500 * time.Millisecond) // the third failure was the last
	eventually(t, "dead-lettered", func() bool {
		dl, err := mem.DeadLetters(ctx, "", 10)
		return err == nil && len(dl) == 1 && strings.Contains(dl[0].Reason, "delivery limit 3")
	})
}

// slowFirstRecordStore delays the first RecordDelivery.
type slowFirstRecordStore struct {
	*memory.Store
	calls atomic.Int32
	delay time.Duration
}

func (s *slowFirstRecordStore) RecordDelivery(ctx context.Context, r storage.DeliveryResult) error {
	if s.calls.Add(1) == 1 {
		time.Sleep(s.delay)
	}
	return s.Store.RecordDelivery(ctx, r)
}

// Bug (delivery.go groupResult, finish): every store call of a flight ran
// in its own goroutine, so a slow RecordDelivery of an early failure could
// reach the store after the message was dead-lettered (an error, and the
// dead letter's state could be overwritten by an older one). A flight's
// store calls now run in the order they were made.
func TestStoreCallsOfAMessageKeepTheirOrder(t *testing.T) {
	mem := memory.New(100)
	t.Cleanup(func() { mem.Close() })
	reg, err := static.NewServer("")
	if err != nil {
		t.Fatal(err)
	}
	b := startOn(t, &slowFirstRecordStore{Store: mem, delay: 400 * time.Millisecond}, reg, nil)
	cons := connect(t, b.Addr(), "c")
	cons.bind("c", bindDirect("c", "trade", "t", 10, true))
	m := newMessage("trade", "t", "twice refused")
	m.Header.DeliveryLimit = proto.Int32(2)
	connect(t, b.Addr(), "p").publish(m)
	for range 2 {
		op, got := cons.receive()
		cons.ack(op, got, "c", false)
	}
	eventually(t, "dead-lettered", func() bool {
		dl, err := mem.DeadLetters(context.Background(), "", 10)
		return err == nil && len(dl) == 1
	})
	time.Sleep(500 * time.Millisecond) // the slow call is done
	if st := b.Stats(); st.StoreErrors != 0 {
		t.Fatalf("%d store calls failed", st.StoreErrors)
	}
	dl, _ := mem.DeadLetters(context.Background(), "", 10)
	if d := dl[0].Message; d.DeliverCount != 2 || strings.Join(d.FailGroups, ",") != "c" {
		t.Fatalf("dead letter: count %d, failed groups %q; want 2, [c]", d.DeliverCount, d.FailGroups)
	}
}

// The stored DeliverCount is the most failures of any group: after a
// restart it is not charged to a group that failed less (limit 5: group
// a failed once, b four times; a is not given up at its second failure).
func TestRestartDoesNotChargeOneGroupsFailuresToAnother(t *testing.T) {
	ctx := context.Background()
	mem, reg := storeAndBindings(t, "a", "b")
	msg := newMessage("trade", "t", "a failed once, b four times")
	msg.Header.DeliveryLimit = proto.Int32(5)
	m := storage.NewMessage(msg, time.Now())
	m.DeliverCount, m.FailGroups = 4, []string{"a", "b"}
	if _, err := mem.Save(ctx, m); err != nil {
		t.Fatal(err)
	}
	b := startOn(t, mem, reg, nil)
	a := connect(t, b.Addr(), "a")
	for range 2 {
		op, got := a.receive()
		a.ack(op, got, "a", false)
	}
	op, got := a.receive() // a third delivery: a has failed 3 times of 5
	a.ack(op, got, "a", true)
}

// storeAndBindings is the memory store and registry a broker restarts
// on: each group bound persistently to trade/t.
func storeAndBindings(t *testing.T, groups ...string) (*memory.Store, *static.Server) {
	t.Helper()
	mem := memory.New(100)
	t.Cleanup(func() { mem.Close() })
	reg, err := static.NewServer("")
	if err != nil {
		t.Fatal(err)
	}
	for _, g := range groups {
		bs := []*binding.Binding{binding.Bind_Direct(g, "trade", "t", 10, true)}
		if err := reg.PublishBindings(context.Background(), g, bs); err != nil {
			t.Fatal(err)
		}
	}
	return mem, reg
}
