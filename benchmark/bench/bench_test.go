package bench

import (
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

func TestBodyRoundTrip(t *testing.T) {
	at := time.Unix(1700000000, 123456789)
	for _, size := range []int{0, 16, 512} {
		b := Body(nil, size, 42, at)
		if len(b) != max(size, headerLen) {
			t.Fatalf("Body of size %d: %d bytes", size, len(b))
		}
		seq, got, ok := ParseBody(b)
		if !ok || seq != 42 || !got.Equal(at) {
			t.Fatalf("ParseBody: %d %v %v, want 42 %v", seq, got, ok, at)
		}
	}
	if _, _, ok := ParseBody(make([]byte, headerLen-1)); ok {
		t.Fatal("ParseBody of a short body succeeded")
	}
}

// The histogram's quantiles are within its precision (1/64) of the exact
// ones, from microseconds to seconds.
func TestHistogramQuantiles(t *testing.T) {
	var h Histogram
	var all []time.Duration
	r := rand.New(rand.NewPCG(1, 2))
	for range 100000 {
		d := time.Duration(r.ExpFloat64() * float64(2*time.Millisecond))
		all = append(all, d)
		h.Record(d)
	}
	slices.Sort(all)
	for _, q := range []float64{0.5, 0.9, 0.99, 0.999} {
		exact := all[int(q*float64(len(all)))-1]
		got := h.Quantile(q)
		if diff := float64(got-exact) / float64(exact); diff > 0.001 || diff < -1.0/32 {
			t.Errorf("q%v: got %v, exact %v (%.2f%%)", q, got, exact, diff*100)
		}
	}
	if h.Quantile(1) != all[len(all)-1] || h.Count() != uint64(len(all)) {
		t.Fatalf("max %v count %d, want %v %d", h.Quantile(1), h.Count(), all[len(all)-1], len(all))
	}
}

func TestSeenCountsUniqueAndDuplicates(t *testing.T) {
	var s seen
	for _, q := range []uint64{0, 5, 70000, 5, 0} {
		s.add(q)
	}
	if n, dups := s.count(); n != 3 || dups != 2 {
		t.Fatalf("count: %d unique, %d duplicates; want 3, 2", n, dups)
	}
}

func TestFlagValueTakesTheLast(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{nil, ""},
		{[]string{"-pport=1", "-db=memory://"}, "memory://"},
		{[]string{"--db=a", "-db", "mysql://root@127.0.0.1/kiteq"}, "mysql://root@127.0.0.1/kiteq"},
		{[]string{"-dbx=a", "-db"}, ""},
	} {
		if got := flagValue(tc.args, "db"); got != tc.want {
			t.Errorf("flagValue(%q) = %q, want %q", tc.args, got, tc.want)
		}
	}
}
