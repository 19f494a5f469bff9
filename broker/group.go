package broker

import (
	"slices"
	"sync"
	"time"

	"github.com/kiteq/kiteq/storage"
)

// group is one consumer group on this broker: its live connections and
// the deliveries waiting for one of them. At most watermark deliveries of
// the group are in flight at once; at most as many again wait in its
// queue, in arrival order. Beyond that, and while the group has no live
// connection, its messages wait in the store (resultWaiting), and the
// group comes back for them, from waitFrom on, once it can take them. So
// a slow group slows only itself, and holds only its share of memory.
//
// Lock order: flight.mu before group.mu before session.mu; never hold
// group.mu while calling into a flight or the store.
type group struct {
	name string
	e    *engine

	mu        sync.Mutex
	sessions  []*session
	rr        int
	queue     []*delivery
	inflight  int
	watermark int

	// wait: messages wait in the store for this group, none of them
	// before waitFrom in the due order. While the scanner refills the
	// group, waits that begin meanwhile lower noted instead.
	wait      bool
	waitFrom  storage.Cursor
	refilling bool
	noted     *storage.Cursor
}

// offerOutcome is what a group did with a delivery offered to it.
type offerOutcome int

const (
	offerQueued  offerOutcome = iota // queued, or sent
	offerSkipped                     // no live connection, and a non-persistent binding or a fly message
	offerWaits                       // persistent, and no live connection or no room in the queue
)

// queueCapLocked bounds the deliveries queued behind those in flight.
func (g *group) queueCapLocked() int { return max(g.watermark, 16) }

// offer queues d when the group can take it.
func (g *group) offer(d *delivery) offerOutcome {
	g.mu.Lock()
	switch {
	case len(g.sessions) == 0 && (!d.persistent || d.f.fly):
		g.mu.Unlock()
		return offerSkipped
	case len(g.sessions) == 0, !d.f.fly && len(g.queue) >= g.queueCapLocked():
		// A fly message is never stored: it is queued past the cap, and
		// the memory bound (MaxDeliveryBytes) holds it.
		g.mu.Unlock()
		return offerWaits
	}
	g.queue = append(g.queue, d)
	picks, skipped, waits := g.pumpLocked()
	refill := g.wantsRefillLocked()
	g.mu.Unlock()
	g.send(picks, skipped, waits, refill)
	return offerQueued
}

// noteWaiting records that a message stored at or after c waits for the
// group.
func (g *group) noteWaiting(c storage.Cursor) {
	g.mu.Lock()
	switch {
	case g.refilling:
		if g.noted == nil || c.Compare(*g.noted) < 0 {
			g.noted = &c
		}
	case !g.wait || c.Compare(g.waitFrom) < 0:
		g.waitFrom = c
	}
	g.wait = true
	refill := g.wantsRefillLocked()
	g.mu.Unlock()
	if refill {
		g.e.wake()
	}
}

// wantsRefillLocked: messages wait in the store for the group, and it has
// a live connection and its queue is at most half full.
func (g *group) wantsRefillLocked() bool {
	return g.wait && !g.refilling && len(g.sessions) > 0 && len(g.queue) <= g.queueCapLocked()/2
}

func (g *group) wantsRefill() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.wantsRefillLocked()
}

// hasRoom reports whether the group can take another delivery now.
func (g *group) hasRoom() bool { return g.room() > 0 }

// room is how many more deliveries the group can queue now.
func (g *group) room() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(g.sessions) == 0 {
		return 0
	}
	return max(g.queueCapLocked()-len(g.queue), 0)
}

// startRefill begins a refill from the group's cursor.
func (g *group) startRefill() (storage.Cursor, bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.wantsRefillLocked() {
		return storage.Cursor{}, false
	}
	g.refilling, g.noted = true, nil
	return g.waitFrom, true
}

// endRefill ends a refill that looked at everything up to last, and at
// everything there is when end.
func (g *group) endRefill(last storage.Cursor, end bool) {
	g.mu.Lock()
	g.refilling = false
	g.wait, g.waitFrom = !end, last
	if g.noted != nil {
		if end || g.noted.Compare(last) < 0 {
			g.waitFrom = *g.noted
		}
		g.wait, g.noted = true, nil
	}
	g.mu.Unlock()
}

// pick is a delivery chosen for a session, sent outside the group lock.
type pick struct {
	d *delivery
	s *session
}

// change runs fn under the group's lock, then sends whatever the group can
// send after it: every change of queue, room or consumers goes through here.
func (g *group) change(fn func()) {
	g.mu.Lock()
	fn()
	picks, skipped, waits := g.pumpLocked()
	refill := g.wantsRefillLocked()
	g.mu.Unlock()
	g.send(picks, skipped, waits, refill)
}

// requeue puts deliveries that lost their connection back at the head of
// the queue, so they go to another consumer at once.
func (g *group) requeue(ds []*delivery) {
	g.change(func() {
		g.inflight -= len(ds)
		g.queue = append(append(make([]*delivery, 0, len(ds)+len(g.queue)), ds...), g.queue...)
	})
}

// done ends an in-flight delivery and lets the next one out.
func (g *group) done() {
	g.change(func() { g.inflight-- })
}

func (g *group) addSession(s *session) {
	g.change(func() { g.sessions = append(g.sessions, s) })
}

func (g *group) removeSession(s *session) {
	g.change(func() {
		if i := slices.Index(g.sessions, s); i >= 0 {
			g.sessions = slices.Delete(g.sessions, i, i+1)
		}
	})
}

// anySession returns a live connection of the group, in turn, or nil.
func (g *group) anySession() *session {
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(g.sessions) == 0 {
		return nil
	}
	g.rr++
	return g.sessions[g.rr%len(g.sessions)]
}

func (g *group) setWatermark(w int) {
	g.change(func() { g.watermark = w })
}

// pumpLocked takes deliveries off the queue while the group has room and
// a live connection. Without a connection, deliveries of non-persistent
// bindings and fly messages are skipped, and the others wait in the store.
func (g *group) pumpLocked() (picks []pick, skipped, waits []*delivery) {
	if len(g.sessions) == 0 {
		for _, d := range g.queue {
			if d.persistent && !d.f.fly {
				waits = append(waits, d)
			} else {
				skipped = append(skipped, d)
			}
		}
		g.queue = nil
		return nil, skipped, waits
	}
	n := 0
	for n < len(g.queue) && g.inflight < g.watermark {
		s := g.sessions[g.rr%len(g.sessions)]
		g.rr++
		picks = append(picks, pick{d: g.queue[n], s: s})
		g.inflight++
		n++
	}
	if n > 0 {
		clear(g.queue[:n])
		g.queue = g.queue[n:]
		if len(g.queue) == 0 {
			g.queue = nil
		}
	}
	return picks, skipped, waits
}

func (g *group) send(picks []pick, skipped, waits []*delivery, refill bool) {
	var lost []*delivery
	for _, p := range picks {
		if !p.s.deliver(p.d) {
			lost = append(lost, p.d)
		}
	}
	for _, d := range skipped {
		d.f.groupResult(d, resultSkipped, "")
	}
	for _, d := range waits {
		d.f.groupResult(d, resultWaiting, "")
	}
	if refill {
		g.e.wake()
	}
	if len(lost) > 0 {
		// The session closed between the pick and the send; its removal
		// from the group is under way, so the retry picks another one.
		g.requeue(lost)
	}
}

// takeExpired removes and returns the queued deliveries whose message
// expired before now.
func (g *group) takeExpired(now time.Time) []*delivery {
	g.mu.Lock()
	defer g.mu.Unlock()
	var out []*delivery
	kept := g.queue[:0]
	for _, d := range g.queue {
		if now.After(g.e.expiry(d.f.msg)) {
			out = append(out, d)
		} else {
			kept = append(kept, d)
		}
	}
	clear(g.queue[len(kept):])
	g.queue = kept
	return out
}
