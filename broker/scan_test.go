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
	o.Auth = AuthOpen // loopback tests
	stats := &Stats{}
	e := newEngine(zap.NewNop(), st, o, stats)
	defer e.stop()
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
	defer e.stop()
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
	defer e.stop()
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

type gateStore struct {
	storage.Store
	mu   sync.Mutex
	id   string
	gate chan struct{}
	in   chan struct{}
}

func (s *gateStore) Save(ctx context.Context, m *storage.Message) (bool, error) {
	s.mu.Lock()
	gate := s.gate
	match := gate != nil && s.id == m.ID()
	if match {
		s.gate = nil
	}
	s.mu.Unlock()
	if match {
		close(s.in)
		<-gate
	}
	return s.Store.Save(ctx, m)
}

// A duplicate publish claims a parked message while its group's refill
// passes by: the refill stops at the claim and comes back, so the group
// gets the message.
func TestRefillStopsAtAnotherCallersClaim(t *testing.T) {
	mem := memory.New(1000)
	defer mem.Close()
	st := &gateStore{Store: mem}
	reg, _ := static.NewServer("")
	b := startOn(t, st, reg, nil)
	binder := connect(t, b.Addr(), "g")
	binder.bind("g", bindDirect("g", "trade", "t", 10, true))
	binder.conn.Close()
	eventually(t, "gone", func() bool { return b.Stats().Connections == 0 })
	prod := connect(t, b.Addr(), "p")
	m := newMessage("trade", "t", "M")
	prod.publish(m)
	eventually(t, "parked", func() bool { return b.Stats().Parked == 1 && b.Stats().InFlight == 0 })

	// The producer resends M (say its store-ack was late); the Save is slow.
	gate := make(chan struct{})
	st.mu.Lock()
	st.id, st.gate, st.in = m.Header.GetMessageId(), gate, make(chan struct{})
	in := st.in
	st.mu.Unlock()
	op := prod.send(protocol.CmdStringMessage, m)
	<-in // claimed by the duplicate, Save in progress

	cons := connect(t, b.Addr(), "g")  // refill from the start: M is claimed, passed
	time.Sleep(500 * time.Millisecond) // g's refill runs
	close(gate)
	p := prod.expect(protocol.CmdMessageStoreAck)
	if p.Opaque != op {
		t.Fatal("opaque")
	}
	if _, err := cons.read(2 * time.Second); err != nil {
		got, _ := mem.Get(context.Background(), m.Header.GetMessageId())
		t.Fatalf("g (consumer connected, room) never got M: %v; M stored due %v (its expiry), waits till then", err, got.NextDeliverTime)
	}
}

// slowDueStore takes 2 ms over each Due, and counts the scanner's reads:
// those of what is due now (a group's refill reads far ahead).
type slowDueStore struct {
	storage.Store
	dueNow atomic.Int64
}

func (s *slowDueStore) Due(ctx context.Context, q storage.DueQuery) ([]*storage.Message, error) {
	time.Sleep(2 * time.Millisecond)
	if q.Kind == storage.DueDelivery && !q.Before.After(time.Now().Add(time.Hour)) {
		s.dueNow.Add(1)
	}
	return s.Store.Due(ctx, q)
}

// While an offline group's messages are parked as fast as they come, the
// scanner reads the store about once per tick, not once per park.
func TestScannerDoesNotSpinOnParks(t *testing.T) {
	mem := memory.New(100000)
	defer mem.Close()
	st := &slowDueStore{Store: mem}
	reg, err := static.NewServer("")
	if err != nil {
		t.Fatal(err)
	}
	b := startOn(t, st, reg, nil)
	c := connect(t, b.Addr(), "g")
	c.bind("g", bindDirect("g", "trade", "t", 10, true))
	c.conn.Close()
	eventually(t, "gone", func() bool { return b.Stats().Connections == 0 })
	time.Sleep(200 * time.Millisecond)
	d0 := st.dueNow.Load()
	start := time.Now()
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			prod := connect(t, b.Addr(), "p")
			for time.Since(start) < 2*time.Second {
				prod.publish(newMessage("trade", "t", "x"))
			}
		})
	}
	wg.Wait()
	el := time.Since(start)
	calls, ticks := st.dueNow.Load()-d0, int64(el/scanEvery)
	t.Logf("%d parked in %v: %d scanner reads (%d ticks)", b.Stats().Parked, el.Round(time.Millisecond), calls, ticks)
	if calls > 4*ticks {
		t.Fatalf("%d scanner reads in %v, over 4 per %v tick", calls, el, scanEvery)
	}
}

// holdDeleteStore: Delete of one id lands, then its caller is held.
type holdDeleteStore struct {
	storage.Store
	mu      sync.Mutex
	id      string
	release chan struct{}
	landed  chan struct{}
}

func (s *holdDeleteStore) Delete(ctx context.Context, id string) error {
	err := s.Store.Delete(ctx, id)
	s.mu.Lock()
	match := s.id == id && s.release != nil
	rel, landed := s.release, s.landed
	if match {
		s.release = nil
	}
	s.mu.Unlock()
	if match {
		close(landed)
		<-rel
	}
	return err
}

// A publish of an id whose earlier flight is ending (its Delete landed,
// the flight not yet forgotten) is delivered.
func TestRepublishWhileOldFlightEndsIsDelivered(t *testing.T) {
	mem := memory.New(1000)
	defer mem.Close()
	st := &holdDeleteStore{Store: mem}
	reg, _ := static.NewServer("")
	b := startOn(t, st, reg, nil)
	c := connect(t, b.Addr(), "g")
	c.bind("g", bindDirect("g", "trade", "t", 10, true))
	prod := connect(t, b.Addr(), "p")
	m := newMessage("trade", "t", "M")
	st.mu.Lock()
	st.id, st.release, st.landed = m.Header.GetMessageId(), make(chan struct{}), make(chan struct{})
	rel, landed := st.release, st.landed
	st.mu.Unlock()
	prod.publish(m)
	op, got := c.receive()
	c.ack(op, got, "g", true)
	<-landed
	m2 := proto.Clone(m).(*protocol.StringMessage)
	m2.Header.ExpiredTime = proto.Int64(time.Now().Add(time.Hour).Unix())
	if ack := prod.publish(m2); !ack.GetStatus() || ack.GetFeedback() != "stored" { // same id, stored again
		t.Fatalf("republish: %v %s", ack.GetStatus(), ack.GetFeedback())
	}
	time.Sleep(300 * time.Millisecond) // the scanner passes it
	close(rel)
	op, got = c.receive()
	if got.Header.GetMessageId() != m.Header.GetMessageId() {
		t.Fatalf("got %s, want the republished message", got.Header.GetMessageId())
	}
	c.ack(op, got, "g", true)
}

// With memory between 3/4 and full while the scanner catches up, a
// message for another group is not held back.
func TestBlockedScannerDoesNotStallOtherGroups(t *testing.T) {
	b := startBroker(t, func(o *Options) {
		o.MaxBody = 16 << 10
		o.MaxDeliveryBytes = 64 << 10
		o.DeliverTimeout = 4 * time.Second
	})
	a := connect(t, b.Addr(), "a")
	a.bind("a", bindDirect("a", "trade", "t", 100, true))
	bc := connect(t, b.Addr(), "b")
	bc.bind("b", bindDirect("b", "trade", "u", 10, true))
	prod := connect(t, b.Addr(), "p")
	publishN(t, prod, 44, 1000) // 43 fit, the 44th finds no room: blocked
	type held struct {
		op uint32
		m  *protocol.StringMessage
	}
	var hs []held
	for range 43 {
		op, m := a.receive()
		hs = append(hs, held{op, m})
	}
	for _, h := range hs[:4] { // a acknowledges 4: memory ~90%, room for 4 messages
		a.ack(h.op, h.m, "a", true)
	}
	eventually(t, "acks", func() bool { return b.Stats().InFlight == 39 })
	start := time.Now()
	prod.publish(newMessage("trade", "u", "for b"))
	bc.receive()
	if took := time.Since(start); took > time.Second {
		t.Fatalf("with memory between 3/4 and full, another group's message took %v", took)
	}
}

// A fly message, which the scanner cannot find, takes the room there is
// while the scanner catches up.
func TestFlyMessageTakesRoomWhileBlocked(t *testing.T) {
	mem := memory.New(100)
	defer mem.Close()
	stats := &Stats{}
	e := newEngine(zap.NewNop(), mem, DefaultOptions(), stats)
	defer e.stop()
	e.updateRoutes("trade", []*binding.Binding{binding.Bind_Direct("c", "trade", "t", 10, false)})
	e.mu.Lock()
	e.blocked = true
	e.mu.Unlock()
	m := storedMessage(time.Now())
	m.Header.Fly = proto.Bool(true)
	err := e.dispatch(m, true, false)
	_, bytes := e.inMemory()
	if err == errNoRoom {
		t.Fatalf("fly message dropped (FlyDropped=%d) with %d bytes in memory of %d", stats.FlyDropped.Load(), bytes, e.opts.MaxDeliveryBytes)
	}
}
