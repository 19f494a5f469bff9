package broker

import (
	"context"
	"errors"
	"time"

	"go.uber.org/zap"

	"github.com/kiteq/kiteq/storage"
)

// The scanner brings stored messages into memory when they are due and
// memory has room: after a restart, when a retry or a delayed message comes
// due, when a message was left in the store for lack of room, and when a
// group that could not take messages (no consumer, or a full queue) can
// again.
//
// It pages through Store.Due with a cursor that only moves forward. What
// becomes due later is stored at a later time, so the cursor meets it. The
// exceptions move the cursor back (rewind): a message left in the store
// for lack of room, and a store call that failed (then from the start).
// Messages that wait for a group are behind the cursor, stored at their
// expiry; each group keeps its own cursor (group.waitFrom) to come back
// for them.
type scanState struct {
	cursor  storage.Cursor // the last message looked at
	reading bool           // a page is being read and dispatched
	// floor, while a page is read, is where a rewind asked the cursor to
	// go: the page may hold messages past it, which move the cursor on,
	// so it takes effect when the page is done.
	floor *storage.Cursor
	// forgotten lists the flights that left memory while a page was read:
	// the page's copy of them is older than their stored state.
	forgotten map[string]struct{}
	lastError time.Time // when a failed read was last logged
	started   bool

	kick chan struct{}
	stop chan struct{}
	done chan struct{}
}

const (
	scanEvery = 100 * time.Millisecond // a delayed message or a retry is late by at most this
	scanPage  = 256
	scanPages = 16 // pages per pass, so that groups' refills get their turn
)

func newScanState() scanState {
	return scanState{forgotten: make(map[string]struct{}), kick: make(chan struct{}, 1),
		stop: make(chan struct{}), done: make(chan struct{})}
}

// rewindLocked moves the cursor back to c, if c is before it (while a
// page is read, once it is done). It reports whether it did now.
func (s *scanState) rewindLocked(c storage.Cursor) bool {
	switch {
	case s.reading:
		if s.floor == nil || c.Compare(*s.floor) < 0 {
			s.floor = &c
		}
		return false // endPage wakes the scanner if the floor moves the cursor
	case c.Compare(s.cursor) < 0:
		s.cursor = c
		return true
	}
	return false
}

func (s *scanState) forgottenLocked(id string) {
	if s.reading {
		s.forgotten[id] = struct{}{}
	}
}

// rewind moves the scanner's cursor back to c and wakes it.
func (e *engine) rewind(c storage.Cursor) {
	e.mu.Lock()
	moved := e.scan.rewindLocked(c)
	e.mu.Unlock()
	if moved {
		e.wake()
	}
}

// wake makes the scanner pass at once.
func (e *engine) wake() {
	select {
	case e.scan.kick <- struct{}{}:
	default:
	}
}

// startScan starts the scanner. Its first pass delivers what the store
// holds after a restart.
func (e *engine) startScan() {
	e.mu.Lock()
	e.scan.started = true
	e.mu.Unlock()
	go func() {
		defer close(e.scan.done)
		t := time.NewTicker(scanEvery)
		defer t.Stop()
		for {
			e.scanOnce()
			select {
			case <-e.scan.stop:
				return
			case <-t.C:
			case <-e.scan.kick:
			}
		}
	}()
}

// stopScan stops the scanner and waits for its pass to end.
func (e *engine) stopScan() {
	e.mu.Lock()
	started := e.scan.started
	e.scan.started = false
	e.mu.Unlock()
	if started {
		close(e.scan.stop)
		<-e.scan.done
	}
}

// scanOnce reads the messages that came due, then refills the groups that
// can take messages they wait for.
func (e *engine) scanOnce() {
	e.scanDue()
	for _, g := range e.allGroups() {
		if g.wantsRefill() {
			e.refill(g)
		}
	}
}

// readPage reads one page of due messages for the scanner, noting the
// flights that leave memory meanwhile. fromCursor reads after the
// scanner's cursor, taken under the lock that starts the page, so that a
// rewind is either applied before the read or kept as the page's floor.
func (e *engine) readPage(q storage.DueQuery, fromCursor bool) ([]*storage.Message, bool) {
	e.mu.Lock()
	if e.stopped {
		e.mu.Unlock()
		return nil, false
	}
	if fromCursor {
		q.After = e.scan.cursor
	}
	e.scan.reading = true
	clear(e.scan.forgotten)
	e.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	page, err := e.store.Due(ctx, q)
	cancel()
	if err != nil {
		e.endPage()
		e.stats.StoreErrors.Add(1)
		e.mu.Lock()
		log := time.Since(e.scan.lastError) > 10*time.Second
		if log {
			e.scan.lastError = time.Now()
		}
		e.mu.Unlock()
		if log {
			e.log.Error("store call failed (logged once in 10 s)", zap.String("op", "read due messages"), zap.Error(err))
		}
		return nil, false
	}
	return page, true
}

func (e *engine) endPage() {
	e.mu.Lock()
	e.scan.reading = false
	moved := false
	if f := e.scan.floor; f != nil {
		e.scan.floor = nil
		moved = e.scan.rewindLocked(*f)
	}
	e.mu.Unlock()
	if moved {
		e.wake()
	}
}

// take decides what the scanner does with m, read from the store: it
// returns m's flight when m is in memory; ok with a claim on m when m may
// be dispatched; held when another caller has claimed m (it dispatches m,
// or rewinds the scanner to it); nothing when m left memory since the
// page was read (its copy is stale; the write that moved it rewinds the
// scanner and notes the groups waiting for it).
func (e *engine) take(id string) (f *flight, ok, held bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	_, gone := e.scan.forgotten[id]
	switch cur := e.flights[id]; {
	case cur == claimed:
		return nil, false, true
	case e.stopped || gone:
		return nil, false, false
	case cur != nil:
		return cur, false, false
	}
	e.flights[id] = claimed
	return nil, true, false
}

// scanDue dispatches the messages due now after the cursor, while memory
// has room. Once it finds none left, publishes and commits dispatch their
// messages themselves again (engine.blocked).
func (e *engine) scanDue() {
	now := e.now()
	for range scanPages {
		e.mu.Lock()
		if e.blocked && e.bytes > e.opts.MaxDeliveryBytes*3/4 {
			e.mu.Unlock()
			return // forget wakes the scanner when memory has drained
		}
		e.mu.Unlock()
		page, ok := e.readPage(storage.DueQuery{Kind: storage.DueDelivery, Before: now, Limit: scanPage}, true)
		if !ok {
			return
		}
		for _, m := range page {
			if _, ok, _ := e.take(m.ID()); ok {
				if err := e.dispatch(m, false, true); errors.Is(err, errNoRoom) {
					e.endPage() // dispatch moved the cursor back before m
					return
				}
			}
			e.mu.Lock()
			e.scan.cursor = m.Cursor()
			e.mu.Unlock()
		}
		e.endPage()
		if len(page) < scanPage {
			e.mu.Lock()
			e.blocked = false
			e.mu.Unlock()
			return
		}
	}
	e.wake() // more is due: go on after the groups' turn
}

// farFuture is the Before of a group's refill: what waits for a group is
// stored at its expiry.
const farFuture = 100 * 365 * 24 * time.Hour

// refill brings back, from the group's cursor on, the messages that wait
// for g, until g's queue is full or none is left.
func (e *engine) refill(g *group) {
	from, ok := g.startRefill()
	if !ok {
		return
	}
	last, end := from, false
	now := e.now()
	defer func() { g.endRefill(last, end) }()
	for range scanPages {
		limit := min(scanPage, max(2*g.room(), 32)) // read about what g can take
		page, ok := e.readPage(storage.DueQuery{Kind: storage.DueDelivery, Before: now.Add(farFuture), After: last, Limit: limit}, false)
		if !ok {
			return
		}
		for _, m := range page {
			if !g.hasRoom() {
				e.endPage()
				return
			}
			if e.wants(g, m, now) {
				// A flight that is ending and a stale copy are passed by:
				// the write that ends the flight, or that moved the
				// message, tells g where to look again (engine.write).
				// Another caller's claim stops the refill: the caller may
				// give the message up without offering it to g.
				switch f, mine, held := e.take(m.ID()); {
				case held:
					e.endPage()
					return
				case f != nil:
					f.offerWaiting(g)
				case mine:
					if err := e.dispatch(m, false, true); errors.Is(err, errNoRoom) {
						e.endPage()
						return
					}
				}
			}
			last = m.Cursor()
		}
		e.endPage()
		if len(page) < limit {
			end = true
			return
		}
	}
}
