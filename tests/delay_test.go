package tests

import (
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kiteq/kiteq/broker"
	client "github.com/kiteq/kiteq/client-go"
	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/registry/binding"
)

// timedRecorder notes when each message arrived.
type timedRecorder struct {
	*recorder
	at chan time.Time
}

func (r *timedRecorder) OnMessage(m *protocol.StringMessage) bool {
	r.at <- time.Now()
	return r.recorder.OnMessage(m)
}

// TestDelayedDelivery: messages with deliverAt arrive no earlier than
// asked and within 1 s after, on the memory store and on the file store.
func TestDelayedDelivery(t *testing.T) {
	eachStore(t, func(t *testing.T, db string) {
		b := startBroker(t, func(o *broker.Options) { o.DB = db })
		rec := &timedRecorder{recorder: newRecorder("c"), at: make(chan time.Time, 16)}
		startClient(t, b.uri(), "g", rec, nil, binding.Bind_Direct("g", "trade", "pay-succ", 100, true))
		producer := startClient(t, b.uri(), "p", newRecorder("p"), []string{"trade"})
		var wants []time.Time
		for _, d := range []time.Duration{1500 * time.Millisecond, 700 * time.Millisecond, 1100 * time.Millisecond} {
			at := time.Now().Add(d)
			m := newMessage("trade", "pay-succ", "later")
			m.Header.DeliverAt = new(at.UnixMilli())
			if err := producer.SendStringMessage(m); err != nil {
				t.Fatal(err)
			}
			wants = append(wants, time.UnixMilli(at.UnixMilli()))
		}
		// In the order of their times, each within its second.
		for _, i := range []int{1, 2, 0} {
			select {
			case got := <-rec.at:
				if got.Before(wants[i]) || got.After(wants[i].Add(time.Second)) {
					t.Fatalf("arrived at %v, asked for %v", got.Format("15:04:05.000"), wants[i].Format("15:04:05.000"))
				}
			case <-time.After(5 * time.Second):
				t.Fatal("a delayed message never arrived")
			}
		}
	})
}

// TestProcessDelayedMessageSurvivesSIGKILL: a delayed message stored by a
// broker that is then killed with SIGKILL is delivered by the restarted
// broker, and no earlier than asked.
func TestProcessDelayedMessageSurvivesSIGKILL(t *testing.T) {
	bin := buildKiteq(t)
	addr := freePort(t)
	db := "-db=file://" + t.TempDir()
	cmd, _, exited := startKiteq(t, bin, addr, db)

	binder := client.NewKiteQClient("static://"+addr, "g", "secret", newRecorder("binder"))
	binder.SetBindings([]*binding.Binding{binding.Bind_Direct("g", "trade", "pay-succ", 100, true)})
	if err := binder.Start(); err != nil {
		t.Fatal(err)
	}
	binder.Destroy()
	producer := client.NewKiteQClient("static://"+addr, "p", "secret", newRecorder("p"))
	producer.SetTopics([]string{"trade"})
	if err := producer.Start(); err != nil {
		t.Fatal(err)
	}
	at := time.UnixMilli(time.Now().Add(3 * time.Second).UnixMilli())
	m := newMessage("trade", "pay-succ", "after the restart")
	m.Header.DeliverAt = new(at.UnixMilli())
	if err := producer.SendStringMessage(m); err != nil {
		t.Fatal(err)
	}
	producer.Destroy()
	cmd.Process.Signal(syscall.SIGKILL)
	<-exited
	startKiteq(t, bin, addr, db)

	rec := &timedRecorder{recorder: newRecorder("c"), at: make(chan time.Time, 4)}
	startClient(t, "static://"+addr, "g", rec, nil, binding.Bind_Direct("g", "trade", "pay-succ", 100, true))
	select {
	case got := <-rec.at:
		if got.Before(at) || got.After(at.Add(time.Second)) {
			t.Fatalf("arrived at %v, asked for %v", got.Format("15:04:05.000"), at.Format("15:04:05.000"))
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the delayed message never arrived after the restart")
	}
}

// TestDelayedMessagesWaitInTheStoreNotInMemory: on the file store, the
// bodies of delayed messages stay on disk until their time; the broker
// keeps only their ids.
func TestDelayedMessagesWaitInTheStoreNotInMemory(t *testing.T) {
	const n, body = 300, 200 << 10 // 60 MiB of bodies
	b := startBroker(t, func(o *broker.Options) { o.DB = "file://" + t.TempDir() })
	producer := startClient(t, b.uri(), "p", newRecorder("p"), []string{"trade"})
	heap := func() uint64 {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	before := heap()
	at := time.Now().Add(30 * time.Minute).UnixMilli() // before the test messages expire
	text := strings.Repeat("x", body)
	for range n {
		m := newMessage("trade", "pay-succ", text)
		m.Header.DeliverAt = new(at)
		if err := producer.SendStringMessage(m); err != nil {
			t.Fatal(err)
		}
	}
	after := heap()
	grown := int64(after) - int64(before)
	t.Logf("heap grew by %d KiB for %d delayed messages of %d KiB", grown>>10, n, body>>10)
	if grown > 16<<20 {
		t.Fatalf("heap grew by %d MiB holding %d delayed messages of %d KiB: their bodies are kept in memory", grown>>20, n, body>>10)
	}
}
