package filestore

import (
	"crypto/rand"
	"runtime"
	"testing"
	"time"
)

// BenchmarkIndexMemory measures what the index costs per pending message:
// one million committed messages applied as recSave records, then the
// heap in use divided by their number. Run with -benchtime=1x.
func BenchmarkIndexMemory(b *testing.B) {
	const pending = 1_000_000
	for range b.N {
		runtime.GC()
		var before runtime.MemStats
		runtime.ReadMemStats(&before)

		x := newIndex()
		next := time.Now().UnixMilli()
		var r record
		r.kind, r.state = recSave, flagCommitted
		for i := range pending {
			rand.Read(r.id[:])
			r.next = next + int64(i%5000)
			x.apply(&r, pos{seg: uint32(1 + i/100000), off: uint32(i%100000) * 700, size: 700})
		}

		runtime.GC()
		var after runtime.MemStats
		runtime.ReadMemStats(&after)
		if x.live != pending {
			b.Fatalf("index holds %d messages, want %d", x.live, pending)
		}
		b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/pending, "bytes/pending")
		runtime.KeepAlive(x)
	}
}
