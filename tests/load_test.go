package tests

import (
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kiteq/kiteq/broker"
	client "github.com/kiteq/kiteq/client-go"
	"github.com/kiteq/kiteq/registry/binding"
)

// loadDuration is how long the load test publishes: 20 s, or
// KITEQ_LOAD_SECONDS, or 3 s with -short.
func loadDuration(t *testing.T) time.Duration {
	if s := os.Getenv("KITEQ_LOAD_SECONDS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n <= 0 {
			t.Fatalf("KITEQ_LOAD_SECONDS=%q: want a positive number", s)
		}
		return time.Duration(n) * time.Second
	}
	if testing.Short() {
		return 3 * time.Second
	}
	return 20 * time.Second
}

// TestLoad64Senders: 64 goroutines publish synchronously for 20 s through
// four producer connections; one consumer group of two consumers takes
// everything. Every acknowledged message is delivered, duplicates are
// counted and each is explained by a delivery the broker retried, and
// deliveries keep pace with publishes.
func TestLoad64Senders(t *testing.T) {
	const (
		producers = 4
		senders   = 64
		bodySize  = 256
	)
	duration := loadDuration(t)
	b := startBroker(t, func(o *broker.Options) { o.DB = "memory://?cap=5000000" })

	rec := newRecorder("load")
	bind := binding.Bind_Fanout("g-load", "load", 1000, true)
	startClient(t, b.uri(), "g-load", rec, nil, bind)
	startClient(t, b.uri(), "g-load", rec, nil, bind)
	var prods []*client.KiteQClient
	for range producers {
		prods = append(prods, startClient(t, b.uri(), "load-producer", newRecorder("p"), []string{"load"}))
	}

	body := strings.Repeat("k", bodySize)
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		acked   []string
		lat     []time.Duration
		errs    atomic.Int64
		lastErr atomic.Value
	)
	start := time.Now()
	deadline := start.Add(duration)
	for i := range senders {
		wg.Add(1)
		go func(p *client.KiteQClient) {
			defer wg.Done()
			var ids []string
			var ls []time.Duration
			for time.Now().Before(deadline) {
				m := newMessage("load", "tick", body)
				t0 := time.Now()
				if err := p.SendStringMessage(m); err != nil {
					errs.Add(1)
					lastErr.Store(err.Error())
					continue
				}
				ls = append(ls, time.Since(t0))
				ids = append(ids, m.GetHeader().GetMessageId())
			}
			mu.Lock()
			acked = append(acked, ids...)
			lat = append(lat, ls...)
			mu.Unlock()
		}(prods[i%producers])
	}
	wg.Wait()
	elapsed := time.Since(start)
	deliveredAtEnd := len(rec.snapshot())
	pubRate := float64(len(acked)) / elapsed.Seconds()
	backlog := len(acked) - deliveredAtEnd

	eventually(t, 60*time.Second, "every acknowledged message delivered", func() bool {
		return len(rec.snapshot()) >= len(acked)
	})
	drained := time.Since(start)
	got := rec.snapshot()
	missing, dups := 0, 0
	for _, id := range acked {
		switch n := got[id]; {
		case n == 0:
			missing++
		case n > 1:
			dups += n - 1
		}
	}
	st := b.Stats()
	slices.Sort(lat)
	pct := func(p float64) time.Duration {
		if len(lat) == 0 {
			return 0
		}
		return lat[int(p*float64(len(lat)-1))]
	}
	t.Logf("load: %d senders over %d connections, %d-byte bodies, %s", senders, producers, bodySize, elapsed.Round(time.Millisecond))
	t.Logf("load: published %d acknowledged (%.0f msg/s), %d send errors", len(acked), pubRate, errs.Load())
	t.Logf("load: delivered %d by the end of publishing (%.0f msg/s); backlog %d = %.2f s of traffic; all delivered after %s",
		deliveredAtEnd, float64(deliveredAtEnd)/elapsed.Seconds(), backlog, float64(backlog)/pubRate, drained.Round(time.Millisecond))
	t.Logf("load: send latency p50 %s p99 %s max %s", pct(0.50), pct(0.99), pct(1))
	t.Logf("load: duplicates %d; broker: deliver timeouts %d, handed over %d, consumer refusals %d",
		dups, st.DeliverTimeouts, st.Redirected, st.DeliverFailed)

	if errs.Load() > 0 {
		t.Errorf("%d sends failed; last: %v", errs.Load(), lastErr.Load())
	}
	if len(acked) == 0 {
		t.Fatal("nothing was published")
	}
	if missing > 0 {
		t.Errorf("%d acknowledged messages were never delivered", missing)
	}
	// At-least-once: a duplicate is only allowed where the broker delivered
	// again because an ack did not come in time or a consumer went away.
	if explained := st.DeliverTimeouts + st.Redirected + st.DeliverFailed; int64(dups) > explained {
		t.Errorf("%d duplicates, but the broker retried only %d deliveries", dups, explained)
	}
	if float64(backlog) > pubRate {
		t.Errorf("backlog %d at the end is more than one second of traffic (%.0f msg/s)", backlog, pubRate)
	}
}
