package broker

import (
	"context"
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

// Regression tests from the second review of the memory bound.

type countStore struct {
	storage.Store
	dueNow, dueFar, readNow, readFar atomic.Int64
}

func (s *countStore) Due(ctx context.Context, q storage.DueQuery) ([]*storage.Message, error) {
	page, err := s.Store.Due(ctx, q)
	if q.Kind == storage.DueDelivery {
		if q.Before.After(time.Now().Add(time.Hour)) {
			s.dueFar.Add(1)
			s.readFar.Add(int64(len(page)))
		} else {
			s.dueNow.Add(1)
			s.readNow.Add(int64(len(page)))
		}
	}
	return page, err
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

type slowDueStore struct{ countStore }

func (s *slowDueStore) Due(ctx context.Context, q storage.DueQuery) ([]*storage.Message, error) {
	time.Sleep(2 * time.Millisecond)
	return s.countStore.Due(ctx, q)
}

func TestReviewScannerSpinsOnParksSlowStore(t *testing.T) {
	mem := memory.New(100000)
	defer mem.Close()
	st := &slowDueStore{countStore{Store: mem}}
	reg, _ := static.NewServer("")
	b := startOn(t, st, reg, nil)
	c := connect(t, b.Addr(), "g")
	c.bind("g", bindDirect("g", "trade", "t", 10, true))
	c.conn.Close()
	eventually(t, "gone", func() bool { return b.Stats().Connections == 0 })
	var wg sync.WaitGroup
	time.Sleep(200 * time.Millisecond)
	d0 := st.dueNow.Load()
	start := time.Now()
	var n atomic.Int64
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			prod := connect(t, b.Addr(), "p")
			for time.Since(start) < 2*time.Second {
				prod.publish(newMessage("trade", "t", "x"))
				n.Add(1)
			}
		}()
	}
	wg.Wait()
	el := time.Since(start)
	t.Logf("%d publishes (parked: %d) in %v: %d scanner Due calls (a 100ms ticker gives ~%d)",
		n.Load(), b.Stats().Parked, el, st.dueNow.Load()-d0, int(el/scanEvery))
}

// While an offline group's messages are parked as fast as they come, the
// scanner reads the store about once per tick, not once per park.
func TestScannerDoesNotSpinOnParks(t *testing.T) {
	mem := memory.New(100000)
	defer mem.Close()
	st := &slowDueStore{countStore{Store: mem}}
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
