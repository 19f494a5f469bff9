package broker

import (
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/kiteq/kiteq/storage"
)

// flight is a committed message in this broker's memory while it is
// delivered: the message, and for each matching group whether it
// acknowledged, how often it failed and whether it gave up.
//
// A stored message is in memory only while one of its groups has a
// delivery queued for, or in flight to, a live consumer. When every group
// that has not finished waits instead — for its retry, or for a consumer,
// or for room in its queue — the flight is parked: its state is stored,
// with the time it is next due, and it leaves memory. The scanner
// (scan.go) brings it back when that time comes, or when a waiting group
// can take it. So what the broker holds grows with what its consumers can
// take, not with what waits for them.
//
// A flight ends when every group acknowledged, was skipped or gave up;
// then the message is deleted or dead-lettered.
type flight struct {
	e    *engine
	msg  *storage.Message // as stored when the flight began; never changed
	fly  bool             // never stored: no store calls, never parked
	size int64            // bytes counted against Options.MaxDeliveryBytes

	mu      sync.Mutex
	groups  []*groupState // one for each matching group, by group name
	pending int           // groups that have not finished
	ended   bool          // finished or parked: the flight changes no more
	// low is the earliest time the message has been stored at since it
	// was read: its writes may move it earlier (a retry before the expiry
	// it waited at), and until one lands it is at either time. A group
	// that waits for it looks from before low (waitCursorLocked).
	low time.Time
	// stored is closed when the flight's last store call so far is done:
	// each call waits for the one before, so the store sees the message's
	// changes in the order they were made.
	stored chan struct{}
}

// storeSlot is a flight's place in the order of its store calls: wait for
// prev, then close done.
type storeSlot struct{ prev, done chan struct{} }

// slotLocked takes the next place in f's store calls. The caller holds
// f.mu, so the places follow the changes they store.
func (f *flight) slotLocked() storeSlot {
	s := storeSlot{prev: f.stored, done: make(chan struct{})}
	f.stored = s.done
	return s
}

// state returns the state of the group called name, or nil. A message
// goes to a few groups: a scan is quicker than a map, and a map for each
// message was a tenth of what the broker allocates.
func (f *flight) state(name string) *groupState {
	for _, gs := range f.groups {
		if gs.d.g.name == name {
			return gs
		}
	}
	return nil
}

// groupDelivery allocates a group's state and its delivery together.
type groupDelivery struct {
	groupState
	delivery
}

type groupState struct {
	d        *delivery
	attempts int32
	result   deliveryResult
	reason   string
	retryAt  time.Time // resultFailed: when the retry is due
	retry    stopper   // resultFailed: the retry's timer
}

type deliveryResult int

const (
	resultPending deliveryResult = iota // queued for, or in flight to, a consumer
	resultAcked
	resultSkipped // no live consumer, and a non-persistent binding or a fly message
	resultFailed  // this attempt failed; its retry is due at retryAt
	resultWaiting // persistent, but the group has no consumer or no room: waits in the store
	resultGaveUp  // delivery limit or expiry reached
	resultExpired // reported only: expired while waiting for a retry
)

// finished reports whether a group with this result is done with.
func (r deliveryResult) finished() bool {
	return r == resultAcked || r == resultSkipped || r == resultGaveUp
}

// delivery is one message on its way to one group.
type delivery struct {
	f          *flight
	g          *group
	persistent bool
}

// groupResult records what became of d: the outcome of an attempt, or
// that the group cannot take the message now (resultWaiting), after which
// the group comes back for it (group.noteWaiting) once it can.
func (f *flight) groupResult(d *delivery, r deliveryResult, reason string) {
	e, g := f.e, d.g
	now := e.now()
	f.mu.Lock()
	gs := f.state(g.name)
	if f.ended || gs == nil || gs.result.finished() || (r == resultWaiting && gs.result != resultPending) {
		f.mu.Unlock()
		return
	}
	switch r {
	case resultAcked, resultSkipped:
		gs.result = r
		f.pending--
	case resultWaiting:
		if at := e.expiry(f.msg); now.After(at) {
			// Nothing will look for it once it waits: it is given up.
			gs.result = resultGaveUp
			gs.reason = fmt.Sprintf("expired at %s while its group had no consumer", at.UTC().Format(time.RFC3339))
			f.pending--
			break
		}
		gs.result = resultWaiting
		// The group comes back for it once it can, from where the message
		// is stored now, or earlier (a write of this flight that moves it
		// notes the group again).
		defer g.noteWaiting(f.waitCursorLocked())
	case resultExpired:
		gs.result = resultGaveUp
		gs.reason = fmt.Sprintf("expired at %s before its retry; last failure: %s",
			e.expiry(f.msg).UTC().Format(time.RFC3339), gs.reason)
		f.pending--
	case resultFailed:
		gs.attempts++
		gs.reason = reason
		limit := f.msg.Header.GetDeliveryLimit()
		switch {
		case limit > 0 && gs.attempts >= limit:
			gs.result = resultGaveUp
			gs.reason = fmt.Sprintf("delivery limit %d reached; last failure: %s", limit, reason)
			f.pending--
		case now.After(e.expiry(f.msg)):
			gs.result = resultGaveUp
			gs.reason = fmt.Sprintf("expired at %s; last failure: %s", e.expiry(f.msg).UTC().Format(time.RFC3339), reason)
			f.pending--
		default:
			gs.result = resultFailed
			gs.retryAt = now.Add(e.retryDelay(gs.attempts))
		}
	}

	switch {
	case f.pending == 0:
		deadReason, final, slot := f.endLocked(now)
		f.mu.Unlock()
		e.finish(f, deadReason, final, slot)
	case f.parkableLocked():
		w := f.parkLocked(now)
		f.mu.Unlock()
		e.write("park", w, func() { e.stats.Parked.Add(1); e.forget(f) })
	case gs.result == resultFailed:
		// Other groups still have the message: it stays, and so does
		// this group's retry. The store learns of the failure, so that a
		// restart counts it.
		gs.retry = e.after(gs.retryAt.Sub(now), func() { f.retryDue(d) })
		if f.fly {
			f.mu.Unlock()
			return
		}
		w := f.writeLocked(f.nextLocked(now))
		f.mu.Unlock()
		e.write("record delivery", w, nil)
	default:
		f.mu.Unlock()
	}
}

// write is a flight's store call that moves its message in the due order:
// the state, its place in the flight's order of store calls, and the
// groups that wait for the message, which must look for it at its new
// place (engine.write).
type write struct {
	r       storage.DeliveryResult
	slot    storeSlot
	waiting []*group
}

// writeLocked prepares the write of f's state, due at next.
func (f *flight) writeLocked(next time.Time) write {
	w := write{r: *f.resultLocked(next), slot: f.slotLocked()}
	if next.Before(f.low) {
		f.low = next
	}
	for _, gs := range f.groups {
		if gs.result == resultWaiting {
			w.waiting = append(w.waiting, gs.d.g)
		}
	}
	return w
}

// nextLocked is when the message is next due: at the first retry of a
// failed group, or else at its expiry, which dead-letters it if no group
// took it by then. A group that waits with no failure is not due at any
// time: it comes back for the message (group.waitFrom). One that waits
// after failures is stored as failed (its count must last), so it is due
// again after its next backoff, and tries again then.
//
// Each failed group's own time is stored too (FailDue), so that a group
// with a long backoff is not retried at another group's shorter one.
func (f *flight) nextLocked(now time.Time) time.Time {
	next := f.e.expiry(f.msg)
	for _, gs := range f.groups {
		switch {
		case gs.result == resultFailed:
		case gs.result == resultWaiting && gs.attempts > 0:
			gs.retryAt = now.Add(f.e.retryDelay(gs.attempts))
		default:
			continue
		}
		if gs.retryAt.Before(next) {
			next = gs.retryAt
		}
	}
	return next
}

// retryDue offers d to its group again once its retry is due.
func (f *flight) retryDue(d *delivery) {
	if f.e.now().After(f.e.expiry(f.msg)) {
		f.groupResult(d, resultExpired, "") // given up, not delivered
		return
	}
	f.mu.Lock()
	gs := f.state(d.g.name)
	if f.ended || gs.result != resultFailed {
		f.mu.Unlock()
		return
	}
	gs.result, gs.retry = resultPending, nil
	f.mu.Unlock()
	f.offer(d)
}

// offer hands d to its group, which queues it, skips it or makes it wait.
func (f *flight) offer(d *delivery) {
	switch d.g.offer(d) {
	case offerSkipped:
		f.groupResult(d, resultSkipped, "")
	case offerWaits:
		f.groupResult(d, resultWaiting, "")
	}
}

// offerWaiting offers the message again to g if g waits for it.
func (f *flight) offerWaiting(g *group) {
	f.mu.Lock()
	gs := f.state(g.name)
	if f.ended || gs == nil || gs.result != resultWaiting {
		f.mu.Unlock()
		return
	}
	gs.result = resultPending
	d := gs.d
	f.mu.Unlock()
	f.offer(d)
}

// waitCursorLocked is a position in the due order at or before where the
// message is stored, and will be until a write of this flight lands
// (engine.write notes the waiting groups again then).
func (f *flight) waitCursorLocked() storage.Cursor { return before(f.low) }

// before is a cursor just before any message stored at t: a backend may
// have truncated t to the millisecond.
func before(t time.Time) storage.Cursor {
	return storage.Cursor{Time: t.Add(-time.Millisecond)}
}

// parkableLocked reports whether no group of a stored flight has the
// message queued or in flight, so that its state can wait in the store.
func (f *flight) parkableLocked() bool {
	if f.fly {
		return false
	}
	for _, gs := range f.groups {
		if gs.result == resultPending {
			return false
		}
	}
	return true
}

// parkLocked ends f in memory: its retries stop, and its state is written
// due when it is next due.
func (f *flight) parkLocked(now time.Time) write {
	f.ended = true
	for _, gs := range f.groups {
		if gs.retry != nil {
			gs.retry.Stop()
			gs.retry = nil
		}
	}
	return f.writeLocked(f.nextLocked(now))
}

// resultLocked is the delivery state to store, due at next. FailGroups
// are the groups with failures that have not acknowledged: those still to
// retry, those waiting, and those that gave up (a group that reached its
// delivery limit is known by its count when the message is read again).
func (f *flight) resultLocked(next time.Time) *storage.DeliveryResult {
	r := &storage.DeliveryResult{MessageID: f.msg.ID(), NextDeliverTime: next}
	for _, gs := range f.groups { // by name
		name := gs.d.g.name
		r.DeliverCount = max(r.DeliverCount, gs.attempts)
		switch {
		case gs.result == resultAcked || gs.result == resultSkipped:
			r.SuccGroups = append(r.SuccGroups, name)
		case gs.attempts > 0:
			due := next // a group that gave up: known by its count
			if gs.result == resultFailed || gs.result == resultWaiting {
				due = gs.retryAt
			}
			r.FailGroups = append(r.FailGroups, name)
			r.FailCounts = append(r.FailCounts, gs.attempts)
			r.FailDue = append(r.FailDue, due)
		}
	}
	r.SuccGroups = append(r.SuccGroups, f.msg.SuccGroups...)
	sort.Strings(r.SuccGroups)
	return r
}

// endLocked ends f once no group is pending: why the message goes to the
// dead-letter queue ("" when it does not), each group's result for the
// dead letter, and the place of the finishing store call. The caller
// holds f.mu.
func (f *flight) endLocked(now time.Time) (deadReason string, final *storage.DeliveryResult, slot storeSlot) {
	f.ended = true
	for _, gs := range f.groups {
		if gs.retry != nil {
			gs.retry.Stop()
			gs.retry = nil
		}
	}
	deadReason = f.deadReasonLocked()
	if deadReason != "" && !f.fly {
		final = f.resultLocked(now) // the dead letter keeps each group's result
	}
	return deadReason, final, f.slotLocked()
}

// deadReasonLocked is why the message goes to the dead-letter queue, or
// "" when every group acknowledged it.
func (f *flight) deadReasonLocked() string {
	var reasons []string
	for _, gs := range f.groups {
		if gs.result == resultGaveUp {
			reasons = append(reasons, gs.d.g.name+": "+gs.reason)
		}
	}
	sort.Strings(reasons)
	return strings.Join(reasons, "; ")
}
