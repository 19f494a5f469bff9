package broker

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/registry/static"
	"github.com/kiteq/kiteq/storage/memory"
)

// publishN publishes n messages of topic trade, type t, each with a body of
// size bytes, and returns their ids.
func publishN(t *testing.T, prod *testConn, n, size int) []string {
	t.Helper()
	ids := make([]string, 0, n)
	for i := range n {
		body := fmt.Sprintf("#%d ", i)
		body += strings.Repeat("x", max(size-len(body), 0))
		m := newMessage("trade", "t", body)
		if ack := prod.publish(m); !ack.GetStatus() {
			t.Fatalf("publish #%d refused: %s", i, ack.GetFeedback())
		}
		ids = append(ids, m.Header.GetMessageId())
	}
	return ids
}

// receiveAll receives until every id in want arrived, acknowledging each
// delivery with ok; it fails on a delivery of an id outside want, and on a
// second delivery of one when ok (an acknowledged message must not come
// back). It returns how often each id came.
func receiveAll(t *testing.T, c *testConn, group string, want []string, ok bool) map[string]int {
	t.Helper()
	wanted := make(map[string]bool, len(want))
	for _, id := range want {
		wanted[id] = true
	}
	got := make(map[string]int, len(want))
	for len(got) < len(want) {
		op, m := c.receive()
		id := m.Header.GetMessageId()
		if !wanted[id] {
			t.Fatalf("delivered %s, which is not one of the %d expected", id, len(want))
		}
		got[id]++
		if ok && got[id] > 1 {
			t.Fatalf("%s delivered again after its acknowledgement", id)
		}
		c.ack(op, m, group, ok)
	}
	return got
}

// missing returns the ids that got has not counted.
func missing(ids []string, got map[string]int) []string {
	var out []string
	for _, id := range ids {
		if got[id] == 0 {
			out = append(out, id)
		}
	}
	return out
}

// A persistent group with no consumer: its messages wait in the store, not
// in memory, and all of them arrive, once each, when a consumer connects.
func TestOfflineGroupWaitsInTheStore(t *testing.T) {
	b := startBroker(t, nil)
	binder := connect(t, b.Addr(), "c")
	binder.bind("c", bindDirect("c", "trade", "t", 10, true))
	binder.conn.Close()
	eventually(t, "the consumer gone", func() bool { return b.Stats().Connections == 0 })

	ids := publishN(t, connect(t, b.Addr(), "p"), 500, 100)
	eventually(t, "nothing held in memory", func() bool {
		st := b.Stats()
		return st.InFlight == 0 && st.DeliveryBytes == 0 && st.Parked >= 500
	})
	if n := storeCount(t, b.store); n != 500 {
		t.Fatalf("the store holds %d messages, want 500", n)
	}

	cons := connect(t, b.Addr(), "c")
	receiveAll(t, cons, "c", ids, true)
	eventually(t, "all finished", func() bool { return storeCount(t, b.store) == 0 })
	cons.expectNothing(300 * time.Millisecond)
}

// A consumer that holds every delivery: the flights it holds stay within
// -max-delivery-bytes, the rest wait in the store, and they all come once
// the consumer acknowledges.
func TestDeliveryMemoryIsBounded(t *testing.T) {
	const limit = 64 << 10
	b := startBroker(t, func(o *Options) { o.MaxBody = 16 << 10; o.MaxDeliveryBytes = limit })
	cons := connect(t, b.Addr(), "c")
	cons.bind("c", bindDirect("c", "trade", "t", 1000, true))
	ids := publishN(t, connect(t, b.Addr(), "p"), 300, 1000)

	// Receive without acknowledging, until nothing more comes.
	type held struct {
		op uint32
		m  *protocol.StringMessage
	}
	var got []held
	for {
		p, err := cons.read(300 * time.Millisecond)
		if err != nil {
			break
		}
		var m protocol.StringMessage
		cons.decode(p, &m)
		got = append(got, held{p.Opaque, &m})
	}
	st := b.Stats()
	perMessage := int64(1000 + flightOverhead)
	if st.DeliveryBytes > limit+perMessage || len(got) == 0 || len(got) >= len(ids) {
		t.Fatalf("held %d deliveries, %d bytes in memory; want some, fewer than %d, within %d bytes",
			len(got), st.DeliveryBytes, len(ids), limit+perMessage)
	}
	t.Logf("a consumer that acknowledges nothing holds %d of %d messages, %d bytes in memory (limit %d)",
		len(got), len(ids), st.DeliveryBytes, limit)

	seen := make(map[string]int)
	for _, h := range got {
		seen[h.m.Header.GetMessageId()]++
		cons.ack(h.op, h.m, "c", true)
	}
	receiveAll(t, cons, "c", missing(ids, seen), true)
	eventually(t, "all finished", func() bool { return storeCount(t, b.store) == 0 })
}

// A group that acknowledges nothing holds at most its watermark in flight
// and as many again queued; a fast group of the same messages gets all of
// them meanwhile, and memory holds only what the slow group has.
func TestSlowGroupHoldsOnlyItsShare(t *testing.T) {
	b := startBroker(t, nil)
	fast := connect(t, b.Addr(), "fast")
	fast.bind("fast", bindDirect("fast", "trade", "t", 1000, true))
	slow := connect(t, b.Addr(), "slow")
	slow.bind("slow", bindDirect("slow", "trade", "t", 5, true))
	ids := publishN(t, connect(t, b.Addr(), "p"), 400, 100)

	receiveAll(t, fast, "fast", ids, true)
	queueCap := 16 // group.queueCapLocked for a watermark of 5
	eventually(t, "memory holds only the slow group's share", func() bool {
		return b.Stats().InFlight <= int64(5+queueCap)
	})
	// The slow group has exactly its watermark in flight.
	var held []uint32
	var msgs []*protocol.StringMessage
	for range 5 {
		op, m := slow.receive()
		held, msgs = append(held, op), append(msgs, m)
	}
	slow.expectNothing(300 * time.Millisecond)
	t.Logf("after the fast group finished: %d messages in memory, %d bytes", b.Stats().InFlight, b.Stats().DeliveryBytes)

	got := make(map[string]int)
	for i, op := range held {
		got[msgs[i].Header.GetMessageId()]++
		slow.ack(op, msgs[i], "slow", true)
	}
	receiveAll(t, slow, "slow", missing(ids, got), true)
	eventually(t, "all finished", func() bool { return storeCount(t, b.store) == 0 })
	fast.expectNothing(100 * time.Millisecond)
}

// A message waiting for its retry is not in memory: it is parked in the
// store and comes back when the retry is due.
func TestRetriesWaitInTheStore(t *testing.T) {
	b := startBroker(t, func(o *Options) { o.RetrySchedule = []time.Duration{time.Second} })
	cons := connect(t, b.Addr(), "c")
	cons.bind("c", bindDirect("c", "trade", "t", 1000, true))
	ids := publishN(t, connect(t, b.Addr(), "p"), 100, 100)
	receiveAll(t, cons, "c", ids, false)
	eventually(t, "nothing in memory while the retries wait", func() bool {
		st := b.Stats()
		return st.InFlight == 0 && st.Parked >= 100
	})
	m, err := b.store.Get(context.Background(), ids[0])
	if err != nil {
		t.Fatal(err)
	}
	if len(m.FailGroups) != 1 || m.FailGroups[0] != "c" || len(m.FailCounts) != 1 || m.FailCounts[0] != 1 || !m.NextDeliverTime.After(time.Now()) {
		t.Fatalf("stored state while waiting for the retry: fail %q counts %v next %v", m.FailGroups, m.FailCounts, m.NextDeliverTime)
	}
	receiveAll(t, cons, "c", ids, true)
	eventually(t, "all finished", func() bool { return storeCount(t, b.store) == 0 })
}

// Each group's delivery limit holds though the message leaves memory
// between its attempts: a group that always fails gets exactly the limit,
// one that fails once gets two, and the dead letter names the first.
func TestDeliveryLimitPerGroupAcrossParking(t *testing.T) {
	b := startBroker(t, func(o *Options) { o.RetrySchedule = []time.Duration{200 * time.Millisecond} })
	always := connect(t, b.Addr(), "always")
	always.bind("always", bindDirect("always", "trade", "t", 10, true))
	once := connect(t, b.Addr(), "once")
	once.bind("once", bindDirect("once", "trade", "t", 10, true))
	m := newMessage("trade", "t", "limited")
	m.Header.DeliveryLimit = proto.Int32(3)
	connect(t, b.Addr(), "p").publish(m)

	var wg sync.WaitGroup
	counts := make([]int, 2)
	for i, c := range []*testConn{always, once} {
		group := []string{"always", "once"}[i]
		wg.Go(func() {
			for {
				p, err := c.read(2 * time.Second)
				if err != nil {
					return
				}
				var got protocol.StringMessage
				c.decode(p, &got)
				counts[i]++
				c.ack(p.Opaque, &got, group, group == "once" && counts[i] == 2)
			}
		})
	}
	wg.Wait()
	if counts[0] != 3 || counts[1] != 2 {
		t.Fatalf("attempts: always %d, once %d; want 3 and 2", counts[0], counts[1])
	}
	if b.Stats().Parked == 0 {
		t.Fatal("the message never left memory between attempts")
	}
	eventually(t, "dead-lettered", func() bool {
		dl, err := b.store.DeadLetters(context.Background(), "", 10)
		return err == nil && len(dl) == 1 && strings.HasPrefix(dl[0].Reason, "always: delivery limit 3 reached") &&
			!strings.Contains(dl[0].Reason, "once:")
	})
}

// After a restart with more committed messages than memory may hold, the
// scanner delivers all of them, a part at a time.
func TestRestartWithBacklogOverTheMemoryLimit(t *testing.T) {
	mem := memory.New(10000)
	defer mem.Close()
	reg, err := static.NewServer(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	mutate := func(o *Options) { o.MaxBody = 16 << 10; o.MaxDeliveryBytes = 32 << 10 }
	first := startOn(t, mem, reg, mutate)
	binder := connect(t, first.Addr(), "c")
	binder.bind("c", bindDirect("c", "trade", "t", 50, true))
	binder.conn.Close()
	ids := publishN(t, connect(t, first.Addr(), "p"), 400, 500)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := first.Stop(ctx); err != nil {
		t.Fatal(err)
	}

	second := startOn(t, mem, reg, mutate)
	cons := connect(t, second.Addr(), "c")
	var maxBytes int64
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		for {
			maxBytes = max(maxBytes, second.Stats().DeliveryBytes)
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
		}
	}()
	receiveAll(t, cons, "c", ids, true)
	close(stop)
	<-done
	if limit := int64(32<<10 + 500 + flightOverhead); maxBytes > limit {
		t.Fatalf("up to %d bytes in memory, want at most %d", maxBytes, limit)
	}
	t.Logf("400 messages of 500 bytes delivered after a restart with at most %d bytes in memory", maxBytes)
	eventually(t, "all finished", func() bool { return storeCount(t, mem) == 0 })
}

// Each failed group keeps its own backoff while the message waits in the
// store: a group with a long one is not retried at another's short one.
func TestEachGroupKeepsItsBackoffWhileParked(t *testing.T) {
	b := startBroker(t, func(o *Options) {
		o.RetrySchedule = []time.Duration{100 * time.Millisecond, 3 * time.Second}
		o.DeliverTimeout = 30 * time.Second
	})
	a := connect(t, b.Addr(), "a")
	a.bind("a", bindDirect("a", "trade", "t", 10, true))
	slow := connect(t, b.Addr(), "b")
	slow.bind("b", bindDirect("b", "trade", "t", 10, true))
	connect(t, b.Addr(), "p").publish(newMessage("trade", "t", "M"))
	aop, am := a.receive()
	op, m := slow.receive()
	slow.ack(op, m, "b", false) // b: retry in 100 ms
	op, m = slow.receive()
	slow.ack(op, m, "b", false) // b: second failure, retry in 3 s
	second := time.Now()
	time.Sleep(50 * time.Millisecond)
	a.ack(aop, am, "a", false) // a: retry in 100 ms; both wait: parked
	op, m = a.receive()
	a.ack(op, m, "a", true)
	if b.Stats().Parked == 0 {
		t.Fatal("the message never waited in the store")
	}
	op, m = slow.receive()
	if el := time.Since(second); el < 2900*time.Millisecond {
		t.Fatalf("b retried %v after its second failure; its backoff is 3s", el.Round(time.Millisecond))
	}
	slow.ack(op, m, "b", true)
	eventually(t, "finished", func() bool { return storeCount(t, b.store) == 0 })
}
