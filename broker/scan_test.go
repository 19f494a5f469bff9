package broker

import (
	"context"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"google.golang.org/protobuf/proto"

	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/registry/binding"
	"github.com/kiteq/kiteq/registry/static"
	"github.com/kiteq/kiteq/storage"
	"github.com/kiteq/kiteq/storage/memory"
)

// The scanner's cursor only moves forward; these tests are the ways a
// message could end up behind it, or behind a group's, with nobody looking.

// pageHoldStore holds the next Due call after it has read its page, until
// the test lets it go.
type pageHoldStore struct {
	storage.Store
	mu   sync.Mutex
	hold chan struct{}
	got  chan struct{}
}

func (s *pageHoldStore) Due(ctx context.Context, q storage.DueQuery) ([]*storage.Message, error) {
	page, err := s.Store.Due(ctx, q)
	s.mu.Lock()
	hold, got := s.hold, s.got
	s.hold = nil
	s.mu.Unlock()
	if hold != nil && q.Kind == storage.DueDelivery {
		got <- struct{}{}
		<-hold
	}
	return page, err
}

// storedMessage is a committed message stored at t.
func storedMessage(t time.Time) *storage.Message {
	topic, mt := "trade", "t"
	h := &protocol.Header{MessageId: proto.String(protocol.MessageId()), Topic: &topic, MessageType: &mt,
		ExpiredTime: proto.Int64(time.Now().Add(time.Hour).Unix()), DeliveryLimit: proto.Int32(-1),
		GroupId: proto.String("p"), Commit: proto.Bool(true), Fly: proto.Bool(false), CreateTime: proto.Int64(time.Now().Unix())}
	body := "x"
	return storage.NewMessage(&protocol.StringMessage{Header: h, Body: &body}, t)
}

// A message left in the store for lack of room while the scanner works
// through a page that goes past it: the scanner comes back for it.
func TestScanRewindDuringAPageIsKept(t *testing.T) {
	mem := memory.New(100)
	defer mem.Close()
	st := &pageHoldStore{Store: mem}
	o := DefaultOptions()
	stats := &Stats{}
	e := newEngine(zap.NewNop(), st, o, stats)
	e.updateRoutes("trade", []*binding.Binding{binding.Bind_Direct("c", "trade", "t", 10, true)})
	ctx := context.Background()
	now := time.Now()

	b := storedMessage(now.Add(-500 * time.Millisecond)) // in memory, held by a consumer
	if _, err := mem.Save(ctx, b); err != nil {
		t.Fatal(err)
	}
	e.mu.Lock()
	e.flights[b.ID()] = &flight{}
	e.bytes = o.MaxDeliveryBytes // memory is full
	e.mu.Unlock()

	hold := make(chan struct{})
	st.hold, st.got = hold, make(chan struct{})
	done := make(chan struct{})
	go func() { e.scanDue(); close(done) }()
	<-st.got // the scanner has read its page: [b]

	// a, published before b, is saved after the page was read and finds
	// no room.
	a := storedMessage(now.Add(-time.Second))
	if !e.claim(a.ID()) {
		t.Fatal("claim")
	}
	if _, err := mem.Save(ctx, a); err != nil {
		t.Fatal(err)
	}
	if err := e.dispatch(a, false, false); err != errNoRoom {
		t.Fatalf("dispatch with memory full: %v, want errNoRoom", err)
	}
	close(hold)
	<-done

	e.mu.Lock()
	e.bytes = 0
	delete(e.flights, b.ID())
	e.mu.Unlock()
	e.scanDue()
	// The group has no consumer: a scanner that took a parks it again.
	deadline := time.Now().Add(5 * time.Second)
	for stats.Parked.Load() == 0 {
		if time.Now().After(deadline) {
			e.mu.Lock()
			cur := e.scan.cursor
			e.mu.Unlock()
			t.Fatalf("a (%v) was never dispatched: the scanner's cursor is %v, past it", a.Cursor(), cur)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// While the scanner catches up with what waits for room, a publish leaves
// its message to it even when memory has room: messages come back in due
// order.
func TestScanBlockedLeavesPublishesToTheScanner(t *testing.T) {
	mem := memory.New(100)
	defer mem.Close()
	stats := &Stats{}
	e := newEngine(zap.NewNop(), mem, DefaultOptions(), stats)
	e.updateRoutes("trade", []*binding.Binding{binding.Bind_Direct("c", "trade", "t", 10, true)})
	m := storedMessage(time.Now())
	if _, err := mem.Save(context.Background(), m); err != nil {
		t.Fatal(err)
	}
	e.mu.Lock()
	e.blocked = true
	e.mu.Unlock()
	if !e.claim(m.ID()) {
		t.Fatal("claim")
	}
	if err := e.dispatch(m, false, false); err != errNoRoom {
		t.Fatalf("a publish's dispatch while blocked: %v, want errNoRoom", err)
	}
	e.scanDue()
	e.mu.Lock()
	blocked := e.blocked
	e.mu.Unlock()
	if blocked {
		t.Fatal("the scanner caught up, and is still blocked")
	}
	// The group has no consumer: the scanner took it, and parked it.
	eventually(t, "the message taken by the scanner", func() bool { return stats.Parked.Load() == 1 })
}

// A duplicate publish of a stored, due message claims it while the scanner
// passes; giving the claim up brings the scanner back to it.
func TestScanDuplicatePublishClaim(t *testing.T) {
	mem := memory.New(100)
	defer mem.Close()
	stats := &Stats{}
	e := newEngine(zap.NewNop(), mem, DefaultOptions(), stats)
	e.updateRoutes("trade", []*binding.Binding{binding.Bind_Direct("c", "trade", "t", 10, true)})
	m := storedMessage(time.Now().Add(-time.Second)) // due: its retry came, say
	if _, err := mem.Save(context.Background(), m); err != nil {
		t.Fatal(err)
	}
	if !e.claim(m.ID()) { // the duplicate's claim, then Save: stored=false
		t.Fatal("claim")
	}
	e.scanDue() // passes it
	e.dropClaim(m.ID())
	e.scanDue()
	// The group has no consumer: the scanner took the message, and it
	// waits in the store again.
	eventually(t, "the message taken and parked", func() bool { return stats.Parked.Load() == 1 })
}

// A group that waits for a message while another group's failure moves the
// message earlier in the due order still finds it when it has room again.
func TestWaitingGroupFindsMessageMovedEarlier(t *testing.T) {
	b := startBroker(t, func(o *Options) { o.DeliverTimeout = 30 * time.Second })
	for _, g := range []string{"g", "h", "k"} {
		c := connect(t, b.Addr(), g)
		bs := []*protocol.Binding{bindDirect(g, "trade", "t", 1, true)}
		if g == "g" {
			bs = append(bs, bindDirect(g, "trade", "f", 1, true))
		}
		c.bind(g, bs...)
		c.conn.Close()
	}
	eventually(t, "binders gone", func() bool { return b.Stats().Connections == 0 })
	prod := connect(t, b.Addr(), "p")
	const fillers = 40
	for range fillers {
		if ack := prod.publish(newMessage("trade", "f", "filler")); !ack.GetStatus() {
			t.Fatal(ack.GetFeedback())
		}
	}
	m := newMessage("trade", "t", "M")
	m.Header.ExpiredTime = proto.Int64(time.Now().Add(2 * time.Hour).Unix())
	prod.publish(m)
	id := m.Header.GetMessageId()
	eventually(t, "all parked", func() bool { st := b.Stats(); return st.InFlight == 0 && st.Parked >= fillers+1 })

	// g fills its queue with fillers (watermark 1, and a queue of 16), so
	// its refill stops before M; h and k take M.
	gc := connect(t, b.Addr(), "g")
	eventually(t, "g's queue full", func() bool { return b.Stats().InFlight == 17 })
	hc := connect(t, b.Addr(), "h")
	kc := connect(t, b.Addr(), "k")
	hop, hm := hc.receive()
	kop, km := kc.receive()
	stored, err := b.store.Get(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	at := stored.NextDeliverTime
	kc.ack(kop, km, "k", false) // k fails while h holds M: M moves to k's retry, before where it was
	eventually(t, "M moved earlier", func() bool {
		got, err := b.store.Get(context.Background(), id)
		return err == nil && got.NextDeliverTime.Before(at)
	})
	kop, km = kc.receive()
	kc.ack(kop, km, "k", true)

	// g drains its fillers, h acknowledges, and g must get M.
	gotM := 0
	drain := func(d time.Duration) {
		for {
			p, err := gc.read(d)
			if err != nil {
				return
			}
			var got protocol.StringMessage
			gc.decode(p, &got)
			if got.Header.GetMessageId() == id {
				gotM++
			}
			gc.ack(p.Opaque, &got, "g", true)
		}
	}
	drain(time.Second)
	hc.ack(hop, hm, "h", true)
	drain(2 * time.Second)
	if gotM != 1 {
		got, _ := b.store.Get(context.Background(), id)
		t.Fatalf("g, with a consumer and room, got M %d times, want once; stored: %+v", gotM, got)
	}
	eventually(t, "all finished", func() bool { return storeCount(t, b.store) == 0 })
}

// A message whose delivery expired while in flight, and whose group's last
// consumer then leaves, is dead-lettered, not left waiting.
func TestExpiredWhileInFlightThenGroupGoneIsDeadLettered(t *testing.T) {
	b := startBroker(t, func(o *Options) { o.DeliverTimeout = 30 * time.Second })
	gc := connect(t, b.Addr(), "g")
	gc.bind("g", bindDirect("g", "trade", "t", 10, true))
	prod := connect(t, b.Addr(), "p")
	m := newMessage("trade", "t", "M")
	m.Header.ExpiredTime = proto.Int64(time.Now().Add(time.Second).Unix())
	prod.publish(m)
	gc.receive() // held, not acknowledged
	time.Sleep(time.Until(time.Unix(m.Header.GetExpiredTime(), 0)) + 300*time.Millisecond)
	gc.conn.Close()
	eventually(t, "dead-lettered", func() bool {
		dl, err := b.store.DeadLetters(context.Background(), "", 10)
		return err == nil && len(dl) == 1 && strings.Contains(dl[0].Reason, "g: expired at") &&
			strings.Contains(dl[0].Reason, "while its group had no consumer")
	})
}

// slowWriteStore makes RecordDelivery of one message slow.
type slowWriteStore struct {
	storage.Store
	slowID atomic.Value
}

func (s *slowWriteStore) RecordDelivery(ctx context.Context, r storage.DeliveryResult) error {
	if id, _ := s.slowID.Load().(string); id == r.MessageID {
		time.Sleep(400 * time.Millisecond)
	}
	return s.Store.RecordDelivery(ctx, r)
}

// A retry whose write lands after the scanner passed its time still comes.
func TestRetryWrittenBehindTheCursorComes(t *testing.T) {
	mem := memory.New(1000)
	defer mem.Close()
	st := &slowWriteStore{Store: mem}
	reg, err := static.NewServer("")
	if err != nil {
		t.Fatal(err)
	}
	b := startOn(t, st, reg, func(o *Options) { o.DeliverTimeout = 30 * time.Second })
	c := connect(t, b.Addr(), "c")
	c.bind("c", bindDirect("c", "trade", "t", 10, true))
	h := connect(t, b.Addr(), "h")
	h.bind("h", bindDirect("h", "trade", "n", 10, true))
	prod := connect(t, b.Addr(), "p")
	m := newMessage("trade", "t", "M")
	st.slowID.Store(m.Header.GetMessageId())
	prod.publish(m)
	op, got := c.receive()
	c.ack(op, got, "c", false) // retry in 50 ms; the write takes 400 ms
	time.Sleep(100 * time.Millisecond)
	prod.publish(newMessage("trade", "n", "N"))
	h.receive() // N held: the scanner moves past M's retry time
	op, got = c.receive()
	if got.Header.GetMessageId() != m.Header.GetMessageId() {
		t.Fatalf("got %s, want the retry of M", got.Header.GetMessageId())
	}
	c.ack(op, got, "c", true)
}
