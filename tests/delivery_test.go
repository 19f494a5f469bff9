package tests

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kiteq/kiteq/broker"
	client "github.com/kiteq/kiteq/client-go"
	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/registry/binding"
)

// eachStore runs fn on the memory store and on the file store.
func eachStore(t *testing.T, fn func(t *testing.T, db string)) {
	for _, db := range []string{"memory://", "file://"} {
		t.Run(strings.TrimSuffix(db, "://"), func(t *testing.T) {
			if db == "file://" {
				db += t.TempDir()
			}
			fn(t, db)
		})
	}
}

// waitDeadLetter waits until id is in b's dead-letter queue and returns
// its reason.
func waitDeadLetter(t *testing.T, b *testBroker, id string, within time.Duration) string {
	t.Helper()
	reason := ""
	eventually(t, within, "dead letter "+id, func() bool {
		page, err := b.store.DeadLetters(context.Background(), "", 100)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range page {
			if d.Message.ID() == id {
				reason = d.Reason
				return true
			}
		}
		return false
	})
	return reason
}

// TestRetryThenDeadLetter: a consumer that fails twice and then succeeds
// gets the message three times and nothing is dead-lettered; one that
// always fails dead-letters the message at its delivery limit, and one
// that always fails a message with a short life dead-letters it at its
// expiry. On the memory and the file store.
func TestRetryThenDeadLetter(t *testing.T) {
	eachStore(t, func(t *testing.T, db string) {
		b := startBroker(t, func(o *broker.Options) { o.DB = db })
		rec := newRecorder("c")
		rec.reject = func(m *protocol.StringMessage, seen int) bool {
			return m.GetBody() != "flaky" || seen <= 2
		}
		startClient(t, b.uri(), "g", rec, nil, binding.Bind_Direct("g", "trade", "pay-succ", 100, true))
		producer := startClient(t, b.uri(), "p", newRecorder("p"), []string{"trade"})

		flaky := newMessage("trade", "pay-succ", "flaky")
		limited := newMessage("trade", "pay-succ", "limited")
		limited.Header.DeliveryLimit = new(int32(3))
		expiring := newMessage("trade", "pay-succ", "expiring")
		expiring.Header.ExpiredTime = new(time.Now().Add(2 * time.Second).Unix())
		for _, m := range []*protocol.StringMessage{flaky, limited, expiring} {
			if err := producer.SendStringMessage(m); err != nil {
				t.Fatal(err)
			}
		}
		if r := waitDeadLetter(t, b, limited.GetHeader().GetMessageId(), 10*time.Second); !strings.Contains(r, "g: delivery limit 3 reached") {
			t.Errorf("limited: reason %q", r)
		}
		if n := rec.count(limited.GetHeader().GetMessageId()); n != 3 {
			t.Errorf("limited: delivered %d times, want its limit 3", n)
		}
		if r := waitDeadLetter(t, b, expiring.GetHeader().GetMessageId(), 10*time.Second); !strings.Contains(r, "g: expired at") {
			t.Errorf("expiring: reason %q", r)
		}
		eventually(t, 5*time.Second, "flaky acknowledged on its third delivery", func() bool {
			return rec.count(flaky.GetHeader().GetMessageId()) == 3 && b.Stats().Finished == 1
		})
		if page, _ := b.store.DeadLetters(context.Background(), "", 100); len(page) != 2 {
			t.Errorf("%d dead letters, want 2", len(page))
		}
	})
}

// TestPersistentBindingKeepsMessagesForAnOfflineGroup: two groups go
// offline, one bound persistently and one not; a message published then
// reaches the persistent group when it comes back, and never the other.
func TestPersistentBindingKeepsMessagesForAnOfflineGroup(t *testing.T) {
	eachStore(t, func(t *testing.T, db string) {
		b := startBroker(t, func(o *broker.Options) { o.DB = db })
		bind := func(group string, persistent bool) *binding.Binding {
			return binding.Bind_Direct(group, "trade", "pay-succ", 100, persistent)
		}
		for _, g := range []struct {
			name       string
			persistent bool
		}{{"keeps", true}, {"skips", false}} {
			c := client.NewKiteQClient(b.uri(), g.name, "secret", newRecorder(g.name))
			c.SetBindings([]*binding.Binding{bind(g.name, g.persistent)})
			if err := c.Start(); err != nil {
				t.Fatal(err)
			}
			c.Destroy()
		}
		producer := startClient(t, b.uri(), "p", newRecorder("p"), []string{"trade"})
		m := newMessage("trade", "pay-succ", "while away")
		if err := producer.SendStringMessage(m); err != nil {
			t.Fatal(err)
		}
		time.Sleep(300 * time.Millisecond)
		keeps, skips := newRecorder("keeps"), newRecorder("skips")
		startClient(t, b.uri(), "keeps", keeps, nil, bind("keeps", true))
		startClient(t, b.uri(), "skips", skips, nil, bind("skips", false))
		id := m.GetHeader().GetMessageId()
		eventually(t, 5*time.Second, "the persistent group received it", func() bool { return keeps.count(id) == 1 })
		time.Sleep(300 * time.Millisecond)
		if skips.count(id) != 0 {
			t.Fatal("the non-persistent group received a message published while it was offline")
		}
	})
}

// gauge is a listener that holds each message for a while and records the
// most it held at once.
type gauge struct {
	*recorder
	hold     time.Duration
	mu       sync.Mutex
	now, max int
}

func (g *gauge) OnMessage(m *protocol.StringMessage) bool {
	g.mu.Lock()
	g.now++
	g.max = max(g.max, g.now)
	g.mu.Unlock()
	time.Sleep(g.hold)
	g.mu.Lock()
	g.now--
	g.mu.Unlock()
	return g.recorder.OnMessage(m)
}

// TestWatermarkBoundsInFlight: a group whose binding says 3 never has more
// than 3 messages in flight, however many wait, and gets all of them.
func TestWatermarkBoundsInFlight(t *testing.T) {
	eachStore(t, func(t *testing.T, db string) {
		b := startBroker(t, func(o *broker.Options) { o.DB = db })
		g := &gauge{recorder: newRecorder("slow"), hold: 50 * time.Millisecond}
		startClient(t, b.uri(), "slow", g, nil, binding.Bind_Direct("slow", "trade", "pay-succ", 3, true))
		producer := startClient(t, b.uri(), "p", newRecorder("p"), []string{"trade"})
		const n = 30
		for i := range n {
			if err := producer.SendStringMessage(newMessage("trade", "pay-succ", fmt.Sprint(i))); err != nil {
				t.Fatal(err)
			}
		}
		eventually(t, 10*time.Second, "every message", func() bool { return len(g.snapshot()) == n })
		g.mu.Lock()
		most := g.max
		g.mu.Unlock()
		if most != 3 {
			t.Fatalf("at most %d in flight, want the watermark 3 (reached)", most)
		}
	})
}

// consumerChildEnv names the broker a child consumer process connects to.
const consumerChildEnv = "KITEQ_TEST_STUCK_CONSUMER"

// stuckConsumerChild is the consumer process of
// TestConsumerKilledMidFlight: it prints the id of each message it gets
// and never answers.
func stuckConsumerChild(addr string) {
	l := &stuck{}
	c := client.NewKiteQClient("static://"+addr, "g", "secret", l)
	c.SetBindings([]*binding.Binding{binding.Bind_Direct("g", "trade", "pay-succ", 100, true)})
	if err := c.Start(); err != nil {
		fmt.Println("ERROR", err)
		os.Exit(1)
	}
	fmt.Println("READY")
	select {}
}

type stuck struct{}

func (stuck) OnMessage(m *protocol.StringMessage) bool {
	fmt.Println("GOT", m.GetHeader().GetMessageId())
	select {}
}

func (stuck) OnMessageCheck(*protocol.TxResponse) error { return nil }

// TestConsumerKilledMidFlight: a consumer process is killed with SIGKILL
// while it holds a message; another consumer of its group gets it at once,
// long before the deliver timeout.
func TestConsumerKilledMidFlight(t *testing.T) {
	b := startBroker(t, func(o *broker.Options) { o.DeliverTimeout = 30 * time.Second })
	cmd, lines := startChild(t, consumerChildEnv, b.Addr())
	if l, err := lines.ReadString('\n'); err != nil || l != "READY\n" {
		t.Fatalf("child consumer: %q, %v", l, err)
	}
	producer := startClient(t, b.uri(), "p", newRecorder("p"), []string{"trade"})
	m := newMessage("trade", "pay-succ", "held by a consumer that dies")
	if err := producer.SendStringMessage(m); err != nil {
		t.Fatal(err)
	}
	if l, err := lines.ReadString('\n'); err != nil || l != "GOT "+m.GetHeader().GetMessageId()+"\n" {
		t.Fatalf("child consumer: %q, %v", l, err)
	}
	other := newRecorder("other")
	startClient(t, b.uri(), "g", other, nil, binding.Bind_Direct("g", "trade", "pay-succ", 100, true))
	killed := time.Now()
	cmd.Process.Kill()
	eventually(t, 5*time.Second, "the other consumer got the message", func() bool {
		return other.count(m.GetHeader().GetMessageId()) == 1
	})
	if el := time.Since(killed); el > 3*time.Second {
		t.Fatalf("handed over %v after the kill", el)
	}
	if st := b.Stats(); st.Redirected < 1 || st.DeliverTimeouts != 0 {
		t.Fatalf("stats: %+v", st)
	}
}
