package broker

import (
	"slices"
	"sync"
	"time"
)

// group is one consumer group on this broker: its live connections and
// the deliveries waiting for one of them. At most watermark deliveries of
// the group are in flight at once; the rest wait in the queue in arrival
// order, so a slow group slows only itself.
//
// Lock order: group.mu before session.mu; never hold group.mu while
// calling into a flight or the store.
type group struct {
	name string
	e    *engine

	mu        sync.Mutex
	sessions  []*session
	rr        int
	queue     []*delivery
	inflight  int
	watermark int
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
	picks, skipped := g.pumpLocked()
	g.mu.Unlock()
	g.send(picks, skipped)
}

// enqueue offers d to the group; it goes out now if the group has room.
func (g *group) enqueue(d *delivery) {
	g.change(func() { g.queue = append(g.queue, d) })
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
// bindings are skipped and persistent ones wait.
func (g *group) pumpLocked() (picks []pick, skipped []*delivery) {
	if len(g.sessions) == 0 {
		kept := g.queue[:0]
		for _, d := range g.queue {
			if d.persistent {
				kept = append(kept, d)
			} else {
				skipped = append(skipped, d)
			}
		}
		clear(g.queue[len(kept):])
		g.queue = kept
		return nil, skipped
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
	return picks, skipped
}

func (g *group) send(picks []pick, skipped []*delivery) {
	var lost []*delivery
	for _, p := range picks {
		if !p.s.deliver(p.d) {
			lost = append(lost, p.d)
		}
	}
	for _, d := range skipped {
		d.f.groupResult(d, resultSkipped, "")
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
