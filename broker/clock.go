package broker

import "time"

// Clock is the broker's time: when messages arrive, expire and are due, and
// when retries, delayed messages and transaction checks fire. Tests set a
// clock they move by hand (Options.Clock); nil is the system clock. Network
// deadlines always use the system clock.
type Clock interface {
	Now() time.Time
	// AfterFunc runs f in its own goroutine once d has passed.
	AfterFunc(d time.Duration, f func()) Timer
}

// Timer is a pending AfterFunc.
type Timer interface {
	// Stop prevents the call if it has not started, and reports whether
	// it did.
	Stop() bool
}

type systemClock struct{}

func (systemClock) Now() time.Time                            { return time.Now() }
func (systemClock) AfterFunc(d time.Duration, f func()) Timer { return time.AfterFunc(d, f) }

// clock returns o.Clock, or the system clock.
func (o Options) clock() Clock {
	if o.Clock != nil {
		return o.Clock
	}
	return systemClock{}
}
