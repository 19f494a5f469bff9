package protocol

import (
	"runtime"
	"time"
)

// Gather is for the one goroutine that writes what others queue (a
// connection's packets, a log's records): before a write, it lets the
// goroutines that are about to queue more run first, while the queue
// keeps growing, for GatherRounds rounds and GatherTime at most, so that
// under load one write carries many. queued reports how much is queued.
// When nothing else is runnable, Gosched returns at once: an idle writer
// waits for nothing.
func Gather(queued func() int) {
	n := queued()
	start := time.Now()
	for range GatherRounds {
		runtime.Gosched()
		m := queued()
		if m == n || time.Since(start) > GatherTime {
			return
		}
		n = m
	}
}

// GatherRounds and GatherTime bound how long Gather waits.
const (
	GatherRounds = 4
	GatherTime   = 50 * time.Microsecond
)
