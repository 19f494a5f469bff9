package tests

import (
	"context"
	"testing"
	"time"

	"github.com/kiteq/kiteq/broker"
	"github.com/kiteq/kiteq/registry/binding"
)

// TestClientsReconnectAfterBrokerRestart: the broker goes away and comes
// back on the same address; the producer's sends fail with an error in
// the meantime (never hang), and both clients reconnect by themselves, the
// consumer sending its bindings again.
func TestClientsReconnectAfterBrokerRestart(t *testing.T) {
	first := startBroker(t, nil)
	addr := first.Addr()
	rec := newRecorder("c")
	startClient(t, "static://"+addr, "g", rec, nil, binding.Bind_Direct("g", "trade", "pay-succ", 100, false))
	producer := startClient(t, "static://"+addr, "p", newRecorder("p"), []string{"trade"})
	producer.SetSendTimeout(time.Second)

	m := newMessage("trade", "pay-succ", "before")
	if err := producer.SendStringMessage(m); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "first delivery", func() bool { return rec.count(m.GetHeader().GetMessageId()) == 1 })

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := first.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := producer.SendStringMessage(newMessage("trade", "pay-succ", "while down")); err == nil {
		t.Fatal("send succeeded with the broker down")
	} else if waited := time.Since(start); waited > 3*time.Second {
		t.Fatalf("send took %s with a 1 s timeout: %v", waited, err)
	} else {
		t.Logf("send while down: %v (after %s)", err, waited.Round(time.Millisecond))
	}

	second := startBroker(t, func(o *broker.Options) { o.Bind = addr })
	// The producer may be back before the consumer has sent its bindings
	// again; until then a message matches no binding. Publish until one is
	// delivered.
	var sent []string
	eventually(t, 15*time.Second, "a delivery through the restarted broker", func() bool {
		m := newMessage("trade", "pay-succ", "after")
		if producer.SendStringMessage(m) == nil {
			sent = append(sent, m.GetHeader().GetMessageId())
		}
		time.Sleep(50 * time.Millisecond)
		for _, id := range sent {
			if rec.count(id) == 1 {
				return true
			}
		}
		return false
	})
	if st := second.Stats(); st.Stored != int64(len(sent)) || st.Connections != 2 {
		t.Fatalf("restarted broker: stored %d of %d sent, %d connections, want 2", st.Stored, len(sent), st.Connections)
	}
}
