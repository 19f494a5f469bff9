package client_test

import (
	"runtime"
	"testing"

	client "github.com/kiteq/kiteq/client-go"
	"github.com/kiteq/kiteq/protocol"
)

// benchProducer returns a producer of a fake broker that keeps no messages.
func benchProducer(b *testing.B) *client.KiteQClient {
	fb, err := newFakeBroker("127.0.0.1:0", false)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(fb.Close)
	return producer(b, fb.addr)
}

func BenchmarkSendStringMessage(b *testing.B) {
	c := benchProducer(b)
	msg := newMsg("benchmark body of some 40 bytes........")
	b.ReportAllocs()
	for b.Loop() {
		msg.Header.MessageId = new(protocol.MessageId())
		if err := c.SendStringMessage(msg); err != nil {
			b.Fatal(err)
		}
	}
}

// 64 goroutines (on 2 CPUs) sending synchronously through one client.
func BenchmarkSendStringMessageParallel(b *testing.B) {
	c := benchProducer(b)
	b.SetParallelism(max(1, 64/runtime.GOMAXPROCS(0)))
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		msg := newMsg("benchmark body of some 40 bytes........")
		for pb.Next() {
			msg.Header.MessageId = new(protocol.MessageId())
			if err := c.SendStringMessage(msg); err != nil {
				b.Error(err)
				return
			}
		}
	})
}
