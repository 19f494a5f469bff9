package memory_test

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/storage"
	"github.com/kiteq/kiteq/storage/memory"
	"github.com/kiteq/kiteq/storage/storagetest"
)

func TestConformance(t *testing.T) {
	storagetest.Run(t, func(t *testing.T) storage.Store {
		s, err := memory.Open("memory://")
		if err != nil {
			t.Fatal(err)
		}
		return s
	})
}

func TestConformanceSmallCapacity(t *testing.T) {
	// The suite's largest test holds about a thousand messages at once.
	storagetest.Run(t, func(t *testing.T) storage.Store { return memory.New(2000) })
}

func open(t *testing.T, uri string) *memory.Store {
	t.Helper()
	s, err := memory.Open(uri)
	if err != nil {
		t.Fatalf("Open(%q): %v", uri, err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func save(t *testing.T, s *memory.Store, m *storage.Message) error {
	t.Helper()
	stored, err := s.Save(t.Context(), m)
	if err == nil && !stored {
		t.Fatalf("Save %s: stored = false for a new message", m.ID())
	}
	return err
}

func TestCapacity(t *testing.T) {
	s := open(t, "memory://?cap=3")
	ctx := t.Context()
	var ms []*storage.Message
	for range 3 {
		m := storagetest.NewMessage("trade", "pay-succ", true)
		if err := save(t, s, m); err != nil {
			t.Fatal(err)
		}
		ms = append(ms, m)
	}
	fourth := storagetest.NewMessage("trade", "pay-succ", true)
	stored, err := s.Save(ctx, fourth)
	if stored || !errors.Is(err, storage.ErrFull) {
		t.Fatalf("4th Save: got (%v, %v), want (false, ErrFull)", stored, err)
	}
	if !strings.Contains(err.Error(), "3 messages") || !strings.Contains(err.Error(), "?cap=") {
		t.Fatalf("ErrFull text %q should name the capacity and how to raise it", err)
	}
	if _, err := s.Get(ctx, fourth.ID()); !errors.Is(err, storage.ErrNotFound) {
		t.Fatalf("Get of the refused message: %v, want ErrNotFound", err)
	}
	for _, m := range ms { // nothing was evicted
		if _, err := s.Get(ctx, m.ID()); err != nil {
			t.Fatalf("Get %s after a refused Save: %v", m.ID(), err)
		}
	}
	// A duplicate is reported as one even when the store is full.
	if stored, err := s.Save(ctx, ms[0]); stored || err != nil {
		t.Fatalf("duplicate Save into a full store: got (%v, %v), want (false, nil)", stored, err)
	}

	if err := s.Delete(ctx, ms[0].ID()); err != nil {
		t.Fatal(err)
	}
	if err := save(t, s, fourth); err != nil {
		t.Fatalf("Save after Delete: %v", err)
	}
	// Dead letters do not count.
	if err := s.DeadLetter(ctx, ms[1].ID(), "expired"); err != nil {
		t.Fatal(err)
	}
	fifth := storagetest.NewMessage("trade", "pay-succ", false)
	if err := save(t, s, fifth); err != nil {
		t.Fatalf("Save after DeadLetter: %v", err)
	}
	// A rollback frees room too.
	if err := s.Rollback(ctx, fifth.ID()); err != nil {
		t.Fatal(err)
	}
	if err := save(t, s, storagetest.NewMessage("trade", "pay-succ", true)); err != nil {
		t.Fatalf("Save after Rollback: %v", err)
	}
	if s.Len() != 3 || s.Cap() != 3 {
		t.Fatalf("Len, Cap = %d, %d; want 3, 3", s.Len(), s.Cap())
	}
	if err := save(t, s, storagetest.NewMessage("trade", "pay-succ", true)); !errors.Is(err, storage.ErrFull) {
		t.Fatalf("Save into a full store again: %v, want ErrFull", err)
	}
	if dls, err := s.DeadLetters(ctx, "", 0); err != nil || len(dls) != 1 {
		t.Fatalf("DeadLetters: got %d, %v; want 1", len(dls), err)
	}
}

func TestCapacityConcurrent(t *testing.T) {
	const capacity, workers, each = 100, 16, 20
	s := memory.New(capacity)
	defer s.Close()
	var stored, full atomic.Int32
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for range each {
				ok, err := s.Save(t.Context(), storagetest.NewMessage("trade", "pay-succ", true))
				switch {
				case ok:
					stored.Add(1)
				case errors.Is(err, storage.ErrFull):
					full.Add(1)
				default:
					t.Errorf("Save: (%v, %v)", ok, err)
				}
			}
		})
	}
	wg.Wait()
	if stored.Load() != capacity || full.Load() != workers*each-capacity || s.Len() != capacity {
		t.Fatalf("stored %d, full %d, Len %d; want %d, %d, %d",
			stored.Load(), full.Load(), s.Len(), capacity, workers*each-capacity, capacity)
	}
}

func TestOpen(t *testing.T) {
	for uri, want := range map[string]int{
		"memory://":          memory.DefaultCapacity,
		"memory://?":         memory.DefaultCapacity,
		"memory://?cap=1":    1,
		"memory://?cap=5000": 5000,
		"MEMORY://?cap=7":    7,
	} {
		s, err := memory.Open(uri)
		if err != nil {
			t.Errorf("Open(%q): %v", uri, err)
			continue
		}
		if s.Cap() != want {
			t.Errorf("Open(%q).Cap() = %d, want %d", uri, s.Cap(), want)
		}
		s.Close()
	}
}

func TestOpenBad(t *testing.T) {
	for uri, mention := range map[string]string{
		"":                                   "memory://",
		"memory:":                            "memory://",
		"file:///tmp/data":                   "memory://",
		"memory://host":                      "memory://",
		"memory:///path":                     "memory://",
		"memory://user@":                     "memory://",
		"memory://#frag":                     "memory://",
		"memory://?cap=0":                    "> 0",
		"memory://?cap=-5":                   "> 0",
		"memory://?cap=":                     "> 0",
		"memory://?cap=ten":                  "> 0",
		"memory://?cap=1.5":                  "> 0",
		"memory://?cap=1e6":                  "> 0",
		"memory://?cap=99999999999999999999": "> 0",
		"memory://?cap=1&cap=2":              "cap=N",
		"memory://?size=10":                  "cap",
		"memory://?cap=10&sync=1":            "cap",
		"memory://?cap=%zz":                  "memory://",
	} {
		s, err := memory.Open(uri)
		if err == nil {
			s.Close()
			t.Errorf("Open(%q): no error", uri)
			continue
		}
		if !strings.Contains(err.Error(), mention) {
			t.Errorf("Open(%q): error %q does not say what is accepted (%q)", uri, err, mention)
		}
	}
}

func TestNewDefaultCapacity(t *testing.T) {
	for _, c := range []int{0, -1} {
		if got := memory.New(c).Cap(); got != memory.DefaultCapacity {
			t.Errorf("New(%d).Cap() = %d, want %d", c, got, memory.DefaultCapacity)
		}
	}
}

func TestClock(t *testing.T) {
	s := memory.New(10)
	defer s.Close()
	fake := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	s.Now = func() time.Time { return fake }
	ctx := t.Context()

	m := storagetest.NewMessage("trade", "pay-succ", false)
	if err := save(t, s, m); err != nil {
		t.Fatal(err)
	}
	if err := s.Commit(ctx, m.ID()); err != nil {
		t.Fatal(err)
	}
	got, err := s.Get(ctx, m.ID())
	if err != nil {
		t.Fatal(err)
	}
	if !got.NextDeliverTime.Equal(fake) {
		t.Fatalf("NextDeliverTime after Commit = %v, want the clock's %v", got.NextDeliverTime, fake)
	}
	// Consumers receive the decision in the header too.
	if !got.Header.GetCommit() {
		t.Fatal("Header.Commit after Commit = false")
	}
	if m.Header.GetCommit() {
		t.Fatal("Commit changed the caller's header")
	}

	if err := s.DeadLetter(ctx, m.ID(), "expired"); err != nil {
		t.Fatal(err)
	}
	dls, err := s.DeadLetters(ctx, "", 1)
	if err != nil || len(dls) != 1 || !dls[0].At.Equal(fake) {
		t.Fatalf("DeadLetters: %v, %v; want one at %v", dls, err, fake)
	}
}

func TestSaveNil(t *testing.T) {
	s := memory.New(10)
	defer s.Close()
	if stored, err := s.Save(t.Context(), nil); stored || !errors.Is(err, storage.ErrInvalid) {
		t.Fatalf("Save(nil): got (%v, %v), want (false, ErrInvalid)", stored, err)
	}
}

func TestDueUnknownKind(t *testing.T) {
	s := memory.New(10)
	defer s.Close()
	_, err := s.Due(t.Context(), storage.DueQuery{Kind: storage.DueKind(9), Before: time.Now()})
	if err == nil || !strings.Contains(err.Error(), "DueDelivery") {
		t.Fatalf("Due with kind 9: %v, want an error naming the kinds", err)
	}
}

func TestCancelledContext(t *testing.T) {
	s := memory.New(10)
	defer s.Close()
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := s.Save(ctx, storagetest.NewMessage("trade", "pay-succ", true)); !errors.Is(err, context.Canceled) {
		t.Fatalf("Save with a cancelled context: %v", err)
	}
	if _, err := s.Due(ctx, storage.DueQuery{Before: time.Now()}); !errors.Is(err, context.Canceled) {
		t.Fatalf("Due with a cancelled context: %v", err)
	}
}

func TestCloseReleases(t *testing.T) {
	s := memory.New(10)
	if err := save(t, s, storagetest.NewMessage("trade", "pay-succ", true)); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if s.Len() != 0 {
		t.Fatalf("Len after Close = %d, want 0", s.Len())
	}
	if err := s.Close(); !errors.Is(err, storage.ErrClosed) {
		t.Fatalf("second Close: %v, want ErrClosed", err)
	}
}

// TestDueLarge pages through many due messages among many that are not,
// with a small limit, to check the shard merge at scale.
func TestDueLarge(t *testing.T) {
	s := memory.New(0)
	defer s.Close()
	ctx := t.Context()
	now := time.Now().Truncate(time.Millisecond)
	want := map[string]bool{}
	for i := range 20000 {
		m := storagetest.NewMessage("trade", "pay-succ", i%7 != 0)
		if i%3 == 0 {
			m.Header.MessageId = ptr(storagetest.RandomID())
		}
		// Due ones spread over 50 ms, so that many share a time.
		m.NextDeliverTime = now.Add(-time.Duration(i%50) * time.Millisecond)
		if i%4 != 0 {
			m.NextDeliverTime = now.Add(time.Hour)
		} else if m.Committed {
			want[m.ID()] = true
		}
		if err := save(t, s, m); err != nil {
			t.Fatal(err)
		}
	}
	seen := 0
	var after storage.Cursor
	for {
		page, err := s.Due(ctx, storage.DueQuery{Kind: storage.DueDelivery, Before: now, After: after, Limit: 37})
		if err != nil {
			t.Fatal(err)
		}
		if len(page) == 0 {
			break
		}
		if len(page) > 37 {
			t.Fatalf("page of %d, limit 37", len(page))
		}
		for _, m := range page {
			if (seen > 0 && m.Cursor().Compare(after) <= 0) || !want[m.ID()] {
				t.Fatalf("Due returned %s at %v after %v (due: %v)", m.ID(), m.NextDeliverTime, after, want[m.ID()])
			}
			after = m.Cursor()
			seen++
		}
	}
	if seen != len(want) {
		t.Fatalf("paged through %d due messages, want %d", seen, len(want))
	}
}

// TestMillisecond checks that every write keeps NextDeliverTime to the
// millisecond, so that what Due orders by is what it returns.
func TestMillisecond(t *testing.T) {
	s := memory.New(10)
	defer s.Close()
	ctx := t.Context()
	fine := time.Date(2030, 1, 2, 3, 4, 5, 6_789_012, time.UTC)
	want := time.Date(2030, 1, 2, 3, 4, 5, 6_000_000, time.UTC)
	s.Now = func() time.Time { return fine.Add(time.Second) }
	check := func(what, id string, want time.Time) {
		t.Helper()
		got, err := s.Get(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		if !got.NextDeliverTime.Equal(want) {
			t.Fatalf("%s: NextDeliverTime %v, want %v", what, got.NextDeliverTime, want)
		}
	}

	m := storagetest.NewMessage("trade", "pay-succ", false)
	m.NextDeliverTime = fine
	if err := save(t, s, m); err != nil {
		t.Fatal(err)
	}
	if !m.NextDeliverTime.Equal(fine) {
		t.Fatal("Save changed the caller's message")
	}
	check("Save", m.ID(), want)
	if err := s.RecordDelivery(ctx, storage.DeliveryResult{MessageID: m.ID(), DeliverCount: 1, NextDeliverTime: fine.Add(time.Minute)}); err != nil {
		t.Fatal(err)
	}
	check("RecordDelivery", m.ID(), want.Add(time.Minute))
	if err := s.Commit(ctx, m.ID()); err != nil {
		t.Fatal(err)
	}
	check("Commit", m.ID(), want.Add(time.Second))

	// Due at the stored time, not at the one given.
	page, err := s.Due(ctx, storage.DueQuery{Kind: storage.DueDelivery, Before: want.Add(time.Second)})
	if err != nil || len(page) != 1 || !page[0].NextDeliverTime.Equal(want.Add(time.Second)) {
		t.Fatalf("Due at the stored commit time: %v, %v", page, err)
	}
	page, err = s.Due(ctx, storage.DueQuery{Kind: storage.DueDelivery, Before: want.Add(time.Second), After: page[0].Cursor()})
	if err != nil || len(page) != 0 {
		t.Fatalf("Due after the message's own cursor: %d messages, %v", len(page), err)
	}
}

// TestDueBeforeYearOne checks that the zero cursor starts before every
// time, even those before the zero time.Time.
func TestDueBeforeYearOne(t *testing.T) {
	s := memory.New(10)
	defer s.Close()
	m := storagetest.NewMessage("trade", "pay-succ", true)
	m.NextDeliverTime = time.Time{}.Add(-time.Hour)
	if err := save(t, s, m); err != nil {
		t.Fatal(err)
	}
	page, err := s.Due(t.Context(), storage.DueQuery{Kind: storage.DueDelivery, Before: time.Now()})
	if err != nil || len(page) != 1 {
		t.Fatalf("Due: %d messages, %v; want 1", len(page), err)
	}
}

func ptr[T any](v T) *T { return &v }

func benchMessage(b *testing.B) *storage.Message {
	body := make([]byte, 512)
	for i := range body {
		body[i] = byte(i)
	}
	return storagetest.NewBytesMessage("trade", "pay-succ", body, true)
}

// BenchmarkSave saves new 512-byte messages from parallel goroutines. The
// store's capacity is raised so that b.N messages fit.
func BenchmarkSave(b *testing.B) {
	s := memory.New(1 << 40)
	defer s.Close()
	ctx := b.Context()
	b.ReportAllocs()
	b.SetBytes(512)
	b.RunParallel(func(pb *testing.PB) {
		m := benchMessage(b) // Save copies it, so one per goroutine will do
		for pb.Next() {
			id := protocol.MessageId()
			m.Header.MessageId = &id
			if stored, err := s.Save(ctx, m); !stored || err != nil {
				b.Errorf("Save: (%v, %v)", stored, err)
				return
			}
		}
	})
}

// BenchmarkSaveDelete is the broker's steady state: every message is saved,
// then deleted once delivered, with a window of messages in flight.
func BenchmarkSaveDelete(b *testing.B) {
	const window = 1024 // per goroutine
	s := memory.New(0)
	defer s.Close()
	ctx := b.Context()
	b.ReportAllocs()
	b.SetBytes(512)
	b.RunParallel(func(pb *testing.PB) {
		m := benchMessage(b)
		var ring [window]string
		i := 0
		for pb.Next() {
			if old := ring[i%window]; old != "" {
				if err := s.Delete(ctx, old); err != nil {
					b.Errorf("Delete: %v", err)
					return
				}
			}
			id := protocol.MessageId()
			m.Header.MessageId = &id
			if stored, err := s.Save(ctx, m); !stored || err != nil {
				b.Errorf("Save: (%v, %v)", stored, err)
				return
			}
			ring[i%window] = id
			i++
		}
	})
}

// BenchmarkGet reads random messages out of 100,000.
func BenchmarkGet(b *testing.B) {
	s := memory.New(0)
	defer s.Close()
	ctx := b.Context()
	m := benchMessage(b)
	ids := make([]string, 100_000)
	for i := range ids {
		ids[i] = protocol.MessageId()
		m.Header.MessageId = &ids[i]
		if _, err := s.Save(ctx, m); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportAllocs()
	b.ResetTimer()
	var n atomic.Uint64
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := s.Get(ctx, ids[n.Add(7919)%uint64(len(ids))]); err != nil {
				b.Errorf("Get: %v", err)
				return
			}
		}
	})
}

// BenchmarkDuePage reads one page of 100 due messages from a store of
// 100,000, where one in ten is due: the delivery loop's query.
func BenchmarkDuePage(b *testing.B) {
	s := memory.New(0)
	defer s.Close()
	ctx := b.Context()
	now := time.Now().Truncate(time.Millisecond)
	m := benchMessage(b)
	var due []storage.Cursor
	for i := range 100_000 {
		id := protocol.MessageId()
		m.Header.MessageId = &id
		m.NextDeliverTime = now.Add(time.Hour)
		if i%10 == 0 {
			m.NextDeliverTime = now.Add(-time.Duration(i%1000) * time.Millisecond)
			due = append(due, m.Cursor())
		}
		if _, err := s.Save(ctx, m); err != nil {
			b.Fatal(err)
		}
	}
	slices.SortFunc(due, storage.Cursor.Compare)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		after := due[(i*100)%(len(due)-100)]
		page, err := s.Due(ctx, storage.DueQuery{Kind: storage.DueDelivery, Before: now, After: after, Limit: 100})
		if err != nil || len(page) != 100 {
			b.Fatalf("Due: %d messages, %v", len(page), err)
		}
	}
}

// BenchmarkDuePollNothingDue polls a store of 1,000,000 pending messages,
// none due yet (retries scheduled minutes ahead): the delivery loop's
// query when it has nothing to do, which must not scan the backlog.
func BenchmarkDuePollNothingDue(b *testing.B) {
	s := memory.New(0)
	defer s.Close()
	ctx := b.Context()
	now := time.Now()
	m := benchMessage(b)
	for i := range 1_000_000 {
		id := protocol.MessageId()
		m.Header.MessageId = &id
		m.Committed = i%10 != 0 // some transaction checks pending too
		m.NextDeliverTime = now.Add(time.Minute + time.Duration(i%600_000)*time.Millisecond)
		if _, err := s.Save(ctx, m); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		page, err := s.Due(ctx, storage.DueQuery{Kind: storage.DueDelivery, Before: now, Limit: 100})
		if err != nil || len(page) != 0 {
			b.Fatalf("Due: %d messages, %v", len(page), err)
		}
	}
}
