package static

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"

	"github.com/kiteq/kiteq/registry"
	"github.com/kiteq/kiteq/registry/binding"
)

func newServer(t *testing.T, dir string) *Server {
	t.Helper()
	s, err := NewServer(dir)
	if err != nil {
		t.Fatalf("NewServer(%q): %v", dir, err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func publish(t *testing.T, s *Server, group string, bs ...*binding.Binding) {
	t.Helper()
	if err := s.PublishBindings(context.Background(), group, bs); err != nil {
		t.Fatalf("PublishBindings(%s): %v", group, err)
	}
}

// requireBindings checks got against want, in order.
func requireBindings(t *testing.T, what string, got []*binding.Binding, want ...*binding.Binding) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %d bindings %v, want %d %v", what, len(got), got, len(want), want)
	}
	for i := range want {
		if !got[i].Equal(want[i]) {
			t.Fatalf("%s: binding %d = %s, want %s", what, i, got[i], want[i])
		}
	}
}

func TestPublishBindingsReplacesPerTopic(t *testing.T) {
	s := newServer(t, "")
	trade1 := binding.Bind_Direct("g", "trade", "pay-succ", 100, false)
	trade2 := binding.Bind_Regx("g", "trade", "refund-.*", 100, false)
	feed := binding.Bind_Fanout("g", "feed", 100, false)
	publish(t, s, "g", trade1, feed)
	requireBindings(t, "trade", s.Bindings("trade"), trade1)
	requireBindings(t, "feed", s.Bindings("feed"), feed)

	// A new set for trade replaces the group's trade bindings, and leaves
	// its feed bindings alone.
	publish(t, s, "g", trade2)
	requireBindings(t, "trade after replace", s.Bindings("trade"), trade2)
	requireBindings(t, "feed after replace", s.Bindings("feed"), feed)

	// Several bindings of one group in one topic are all kept.
	publish(t, s, "g", trade1, trade2)
	requireBindings(t, "trade with two", s.Bindings("trade"), trade1, trade2)

	// Other groups are untouched.
	other := binding.Bind_Direct("h", "trade", "pay-succ", 100, false)
	publish(t, s, "h", other)
	requireBindings(t, "trade with h", s.Bindings("trade"), trade1, trade2, other)

	// Publishing nothing changes nothing.
	publish(t, s, "g")
	requireBindings(t, "after an empty publish", s.Bindings("trade"), trade1, trade2, other)

	if got := s.Bindings("unknown"); len(got) != 0 {
		t.Fatalf("Bindings(unknown) = %v", got)
	}
}

func TestBindingsOrderedByGroup(t *testing.T) {
	s := newServer(t, "")
	var want []*binding.Binding
	for _, g := range []string{"c", "a", "d", "b"} {
		publish(t, s, g, binding.Bind_Fanout(g, "trade", 0, false))
	}
	for _, g := range []string{"a", "b", "c", "d"} {
		want = append(want, binding.Bind_Fanout(g, "trade", 0, false))
	}
	for i := 0; i < 5; i++ { // map order must not leak out
		requireBindings(t, "trade", s.Bindings("trade"), want...)
	}
}

type watchEvent struct {
	topic string
	bs    []*binding.Binding
}

func TestWatchBindings(t *testing.T) {
	s := newServer(t, "")
	var mu sync.Mutex
	var events []watchEvent
	s.WatchBindings(func(topic string, bs []*binding.Binding) {
		mu.Lock()
		events = append(events, watchEvent{topic, bs})
		mu.Unlock()
	})
	take := func() []watchEvent {
		mu.Lock()
		defer mu.Unlock()
		out := events
		events = nil
		return out
	}

	a := binding.Bind_Direct("a", "trade", "pay-succ", 100, false)
	b := binding.Bind_Direct("b", "trade", "pay-succ", 100, false)
	publish(t, s, "b", b)
	ev := take()
	if len(ev) != 1 || ev[0].topic != "trade" {
		t.Fatalf("events after first publish: %v", ev)
	}
	requireBindings(t, "event", ev[0].bs, b)

	// The event carries all the topic's bindings, not only the group's.
	publish(t, s, "a", a)
	ev = take()
	if len(ev) != 1 {
		t.Fatalf("events after second group: %v", ev)
	}
	requireBindings(t, "event", ev[0].bs, a, b)

	// The same bindings again, in new values: no change, no event.
	publish(t, s, "a", binding.Bind_Direct("a", "trade", "pay-succ", 100, false))
	if ev := take(); len(ev) != 0 {
		t.Fatalf("identical re-publish gave events %v", ev)
	}

	// A change in one of two topics: one event, for that topic.
	feed := binding.Bind_Fanout("a", "feed", 0, false)
	publish(t, s, "a", binding.Bind_Direct("a", "trade", "pay-succ", 100, false), feed)
	ev = take()
	if len(ev) != 1 || ev[0].topic != "feed" {
		t.Fatalf("events after adding feed: %v", ev)
	}
	requireBindings(t, "feed event", ev[0].bs, feed)

	// A watcher may read the server.
	s.WatchBindings(func(topic string, bs []*binding.Binding) {
		requireBindings(t, "Bindings in a watcher", s.Bindings(topic), bs...)
	})
	payFail := binding.Bind_Direct("a", "trade", "pay-fail", 100, false)
	publish(t, s, "a", payFail)
	ev = take()
	if len(ev) != 1 {
		t.Fatalf("events after change: %v", ev)
	}
	requireBindings(t, "trade event", ev[0].bs, payFail, b)
}

func TestWatchBindingsReplaysCurrentBindings(t *testing.T) {
	s := newServer(t, "")
	trade := binding.Bind_Direct("g", "trade", "pay-succ", 100, false)
	feed := binding.Bind_Fanout("g", "feed", 0, false)
	publish(t, s, "g", trade, feed)

	// A late watcher first gets what the server holds, one call per topic.
	got := map[string][]*binding.Binding{}
	calls := 0
	s.WatchBindings(func(topic string, bs []*binding.Binding) {
		calls++
		got[topic] = bs
	})
	if calls != 2 {
		t.Fatalf("%d calls on registration, want 2 (one per topic)", calls)
	}
	requireBindings(t, "trade replay", got["trade"], trade)
	requireBindings(t, "feed replay", got["feed"], feed)

	// Then only changes.
	publish(t, s, "g", trade)
	if calls != 2 {
		t.Fatalf("identical re-publish after registration: %d calls", calls)
	}
}

func TestWatchersSeeChangesInOrder(t *testing.T) {
	// Concurrent publishers, each moving its group through type-0, type-1,
	// …: a watcher must never see a group step back, and what it saw last
	// is what the server holds in the end.
	s := newServer(t, "")
	var mu sync.Mutex
	var last []*binding.Binding
	seen := map[string]int{}
	s.WatchBindings(func(topic string, bs []*binding.Binding) {
		runtime.Gosched() // widen the window between the change and its event
		mu.Lock()
		defer mu.Unlock()
		for _, b := range bs {
			var n int
			fmt.Sscanf(b.MessageType, "type-%d", &n)
			if prev, ok := seen[b.GroupId]; ok && n < prev {
				t.Errorf("group %s went back from type-%d to type-%d", b.GroupId, prev, n)
			}
			seen[b.GroupId] = n
		}
		last = bs
	})
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			group := fmt.Sprintf("g%d", g)
			for i := 0; i < 200; i++ {
				b := binding.Bind_Direct(group, "trade", fmt.Sprintf("type-%d", i), 10, false)
				if err := s.PublishBindings(context.Background(), group, []*binding.Binding{b}); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	requireBindings(t, "last event", last, s.Bindings("trade")...)
}

func TestPublishBindingsValidation(t *testing.T) {
	s := newServer(t, "")
	good := binding.Bind_Direct("g", "trade", "pay-succ", 0, false)
	publish(t, s, "g", good)
	called := false
	s.WatchBindings(func(string, []*binding.Binding) { called = true })
	called = false // WatchBindings replays the current bindings first

	tests := []struct {
		name     string
		bs       []*binding.Binding
		contains string
	}{
		{"wrong group", []*binding.Binding{binding.Bind_Direct("h", "trade", "x", 0, false)}, "does not belong to group g"},
		{"bad regex", []*binding.Binding{binding.Bind_Regx("g", "trade", "(", 0, false)}, "bad regular expression"},
		{"empty topic", []*binding.Binding{binding.Bind_Direct("g", "", "x", 0, false)}, "empty topic"},
		{"one bad among good", []*binding.Binding{binding.Bind_Fanout("g", "feed", 0, false), binding.Bind_Direct("g", "trade", "", 0, false)}, "empty messageType"},
	}
	for _, tc := range tests {
		err := s.PublishBindings(context.Background(), "g", tc.bs)
		if err == nil || !strings.Contains(err.Error(), tc.contains) {
			t.Errorf("%s: err = %v, want one containing %q", tc.name, err, tc.contains)
		}
	}
	// A rejected publish changes nothing.
	requireBindings(t, "trade", s.Bindings("trade"), good)
	requireBindings(t, "feed", s.Bindings("feed"))
	if called {
		t.Error("watcher called for a rejected publish")
	}
}

func TestPersistence(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data") // NewServer creates it
	s := newServer(t, dir)
	durable := binding.Bind_Direct("g", "trade", "pay-succ", 1000, true)
	durableFeed := binding.Bind_Fanout("g", "feed", 10, true)
	volatile := binding.Bind_Regx("g", "trade", "refund-.*", 1000, false)
	otherVolatile := binding.Bind_Fanout("h", "trade", 0, false)
	publish(t, s, "g", durable, volatile, durableFeed)
	publish(t, s, "h", otherVolatile)
	s.Close()

	if _, err := os.Stat(filepath.Join(dir, BindingsFile)); err != nil {
		t.Fatalf("no %s: %v", BindingsFile, err)
	}
	if _, err := os.Stat(filepath.Join(dir, BindingsFile+".tmp")); !os.IsNotExist(err) {
		t.Fatalf("temporary file left behind: %v", err)
	}

	// A restarted broker sees only the persistent bindings.
	s2 := newServer(t, dir)
	requireBindings(t, "trade after restart", s2.Bindings("trade"), durable)
	requireBindings(t, "feed after restart", s2.Bindings("feed"), durableFeed)
	if !s2.Bindings("trade")[0].Matches("trade", "pay-succ") {
		t.Fatal("reloaded binding does not match")
	}

	// Replacing a persistent binding with a non-persistent one removes it
	// from the file.
	publish(t, s2, "g", binding.Bind_Direct("g", "trade", "pay-succ", 1000, false))
	s2.Close()
	s3 := newServer(t, dir)
	requireBindings(t, "trade after second restart", s3.Bindings("trade"))
	requireBindings(t, "feed after second restart", s3.Bindings("feed"), durableFeed)
}

func TestCorruptedBindingsFile(t *testing.T) {
	for name, content := range map[string]string{
		"not json":        `[{"groupId":`,
		"null element":    `[null]`,
		"invalid binding": `[{"groupId":"g","topic":"t","messageType":"(","bindType":1}]`,
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, BindingsFile)
			if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
				t.Fatal(err)
			}
			s, err := NewServer(dir)
			if err == nil {
				s.Close()
				t.Fatal("NewServer accepted a corrupted bindings file")
			}
			if !strings.Contains(err.Error(), path) {
				t.Fatalf("error %q does not name %s", err, path)
			}
		})
	}
}

func TestEmptyBindingsFile(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, BindingsFile), []byte("[]"), 0o644); err != nil {
		t.Fatal(err)
	}
	s := newServer(t, dir)
	if got := s.Bindings("trade"); len(got) != 0 {
		t.Fatalf("Bindings = %v", got)
	}
}

func TestSaveErrorIsReturned(t *testing.T) {
	dir := t.TempDir()
	s := newServer(t, dir)
	// A directory where the temporary file should go makes the save fail.
	if err := os.Mkdir(filepath.Join(dir, BindingsFile+".tmp"), 0o755); err != nil {
		t.Fatal(err)
	}
	err := s.PublishBindings(context.Background(), "g", []*binding.Binding{binding.Bind_Fanout("g", "trade", 0, true)})
	if err == nil || !strings.Contains(err.Error(), "save bindings") {
		t.Fatalf("PublishBindings with an unwritable file: %v", err)
	}
	// A non-persistent change does not touch the file.
	publish(t, s, "h", binding.Bind_Fanout("h", "feed", 0, false))
}

func TestMemoryOnly(t *testing.T) {
	t.Chdir(t.TempDir())
	s := newServer(t, "")
	b := binding.Bind_Direct("g", "trade", "pay-succ", 0, true)
	publish(t, s, "g", b)
	requireBindings(t, "trade", s.Bindings("trade"), b)
	entries, err := os.ReadDir(".")
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 0 {
		t.Fatalf("a memory-only server wrote %v", entries)
	}
	s.Close()
	requireBindings(t, "a new memory-only server", newServer(t, "").Bindings("trade"))
}

func TestServerClosed(t *testing.T) {
	ctx := context.Background()
	s := newServer(t, t.TempDir())
	if err := s.PublishServer(ctx, "127.0.0.1:13800", []string{"trade"}); err != nil {
		t.Fatal(err)
	}
	if err := s.UnpublishServer(ctx, "127.0.0.1:13800", []string{"trade"}); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := s.PublishBindings(ctx, "g", []*binding.Binding{binding.Bind_Fanout("g", "trade", 0, true)}); !errors.Is(err, registry.ErrClosed) {
		t.Fatalf("PublishBindings after Close: %v", err)
	}
	if err := s.PublishServer(ctx, "a:1", nil); !errors.Is(err, registry.ErrClosed) {
		t.Fatalf("PublishServer after Close: %v", err)
	}
	if err := s.UnpublishServer(ctx, "a:1", nil); !errors.Is(err, registry.ErrClosed) {
		t.Fatalf("UnpublishServer after Close: %v", err)
	}
}
