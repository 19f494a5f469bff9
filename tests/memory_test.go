package tests

import (
	"fmt"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kiteq/kiteq/broker"
	client "github.com/kiteq/kiteq/client-go"
	"github.com/kiteq/kiteq/registry/binding"
)

// heapInUse is the live heap after a collection.
func heapInUse() int64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return int64(ms.HeapAlloc)
}

// TestBacklogOfAnOfflineGroupStaysOnDisk: on the file store, 60 MiB
// published for a persistent group with no consumer stay on disk, not in
// the broker's heap; when a consumer connects it gets every message, once.
// The same holds for a consumer that takes messages slower than they come:
// what it has not taken waits on disk, within -max-delivery-bytes.
func TestBacklogOfAnOfflineGroupStaysOnDisk(t *testing.T) {
	const n, body = 300, 200 << 10 // 60 MiB of bodies
	const limit = 8 << 20
	b := startBroker(t, func(o *broker.Options) {
		o.DB = "file://" + t.TempDir()
		o.MaxDeliveryBytes = limit
	})
	bind := binding.Bind_Direct("g", "trade", "pay-succ", 100, true)
	c := client.NewKiteQClient(b.uri(), "g", "secret", newRecorder("binder"))
	c.SetBindings([]*binding.Binding{bind})
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	c.Destroy()

	producer := startClient(t, b.uri(), "p", newRecorder("p"), []string{"trade"})
	before := heapInUse()
	text := strings.Repeat("x", body)
	ids := make([]string, 0, n)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			for i := range n / 4 {
				m := newMessage("trade", "pay-succ", fmt.Sprintf("%d/%d %s", w, i, text))
				if err := producer.SendStringMessage(m); err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				ids = append(ids, m.GetHeader().GetMessageId())
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	eventually(t, 10*time.Second, "every message stored and out of memory", func() bool {
		st := b.Stats()
		return st.Stored == n && st.InFlight == 0
	})
	grown := heapInUse() - before
	t.Logf("offline group: the heap grew by %d KiB for %d messages of %d KiB waiting", grown>>10, n, body>>10)
	if grown > 16<<20 {
		t.Fatalf("the heap grew by %d MiB with %d messages of %d KiB waiting for an offline group: they are held in memory",
			grown>>20, n, body>>10)
	}

	// A consumer that takes one message per 20 ms: what it has not taken
	// stays on disk; the broker holds at most -max-delivery-bytes of it.
	g := &gauge{recorder: newRecorder("g"), hold: 20 * time.Millisecond}
	startClient(t, b.uri(), "g", g, nil, bind)
	var peak int64
	deadline := time.Now().Add(60 * time.Second)
	for {
		st := b.Stats()
		peak = max(peak, st.DeliveryBytes)
		if st.Finished == n || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	got := g.snapshot()
	for _, id := range ids {
		if got[id] != 1 {
			t.Fatalf("message %s delivered %d times, want once (%d of %d delivered)", id, got[id], len(got), n)
		}
	}
	t.Logf("slow consumer: all %d delivered once; the broker held at most %d KiB of them (limit %d KiB)", n, peak>>10, limit>>10)
	if peak > limit+body+1024 {
		t.Fatalf("the broker held %d KiB of messages for delivery, over -max-delivery-bytes %d KiB", peak>>10, limit>>10)
	}
}
