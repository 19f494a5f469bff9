package broker

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/registry/binding"
	"github.com/kiteq/kiteq/storage"
)

// engine routes committed messages to groups and follows each delivery to
// its end. What it holds in memory is bounded: flights (flight.go) take at
// most Options.MaxDeliveryBytes; beyond that, committed messages wait in
// the store, where the scanner (scan.go) finds them.
type engine struct {
	log   *zap.Logger
	store storage.Store
	opts  Options
	stats *Stats
	now   func() time.Time

	mu      sync.Mutex
	groups  map[string]*group
	flights map[string]*flight // and claimed ids
	bytes   int64              // flights' sizes
	// blocked: a message was left in the store for lack of room. Until
	// the scanner catches up, it brings messages into memory in due order
	// as room frees up (below 3/4 of the limit), and publishes and
	// commits leave theirs to it.
	blocked bool
	stopped bool
	timers  map[*engineTimer]struct{} // retries of flights in memory

	storeErrLog map[string]storeErrLog // storeFailed

	scan scanState // scan.go

	routes   *router
	wg       sync.WaitGroup // store calls and retries in progress
	workers  *workers       // run store calls (workers.go)
	deadline storeDeadline  // of store calls
}

func newEngine(log *zap.Logger, store storage.Store, opts Options, stats *Stats) *engine {
	return &engine{
		log: log, store: store, opts: opts, stats: stats, now: opts.clock().Now,
		groups: make(map[string]*group), flights: make(map[string]*flight),
		routes: newRouter(), timers: make(map[*engineTimer]struct{}), storeErrLog: make(map[string]storeErrLog),
		scan: newScanState(), workers: newWorkers(workerIdle),
	}
}

// group returns the group called name, creating it on first use.
func (e *engine) group(name string) *group {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.groupLocked(name)
}

func (e *engine) groupLocked(name string) *group {
	g := e.groups[name]
	if g == nil {
		// What waits in the store for a group is stored at its expiry,
		// behind no cursor this broker has yet: a group with bindings
		// looks for it from the start, once, when it can first take
		// messages.
		g = &group{name: name, e: e, watermark: e.routes.watermark(name), wait: e.routes.has(name)}
		e.groups[name] = g
	}
	return g
}

// errNoRoom: the flights already hold Options.MaxDeliveryBytes.
var errNoRoom = errors.New("no room for another message in memory")

// flightOverhead is what a flight costs beyond its message's bytes.
const flightOverhead = 512

func flightSize(m *storage.Message) int64 {
	return int64(len(m.Body)) + int64(len(m.Header.GetTopic())+len(m.Header.GetMessageType())+len(m.Header.GetGroupId())) + flightOverhead
}

// dispatch starts delivering a committed message to every group whose
// binding matches it, except the groups that already acknowledged it. A
// stored message must have been claimed (claim) by the caller; dispatch
// takes the claim over. It returns errNoRoom, and leaves the message to
// the store (a fly message is dropped), when memory holds MaxDeliveryBytes
// of flights already, or when the scanner is catching up and the caller
// is not the scanner (fromScan).
func (e *engine) dispatch(m *storage.Message, fly, fromScan bool) error {
	h := m.Header
	now := e.now()
	if at := deliverAt(h); at.After(now) && !fly { // a fly message cannot be delayed (validate)
		e.hold(m, at)
		return nil
	}
	matches := e.routes.match(h.GetTopic(), h.GetMessageType())
	done := make(map[string]bool, len(m.SuccGroups))
	for _, g := range m.SuccGroups {
		done[g] = true
	}
	counts, due := failCounts(m), failDue(m)
	limit := h.GetDeliveryLimit()
	size := flightSize(m)

	e.mu.Lock()
	if f := e.flights[m.ID()]; e.stopped || (f != nil && f != claimed) {
		e.mu.Unlock()
		return nil
	}
	f := &flight{e: e, msg: m, fly: fly, size: size, low: m.NextDeliverTime, groups: make([]*groupState, 0, len(matches))}
	var offers []*delivery
	var retries []*groupState
	for _, mt := range matches {
		if done[mt.group] {
			continue
		}
		gd := &groupDelivery{
			groupState: groupState{attempts: counts[mt.group]},
			delivery:   delivery{f: f, g: e.groupLocked(mt.group), persistent: mt.persistent},
		}
		gs, d := &gd.groupState, &gd.delivery
		gs.d = d
		f.groups = append(f.groups, gs)
		switch at, failed := due[mt.group]; {
		case limit > 0 && gs.attempts >= limit:
			gs.result = resultGaveUp
			gs.reason = fmt.Sprintf("delivery limit %d reached", limit)
			continue
		case failed && at.After(now):
			// Read before this group's retry is due, for another group.
			gs.result, gs.retryAt = resultFailed, at
			retries = append(retries, gs)
		default:
			offers = append(offers, d)
		}
		f.pending++
	}
	slices.SortFunc(f.groups, func(a, b *groupState) int { return strings.Compare(a.d.g.name, b.d.g.name) })
	if len(f.groups) > 0 {
		// While the scanner catches up it takes the room below 3/4 of the
		// limit, in due order; a fly message, which the scanner cannot
		// find, takes what room there is.
		deferToScan := e.blocked && !fromScan && !fly && e.bytes <= e.opts.MaxDeliveryBytes*3/4
		if deferToScan || (e.bytes > 0 && e.bytes+size > e.opts.MaxDeliveryBytes) {
			if e.flights[m.ID()] == claimed {
				delete(e.flights, m.ID())
			}
			e.blocked = true
			if !fly {
				e.scan.rewindLocked(before(m.NextDeliverTime))
			}
			e.mu.Unlock()
			if fly {
				e.stats.FlyDropped.Add(1)
				e.log.Debug("fly message dropped: delivery memory full", zap.String("id", m.ID()))
			}
			return errNoRoom
		}
		e.flights[m.ID()] = f
		e.bytes += size
	} else if e.flights[m.ID()] == claimed {
		delete(e.flights, m.ID())
	}
	e.mu.Unlock()

	if len(f.groups) == 0 {
		if len(matches) == 0 {
			e.stats.Unrouted.Add(1)
			e.log.Debug("unrouted message", zap.String("id", m.ID()), zap.String("topic", clipForLog(h.GetTopic())),
				zap.String("messageType", clipForLog(h.GetMessageType())))
		}
		f.ended = true
		e.finish(f, "", nil, f.slotLocked()) // f is not shared
		return nil
	}
	f.mu.Lock()
	if at := e.expiry(m); now.After(at) || f.pending == 0 {
		// Expired before it could be delivered (committed late, held past
		// its expiry, or waiting in the store), or every group is at its
		// delivery limit: given up in every group.
		for _, gs := range f.groups {
			switch {
			case gs.result == resultGaveUp:
			case gs.attempts > 0:
				gs.reason = fmt.Sprintf("expired at %s before its retry", at.UTC().Format(time.RFC3339))
			default:
				gs.reason = fmt.Sprintf("expired at %s before it was delivered", at.UTC().Format(time.RFC3339))
			}
			gs.result = resultGaveUp
		}
		f.pending = 0
		dead, final, slot := f.endLocked(now)
		f.mu.Unlock()
		e.finish(f, dead, final, slot)
		return nil
	}
	for _, gs := range retries {
		gs.retry = e.after(gs.retryAt.Sub(now), func() { f.retryDue(gs.d) })
	}
	f.mu.Unlock()
	for _, d := range offers {
		f.offer(d)
	}
	return nil
}

// failCounts maps each failed group of m to its failures. A message stored
// without counts has one, DeliverCount, the most of any group: it is the
// group's own count when that group is the only one delivered to; with
// several, a group starts again (more retries, never fewer).
func failCounts(m *storage.Message) map[string]int32 {
	counts := make(map[string]int32, len(m.FailGroups))
	for i, g := range m.FailGroups {
		switch {
		case len(m.FailCounts) == len(m.FailGroups):
			counts[g] = m.FailCounts[i]
		case len(m.FailGroups) == 1 && len(m.SuccGroups) == 0:
			counts[g] = m.DeliverCount
		default:
			counts[g] = 0
		}
	}
	return counts
}

// failDue maps each failed group of m to when it is due: its own time,
// or, for a message stored without them, the message's.
func failDue(m *storage.Message) map[string]time.Time {
	due := make(map[string]time.Time, len(m.FailGroups))
	for i, g := range m.FailGroups {
		if len(m.FailDue) == len(m.FailGroups) {
			due[g] = m.FailDue[i]
		} else {
			due[g] = m.NextDeliverTime
		}
	}
	return due
}

// deliverAt is when the producer asked the message to be delivered, or
// the zero time for at once.
func deliverAt(h *protocol.Header) time.Time {
	if ms := h.GetDeliverAt(); ms > 0 {
		return unixMilliTime(ms) // clamped: a stored value may predate validateTimes
	}
	return time.Time{}
}

// hold leaves a claimed, delayed message in the store until at. The store
// learns the time first (a message committed after its publish is due at
// its commit); the scanner delivers it when that time comes, after a
// restart too.
func (e *engine) hold(m *storage.Message, at time.Time) {
	if !m.NextDeliverTime.Before(at.Truncate(time.Millisecond)) {
		// Stored at its time already; the scanner may have passed it
		// while it was claimed.
		e.unclaim(m.ID())
		e.rewind(before(m.NextDeliverTime))
		return
	}
	r := storage.DeliveryResult{MessageID: m.ID(), DeliverCount: m.DeliverCount, NextDeliverTime: at,
		SuccGroups: m.SuccGroups, FailGroups: m.FailGroups, FailCounts: m.FailCounts}
	e.storeAsync("hold until deliverAt", func(ctx context.Context) error {
		err := e.store.RecordDelivery(ctx, r)
		e.unclaim(m.ID())
		if err != nil {
			e.rewind(storage.Cursor{}) // still due at its old time
			return err
		}
		e.rewind(before(at))
		return nil
	})
}

// deliverStored delivers the stored message id, which a commit or a put
// back has just made due. When it cannot (the read fails, or memory is
// full), the message stays due in the store, where the scanner finds it.
func (e *engine) deliverStored(ctx context.Context, id string) error {
	if !e.claimAfterEnd(ctx, id) {
		// Being delivered already, or a flight of the message before a
		// put back is ending: make sure the scanner looks at it.
		e.rewindTo(ctx, id)
		return nil
	}
	m, err := e.store.Get(ctx, id)
	if err != nil {
		e.unclaim(id)
		if errors.Is(err, storage.ErrNotFound) {
			return nil // delivered and finished already
		}
		e.rewind(storage.Cursor{})
		return fmt.Errorf("read %s to deliver it: %w", id, err)
	}
	if err := e.dispatch(m, false, false); err != nil && !errors.Is(err, errNoRoom) {
		return err
	}
	return nil
}

// dropClaim gives up a claim on the stored message id without
// dispatching it (a duplicate publish of it): the stored copy may be due,
// and the scanner passed it while the claim hid it.
func (e *engine) dropClaim(id string) {
	e.unclaim(id)
	e.rewindTo(e.deadline.get(), id)
}

// rewindTo moves the scanner's cursor back to the stored message id, for
// a caller that held a claim on it, or found another's, and did not
// dispatch it.
func (e *engine) rewindTo(ctx context.Context, id string) {
	m, err := e.store.Get(ctx, id)
	switch {
	case err == nil:
		e.rewind(before(m.NextDeliverTime))
	case !errors.Is(err, storage.ErrNotFound):
		e.rewind(storage.Cursor{})
	}
}

// claimAfterEnd claims id, first waiting for a flight of id that has
// ended: its Delete or DeadLetter may have landed before a Save or a put
// back of the same id, whose stored copy that flight must not hide.
func (e *engine) claimAfterEnd(ctx context.Context, id string) bool {
	for {
		if e.claim(id) {
			return true
		}
		e.mu.Lock()
		f, stopped := e.flights[id], e.stopped
		e.mu.Unlock()
		switch {
		case stopped || f == claimed:
			return false
		case f == nil:
			continue
		}
		f.mu.Lock()
		ended, stored := f.ended, f.stored
		f.mu.Unlock()
		if !ended || stored == nil {
			return false // a live flight has the message
		}
		select {
		case <-stored: // its last store call, and forget, are done
		case <-ctx.Done():
			return false
		}
	}
}

// claimed holds the place of a flight while a stored message is read or
// saved, or waits for a store call.
var claimed = &flight{}

// claim reserves id for a caller about to read, save or dispatch the
// message, so that a flight of id that finishes meanwhile cannot be
// started again from a copy read before its Delete, nor a second flight
// from the scanner's copy. It reports false when id has a flight or claim.
func (e *engine) claim(id string) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.stopped || e.flights[id] != nil {
		return false
	}
	e.flights[id] = claimed
	return true
}

func (e *engine) unclaim(id string) {
	e.mu.Lock()
	if e.flights[id] == claimed {
		delete(e.flights, id)
	}
	e.mu.Unlock()
}

// forget removes f from memory once its last store call is done.
func (e *engine) forget(f *flight) {
	id := f.msg.ID()
	e.mu.Lock()
	if e.flights[id] == f {
		delete(e.flights, id)
		e.bytes -= f.size
		e.scan.forgottenLocked(id)
	}
	wake := e.blocked && e.bytes <= e.opts.MaxDeliveryBytes*3/4
	e.mu.Unlock()
	if wake {
		e.wake()
	}
}

// finish ends a flight: the message is deleted, or dead-lettered with the
// reason, and with each group's result (final) when a group gave up. The
// flight stays registered until the store has done so, so that a repeated
// commit in between cannot start it again.
func (e *engine) finish(f *flight, deadReason string, final *storage.DeliveryResult, slot storeSlot) {
	id := f.msg.ID()
	if deadReason == "" {
		e.stats.Finished.Add(1)
	} else {
		e.stats.DeadLettered.Add(1)
		e.log.Warn("message dead-lettered", zap.String("id", id), zap.String("reason", clipTo(deadReason, feedbackClipBytes)))
	}
	if f.fly {
		e.forget(f)
		return
	}
	e.storeInOrder("finish", slot, func(ctx context.Context) error {
		var err error
		defer func() {
			e.forget(f)
			if err != nil {
				e.rewind(storage.Cursor{}) // delivered again rather than lost
			}
		}()
		if deadReason == "" {
			err = e.store.Delete(ctx, id)
		} else if final != nil {
			err = e.store.RecordDelivery(ctx, *final)
		}
		if err == nil && deadReason != "" {
			err = e.store.DeadLetter(ctx, id, deadReason)
		}
		return err
	})
}

// write stores w in its flight's order, then runs done (when not nil),
// and then has the scanner and the groups waiting for the message look
// for it at its new place: the write may have moved it behind their
// cursors. A failed write leaves an older state in the store, which the
// scanner reads again from the start.
func (e *engine) write(what string, w write, done func()) {
	e.storeInOrder(what, w.slot, func(ctx context.Context) error {
		err := e.store.RecordDelivery(ctx, w.r)
		if done != nil {
			done()
		}
		if err != nil {
			e.rewind(storage.Cursor{})
			return err
		}
		c := before(w.r.NextDeliverTime)
		e.rewind(c)
		for _, g := range w.waiting {
			g.noteWaiting(c)
		}
		return nil
	})
}

// storeAsync runs a store call off the connection's reader, so that
// reading never waits for the store.
func (e *engine) storeAsync(what string, fn func(ctx context.Context) error) {
	e.wg.Add(1)
	e.workers.Go(func() {
		defer e.wg.Done()
		e.storeCall(what, fn)
	})
}

// storeCall runs fn with a time limit and counts and logs its failure.
func (e *engine) storeCall(what string, fn func(ctx context.Context) error) {
	if err := fn(e.deadline.get()); err != nil {
		e.storeFailed(what, err)
	}
}

// storeFailed counts a failed store call and logs it, at most once a
// second for each kind of call: a store that is down fails every call.
func (e *engine) storeFailed(what string, err error) {
	e.stats.StoreErrors.Add(1)
	now := time.Now()
	e.mu.Lock()
	last, ok := e.storeErrLog[what]
	log := !ok || now.Sub(last.at) >= time.Second
	suppressed := last.suppressed
	if log {
		e.storeErrLog[what] = storeErrLog{at: now}
	} else {
		last.suppressed++
		e.storeErrLog[what] = last
	}
	e.mu.Unlock()
	if log {
		e.log.Error("store call failed", zap.String("op", what), zap.Error(err), zap.Int("suppressedSinceLast", suppressed))
	}
}

type storeErrLog struct {
	at         time.Time
	suppressed int
}

// storeInOrder runs fn as storeAsync does, once the store call before it
// in slot's order is done; its time limit starts then.
func (e *engine) storeInOrder(what string, slot storeSlot, fn func(ctx context.Context) error) {
	e.wg.Add(1)
	e.workers.Go(func() {
		defer e.wg.Done()
		defer close(slot.done)
		if slot.prev != nil {
			<-slot.prev
		}
		e.storeCall(what, fn)
	})
}

// stopper stops a pending call.
type stopper interface{ Stop() bool }

// engineTimer is a retry waiting in memory.
type engineTimer struct {
	e *engine
	t Timer
}

// Stop cancels the call if it has not started.
func (t *engineTimer) Stop() bool {
	t.e.mu.Lock()
	_, live := t.e.timers[t]
	delete(t.e.timers, t)
	t.e.mu.Unlock()
	return live && t.t.Stop()
}

type noTimer struct{}

func (noTimer) Stop() bool { return false }

// after runs fn after d unless the engine stops or the timer is stopped
// first. A waiting retry costs a timer, not a goroutine.
func (e *engine) after(d time.Duration, fn func()) stopper {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.stopped {
		return noTimer{}
	}
	t := &engineTimer{e: e}
	t.t = e.opts.clock().AfterFunc(d, func() {
		e.mu.Lock()
		_, live := e.timers[t]
		delete(e.timers, t)
		if live {
			e.wg.Add(1) // stop waits for a retry that is running
		}
		e.mu.Unlock()
		if live {
			defer e.wg.Done()
			fn()
		}
	})
	e.timers[t] = struct{}{}
	return t
}

// retryDelay is the wait after failure n (1, 2, ...) before the next
// attempt: the retry schedule's entry n, or its last one past its end.
func (e *engine) retryDelay(failures int32) time.Duration {
	s := e.opts.RetrySchedule
	return s[min(int(max(failures, 1)), len(s))-1]
}

// expiry is when the message stops being delivered: its expiredTime,
// capped at MaxLifetime after its creation. The header's times are clamped
// (unixTime): a message stored before validateTimes refused absurd ones
// must not overflow into the past and expire at once.
func (e *engine) expiry(m *storage.Message) time.Time {
	limit := latestTime // no createTime (the broker sets one): no cap known
	if hasCreateTime(m.Header) {
		limit = unixTime(m.Header.GetCreateTime()).Add(e.opts.MaxLifetime)
	}
	if et := m.Header.GetExpiredTime(); et > 0 && unixTime(et).Before(limit) {
		return unixTime(et)
	}
	return limit
}

// updateRoutes takes new bindings for topic and resizes the groups. A
// group whose bindings changed looks through the store for what waits for
// it, from the start: the bindings may have come after the group's
// consumer (ZooKeeper), with messages for it stored before a restart.
func (e *engine) updateRoutes(topic string, bs []*binding.Binding) {
	changed := e.routes.set(topic, bs)
	for _, name := range changed {
		g := e.group(name)
		g.setWatermark(e.routes.watermark(name))
		if e.routes.has(name) {
			g.noteWaiting(storage.Cursor{})
		}
	}
}

// stop ends the scanner, cancels waiting retries and waits for store
// calls in progress. A retry that is running when stop is called finishes.
func (e *engine) stop() {
	e.mu.Lock()
	e.stopped = true
	for t := range e.timers {
		t.t.Stop()
	}
	clear(e.timers)
	e.mu.Unlock()
	e.stopScan()
	e.wg.Wait()
	e.workers.stop()
	e.deadline.stop()
}

// expireQueued gives up the queued deliveries whose message expired.
func (e *engine) expireQueued(now time.Time) {
	for _, g := range e.allGroups() {
		for _, d := range g.takeExpired(now) {
			d.f.groupResult(d, resultFailed, "expired while queued")
		}
	}
}

func (e *engine) allGroups() []*group {
	e.mu.Lock()
	defer e.mu.Unlock()
	gs := make([]*group, 0, len(e.groups))
	for _, g := range e.groups {
		gs = append(gs, g)
	}
	return gs
}

// wants reports whether m waits for g: g matches it, has not acknowledged
// it, and is not waiting for a retry that is not due yet.
func (e *engine) wants(g *group, m *storage.Message, now time.Time) bool {
	if slices.Contains(m.SuccGroups, g.name) {
		return false
	}
	if at, failed := failDue(m)[g.name]; failed && at.After(now) {
		return false
	}
	for _, mt := range e.routes.match(m.Header.GetTopic(), m.Header.GetMessageType()) {
		if mt.group == g.name {
			return true
		}
	}
	return false
}

// inMemory returns the number of messages held for delivery and their
// bytes.
func (e *engine) inMemory() (int, int64) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.flights), e.bytes
}
