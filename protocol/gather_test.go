package protocol

import (
	"testing"
	"time"
)

func TestGatherStopsWhenNothingMoreIsQueued(t *testing.T) {
	calls := 0
	Gather(func() int { calls++; return 7 })
	if calls != 2 {
		t.Fatalf("queued called %d times, want 2 (before, and after one round)", calls)
	}
}

func TestGatherWaitsWhileTheQueueGrows(t *testing.T) {
	calls := 0
	Gather(func() int { calls++; return calls })
	// Four rounds, unless they took over GatherTime (a slow machine).
	if calls < 2 || calls > 1+GatherRounds {
		t.Fatalf("queued called %d times, want 2 to %d", calls, 1+GatherRounds)
	}
}

func TestGatherStopsAfterGatherTime(t *testing.T) {
	calls := 0
	Gather(func() int {
		calls++
		time.Sleep(GatherTime + 10*time.Microsecond)
		return calls
	})
	if calls != 2 {
		t.Fatalf("queued called %d times, want 2: the first round took longer than GatherTime", calls)
	}
}
