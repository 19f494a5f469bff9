package broker

import (
	"context"
	"sync"
	"time"
)

// workerIdle is how long a worker waits for its next task before it ends.
const workerIdle = 5 * time.Second

// workers runs short tasks (a publish's store call and answer, a finished
// message's delete) on goroutines it keeps, rather than on a new goroutine
// each. A new goroutine starts with a small stack and grows it, copying
// it each time, on the deep paths of a store call and of protobuf encoding:
// under load that copying took a fifth of the broker's CPU. A kept
// goroutine has grown its stack once.
//
// There is no bound on the number of workers: a task that waits (a store
// call in a group commit, a decision waiting for its save) must not hold
// up the others, and the callers bound their own tasks (MaxPendingPublishes
// and MaxPendingBytes). A worker left idle for idleAfter ends.
type workers struct {
	idleAfter time.Duration

	mu      sync.Mutex
	idle    []*worker // the most recently idle last: it is reused first
	stopped bool
	// now is the time of the last trim, which the workers that go idle
	// take as their idle time: no clock read for each task, and trim
	// runs often (every sweep) next to idleAfter.
	now time.Time
}

type worker struct {
	tasks chan func() // a nil task ends the worker
	since time.Time   // idle since (the last trim before)
}

func newWorkers(idleAfter time.Duration) *workers {
	return &workers{idleAfter: idleAfter, now: time.Now()}
}

// Go runs fn on an idle worker, or on a new one.
func (p *workers) Go(fn func()) {
	p.mu.Lock()
	if n := len(p.idle); n > 0 {
		w := p.idle[n-1]
		p.idle[n-1] = nil
		p.idle = p.idle[:n-1]
		p.mu.Unlock()
		w.tasks <- fn // buffered: an idle worker's channel is empty
		return
	}
	p.mu.Unlock()
	go p.work(&worker{tasks: make(chan func(), 1)}, fn)
}

func (p *workers) work(w *worker, fn func()) {
	for fn != nil {
		fn()
		p.mu.Lock()
		if p.stopped {
			p.mu.Unlock()
			return
		}
		w.since = p.now
		p.idle = append(p.idle, w)
		p.mu.Unlock()
		fn = <-w.tasks
	}
}

// trim ends the workers idle since before now less idleAfter.
func (p *workers) trim(now time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.now = now
	n := 0
	for n < len(p.idle) && now.Sub(p.idle[n].since) > p.idleAfter {
		p.idle[n].tasks <- nil
		n++
	}
	if n > 0 {
		p.idle = append(p.idle[:0], p.idle[n:]...)
	}
}

// stop ends the idle workers; a busy one ends after its task. Go still
// runs tasks after stop, each on a goroutine of its own.
func (p *workers) stop() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.stopped = true
	for _, w := range p.idle {
		w.tasks <- nil
	}
	p.idle = nil
}

// storeTimeout bounds a store call.
const storeTimeout = 30 * time.Second

// storeDeadline hands out the contexts of store calls: each ends
// storeTimeout after it was made, and calls made within the same second
// share one. A context and a timer for each call were 6% of the broker's
// CPU under load; a call now gets between storeTimeout less a second and
// storeTimeout.
type storeDeadline struct {
	mu     sync.Mutex
	ctx    context.Context
	cancel context.CancelFunc
	until  time.Time // ctx is handed out until then
}

func (d *storeDeadline) get() context.Context {
	now := time.Now()
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.ctx == nil || now.After(d.until) {
		// The context before this one is not cancelled: calls still use
		// it. Its own timer releases it at its deadline.
		d.ctx, d.cancel = context.WithTimeout(context.Background(), storeTimeout)
		d.until = now.Add(time.Second)
	}
	return d.ctx
}

// stop releases the current context; call it once no store call runs.
func (d *storeDeadline) stop() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cancel != nil {
		d.cancel()
		d.ctx, d.cancel = nil, nil
	}
}
