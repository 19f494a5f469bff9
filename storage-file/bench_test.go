package filestore

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/storage"
)

// benchDir is where benchmarks write: KITEQ_BENCH_DIR, or a temporary
// directory on the disk the tests run on.
func benchDir(b *testing.B) string {
	if d := os.Getenv("KITEQ_BENCH_DIR"); d != "" {
		dir, err := os.MkdirTemp(d, "filestore-bench-")
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { os.RemoveAll(dir) })
		return dir
	}
	return b.TempDir()
}

// BenchmarkDiskFsync is the disk's own latency for making 512 bytes
// durable: appended to a growing file and fsynced (the bound of one
// synchronous saver), written over blocks that already exist and fsynced
// (a preallocated segment through the page cache), and written as one
// 4 KiB block with O_DIRECT|O_DSYNC over blocks that exist (what the store
// does with fsync=always, direct.go).
func BenchmarkDiskFsync(b *testing.B) {
	b.Run("direct", func(b *testing.B) {
		path := filepath.Join(benchDir(b), "probe")
		if err := os.WriteFile(path, make([]byte, 64<<20), 0o644); err != nil {
			b.Fatal(err)
		}
		seg := &segment{f: must(os.Open(path))}
		defer seg.f.Close()
		d, err := openDirect(seg, 0)
		if err != nil || d == nil {
			b.Fatalf("direct I/O: %v", err)
		}
		defer d.close()
		buf := make([]byte, 512)
		b.SetBytes(512)
		b.ResetTimer()
		for i := range b.N {
			off := int64(i%(128<<10)) * 512
			d.tail = d.tail[:off%directBlock] // the bytes before off in its block
			if err := d.writeAt(buf, off); err != nil {
				b.Fatal(err)
			}
		}
	})
	for _, mode := range []string{"append", "overwrite"} {
		b.Run(mode, func(b *testing.B) {
			f, err := os.Create(filepath.Join(benchDir(b), "probe"))
			if err != nil {
				b.Fatal(err)
			}
			defer f.Close()
			buf := make([]byte, 512)
			if mode == "overwrite" {
				zeros := make([]byte, 1<<20)
				for range 64 {
					f.Write(zeros)
				}
				f.Sync()
			}
			b.SetBytes(512)
			b.ResetTimer()
			for i := range b.N {
				off := int64(i) * 512 // append: the file grows
				if mode == "overwrite" {
					off = int64(i%(128<<10)) * 512
				}
				if _, err := f.WriteAt(buf, off); err != nil {
					b.Fatal(err)
				}
				if err := f.Sync(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// benchMessage returns a committed message with a 512-byte body, and a
// function that gives it a new id: a saver reuses it, as the store keeps
// nothing of the message it saves, so that the benchmark measures the
// store and not the building of messages.
func benchMessage(body []byte) (*storage.Message, func()) {
	id := protocol.MessageId()
	h := &protocol.Header{
		MessageId: &id, Topic: new("trade"), MessageType: new("pay-succ"),
		ExpiredTime: new(int64(-1)), DeliveryLimit: new(int32(-1)), GroupId: new("producer"),
		Commit: new(true), Fly: new(false),
	}
	m := &storage.Message{Cmd: protocol.CmdBytesMessage, Header: h, Body: body, Committed: true, NextDeliverTime: time.Now()}
	// A Digest as the broker sets it, so that its bytes are written too
	// (computing it is the broker's cost, not the store's).
	m.Digest = storage.Digest("producer", m.Protocol())
	return m, func() { *h.MessageId = protocol.MessageId() }
}

// BenchmarkSave: C concurrent savers of 512-byte messages, each Save
// waiting for its own acknowledgement, with fsync=always and fsync=never.
func BenchmarkSave(b *testing.B) {
	body := []byte(strings.Repeat("x", 512))
	for _, policy := range []SyncPolicy{SyncAlways, SyncNever} {
		for _, savers := range []int{1, 16, 64} {
			b.Run(fmt.Sprintf("fsync=%s/savers=%d", policy, savers), func(b *testing.B) {
				o := DefaultOptions(benchDir(b))
				o.Sync = policy
				s, err := Open(o, zap.NewNop())
				if err != nil {
					b.Fatal(err)
				}
				defer s.Close()
				b.SetBytes(int64(len(body)))
				b.ReportAllocs()
				b.SetParallelism(max(1, savers/runtime.GOMAXPROCS(0)))
				ctx := context.Background()
				b.ResetTimer()
				if savers == 1 {
					m, next := benchMessage(body)
					for range b.N {
						next()
						if _, err := s.Save(ctx, m); err != nil {
							b.Fatal(err)
						}
					}
				} else {
					b.RunParallel(func(pb *testing.PB) {
						m, next := benchMessage(body)
						for pb.Next() {
							next()
							if _, err := s.Save(ctx, m); err != nil {
								b.Error(err)
								return
							}
						}
					})
				}
				b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
			})
		}
	}
}
