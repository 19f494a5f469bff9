package broker

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/kiteq/kiteq/protocol"
)

// fakeClock is a Clock that moves only when a test advances it.
type fakeClock struct {
	mu     sync.Mutex
	now    time.Time
	timers []*fakeTimer
}

type fakeTimer struct {
	c    *fakeClock
	at   time.Time
	f    func()
	done bool // fired or stopped
}

// newFakeClock starts at the current second, so that the real times in
// test headers (expiredTime) make sense to it.
func newFakeClock() *fakeClock { return &fakeClock{now: time.Now().Truncate(time.Second)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) AfterFunc(d time.Duration, f func()) Timer {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &fakeTimer{c: c, at: c.now.Add(d), f: f}
	c.timers = append(c.timers, t)
	return t
}

func (t *fakeTimer) Stop() bool {
	t.c.mu.Lock()
	defer t.c.mu.Unlock()
	if t.done {
		return false
	}
	t.done = true
	return true
}

// Advance moves the clock by d and runs the timers that came due.
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	var due []func()
	kept := c.timers[:0]
	for _, t := range c.timers {
		switch {
		case t.done:
		case !t.at.After(c.now):
			t.done = true
			due = append(due, t.f)
		default:
			kept = append(kept, t)
		}
	}
	c.timers = kept
	c.mu.Unlock()
	for _, f := range due {
		go f()
	}
}

// waitStoredNext waits until the store has id due at want: a retry or a
// delayed message waits in the store, not in a timer.
func waitStoredNext(t *testing.T, b *testBroker, id string, want time.Time) {
	t.Helper()
	eventually(t, "the store has the message due at "+want.Format(time.RFC3339Nano), func() bool {
		m, err := b.store.Get(context.Background(), id)
		return err == nil && m.NextDeliverTime.Equal(want)
	})
}

// The retry schedule, to the millisecond: nothing before the wait has
// passed, the retry once it has.
func TestClockRetrySchedule(t *testing.T) {
	clk := newFakeClock()
	b := startBroker(t, func(o *Options) { o.Clock = clk; o.RetrySchedule = []time.Duration{10 * time.Second, 20 * time.Second} })
	cons := connect(t, b.Addr(), "c")
	cons.bind("c", bindDirect("c", "trade", "t", 10, true))
	connect(t, b.Addr(), "p").publish(newMessage("trade", "t", "x"))
	for i, wait := range []time.Duration{10 * time.Second, 20 * time.Second, 20 * time.Second} {
		op, m := cons.receive()
		cons.ack(op, m, "c", false)
		waitStoredNext(t, b, m.Header.GetMessageId(), clk.Now().Add(wait))
		clk.Advance(wait - time.Millisecond)
		cons.expectNothing(200 * time.Millisecond)
		clk.Advance(time.Millisecond)
		if i == 2 {
			op, m := cons.receive()
			cons.ack(op, m, "c", true)
		}
	}
	eventually(t, "finished", func() bool { return storeCount(t, b.store) == 0 })
}

// A message that expires while it waits for its retry is not delivered
// again: it is dead-lettered with the reason.
func TestClockExpiryBeforeRetry(t *testing.T) {
	clk := newFakeClock()
	b := startBroker(t, func(o *Options) { o.Clock = clk; o.RetrySchedule = []time.Duration{10 * time.Second} })
	cons := connect(t, b.Addr(), "c")
	cons.bind("c", bindDirect("c", "trade", "t", 10, true))
	m := newMessage("trade", "t", "short-lived")
	m.Header.ExpiredTime = proto.Int64(clk.Now().Add(15 * time.Second).Unix())
	connect(t, b.Addr(), "p").publish(m)
	op, got := cons.receive()
	cons.ack(op, got, "c", false) // at 0 s: retry at 10 s
	waitStoredNext(t, b, m.Header.GetMessageId(), clk.Now().Add(10*time.Second))
	clk.Advance(10 * time.Second)
	op, got = cons.receive()
	cons.ack(op, got, "c", false) // at 10 s: retry at 20 s, after the expiry at 15 s
	expiry := time.Unix(m.Header.GetExpiredTime(), 0)
	waitStoredNext(t, b, m.Header.GetMessageId(), expiry) // due at its expiry, not at the retry
	clk.Advance(10 * time.Second)
	cons.expectNothing(300 * time.Millisecond)
	eventually(t, "dead-lettered", func() bool {
		dl, err := b.store.DeadLetters(context.Background(), "", 10)
		return err == nil && len(dl) == 1 && strings.Contains(dl[0].Reason, "c: expired at "+expiry.UTC().Format(time.RFC3339)+" before its retry")
	})
}

// A delayed message is held until the clock reaches its deliverAt.
func TestClockDelayedDelivery(t *testing.T) {
	clk := newFakeClock()
	b := startBroker(t, func(o *Options) { o.Clock = clk })
	cons := connect(t, b.Addr(), "c")
	cons.bind("c", bindDirect("c", "trade", "t", 10, true))
	m := newMessage("trade", "t", "in ten minutes")
	m.Header.DeliverAt = proto.Int64(clk.Now().Add(10 * time.Minute).UnixMilli())
	connect(t, b.Addr(), "p").publish(m)
	waitStoredNext(t, b, m.Header.GetMessageId(), time.UnixMilli(m.Header.GetDeliverAt()))
	clk.Advance(10*time.Minute - time.Millisecond)
	cons.expectNothing(300 * time.Millisecond)
	clk.Advance(time.Millisecond)
	op, got := cons.receive()
	if got.GetBody() != "in ten minutes" {
		t.Fatalf("delivered %q", got.GetBody())
	}
	cons.ack(op, got, "c", true)
}

// The transaction checks: the first after TxCheckDelay, the next after
// twice as long.
func TestClockTxChecks(t *testing.T) {
	clk := newFakeClock()
	b := startBroker(t, func(o *Options) { o.Clock = clk; o.TxCheckDelay = 5 * time.Second })
	prod := connect(t, b.Addr(), "p")
	m := undecided(t, prod, "undecided")
	for _, wait := range []time.Duration{5 * time.Second, 10 * time.Second} {
		clk.Advance(wait - time.Millisecond)
		prod.expectNothing(600 * time.Millisecond) // the checker passes every 250 ms
		clk.Advance(time.Millisecond)
		opaque := expectCheck(t, prod, m)
		prod.sendOpaque(opaque, protocol.CmdTxAck, &protocol.TxACKPacket{Header: m.Header,
			Status: proto.Int32(int32(protocol.TxUnknown)), Feedback: proto.String("not yet")})
		eventually(t, "the check recorded", func() bool {
			got, err := b.store.Get(context.Background(), m.Header.GetMessageId())
			return err == nil && got.DeliverCount >= 1 && got.NextDeliverTime.After(clk.Now())
		})
	}
}
