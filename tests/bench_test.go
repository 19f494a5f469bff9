package tests

import (
	"fmt"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kiteq/kiteq/broker"
	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/registry/binding"
)

// counter is a listener that counts what it receives.
type counter struct{ n atomic.Int64 }

func (c *counter) OnMessage(*protocol.StringMessage) bool       { c.n.Add(1); return true }
func (c *counter) OnMessageCheck(tx *protocol.TxResponse) error { return fmt.Errorf("no transactions") }

// BenchmarkPublishDeliver: 64 goroutines publish 100-byte messages through
// one client to one broker, and one consumer group takes them all; an
// operation is one message published, stored, delivered and acknowledged.
func BenchmarkPublishDeliver(b *testing.B) {
	for _, store := range []string{"memory", "file"} {
		b.Run(store, func(b *testing.B) {
			db := "memory://"
			if store == "file" {
				db = "file://" + b.TempDir()
			}
			brk := startBroker(b, func(o *broker.Options) { o.DB = db })
			cons := &counter{}
			startClient(b, brk.uri(), "g", cons, nil, binding.Bind_Direct("g", "trade", "pay-succ", 1000, true))
			producer := startClient(b, brk.uri(), "p", newRecorder("p"), []string{"trade"})
			body := string(make([]byte, 100))
			b.SetParallelism(max(1, 64/runtime.GOMAXPROCS(0)))
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if err := producer.SendStringMessage(newMessage("trade", "pay-succ", body)); err != nil {
						b.Error(err)
						return
					}
				}
			})
			deadline := time.Now().Add(time.Minute)
			for cons.n.Load() < int64(b.N) && time.Now().Before(deadline) {
				time.Sleep(time.Millisecond)
			}
			b.StopTimer()
			if got := cons.n.Load(); got < int64(b.N) {
				b.Fatalf("delivered %d of %d", got, b.N)
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
		})
	}
}
