package broker

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/registry/binding"
	"github.com/kiteq/kiteq/storage"
)

// flight is a message this broker is delivering: the message, and for
// each matching group whether it acknowledged, how often it failed and
// whether it gave up. A flight ends when every group acknowledged, was
// skipped or gave up; then the message is deleted or dead-lettered.
type flight struct {
	e   *engine
	msg *storage.Message
	fly bool // never stored: no store calls

	mu      sync.Mutex
	groups  map[string]*groupState
	pending int // groups that have not finished
	ended   bool
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

type groupState struct {
	attempts int32
	result   deliveryResult
	reason   string
}

type deliveryResult int

const (
	resultPending deliveryResult = iota
	resultAcked
	resultSkipped // no live consumer and a non-persistent binding
	resultFailed  // this attempt failed; a retry follows
	resultGaveUp  // delivery limit or expiry reached
	resultExpired // expired while waiting for a retry: gives up, not an attempt
)

// delivery is one message on its way to one group.
type delivery struct {
	f          *flight
	g          *group
	persistent bool
}

// groupResult records the outcome of one delivery attempt to g.
func (f *flight) groupResult(d *delivery, r deliveryResult, reason string) {
	e, g := f.e, d.g
	now := e.now()
	f.mu.Lock()
	gs := f.groups[g.name]
	if f.ended || gs == nil || gs.result == resultAcked || gs.result == resultGaveUp || gs.result == resultSkipped {
		f.mu.Unlock()
		return
	}
	var retryIn time.Duration
	retry := false
	switch r {
	case resultAcked, resultSkipped:
		gs.result = r
		f.pending--
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
			retryIn, retry = e.retryDelay(gs.attempts), true
		}
	}
	finished := f.pending == 0
	var record *storage.DeliveryResult
	var recordSlot, finishSlot storeSlot
	if !f.fly && r == resultFailed && !finished {
		record = f.resultLocked(now.Add(retryIn))
		recordSlot = f.slotLocked()
	}
	var deadReason string
	var final *storage.DeliveryResult
	if finished {
		deadReason, final, finishSlot = f.endLocked(now)
	}
	f.mu.Unlock()

	if record != nil {
		e.storeInOrder("record delivery", recordSlot, func(ctx context.Context) error { return e.store.RecordDelivery(ctx, *record) })
	}
	if retry {
		e.after(retryIn, func() {
			if e.now().After(e.expiry(f.msg)) {
				f.groupResult(d, resultExpired, "") // given up, not delivered
				return
			}
			g.enqueue(d)
		})
	}
	if finished {
		e.finish(f, deadReason, final, finishSlot)
	}
}

// resultLocked is the delivery state to store after a failure.
func (f *flight) resultLocked(next time.Time) *storage.DeliveryResult {
	r := &storage.DeliveryResult{MessageID: f.msg.ID(), NextDeliverTime: next}
	for name, gs := range f.groups {
		r.DeliverCount = max(r.DeliverCount, gs.attempts)
		switch gs.result {
		case resultAcked, resultSkipped:
			r.SuccGroups = append(r.SuccGroups, name)
		case resultFailed, resultGaveUp:
			r.FailGroups = append(r.FailGroups, name)
		}
	}
	r.SuccGroups = append(r.SuccGroups, f.msg.SuccGroups...)
	sort.Strings(r.SuccGroups)
	sort.Strings(r.FailGroups)
	return r
}

// endLocked ends f once no group is pending: why the message goes to the
// dead-letter queue ("" when it does not), each group's result for the
// dead letter, and the place of the finishing store call. The caller
// holds f.mu.
func (f *flight) endLocked(now time.Time) (deadReason string, final *storage.DeliveryResult, slot storeSlot) {
	f.ended = true
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
	for name, gs := range f.groups {
		if gs.result == resultGaveUp {
			reasons = append(reasons, name+": "+gs.reason)
		}
	}
	sort.Strings(reasons)
	return strings.Join(reasons, "; ")
}

// engine routes committed messages to groups and follows each delivery to
// its end.
type engine struct {
	log   *zap.Logger
	store storage.Store
	opts  Options
	stats *Stats
	now   func() time.Time

	mu      sync.Mutex
	groups  map[string]*group
	flights map[string]*flight
	stopped bool

	timers map[Timer]struct{} // retries and delayed messages waiting for their time

	routes *router
	wg     sync.WaitGroup // store calls in progress
}

func newEngine(log *zap.Logger, store storage.Store, opts Options, stats *Stats) *engine {
	return &engine{
		log: log, store: store, opts: opts, stats: stats, now: opts.clock().Now,
		groups: make(map[string]*group), flights: make(map[string]*flight),
		routes: newRouter(), timers: make(map[Timer]struct{}),
	}
}

// group returns the group called name, creating it on first use.
func (e *engine) group(name string) *group {
	e.mu.Lock()
	defer e.mu.Unlock()
	g := e.groups[name]
	if g == nil {
		g = &group{name: name, e: e, watermark: e.routes.watermark(name)}
		e.groups[name] = g
	}
	return g
}

// dispatch starts delivering a committed message to every group whose
// binding matches it, except the groups that already acknowledged it.
func (e *engine) dispatch(m *storage.Message, fly bool) {
	h := m.Header
	if at := deliverAt(h); at.After(e.now()) && !fly { // a fly message cannot be delayed (validate)
		e.hold(m, at)
		return
	}
	matches := e.routes.match(h.GetTopic(), h.GetMessageType())
	done := make(map[string]bool, len(m.SuccGroups))
	for _, g := range m.SuccGroups {
		done[g] = true
	}
	// The store keeps one DeliverCount, the most failures of any group. It
	// is the failed group's own count when that group is the only one that
	// was delivered to: then its failures before a restart count toward
	// the delivery limit. With several groups a group's own count is not
	// known, and it starts again (more retries, never fewer).
	failedAlone := ""
	if len(m.FailGroups) == 1 && len(m.SuccGroups) == 0 {
		failedAlone = m.FailGroups[0]
	}
	e.mu.Lock()
	if f := e.flights[m.ID()]; e.stopped || (f != nil && f != claimed) {
		e.mu.Unlock()
		return
	}
	f := &flight{e: e, msg: m, fly: fly, groups: make(map[string]*groupState, len(matches))}
	var ds []*delivery
	for _, mt := range matches {
		if done[mt.group] {
			continue
		}
		g := e.groups[mt.group]
		if g == nil {
			g = &group{name: mt.group, e: e, watermark: e.routes.watermark(mt.group)}
			e.groups[mt.group] = g
		}
		gs := &groupState{}
		if mt.group == failedAlone {
			gs.attempts = m.DeliverCount
		}
		f.groups[mt.group] = gs
		ds = append(ds, &delivery{f: f, g: g, persistent: mt.persistent})
	}
	f.pending = len(ds)
	if len(ds) > 0 {
		e.flights[m.ID()] = f
	} else if e.flights[m.ID()] == claimed {
		delete(e.flights, m.ID())
	}
	e.mu.Unlock()

	if len(ds) == 0 {
		if len(matches) == 0 {
			e.stats.Unrouted.Add(1)
			e.log.Debug("unrouted message", zap.String("id", m.ID()), zap.String("topic", h.GetTopic()),
				zap.String("messageType", h.GetMessageType()))
		}
		f.ended = true
		e.finish(f, "", nil, f.slotLocked()) // f is not shared yet
		return
	}
	if at := e.expiry(m); e.now().After(at) {
		// Expired before it could be delivered (committed late, or held
		// past its expiry): given up in every group, not delivered.
		f.mu.Lock()
		for _, gs := range f.groups {
			gs.result = resultGaveUp
			gs.reason = fmt.Sprintf("expired at %s before it was delivered", at.UTC().Format(time.RFC3339))
		}
		f.pending = 0
		dead, final, slot := f.endLocked(e.now())
		f.mu.Unlock()
		e.finish(f, dead, final, slot)
		return
	}
	for _, d := range ds {
		d.g.enqueue(d)
	}
}

// deliverAt is when the producer asked the message to be delivered, or
// the zero time for at once.
func deliverAt(h *protocol.Header) time.Time {
	if ms := h.GetDeliverAt(); ms > 0 {
		return time.UnixMilli(ms)
	}
	return time.Time{}
}

// hold keeps a delayed message until at. The store learns the time first
// (a message committed after its publish is due at its commit), so that a
// restart delivers it no earlier either.
func (e *engine) hold(m *storage.Message, at time.Time) {
	e.unclaim(m.ID())
	if m.NextDeliverTime.Before(at) {
		r := storage.DeliveryResult{MessageID: m.ID(), DeliverCount: m.DeliverCount, NextDeliverTime: at,
			SuccGroups: m.SuccGroups, FailGroups: m.FailGroups}
		e.storeAsync("hold until deliverAt", func(ctx context.Context) error { return e.store.RecordDelivery(ctx, r) })
	}
	e.deliverLater(m.ID(), at.Sub(e.now()), storedReadTries)
}

// deliverLater delivers the stored message id after d, with tries reads
// (deliverStored). Only the id waits in memory: the message is read from
// the store when its time comes.
func (e *engine) deliverLater(id string, d time.Duration, tries int) {
	e.after(d, func() {
		e.storeAsync("deliver when due", func(ctx context.Context) error { return e.deliverStored(ctx, id, tries) })
	})
}

// storedReadTries bounds the reads of deliverStored: one a second.
const storedReadTries = 60

// deliverStored delivers the stored message id, which a commit or a put
// back has just made due. A read that fails is tried again a second later,
// up to tries times in all, so that a passing store error does not leave
// the message waiting for the next restart.
func (e *engine) deliverStored(ctx context.Context, id string, tries int) error {
	if !e.claim(id) {
		return nil // being delivered already
	}
	m, err := e.store.Get(ctx, id)
	if err != nil {
		e.unclaim(id)
		if errors.Is(err, storage.ErrNotFound) {
			return nil // delivered and finished already
		}
		if tries > 1 {
			e.deliverLater(id, time.Second, tries-1)
		}
		return fmt.Errorf("read %s to deliver it: %w", id, err)
	}
	e.dispatch(m, false)
	return nil
}

// claimed holds the place of a flight while a commit reads its message.
var claimed = &flight{}

// claim reserves id for a commit that is about to read the message, so that
// a flight of id that finishes meanwhile cannot be started again from a
// copy read before its Delete. It reports false when id has a flight.
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
		e.log.Warn("message dead-lettered", zap.String("id", id), zap.String("reason", deadReason))
	}
	forget := func() {
		e.mu.Lock()
		if e.flights[id] == f {
			delete(e.flights, id)
		}
		e.mu.Unlock()
	}
	if f.fly {
		forget()
		return
	}
	e.storeInOrder("finish", slot, func(ctx context.Context) error {
		defer forget()
		if deadReason == "" {
			return e.store.Delete(ctx, id)
		}
		if final != nil {
			if err := e.store.RecordDelivery(ctx, *final); err != nil {
				return err
			}
		}
		return e.store.DeadLetter(ctx, id, deadReason)
	})
}

// storeAsync runs a store call off the connection's reader, so that
// reading never waits for the store.
func (e *engine) storeAsync(what string, fn func(ctx context.Context) error) {
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		e.storeCall(what, fn)
	}()
}

// storeCall runs fn with a time limit and counts and logs its failure.
func (e *engine) storeCall(what string, fn func(ctx context.Context) error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := fn(ctx); err != nil {
		e.stats.StoreErrors.Add(1)
		e.log.Error("store call failed", zap.String("op", what), zap.Error(err))
	}
}

// storeInOrder runs fn as storeAsync does, once the store call before it
// in slot's order is done; its time limit starts then.
func (e *engine) storeInOrder(what string, slot storeSlot, fn func(ctx context.Context) error) {
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		defer close(slot.done)
		if slot.prev != nil {
			<-slot.prev
		}
		e.storeCall(what, fn)
	}()
}

// after runs fn after d unless the engine stops first. A waiting retry
// costs a timer, not a goroutine.
func (e *engine) after(d time.Duration, fn func()) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.stopped {
		return
	}
	var t Timer
	t = e.opts.clock().AfterFunc(d, func() {
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
}

// retryDelay is the wait after failure n (1, 2, ...) before the next
// attempt: the retry schedule's entry n, or its last one past its end.
func (e *engine) retryDelay(failures int32) time.Duration {
	s := e.opts.RetrySchedule
	return s[min(int(max(failures, 1)), len(s))-1]
}

// expiry is when the message stops being delivered: its expiredTime,
// capped at MaxLifetime after its creation.
func (e *engine) expiry(m *storage.Message) time.Time {
	limit := time.Unix(1<<62, 0) // no createTime (the broker sets one): no cap known
	if ct := m.Header.GetCreateTime(); ct > 0 {
		limit = time.Unix(ct, 0).Add(e.opts.MaxLifetime)
	}
	if et := m.Header.GetExpiredTime(); et > 0 && time.Unix(et, 0).Before(limit) {
		return time.Unix(et, 0)
	}
	return limit
}

// recover dispatches every committed message the store holds that is due,
// after a restart.
func (e *engine) recover(ctx context.Context) (int, error) {
	n := 0
	now := e.now()
	// Every committed message, due or not: one whose retry was pending
	// when the broker stopped is dispatched when its time comes.
	q := storage.DueQuery{Kind: storage.DueDelivery, Before: now.Add(100 * 365 * 24 * time.Hour), Limit: 500}
	for {
		page, err := e.store.Due(ctx, q)
		if err != nil {
			return n, fmt.Errorf("recover due messages: %w", err)
		}
		for _, m := range page {
			if wait := m.NextDeliverTime.Sub(now); wait > 0 {
				e.deliverLater(m.ID(), wait, storedReadTries)
			} else {
				e.dispatch(m, false)
			}
			n++
		}
		if len(page) < q.Limit {
			return n, nil
		}
		q.After = page[len(page)-1].Cursor()
	}
}

// updateRoutes takes new bindings for topic and resizes the groups.
func (e *engine) updateRoutes(topic string, bs []*binding.Binding) {
	changed := e.routes.set(topic, bs)
	for _, name := range changed {
		e.group(name).setWatermark(e.routes.watermark(name))
	}
}

// stop cancels waiting retries and waits for store calls in progress.
// A retry that is running when stop is called finishes.
func (e *engine) stop() {
	e.mu.Lock()
	e.stopped = true
	for t := range e.timers {
		t.Stop()
	}
	clear(e.timers)
	e.mu.Unlock()
	e.wg.Wait()
}

// expireQueued gives up the queued deliveries whose message expired.
func (e *engine) expireQueued(now time.Time) {
	e.mu.Lock()
	gs := make([]*group, 0, len(e.groups))
	for _, g := range e.groups {
		gs = append(gs, g)
	}
	e.mu.Unlock()
	for _, g := range gs {
		for _, d := range g.takeExpired(now) {
			d.f.groupResult(d, resultFailed, "expired while queued")
		}
	}
}

func (e *engine) inFlight() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.flights)
}
