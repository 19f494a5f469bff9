package tests

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/registry/binding"
)

// TestEndToEndBindings: three groups bound Direct, Regx and Fanout, two
// competing consumers in the fanout group, a group on another topic, and a
// producer. Every message reaches every matching group, exactly the
// matching ones, and each group once.
func TestEndToEndBindings(t *testing.T) {
	b := startBroker(t, nil)

	direct := newRecorder("direct")
	regx := newRecorder("regx")
	fanoutA := newRecorder("fanout-a")
	fanoutB := newRecorder("fanout-b")
	feed := newRecorder("feed")
	startClient(t, b.uri(), "g-direct", direct, nil, binding.Bind_Direct("g-direct", "trade", "pay-succ", 1000, true))
	startClient(t, b.uri(), "g-regx", regx, nil, binding.Bind_Regx("g-regx", "trade", "pay-.*", 1000, true))
	startClient(t, b.uri(), "g-fanout", fanoutA, nil, binding.Bind_Fanout("g-fanout", "trade", 1000, true))
	startClient(t, b.uri(), "g-fanout", fanoutB, nil, binding.Bind_Fanout("g-fanout", "trade", 1000, true))
	startClient(t, b.uri(), "g-feed", feed, nil, binding.Bind_Fanout("g-feed", "feed", 1000, true))
	producer := startClient(t, b.uri(), "producer", newRecorder("producer"), []string{"trade", "feed"})

	// Each message type, and the groups it must reach.
	types := []struct {
		topic, messageType string
		groups             []string
	}{
		{"trade", "pay-succ", []string{"direct", "regx", "fanout"}},
		{"trade", "pay-fail", []string{"regx", "fanout"}},
		{"trade", "xpay-succ", []string{"fanout"}}, // Regx is anchored
		{"trade", "pay", []string{"fanout"}},
		{"trade", "refund", []string{"fanout"}},
		{"feed", "pay-succ", []string{"feed"}},
	}
	const perType = 40
	want := make(map[string][]string) // id -> groups
	for _, ty := range types {
		for i := range perType {
			m := newMessage(ty.topic, ty.messageType, fmt.Sprintf("%s/%s #%d", ty.topic, ty.messageType, i))
			if err := producer.SendStringMessage(m); err != nil {
				t.Fatalf("send %s/%s: %v", ty.topic, ty.messageType, err)
			}
			want[m.GetHeader().GetMessageId()] = ty.groups
		}
	}

	got := func(group string, id string) int {
		switch group {
		case "direct":
			return direct.count(id)
		case "regx":
			return regx.count(id)
		case "fanout":
			return fanoutA.count(id) + fanoutB.count(id)
		case "feed":
			return feed.count(id)
		}
		panic(group)
	}
	eventually(t, 10*time.Second, "every message at every matching group", func() bool {
		for id, groups := range want {
			for _, g := range groups {
				if got(g, id) == 0 {
					return false
				}
			}
		}
		return true
	})
	eventually(t, 5*time.Second, "broker finished every message", func() bool {
		return b.Stats().Finished == int64(len(want))
	})
	time.Sleep(200 * time.Millisecond) // room for a stray extra delivery to show up

	for id, groups := range want {
		for _, g := range []string{"direct", "regx", "fanout", "feed"} {
			n := got(g, id)
			switch {
			case slices.Contains(groups, g) && n != 1:
				t.Errorf("message %s reached %s %d times, want once", id, g, n)
			case !slices.Contains(groups, g) && n != 0:
				t.Errorf("message %s reached %s, which does not match it", id, g)
			}
		}
	}
	// Competing consumers: both took a share, none saw the other's.
	a, bb := fanoutA.snapshot(), fanoutB.snapshot()
	if len(a) == 0 || len(bb) == 0 {
		t.Errorf("competing consumers: %d and %d messages; both should get some", len(a), len(bb))
	}
	for id := range a {
		if bb[id] > 0 {
			t.Errorf("message %s went to both consumers of one group", id)
		}
	}
	t.Logf("fanout group split %d/%d; stats %+v", len(a), len(bb), b.Stats())
}

// TestConsumerFalseRedelivers: a consumer that returns false gets the
// message again, and the message finishes once it returns true.
func TestConsumerFalseRedelivers(t *testing.T) {
	b := startBroker(t, nil)
	flaky := newRecorder("flaky")
	flaky.reject = func(_ *protocol.StringMessage, seen int) bool { return seen < 3 }
	startClient(t, b.uri(), "g-flaky", flaky, nil, binding.Bind_Direct("g-flaky", "trade", "pay-succ", 1000, true))
	producer := startClient(t, b.uri(), "producer", newRecorder("producer"), []string{"trade"})

	m := newMessage("trade", "pay-succ", "try again")
	if err := producer.SendStringMessage(m); err != nil {
		t.Fatal(err)
	}
	id := m.GetHeader().GetMessageId()
	eventually(t, 10*time.Second, "third delivery", func() bool { return flaky.count(id) >= 3 })
	eventually(t, 5*time.Second, "message finished", func() bool { return b.Stats().Finished == 1 })
	time.Sleep(300 * time.Millisecond)
	if n := flaky.count(id); n != 3 {
		t.Fatalf("delivered %d times, want 3 (two refusals, then success)", n)
	}
	if st := b.Stats(); st.DeliverFailed != 2 || st.DeliverAcked != 1 {
		t.Fatalf("broker counted %d failures and %d acks, want 2 and 1", st.DeliverFailed, st.DeliverAcked)
	}
}
