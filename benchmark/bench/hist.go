package bench

import (
	"math"
	"math/bits"
	"sync"
	"time"
)

// Histogram records durations with about 1.6% precision from 1 µs to
// hours, in constant memory: 64 sub-buckets per power of two.
type Histogram struct {
	mu     sync.Mutex
	counts [64 * 64]uint64
	n      uint64
	max    time.Duration
}

const subBits = 6

func bucketOf(d time.Duration) int {
	us := uint64(max(d/time.Microsecond, 1))
	exp := 63 - bits.LeadingZeros64(us)
	if exp < subBits {
		return int(us)
	}
	sub := (us >> (exp - subBits)) & (1<<subBits - 1)
	return (exp-subBits+1)<<subBits | int(sub)
}

// lowerOf is the smallest duration in bucket i.
func lowerOf(i int) time.Duration {
	if i < 1<<subBits {
		return time.Duration(i) * time.Microsecond
	}
	exp := i>>subBits + subBits - 1
	sub := uint64(i & (1<<subBits - 1))
	return time.Duration((1<<exp | sub<<(exp-subBits))) * time.Microsecond
}

// Record adds one duration.
func (h *Histogram) Record(d time.Duration) {
	i := min(bucketOf(d), len(h.counts)-1)
	h.mu.Lock()
	h.counts[i]++
	h.n++
	h.max = max(h.max, d)
	h.mu.Unlock()
}

// Count is how many durations were recorded.
func (h *Histogram) Count() uint64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.n
}

// Quantile returns the duration below which a fraction q of the recorded
// ones fall (the bucket's lower bound; the maximum for q = 1).
func (h *Histogram) Quantile(q float64) time.Duration {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.n == 0 {
		return 0
	}
	if q >= 1 {
		return h.max
	}
	rank := uint64(math.Ceil(q * float64(h.n)))
	var seen uint64
	for i, c := range h.counts {
		seen += c
		if seen >= rank && c > 0 {
			return min(lowerOf(i), h.max)
		}
	}
	return h.max
}
