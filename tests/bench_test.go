package tests

import (
	"runtime"
	"strings"
	"testing"

	"github.com/kiteq/kiteq/broker"
)

// BenchmarkPublishRoundTrip: publish → store-ack through client-go and the
// broker on the memory store, over loopback TCP. senders=1 is one
// synchronous sender; senders=64 is 64 concurrent ones on one client.
// Nothing consumes: the messages match no binding and finish at once.
func BenchmarkPublishRoundTrip(b *testing.B) {
	for _, senders := range []int{1, 64} {
		b.Run(map[int]string{1: "senders=1", 64: "senders=64"}[senders], func(b *testing.B) {
			br := startBroker(b, func(o *broker.Options) { o.DB = "memory://?cap=10000000" })
			producer := startClient(b, br.uri(), "p", newRecorder("p"), []string{"bench"})
			body := strings.Repeat("b", 512)
			b.SetBytes(int64(len(body)))
			b.ReportAllocs()
			b.ResetTimer()
			if senders == 1 {
				for range b.N {
					if err := producer.SendStringMessage(newMessage("bench", "t", body)); err != nil {
						b.Fatal(err)
					}
				}
				return
			}
			b.SetParallelism(max(1, senders/runtime.GOMAXPROCS(0))) // goroutines = parallelism × GOMAXPROCS
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if err := producer.SendStringMessage(newMessage("bench", "t", body)); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}
