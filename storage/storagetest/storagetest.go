// Package storagetest is the conformance suite that every storage backend
// runs: one set of test bodies, written against the storage.Store contract,
// for the memory store, the file store and the MySQL store alike.
//
//	func TestConformance(t *testing.T) {
//		storagetest.Run(t, func(t *testing.T) storage.Store {
//			s, err := memory.Open("memory://")
//			if err != nil {
//				t.Fatal(err)
//			}
//			return s
//		})
//	}
//
// The contract lets a backend keep NextDeliverTime to the millisecond:
// times the suite stores are whole milliseconds, except where it checks
// that finer times round-trip through a Cursor, and times it expects a
// backend to set ("now") are checked to within a second.
package storagetest

import (
	"bytes"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/storage"
)

// Run runs the conformance suite. Every subtest calls open for a fresh,
// empty store and closes it when it ends.
func Run(t *testing.T, open func(t *testing.T) storage.Store) {
	tests := []struct {
		name string
		fn   func(t *testing.T, s storage.Store)
	}{
		{"SaveGetString", testSaveGetString},
		{"SaveGetBytes", testSaveGetBytes},
		{"SaveKeepsDeliveryState", testSaveKeepsDeliveryState},
		{"SaveAndGetCopy", testSaveAndGetCopy},
		{"SaveDuplicate", testSaveDuplicate},
		{"SaveDigestRetry", testSaveDigestRetry},
		{"SaveConflict", testSaveConflict},
		{"SaveDigestUnknown", testSaveDigestUnknown},
		{"SaveConflictDeadLetter", testSaveConflictDeadLetter},
		{"SaveConflictConcurrent", testSaveConflictConcurrent},
		{"SaveInvalid", testSaveInvalid},
		{"GetMissing", testGetMissing},
		{"Commit", testCommit},
		{"CommitCommitted", testCommitCommitted},
		{"CommitMissing", testCommitMissing},
		{"Rollback", testRollback},
		{"RollbackCommitted", testRollbackCommitted},
		{"RollbackMissing", testRollbackMissing},
		{"RecordDelivery", testRecordDelivery},
		{"RecordDeliveryTxCheck", testRecordDeliveryTxCheck},
		{"RecordDeliveryMissing", testRecordDeliveryMissing},
		{"Delete", testDelete},
		{"DueKind", testDueKind},
		{"DueBefore", testDueBefore},
		{"DueOrder", testDueOrder},
		{"DuePaging", testDuePaging},
		{"DuePagingWhileDeleting", testDuePagingWhileDeleting},
		{"DuePagingWhileRescheduling", testDuePagingWhileRescheduling},
		{"DueCommit", testDueCommit},
		{"DueCursorRoundTrip", testDueCursorRoundTrip},
		{"DueDefaultLimit", testDueDefaultLimit},
		{"DueReturnsCopies", testDueReturnsCopies},
		{"DeadLetter", testDeadLetter},
		{"DeadLetterNotRevived", testDeadLetterNotRevived},
		{"DeadLetterMissing", testDeadLetterMissing},
		{"DeadLettersPaging", testDeadLettersPaging},
		{"Redeliver", testRedeliver},
		{"RedeliverNotDead", testRedeliverNotDead},
		{"Close", testClose},
		{"Concurrent", testConcurrent},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := open(t)
			if s == nil {
				t.Fatal("open returned a nil store")
			}
			t.Cleanup(func() {
				// testClose closes the store itself; closing again may say so.
				if err := s.Close(); err != nil && !errors.Is(err, storage.ErrClosed) {
					t.Errorf("Close: %v", err)
				}
			})
			tc.fn(t, s)
		})
	}
}

// second is the precision the suite grants a backend for times it sets.
const second = time.Second

// milli is the precision of NextDeliverTime the contract requires.
const milli = time.Millisecond

func now() time.Time { return time.Now().Truncate(second) }

func save(t *testing.T, s storage.Store, m *storage.Message) {
	t.Helper()
	stored, err := s.Save(t.Context(), m)
	if err != nil {
		t.Fatalf("Save %s: %v", m.ID(), err)
	}
	if !stored {
		t.Fatalf("Save %s: stored = false for a new message", m.ID())
	}
}

func get(t *testing.T, s storage.Store, id string) *storage.Message {
	t.Helper()
	m, err := s.Get(t.Context(), id)
	if err != nil {
		t.Fatalf("Get %s: %v", id, err)
	}
	if m == nil {
		t.Fatalf("Get %s: nil message and nil error", id)
	}
	return m
}

func wantNotFound(t *testing.T, s storage.Store, id string) {
	t.Helper()
	m, err := s.Get(t.Context(), id)
	if !errors.Is(err, storage.ErrNotFound) {
		t.Fatalf("Get %s: got (%v, %v), want ErrNotFound", id, m, err)
	}
}

func wantErr(t *testing.T, what string, err, want error) {
	t.Helper()
	if want == nil {
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		return
	}
	if !errors.Is(err, want) {
		t.Fatalf("%s: got error %v, want %v", what, err, want)
	}
}

func wantSame(t *testing.T, what string, got, want *storage.Message) {
	t.Helper()
	if d := DiffMessage(got, want); d != "" {
		t.Fatalf("%s: %s", what, d)
	}
}

// within reports whether tm lies in [from, to], widened by the precision
// the suite grants.
func within(tm, from, to time.Time) bool {
	return !tm.Before(from.Add(-second)) && !tm.After(to.Add(second))
}

func ids(ms []*storage.Message) []string {
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = m.ID()
	}
	return out
}

// wantIDs checks that got holds exactly the ids of want, in ascending order.
func wantIDs(t *testing.T, what string, got []string, want ...string) {
	t.Helper()
	want = slices.Clone(want)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Fatalf("%s: got ids\n%q\nwant\n%q", what, got, want)
	}
}

// dueOrder returns ms sorted in the due order, by the NextDeliverTime
// each holds, then by id.
func dueOrder(ms []*storage.Message) []*storage.Message {
	out := slices.Clone(ms)
	slices.SortFunc(out, func(a, b *storage.Message) int { return a.Cursor().Compare(b.Cursor()) })
	return out
}

func cursors(ms []*storage.Message) []string {
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = fmt.Sprintf("%s@%s", m.ID(), m.NextDeliverTime.UTC().Format("15:04:05.000000000"))
	}
	return out
}

// wantDue checks that got holds exactly the messages want, in the due
// order of the times the test gave them, and with those times.
func wantDue(t *testing.T, what string, got []*storage.Message, want ...*storage.Message) {
	t.Helper()
	want = dueOrder(want)
	ok := len(got) == len(want)
	for i := 0; ok && i < len(got); i++ {
		ok = got[i].ID() == want[i].ID() && got[i].NextDeliverTime.Equal(want[i].NextDeliverTime)
	}
	if !ok {
		t.Fatalf("%s: got (id@time)\n%q\nwant\n%q", what, cursors(got), cursors(want))
	}
}

// wantDueSet checks that got is in the due order of its own times and
// holds exactly the ids of want, each once.
func wantDueSet(t *testing.T, what string, got []*storage.Message, want ...string) {
	t.Helper()
	for i := 1; i < len(got); i++ {
		if got[i-1].Cursor().Compare(got[i].Cursor()) >= 0 {
			t.Fatalf("%s: out of due order at %d: %q", what, i, cursors(got))
		}
	}
	g := slices.Sorted(slices.Values(ids(got)))
	wantIDs(t, what, g, want...)
}

// allDue pages through Due with the given limit until a page comes back
// empty, checking every page's size, order and contents, and returns all
// the pages.
func allDue(t *testing.T, s storage.Store, kind storage.DueKind, before time.Time, limit int) []*storage.Message {
	t.Helper()
	var all []*storage.Message
	var after storage.Cursor
	seen := map[string]bool{}
	for pages := 0; ; pages++ {
		if pages > 10000 {
			t.Fatalf("Due: paging does not end (after %v)", after)
		}
		page, err := s.Due(t.Context(), storage.DueQuery{Kind: kind, Before: before, After: after, Limit: limit})
		if err != nil {
			t.Fatalf("Due after %v: %v", after, err)
		}
		if len(page) == 0 {
			return all
		}
		if limit > 0 && len(page) > limit {
			t.Fatalf("Due after %v: %d messages, limit %d", after, len(page), limit)
		}
		for _, m := range page {
			if len(seen) > 0 && m.Cursor().Compare(after) <= 0 {
				t.Fatalf("Due after %v: got %s at %v, not after the cursor", after, m.ID(), m.NextDeliverTime)
			}
			if m.NextDeliverTime.After(before) {
				t.Fatalf("Due before %v: got %s at %v, not due", before, m.ID(), m.NextDeliverTime)
			}
			if m.Committed != (kind == storage.DueDelivery) {
				t.Fatalf("Due(kind %d): got %s with Committed = %v", kind, m.ID(), m.Committed)
			}
			if seen[m.ID()] {
				t.Fatalf("Due after %v: %s again", after, m.ID())
			}
			seen[m.ID()] = true
			after = m.Cursor()
		}
		all = append(all, page...)
	}
}

func due(t *testing.T, s storage.Store, q storage.DueQuery) []*storage.Message {
	t.Helper()
	page, err := s.Due(t.Context(), q)
	if err != nil {
		t.Fatalf("Due %+v: %v", q, err)
	}
	return page
}

func testSaveGetString(t *testing.T, s storage.Store) {
	for _, committed := range []bool{true, false} {
		want := NewMessage("trade", "pay-succ", committed)
		save(t, s, want)
		got := get(t, s, want.ID())
		wantSame(t, "Get after Save", got, want)
		pm, ok := got.Protocol().(*protocol.StringMessage)
		if !ok {
			t.Fatalf("Protocol() = %T, want *protocol.StringMessage", got.Protocol())
		}
		if pm.GetBody() != "hello "+want.ID() {
			t.Fatalf("Protocol().Body = %q, want %q", pm.GetBody(), "hello "+want.ID())
		}
		// A v1 client rejects a header that misses a required field.
		if _, err := protocol.Marshal(pm); err != nil {
			t.Fatalf("stored message does not marshal (a required header field was lost?): %v", err)
		}
	}
}

func testSaveGetBytes(t *testing.T, s storage.Store) {
	for _, body := range [][]byte{
		{0x00, 0xff, 0x80, 0x01, 0x00, '\n', 0xfe},
		bytes.Repeat([]byte{0xab, 0x00}, 32<<10),
		{},
	} {
		want := NewBytesMessage("feed", "photo", body, true)
		save(t, s, want)
		got := get(t, s, want.ID())
		wantSame(t, "Get after Save", got, want)
		pm, ok := got.Protocol().(*protocol.BytesMessage)
		if !ok {
			t.Fatalf("Protocol() = %T, want *protocol.BytesMessage", got.Protocol())
		}
		if !bytes.Equal(pm.GetBody(), body) {
			t.Fatalf("Protocol().Body: got %d bytes, want %d bytes", len(pm.GetBody()), len(body))
		}
		if _, err := protocol.Marshal(pm); err != nil {
			t.Fatalf("stored message does not marshal: %v", err)
		}
	}
}

func testSaveKeepsDeliveryState(t *testing.T, s storage.Store) {
	want := NewMessage("trade", "pay-succ", true)
	want.DeliverCount = 3
	want.NextDeliverTime = now().Add(90 * time.Second)
	want.SuccGroups = []string{"s-a", "s-b"}
	want.FailGroups = []string{"s-c", "s-d"}
	want.FailCounts = []int32{3, 1}
	want.FailDue = []time.Time{now().Add(2 * time.Minute), now().Add(90 * time.Second)}
	save(t, s, want)
	wantSame(t, "Get after Save", get(t, s, want.ID()), want)
}

func testSaveAndGetCopy(t *testing.T, s storage.Store) {
	m := NewMessage("trade", "pay-succ", true)
	m.SuccGroups = []string{"s-a"}
	want := m.Clone()
	save(t, s, m)

	// The caller may reuse what it saved.
	m.Header.Topic = ptr("changed")
	m.Header.Properties[0].Value = ptr("changed")
	m.Body[0] = 'X'
	m.SuccGroups[0] = "changed"
	m.DeliverCount = 9
	wantSame(t, "Get after changing the saved message", get(t, s, want.ID()), want)

	// And may change what it got.
	got := get(t, s, want.ID())
	got.Header.Topic = ptr("changed")
	got.Header.Properties[1].Key = ptr("changed")
	got.Body[0] = 'Y'
	got.SuccGroups[0] = "changed"
	got.Committed = false
	wantSame(t, "Get after changing a message Get returned", get(t, s, want.ID()), want)
}

// testSaveDuplicate: with no Digest on either side, any Save of a stored
// id is a duplicate.
func testSaveDuplicate(t *testing.T, s storage.Store) {
	want := NewMessage("trade", "pay-succ", true)
	want.Digest = nil
	save(t, s, want)
	dup := want.Clone()
	dup.Body = []byte("another body")
	dup.Committed = false
	dup.DeliverCount = 5
	stored, err := s.Save(t.Context(), dup)
	if err != nil || stored {
		t.Fatalf("Save of an existing id: got (%v, %v), want (false, nil)", stored, err)
	}
	wantSame(t, "Get after duplicate Save", get(t, s, want.ID()), want)
}

func testSaveInvalid(t *testing.T, s storage.Store) {
	noHeader := NewMessage("trade", "pay-succ", true)
	noHeader.Header = nil
	cases := map[string]*storage.Message{"no header": noHeader}
	for name, id := range map[string]string{
		"empty id":     "",
		"short id":     "0123456789abcdef",
		"long id":      RandomID() + "0",
		"uppercase id": "0123456789ABCDEF0123456789ABCDEF",
		"non-hex id":   "0123456789abcdeg0123456789abcdef",
		"spaces":       "0123456789abcdef 123456789abcdef",
	} {
		cases[name] = withID(NewMessage("trade", "pay-succ", true), id)
	}
	counts := NewMessage("trade", "pay-succ", true)
	counts.FailGroups, counts.FailCounts = []string{"s-a", "s-b"}, []int32{1}
	cases["FailCounts shorter than FailGroups"] = counts
	dues := NewMessage("trade", "pay-succ", true)
	dues.FailGroups, dues.FailDue = []string{"s-a"}, []time.Time{now(), now()}
	cases["FailDue longer than FailGroups"] = dues
	for name, m := range cases {
		stored, err := s.Save(t.Context(), m)
		if stored || !errors.Is(err, storage.ErrInvalid) {
			t.Errorf("Save with %s: got (%v, %v), want (false, ErrInvalid)", name, stored, err)
		}
	}
	page := due(t, s, storage.DueQuery{Kind: storage.DueDelivery, Before: now().Add(time.Hour)})
	if len(page) != 0 {
		t.Fatalf("Due after invalid saves: got %q, want nothing", ids(page))
	}
}

func testGetMissing(t *testing.T, s storage.Store) {
	wantNotFound(t, s, protocol.MessageId())
	wantNotFound(t, s, "not an id")
	m := NewMessage("trade", "pay-succ", true)
	save(t, s, m)
	wantNotFound(t, s, RandomID())
}

func testCommit(t *testing.T, s storage.Store) {
	m := NewMessage("trade", "pay-succ", false)
	m.NextDeliverTime = now().Add(time.Hour) // the next transaction check
	save(t, s, m)
	if page := due(t, s, storage.DueQuery{Kind: storage.DueDelivery, Before: now().Add(2 * time.Hour)}); len(page) != 0 {
		t.Fatalf("Due(DueDelivery) before Commit: got %q, want nothing: an uncommitted message is never delivered", ids(page))
	}

	from := time.Now()
	wantErr(t, "Commit", s.Commit(t.Context(), m.ID()), nil)
	to := time.Now()
	got := get(t, s, m.ID())
	if !got.Committed {
		t.Fatal("Get after Commit: Committed = false")
	}
	if !within(got.NextDeliverTime, from, to) {
		t.Fatalf("Get after Commit: NextDeliverTime = %v, want now (%v)", got.NextDeliverTime, from)
	}
	if !bytes.Equal(got.Body, m.Body) || got.Header.GetTopic() != m.Header.GetTopic() {
		t.Fatalf("Commit changed the message: %s", DiffMessage(got, m))
	}
	page := due(t, s, storage.DueQuery{Kind: storage.DueDelivery, Before: to.Add(second)})
	wantIDs(t, "Due(DueDelivery) after Commit", ids(page), m.ID())
	page = due(t, s, storage.DueQuery{Kind: storage.DueTxCheck, Before: to.Add(2 * time.Hour)})
	wantIDs(t, "Due(DueTxCheck) after Commit", ids(page))

	wantErr(t, "second Commit", s.Commit(t.Context(), m.ID()), nil)
	if got := get(t, s, m.ID()); !got.Committed {
		t.Fatal("Get after second Commit: Committed = false")
	}
}

func testCommitCommitted(t *testing.T, s storage.Store) {
	m := NewMessage("trade", "pay-succ", true)
	save(t, s, m)
	wantErr(t, "Commit of a committed message", s.Commit(t.Context(), m.ID()), nil)
	got := get(t, s, m.ID())
	if !got.Committed || !bytes.Equal(got.Body, m.Body) {
		t.Fatalf("Commit of a committed message changed it: %s", DiffMessage(got, m))
	}
}

func testCommitMissing(t *testing.T, s storage.Store) {
	wantErr(t, "Commit of a never saved id", s.Commit(t.Context(), protocol.MessageId()), storage.ErrNotFound)
	m := NewMessage("trade", "pay-succ", false)
	save(t, s, m)
	wantErr(t, "Rollback", s.Rollback(t.Context(), m.ID()), nil)
	wantErr(t, "Commit after Rollback", s.Commit(t.Context(), m.ID()), storage.ErrNotFound)
	wantNotFound(t, s, m.ID())
}

func testRollback(t *testing.T, s storage.Store) {
	m := NewMessage("trade", "pay-succ", false)
	other := NewMessage("trade", "pay-succ", false)
	save(t, s, m)
	save(t, s, other)
	wantErr(t, "Rollback", s.Rollback(t.Context(), m.ID()), nil)
	wantNotFound(t, s, m.ID())
	wantErr(t, "second Rollback", s.Rollback(t.Context(), m.ID()), nil)
	page := due(t, s, storage.DueQuery{Kind: storage.DueTxCheck, Before: now().Add(time.Hour)})
	wantIDs(t, "Due(DueTxCheck) after Rollback", ids(page), other.ID())
	wantSame(t, "the other message after Rollback", get(t, s, other.ID()), other)
}

func testRollbackCommitted(t *testing.T, s storage.Store) {
	committed := NewMessage("trade", "pay-succ", true)
	save(t, s, committed)
	wantErr(t, "Rollback of a committed message", s.Rollback(t.Context(), committed.ID()), storage.ErrDecided)
	wantSame(t, "Get after refused Rollback", get(t, s, committed.ID()), committed)

	m := NewMessage("trade", "pay-succ", false)
	save(t, s, m)
	wantErr(t, "Commit", s.Commit(t.Context(), m.ID()), nil)
	wantErr(t, "Rollback after Commit", s.Rollback(t.Context(), m.ID()), storage.ErrDecided)
	if got := get(t, s, m.ID()); !got.Committed {
		t.Fatal("Get after refused Rollback: Committed = false")
	}
}

func testRollbackMissing(t *testing.T, s storage.Store) {
	wantErr(t, "Rollback of a never saved id", s.Rollback(t.Context(), protocol.MessageId()), nil)
	m := NewMessage("trade", "pay-succ", true)
	save(t, s, m)
	wantErr(t, "Delete", s.Delete(t.Context(), m.ID()), nil)
	wantErr(t, "Rollback of a deleted id", s.Rollback(t.Context(), m.ID()), nil)
	wantNotFound(t, s, m.ID())
}

func testRecordDelivery(t *testing.T, s storage.Store) {
	m := NewMessage("trade", "pay-succ", true)
	save(t, s, m)
	next := now().Add(30 * time.Second)
	r := storage.DeliveryResult{
		MessageID:       m.ID(),
		DeliverCount:    1,
		NextDeliverTime: next,
		SuccGroups:      []string{"s-a"},
		FailGroups:      []string{"s-b", "s-c"},
	}
	wantErr(t, "RecordDelivery", s.RecordDelivery(t.Context(), r), nil)
	r.SuccGroups[0] = "changed by the caller" // the store keeps its own copy
	want := m.Clone()
	want.DeliverCount = 1
	want.NextDeliverTime = next
	want.SuccGroups = []string{"s-a"}
	want.FailGroups = []string{"s-b", "s-c"}
	wantSame(t, "Get after RecordDelivery", get(t, s, m.ID()), want)

	page := due(t, s, storage.DueQuery{Kind: storage.DueDelivery, Before: next.Add(-second)})
	wantIDs(t, "Due before the next delivery time", ids(page))
	page = due(t, s, storage.DueQuery{Kind: storage.DueDelivery, Before: next})
	wantIDs(t, "Due at the next delivery time", ids(page), m.ID())
	wantSame(t, "Due after RecordDelivery", page[0], want)

	// The next round: s-b acknowledged, s-c failed again, with each
	// failed group's count.
	next2 := next.Add(time.Minute)
	wantErr(t, "second RecordDelivery", s.RecordDelivery(t.Context(), storage.DeliveryResult{
		MessageID: m.ID(), DeliverCount: 2, NextDeliverTime: next2,
		SuccGroups: []string{"s-a", "s-b"}, FailGroups: []string{"s-c"}, FailCounts: []int32{2},
		FailDue: []time.Time{next2.Add(1500 * time.Microsecond)}, // kept to the millisecond at least
	}), nil)
	want.DeliverCount, want.NextDeliverTime = 2, next2
	want.SuccGroups, want.FailGroups, want.FailCounts = []string{"s-a", "s-b"}, []string{"s-c"}, []int32{2}
	want.FailDue = []time.Time{next2.Add(time.Millisecond)}
	wantSame(t, "Get after second RecordDelivery", get(t, s, m.ID()), want)
	page = due(t, s, storage.DueQuery{Kind: storage.DueDelivery, Before: next2})
	wantIDs(t, "Due at the second delivery time", ids(page), m.ID())
	wantSame(t, "Due after second RecordDelivery", page[0], want)

	// Counts that do not match the groups are refused and change nothing.
	err := s.RecordDelivery(t.Context(), storage.DeliveryResult{
		MessageID: m.ID(), DeliverCount: 9, NextDeliverTime: next2,
		FailGroups: []string{"s-c"}, FailCounts: []int32{9, 9},
	})
	wantErr(t, "RecordDelivery with 2 FailCounts for 1 FailGroups", err, storage.ErrInvalid)
	err = s.RecordDelivery(t.Context(), storage.DeliveryResult{
		MessageID: m.ID(), DeliverCount: 9, NextDeliverTime: next2,
		FailGroups: []string{"s-c"}, FailDue: []time.Time{next2, next2},
	})
	wantErr(t, "RecordDelivery with 2 FailDue for 1 FailGroups", err, storage.ErrInvalid)
	wantSame(t, "Get after a refused RecordDelivery", get(t, s, m.ID()), want)

	// Every group acknowledged.
	wantErr(t, "third RecordDelivery", s.RecordDelivery(t.Context(), storage.DeliveryResult{
		MessageID: m.ID(), DeliverCount: 3, NextDeliverTime: next2,
		SuccGroups: []string{"s-a", "s-b", "s-c"},
	}), nil)
	got := get(t, s, m.ID())
	if len(got.FailGroups) != 0 || len(got.SuccGroups) != 3 || got.DeliverCount != 3 {
		t.Fatalf("Get after third RecordDelivery: DeliverCount %d, SuccGroups %q, FailGroups %q; want 3, 3 groups, none",
			got.DeliverCount, got.SuccGroups, got.FailGroups)
	}
}

// The broker backs off its transaction checks through RecordDelivery.
func testRecordDeliveryTxCheck(t *testing.T, s storage.Store) {
	m := NewMessage("trade", "pay-succ", false)
	save(t, s, m)
	t0 := now()
	wantIDs(t, "Due(DueTxCheck) after Save", ids(due(t, s, storage.DueQuery{Kind: storage.DueTxCheck, Before: t0.Add(second)})), m.ID())
	next := t0.Add(time.Minute)
	wantErr(t, "RecordDelivery", s.RecordDelivery(t.Context(), storage.DeliveryResult{
		MessageID: m.ID(), DeliverCount: 1, NextDeliverTime: next,
	}), nil)
	wantIDs(t, "Due(DueTxCheck) before the next check", ids(due(t, s, storage.DueQuery{Kind: storage.DueTxCheck, Before: next.Add(-second)})))
	wantIDs(t, "Due(DueTxCheck) at the next check", ids(due(t, s, storage.DueQuery{Kind: storage.DueTxCheck, Before: next})), m.ID())
	got := get(t, s, m.ID())
	if got.Committed || got.DeliverCount != 1 || !got.NextDeliverTime.Equal(next) {
		t.Fatalf("Get after RecordDelivery: Committed %v, DeliverCount %d, NextDeliverTime %v; want false, 1, %v",
			got.Committed, got.DeliverCount, got.NextDeliverTime, next)
	}
	// The checks were not deliveries: a commit starts the count again.
	wantErr(t, "Commit", s.Commit(t.Context(), m.ID()), nil)
	if got := get(t, s, m.ID()); !got.Committed || got.DeliverCount != 0 {
		t.Fatalf("Get after Commit: Committed %v, DeliverCount %d; want true, 0", got.Committed, got.DeliverCount)
	}
}

func testRecordDeliveryMissing(t *testing.T, s storage.Store) {
	err := s.RecordDelivery(t.Context(), storage.DeliveryResult{MessageID: protocol.MessageId(), DeliverCount: 1, NextDeliverTime: now()})
	wantErr(t, "RecordDelivery of a never saved id", err, storage.ErrNotFound)
	m := NewMessage("trade", "pay-succ", true)
	save(t, s, m)
	wantErr(t, "Delete", s.Delete(t.Context(), m.ID()), nil)
	err = s.RecordDelivery(t.Context(), storage.DeliveryResult{MessageID: m.ID(), DeliverCount: 1, NextDeliverTime: now()})
	wantErr(t, "RecordDelivery of a deleted id", err, storage.ErrNotFound)
	wantNotFound(t, s, m.ID())
}

func testDelete(t *testing.T, s storage.Store) {
	m := NewMessage("trade", "pay-succ", true)
	keep := NewMessage("trade", "pay-succ", true)
	save(t, s, m)
	save(t, s, keep)
	wantErr(t, "Delete", s.Delete(t.Context(), m.ID()), nil)
	wantNotFound(t, s, m.ID())
	wantErr(t, "second Delete", s.Delete(t.Context(), m.ID()), nil)
	wantErr(t, "Delete of a never saved id", s.Delete(t.Context(), protocol.MessageId()), nil)
	page := due(t, s, storage.DueQuery{Kind: storage.DueDelivery, Before: now().Add(time.Hour)})
	wantIDs(t, "Due after Delete", ids(page), keep.ID())
	wantSame(t, "the other message after Delete", get(t, s, keep.ID()), keep)
}

// at returns a message due at tm, committed or not, with a random id.
func at(tm time.Time, committed bool) *storage.Message {
	m := withID(NewMessage("trade", "pay-succ", committed), RandomID())
	m.NextDeliverTime = tm
	return m
}

func testDueKind(t *testing.T, s storage.Store) {
	t0 := now()
	var committed, uncommitted []*storage.Message
	for i := range 12 {
		// Both kinds share times, so that only the kind tells them apart.
		m := at(t0.Add(-time.Duration(i/4)*second), i%2 == 0)
		if i%3 == 0 {
			withID(m, protocol.MessageId())
		}
		save(t, s, m)
		if m.Committed {
			committed = append(committed, m)
		} else {
			uncommitted = append(uncommitted, m)
		}
	}
	before := t0.Add(second)
	wantDue(t, "Due(DueDelivery)", due(t, s, storage.DueQuery{Kind: storage.DueDelivery, Before: before}), committed...)
	wantDue(t, "Due(DueTxCheck)", due(t, s, storage.DueQuery{Kind: storage.DueTxCheck, Before: before}), uncommitted...)
	for _, limit := range []int{1, 4} {
		wantDue(t, fmt.Sprintf("Due(DueDelivery) in pages of %d", limit), allDue(t, s, storage.DueDelivery, before, limit), committed...)
		wantDue(t, fmt.Sprintf("Due(DueTxCheck) in pages of %d", limit), allDue(t, s, storage.DueTxCheck, before, limit), uncommitted...)
	}
	// A cursor taken in one kind pages the other from that position.
	mid := dueOrder(committed)[2].Cursor()
	var rest []*storage.Message
	for _, m := range uncommitted {
		if m.Cursor().Compare(mid) > 0 {
			rest = append(rest, m)
		}
	}
	wantDue(t, "Due(DueTxCheck) after a DueDelivery cursor",
		due(t, s, storage.DueQuery{Kind: storage.DueTxCheck, Before: before, After: mid}), rest...)
}

// testDueBefore checks that Before filters to the millisecond: a message
// due at Before is due, one a millisecond later is not.
func testDueBefore(t *testing.T, s storage.Store) {
	t0 := now()
	for _, committed := range []bool{true, false} {
		kind := storage.DueDelivery
		if !committed {
			kind = storage.DueTxCheck
		}
		past := at(t0.Add(-10*second), committed)
		justBefore := at(t0.Add(-milli), committed)
		present := at(t0, committed)
		justAfter := at(t0.Add(milli), committed)
		future := at(t0.Add(10*second), committed)
		for _, m := range []*storage.Message{present, future, past, justAfter, justBefore} {
			save(t, s, m)
		}
		query := func(before time.Time) []*storage.Message {
			return due(t, s, storage.DueQuery{Kind: kind, Before: before})
		}
		what := fmt.Sprintf("Due(kind %d)", kind)
		wantDue(t, what+" before every message", query(t0.Add(-10*second-milli)))
		wantDue(t, what+" at the first message's time", query(t0.Add(-10*second)), past)
		wantDue(t, what+" a millisecond before t0", query(t0.Add(-milli)), past, justBefore)
		wantDue(t, what+" at t0 (inclusive)", query(t0), past, justBefore, present)
		wantDue(t, what+" less than a millisecond after t0", query(t0.Add(milli-time.Nanosecond)), past, justBefore, present)
		wantDue(t, what+" a millisecond after t0", query(t0.Add(milli)), past, justBefore, present, justAfter)
		wantDue(t, what+" just before the last", query(t0.Add(10*second-milli)), past, justBefore, present, justAfter)
		wantDue(t, what+" at the last", query(t0.Add(10*second)), past, justBefore, present, justAfter, future)
		wantDue(t, what+" at the zero time", query(time.Time{}))
	}
}

// testDueOrder checks the due order: by time, then by id, with several
// messages at each time and ids that run against the times.
func testDueOrder(t *testing.T, s storage.Store) {
	t0 := now()
	times := []time.Time{t0.Add(-2 * second), t0.Add(-second + 5*milli), t0.Add(-second + 6*milli), t0}
	idList := make([]string, 4*len(times))
	for i := range idList {
		idList[i] = RandomID()
	}
	slices.Sort(idList)
	slices.Reverse(idList) // the earliest time gets the largest ids
	var all []*storage.Message
	for i, id := range idList {
		m := withID(NewMessage("trade", "pay-succ", true), id)
		m.NextDeliverTime = times[i/4]
		if i == 5 {
			// The same instant in another location is the same time.
			m.NextDeliverTime = m.NextDeliverTime.In(time.FixedZone("UTC+3", 3*3600))
		}
		all = append(all, m)
	}
	for i := range all { // save in neither the time nor the id order
		save(t, s, all[(i*7)%len(all)])
	}
	before := t0.Add(second)
	want := dueOrder(all)
	for i := 1; i < len(want); i++ {
		if want[i-1].NextDeliverTime.Equal(want[i].NextDeliverTime) && want[i-1].ID() >= want[i].ID() ||
			want[i-1].NextDeliverTime.After(want[i].NextDeliverTime) {
			t.Fatalf("dueOrder is wrong at %d: %q", i, cursors(want))
		}
	}
	wantDue(t, "Due", due(t, s, storage.DueQuery{Kind: storage.DueDelivery, Before: before}), all...)
	wantDue(t, "Due in pages of 3", allDue(t, s, storage.DueDelivery, before, 3), all...)
	// The first page is the earliest messages, not the smallest ids.
	wantDue(t, "first page of 5", due(t, s, storage.DueQuery{Kind: storage.DueDelivery, Before: before, Limit: 5}), want[:5]...)
}

func testDuePaging(t *testing.T, s storage.Store) {
	t0 := now()
	times := []time.Time{t0.Add(-2 * second), t0.Add(-second), t0.Add(-second + milli), t0}
	var want, all []*storage.Message
	for i := range 40 {
		var m *storage.Message
		switch i % 4 {
		case 0, 1: // due for delivery, several at each time
			m = NewMessage("trade", "pay-succ", true)
			m.NextDeliverTime = times[i%len(times)]
			want = append(want, m)
		case 2: // not due yet
			m = NewMessage("trade", "pay-succ", true)
			m.NextDeliverTime = t0.Add(time.Hour)
		case 3: // not committed
			m = NewMessage("trade", "pay-succ", false)
			m.NextDeliverTime = times[i%len(times)]
		}
		if i%5 == 0 { // ids out of order, as v1 clients make them
			withID(m, RandomID())
		}
		all = append(all, m)
	}
	// Save in an order that is neither the id nor the time order.
	for i := range all {
		save(t, s, all[(i*7)%len(all)])
	}
	want = dueOrder(want)
	before := t0.Add(second)
	for _, limit := range []int{1, 3, 7, len(want), len(want) + 1, 100} {
		wantDue(t, fmt.Sprintf("pages of %d", limit), allDue(t, s, storage.DueDelivery, before, limit), want...)
	}
	query := func(after storage.Cursor, limit int) []*storage.Message {
		return due(t, s, storage.DueQuery{Kind: storage.DueDelivery, Before: before, After: after, Limit: limit})
	}
	// Page sizes: full pages, then the rest.
	wantDue(t, "first page of 7", query(storage.Cursor{}, 7), want[:7]...)
	wantDue(t, "second page of 7", query(want[6].Cursor(), 7), want[7:14]...)
	wantDue(t, "the rest", query(want[13].Cursor(), 100), want[14:]...)
	wantDue(t, "after the last", query(want[len(want)-1].Cursor(), 100))

	// After need not be the position of a stored message.
	after := func(c storage.Cursor) []*storage.Message {
		var out []*storage.Message
		for _, m := range want {
			if m.Cursor().Compare(c) > 0 {
				out = append(out, m)
			}
		}
		return out
	}
	for what, c := range map[string]storage.Cursor{
		"a time between two times":           {Time: times[1].Add(milli / 2)},
		"a time before every message":        {Time: t0.Add(-time.Hour), ID: "ffffffffffffffffffffffffffffffff"},
		"a stored time and an empty id":      {Time: times[2]},
		"a stored time and an id above all":  {Time: times[2], ID: "g"},
		"a stored time and an id not stored": {Time: want[9].NextDeliverTime, ID: want[9].ID()[:31] + "0"},
		"a stored time in another location":  {Time: want[9].NextDeliverTime.In(time.FixedZone("UTC-7", -7*3600)), ID: want[9].ID()},
		"a time after every due message":     {Time: t0.Add(milli)},
		"a time after Before":                {Time: before.Add(time.Hour)},
		"the last position with a larger id": {Time: want[len(want)-1].NextDeliverTime, ID: want[len(want)-1].ID() + "0"},
	} {
		wantDue(t, "after "+what, query(c, 100), after(c)...)
	}
}

// The broker deletes what it delivered while it pages.
func testDuePagingWhileDeleting(t *testing.T, s storage.Store) {
	t0 := now()
	var want []*storage.Message
	for i := range 20 {
		m := NewMessage("trade", "pay-succ", true)
		m.NextDeliverTime = t0.Add(-time.Duration(i%3) * second)
		if i%2 == 0 {
			withID(m, RandomID())
		}
		save(t, s, m)
		want = append(want, m)
	}
	before := t0.Add(second)
	var got []*storage.Message
	var after storage.Cursor
	for {
		page := due(t, s, storage.DueQuery{Kind: storage.DueDelivery, Before: before, After: after, Limit: 6})
		if len(page) == 0 {
			break
		}
		for _, m := range page {
			got = append(got, m)
			wantErr(t, "Delete", s.Delete(t.Context(), m.ID()), nil)
		}
		after = page[len(page)-1].Cursor()
	}
	wantDue(t, "pages while deleting", got, want...)
	wantDue(t, "Due after deleting everything", due(t, s, storage.DueQuery{Kind: storage.DueDelivery, Before: before}))
}

// The broker reschedules what it delivered (a retry, later than Before)
// while it pages: no message comes twice, and a message rescheduled past
// Before before its page came is not returned at all.
func testDuePagingWhileRescheduling(t *testing.T, s storage.Store) {
	t0 := now()
	var all []*storage.Message
	for i := range 24 {
		m := at(t0.Add(-time.Duration(i%4)*second), true)
		save(t, s, m)
		all = append(all, m)
	}
	before := t0
	retry := before.Add(time.Minute)
	order := dueOrder(all)
	late := order[len(order)-3] // rescheduled before its page comes
	var want []*storage.Message
	for _, m := range order {
		if m.ID() != late.ID() {
			want = append(want, m)
		}
	}
	reschedule := func(m *storage.Message, count int32) {
		t.Helper()
		wantErr(t, "RecordDelivery", s.RecordDelivery(t.Context(), storage.DeliveryResult{
			MessageID: m.ID(), DeliverCount: count, NextDeliverTime: retry, FailGroups: []string{"s-a"},
		}), nil)
	}
	var got []*storage.Message
	var after storage.Cursor
	for pages := 0; ; pages++ {
		if pages > len(all) {
			t.Fatal("paging does not end")
		}
		page := due(t, s, storage.DueQuery{Kind: storage.DueDelivery, Before: before, After: after, Limit: 5})
		if len(page) == 0 {
			break
		}
		if pages == 0 {
			reschedule(late, 1)
		}
		for _, m := range page {
			got = append(got, m)
			reschedule(m, 1)
		}
		after = page[len(page)-1].Cursor()
	}
	wantDue(t, "pages while rescheduling", got, want...)
	wantDue(t, "Due after rescheduling everything", due(t, s, storage.DueQuery{Kind: storage.DueDelivery, Before: before}))
	// At the retry time they are all due again, in id order.
	again := make([]*storage.Message, len(all))
	for i, m := range all {
		again[i] = m.Clone()
		again[i].NextDeliverTime = retry
	}
	wantDue(t, "Due at the retry time", allDue(t, s, storage.DueDelivery, retry, 7), again...)
}

// testDueCommit checks that Commit moves an uncommitted message from the
// transaction checks to the deliveries, positioned at the time of the
// commit.
func testDueCommit(t *testing.T, s storage.Store) {
	t0 := now()
	early, late := at(t0.Add(-10*second), true), at(t0.Add(10*second), true)
	tx := at(t0.Add(-20*second), false) // its check is overdue
	later := at(t0.Add(time.Hour), false)
	for _, m := range []*storage.Message{early, late, tx, later} {
		save(t, s, m)
	}
	horizon := t0.Add(2 * time.Hour)
	wantDue(t, "Due(DueDelivery) before Commit", due(t, s, storage.DueQuery{Kind: storage.DueDelivery, Before: horizon}), early, late)
	wantDue(t, "Due(DueTxCheck) before Commit", due(t, s, storage.DueQuery{Kind: storage.DueTxCheck, Before: horizon}), tx, later)

	from := time.Now()
	wantErr(t, "Commit", s.Commit(t.Context(), tx.ID()), nil)
	wantErr(t, "Commit", s.Commit(t.Context(), later.ID()), nil)
	to := time.Now()
	txc, laterc := get(t, s, tx.ID()), get(t, s, later.ID())
	for _, m := range []*storage.Message{txc, laterc} {
		if !m.Committed || !within(m.NextDeliverTime, from, to) {
			t.Fatalf("Get %s after Commit: Committed %v, NextDeliverTime %v; want true, the time of the commit (%v)",
				m.ID(), m.Committed, m.NextDeliverTime, from)
		}
	}
	wantDue(t, "Due(DueTxCheck) after Commit", due(t, s, storage.DueQuery{Kind: storage.DueTxCheck, Before: horizon}))
	wantDue(t, "Due(DueDelivery) after Commit", due(t, s, storage.DueQuery{Kind: storage.DueDelivery, Before: horizon}),
		early, txc, laterc, late)
	wantDue(t, "Due(DueDelivery) in pages of 1 after Commit", allDue(t, s, storage.DueDelivery, horizon, 1),
		early, txc, laterc, late)
	// At the commit time, not at the check time nor at the time it was saved.
	first := dueOrder([]*storage.Message{txc, laterc})[0]
	atFirst := []*storage.Message{early, first}
	if next := dueOrder([]*storage.Message{txc, laterc})[1]; next.NextDeliverTime.Equal(first.NextDeliverTime) {
		atFirst = append(atFirst, next) // both commits in one millisecond
	}
	wantDue(t, "Due(DueDelivery) at the commit time", due(t, s, storage.DueQuery{Kind: storage.DueDelivery, Before: first.NextDeliverTime}),
		atFirst...)
	wantDue(t, "Due(DueDelivery) just before the commit time", due(t, s, storage.DueQuery{Kind: storage.DueDelivery, Before: first.NextDeliverTime.Add(-milli)}),
		early)
	wantDue(t, "Due(DueDelivery) after the committed message", due(t, s, storage.DueQuery{Kind: storage.DueDelivery, Before: horizon, After: first.Cursor()}),
		dueOrder([]*storage.Message{txc, laterc})[1], late)
	// A second Commit does not move it.
	wantErr(t, "second Commit", s.Commit(t.Context(), tx.ID()), nil)
	wantSame(t, "Get after second Commit", get(t, s, tx.ID()), txc)
}

// testDueCursorRoundTrip saves times finer than a millisecond, which a
// backend may truncate: the cursor of what Due returns pages exactly.
func testDueCursorRoundTrip(t *testing.T, s storage.Store) {
	t0 := now()
	fine := t0.Add(-second + 1234567*time.Nanosecond)
	a, b := at(fine, true), at(fine, true)
	save(t, s, a)
	save(t, s, b)
	check := func(what string, tm time.Time) {
		t.Helper()
		page := due(t, s, storage.DueQuery{Kind: storage.DueDelivery, Before: t0})
		if len(page) != 2 {
			t.Fatalf("%s: Due: got %q, want 2 messages", what, cursors(page))
		}
		for _, m := range page {
			stored := m.NextDeliverTime
			if stored.Before(tm.Truncate(milli)) || stored.After(tm) {
				t.Fatalf("%s: %s due at %v, want %v to the millisecond", what, m.ID(), stored, tm)
			}
			if g := get(t, s, m.ID()); !g.NextDeliverTime.Equal(stored) {
				t.Fatalf("%s: Get %s: NextDeliverTime %v, Due said %v", what, m.ID(), g.NextDeliverTime, stored)
			}
		}
		if !page[0].NextDeliverTime.Equal(page[1].NextDeliverTime) {
			t.Fatalf("%s: the same time stored as %v and %v", what, page[0].NextDeliverTime, page[1].NextDeliverTime)
		}
		wantDue(t, what+": Due", page, page...)
		wantDue(t, what+": pages of 1", allDue(t, s, storage.DueDelivery, t0, 1), page...)
		wantDue(t, what+": after the first", due(t, s, storage.DueQuery{Kind: storage.DueDelivery, Before: t0, After: page[0].Cursor()}), page[1])
		wantDue(t, what+": after the second", due(t, s, storage.DueQuery{Kind: storage.DueDelivery, Before: t0, After: page[1].Cursor()}))
		wantDue(t, what+": at the time given", due(t, s, storage.DueQuery{Kind: storage.DueDelivery, Before: tm}), page...)
		wantDue(t, what+": before its millisecond", due(t, s, storage.DueQuery{Kind: storage.DueDelivery, Before: tm.Truncate(milli).Add(-time.Nanosecond)}))
	}
	check("after Save", fine)
	fine2 := t0.Add(-second/2 + 7654321*time.Nanosecond)
	for _, m := range []*storage.Message{a, b} {
		wantErr(t, "RecordDelivery", s.RecordDelivery(t.Context(), storage.DeliveryResult{
			MessageID: m.ID(), DeliverCount: 1, NextDeliverTime: fine2,
		}), nil)
	}
	check("after RecordDelivery", fine2)
}

func testDueDefaultLimit(t *testing.T, s storage.Store) {
	var all []*storage.Message
	for range 5 {
		m := NewMessage("trade", "pay-succ", true)
		save(t, s, m)
		all = append(all, m)
	}
	want := dueOrder(all)
	before := now().Add(second)
	for _, limit := range []int{0, -1} {
		got := due(t, s, storage.DueQuery{Kind: storage.DueDelivery, Before: before, Limit: limit})
		if len(got) == 0 {
			t.Fatalf("Due with Limit %d: got nothing, want a page of the default size", limit)
		}
		wantDue(t, fmt.Sprintf("Due with Limit %d", limit), got, want[:len(got)]...)
		// Whatever the default, paging with it finds everything.
		wantDue(t, fmt.Sprintf("pages with Limit %d", limit), allDue(t, s, storage.DueDelivery, before, limit), want...)
	}
}

func testDueReturnsCopies(t *testing.T, s storage.Store) {
	m := NewMessage("trade", "pay-succ", true)
	m.FailGroups = []string{"s-a"}
	save(t, s, m)
	page := due(t, s, storage.DueQuery{Kind: storage.DueDelivery, Before: now().Add(second)})
	wantIDs(t, "Due", ids(page), m.ID())
	wantSame(t, "Due", page[0], m)
	page[0].Header.MessageType = ptr("changed")
	page[0].Body[0] = 'X'
	page[0].FailGroups[0] = "changed"
	page[0].NextDeliverTime = time.Time{}
	wantSame(t, "Get after changing a message Due returned", get(t, s, m.ID()), m)
}

func deadLetters(t *testing.T, s storage.Store, after string, limit int) []*storage.DeadLetter {
	t.Helper()
	page, err := s.DeadLetters(t.Context(), after, limit)
	if err != nil {
		t.Fatalf("DeadLetters after %q: %v", after, err)
	}
	return page
}

func testDeadLetter(t *testing.T, s storage.Store) {
	m := NewMessage("trade", "pay-succ", true)
	m.DeliverCount = 7
	m.SuccGroups = []string{"s-a"}
	m.FailGroups = []string{"s-b"}
	keep := NewMessage("trade", "pay-succ", true)
	save(t, s, m)
	save(t, s, keep)

	from := time.Now()
	wantErr(t, "DeadLetter", s.DeadLetter(t.Context(), m.ID(), "delivery limit reached"), nil)
	to := time.Now()
	wantNotFound(t, s, m.ID())
	page := due(t, s, storage.DueQuery{Kind: storage.DueDelivery, Before: now().Add(time.Hour)})
	wantIDs(t, "Due after DeadLetter", ids(page), keep.ID())

	dls := deadLetters(t, s, "", 10)
	if len(dls) != 1 {
		t.Fatalf("DeadLetters: got %d, want 1", len(dls))
	}
	dl := dls[0]
	if dl.Reason != "delivery limit reached" {
		t.Fatalf("DeadLetter.Reason = %q, want %q", dl.Reason, "delivery limit reached")
	}
	if !within(dl.At, from, to) {
		t.Fatalf("DeadLetter.At = %v, want the time of DeadLetter (%v)", dl.At, from)
	}
	wantSame(t, "DeadLetter.Message", dl.Message, m)

	// What DeadLetters returns is a copy.
	dl.Message.Body[0] = 'X'
	dl.Message.Header.Topic = ptr("changed")
	dl.Reason = "changed"
	again := deadLetters(t, s, "", 10)
	if len(again) != 1 || again[0].Reason != "delivery limit reached" {
		t.Fatalf("DeadLetters after changing a returned one: got %d, reason %q", len(again), again[0].Reason)
	}
	wantSame(t, "DeadLetter.Message after changing a returned one", again[0].Message, m)

	// A dead letter is not live: the live-message calls treat it as missing.
	wantErr(t, "DeadLetter again", s.DeadLetter(t.Context(), m.ID(), "again"), storage.ErrNotFound)
	wantErr(t, "Commit of a dead letter", s.Commit(t.Context(), m.ID()), storage.ErrNotFound)
	wantErr(t, "RecordDelivery of a dead letter", s.RecordDelivery(t.Context(), storage.DeliveryResult{
		MessageID: m.ID(), DeliverCount: 8, NextDeliverTime: now(),
	}), storage.ErrNotFound)
	wantErr(t, "Rollback of a dead letter", s.Rollback(t.Context(), m.ID()), nil)
	wantErr(t, "Delete of a dead letter", s.Delete(t.Context(), m.ID()), nil)
	wantNotFound(t, s, m.ID())
	wantSame(t, "the other message", get(t, s, keep.ID()), keep)
}

func testDeadLetterNotRevived(t *testing.T, s storage.Store) {
	for _, committed := range []bool{true, false} {
		m := NewMessage("trade", "pay-succ", committed)
		save(t, s, m)
		wantErr(t, "DeadLetter", s.DeadLetter(t.Context(), m.ID(), "expired"), nil)
		stored, err := s.Save(t.Context(), m.Clone())
		if err != nil || stored {
			t.Fatalf("Save of a dead-lettered id: got (%v, %v), want (false, nil)", stored, err)
		}
		wantNotFound(t, s, m.ID())
		kind := storage.DueDelivery
		if !committed {
			kind = storage.DueTxCheck
		}
		page := due(t, s, storage.DueQuery{Kind: kind, Before: now().Add(time.Hour)})
		wantIDs(t, "Due after re-saving a dead letter", ids(page))
	}
	if got := len(deadLetters(t, s, "", 10)); got != 2 {
		t.Fatalf("DeadLetters: got %d, want 2", got)
	}
}

func testDeadLetterMissing(t *testing.T, s storage.Store) {
	wantErr(t, "DeadLetter of a never saved id", s.DeadLetter(t.Context(), protocol.MessageId(), "x"), storage.ErrNotFound)
	m := NewMessage("trade", "pay-succ", true)
	save(t, s, m)
	wantErr(t, "Delete", s.Delete(t.Context(), m.ID()), nil)
	wantErr(t, "DeadLetter of a deleted id", s.DeadLetter(t.Context(), m.ID(), "x"), storage.ErrNotFound)
	if got := deadLetters(t, s, "", 10); len(got) != 0 {
		t.Fatalf("DeadLetters: got %d, want none", len(got))
	}
}

func testDeadLettersPaging(t *testing.T, s storage.Store) {
	var want []string
	reasons := map[string]string{}
	for i := range 12 {
		m := NewMessage("trade", "pay-succ", i%3 != 0)
		if i%2 == 0 {
			withID(m, RandomID())
		}
		save(t, s, m)
		reasons[m.ID()] = fmt.Sprintf("reason %d", i)
		want = append(want, m.ID())
	}
	live := NewMessage("trade", "pay-succ", true)
	save(t, s, live)
	// Dead-letter in an order that is not the id order.
	for i := range want {
		id := want[(i*5)%len(want)]
		wantErr(t, "DeadLetter", s.DeadLetter(t.Context(), id, reasons[id]), nil)
	}
	slices.Sort(want)

	for _, limit := range []int{1, 5, 12, 13} {
		var got []string
		after := ""
		for pages := 0; ; pages++ {
			page := deadLetters(t, s, after, limit)
			if len(page) == 0 {
				break
			}
			if len(page) > limit || pages > len(want) {
				t.Fatalf("DeadLetters(%q, %d): %d dead letters on page %d", after, limit, len(page), pages)
			}
			for _, dl := range page {
				if dl.Message == nil || dl.Message.ID() <= after {
					t.Fatalf("DeadLetters(%q, %d): a dead letter out of order or without a message", after, limit)
				}
				if dl.Reason != reasons[dl.Message.ID()] {
					t.Fatalf("dead letter %s: reason %q, want %q", dl.Message.ID(), dl.Reason, reasons[dl.Message.ID()])
				}
				after = dl.Message.ID()
				got = append(got, after)
			}
		}
		wantIDs(t, fmt.Sprintf("DeadLetters in pages of %d", limit), got, want...)
	}
	page := deadLetters(t, s, want[4], 5)
	var got []string
	for _, dl := range page {
		got = append(got, dl.Message.ID())
	}
	wantIDs(t, "DeadLetters after the fifth", got, want[5:10]...)
	if page := deadLetters(t, s, "", 0); len(page) == 0 {
		t.Fatal("DeadLetters with limit 0: got nothing, want a page of the default size")
	}
	wantSame(t, "the live message", get(t, s, live.ID()), live)
}

func testClose(t *testing.T, s storage.Store) {
	m := NewMessage("trade", "pay-succ", false)
	save(t, s, m)
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	ctx := t.Context()
	_, err := s.Save(ctx, NewMessage("trade", "pay-succ", true))
	wantErr(t, "Save after Close", err, storage.ErrClosed)
	_, err = s.Get(ctx, m.ID())
	wantErr(t, "Get after Close", err, storage.ErrClosed)
	wantErr(t, "Commit after Close", s.Commit(ctx, m.ID()), storage.ErrClosed)
	wantErr(t, "Rollback after Close", s.Rollback(ctx, m.ID()), storage.ErrClosed)
	wantErr(t, "RecordDelivery after Close", s.RecordDelivery(ctx, storage.DeliveryResult{MessageID: m.ID(), NextDeliverTime: now()}), storage.ErrClosed)
	wantErr(t, "Delete after Close", s.Delete(ctx, m.ID()), storage.ErrClosed)
	_, err = s.Due(ctx, storage.DueQuery{Kind: storage.DueTxCheck, Before: now().Add(time.Hour)})
	wantErr(t, "Due after Close", err, storage.ErrClosed)
	wantErr(t, "DeadLetter after Close", s.DeadLetter(ctx, m.ID(), "x"), storage.ErrClosed)
	_, err = s.DeadLetters(ctx, "", 10)
	wantErr(t, "DeadLetters after Close", err, storage.ErrClosed)
	if err := s.Close(); err != nil && !errors.Is(err, storage.ErrClosed) {
		t.Fatalf("second Close: got %v, want nil or ErrClosed", err)
	}
}

// testConcurrent runs 16 goroutines that save, get, update and delete ids
// of their own and ids they share; run it with -race.
func testConcurrent(t *testing.T, s storage.Store) {
	const (
		workers   = 16
		perWorker = 60
		shared    = 24
	)
	sharedKeep := make([]*storage.Message, shared)  // saved by all, never deleted
	sharedChurn := make([]*storage.Message, shared) // saved and deleted by all
	for i := range shared {
		sharedKeep[i] = NewMessage("trade", "pay-succ", true)
		sharedChurn[i] = NewMessage("trade", "pay-succ", i%2 == 0)
		if i%2 == 0 {
			withID(sharedKeep[i], RandomID())
		}
	}
	var storedKeep [shared]atomic.Int32
	kept := make([][]string, workers)
	deleted := make([][]string, workers)

	ctx := t.Context()
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := range perWorker {
				m := NewMessage("trade", fmt.Sprintf("w%d", w), i%3 != 0)
				if i%2 == 0 {
					withID(m, RandomID())
				}
				if stored, err := s.Save(ctx, m); err != nil || !stored {
					t.Errorf("worker %d: Save %s: (%v, %v)", w, m.ID(), stored, err)
					return
				}
				got, err := s.Get(ctx, m.ID())
				if err != nil || !bytes.Equal(got.Body, m.Body) {
					t.Errorf("worker %d: Get %s after Save: %v", w, m.ID(), err)
					return
				}
				if i%4 == 1 {
					if err := s.Delete(ctx, m.ID()); err != nil {
						t.Errorf("worker %d: Delete %s: %v", w, m.ID(), err)
						return
					}
					deleted[w] = append(deleted[w], m.ID())
				} else {
					kept[w] = append(kept[w], m.ID())
				}

				j := (i + w) % shared
				stored, err := s.Save(ctx, sharedKeep[j].Clone())
				if err != nil {
					t.Errorf("worker %d: Save shared %s: %v", w, sharedKeep[j].ID(), err)
					return
				}
				if stored {
					storedKeep[j].Add(1)
				}
				if _, err := s.Get(ctx, sharedKeep[j].ID()); err != nil {
					t.Errorf("worker %d: Get shared %s after Save: %v", w, sharedKeep[j].ID(), err)
					return
				}
				if err := s.RecordDelivery(ctx, storage.DeliveryResult{
					MessageID: sharedKeep[j].ID(), DeliverCount: int32(w), NextDeliverTime: sharedKeep[j].NextDeliverTime,
					SuccGroups: []string{fmt.Sprintf("w%d", w)},
				}); err != nil {
					t.Errorf("worker %d: RecordDelivery shared %s: %v", w, sharedKeep[j].ID(), err)
					return
				}

				c := sharedChurn[j]
				if _, err := s.Save(ctx, c.Clone()); err != nil {
					t.Errorf("worker %d: Save churn %s: %v", w, c.ID(), err)
					return
				}
				if err := s.Commit(ctx, c.ID()); err != nil && !errors.Is(err, storage.ErrNotFound) {
					t.Errorf("worker %d: Commit churn %s: %v", w, c.ID(), err)
					return
				}
				if _, err := s.Get(ctx, c.ID()); err != nil && !errors.Is(err, storage.ErrNotFound) {
					t.Errorf("worker %d: Get churn %s: %v", w, c.ID(), err)
					return
				}
				if err := s.Delete(ctx, c.ID()); err != nil {
					t.Errorf("worker %d: Delete churn %s: %v", w, c.ID(), err)
					return
				}

				if i%10 == 0 {
					page, err := s.Due(ctx, storage.DueQuery{Kind: storage.DueDelivery, Before: now().Add(time.Hour), Limit: 20})
					if err != nil {
						t.Errorf("worker %d: Due: %v", w, err)
						return
					}
					for k := 1; k < len(page); k++ {
						if page[k-1].Cursor().Compare(page[k].Cursor()) >= 0 {
							t.Errorf("worker %d: Due out of order: %q", w, cursors(page))
							return
						}
					}
				}
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		return
	}

	for j := range shared {
		if n := storedKeep[j].Load(); n != 1 {
			t.Errorf("shared id %s: stored %d times, want exactly once", sharedKeep[j].ID(), n)
		}
		got := get(t, s, sharedKeep[j].ID())
		if !bytes.Equal(got.Body, sharedKeep[j].Body) || len(got.SuccGroups) != 1 {
			t.Errorf("shared id %s after the storm: body %q, SuccGroups %q", got.ID(), got.Body, got.SuccGroups)
		}
		// Every worker deleted the churn id after its own Save: it is gone.
		wantNotFound(t, s, sharedChurn[j].ID())
	}
	var all []string
	for w := range workers {
		for _, id := range kept[w] {
			get(t, s, id)
			all = append(all, id)
		}
		for _, id := range deleted[w] {
			wantNotFound(t, s, id)
		}
	}
	for _, m := range sharedKeep {
		all = append(all, m.ID())
	}
	var wantDelivery, wantTx []string
	for _, id := range all {
		if get(t, s, id).Committed {
			wantDelivery = append(wantDelivery, id)
		} else {
			wantTx = append(wantTx, id)
		}
	}
	before := now().Add(time.Hour)
	wantDueSet(t, "Due(DueDelivery) after the storm", allDue(t, s, storage.DueDelivery, before, 50), wantDelivery...)
	wantDueSet(t, "Due(DueTxCheck) after the storm", allDue(t, s, storage.DueTxCheck, before, 50), wantTx...)
}

func testRedeliver(t *testing.T, s storage.Store) {
	for _, committed := range []bool{true, false} {
		m := NewMessage("trade", "pay-succ", committed)
		save(t, s, m)
		wantErr(t, "RecordDelivery", s.RecordDelivery(t.Context(), storage.DeliveryResult{
			MessageID: m.ID(), DeliverCount: 5, NextDeliverTime: now().Add(time.Hour),
			SuccGroups: []string{"s-a"}, FailGroups: []string{"s-b"}, FailCounts: []int32{5},
			FailDue: []time.Time{now().Add(time.Hour)},
		}), nil)
		wantErr(t, "DeadLetter", s.DeadLetter(t.Context(), m.ID(), "delivery limit reached"), nil)
		if dls := deadLetters(t, s, "", 10); len(dls) != 1 || !slices.Equal(dls[0].Message.FailCounts, []int32{5}) {
			t.Fatalf("DeadLetters: %d, want 1 that keeps FailCounts [5]", len(dls))
		}

		from := time.Now()
		wantErr(t, "Redeliver", s.Redeliver(t.Context(), m.ID()), nil)
		to := time.Now()
		got := get(t, s, m.ID())
		if !got.Committed || !got.Header.GetCommit() || got.DeliverCount != 0 || len(got.FailGroups) != 0 || len(got.FailCounts) != 0 || len(got.FailDue) != 0 ||
			len(got.SuccGroups) != 1 || got.SuccGroups[0] != "s-a" || !within(got.NextDeliverTime, from, to) {
			t.Fatalf("Get after Redeliver (saved committed=%v): committed %v/%v, DeliverCount %d, groups %q %q, next %v; "+
				"want committed, 0, [s-a] [], now", committed, got.Committed, got.Header.GetCommit(), got.DeliverCount,
				got.SuccGroups, got.FailGroups, got.NextDeliverTime)
		}
		if !bytes.Equal(got.Body, m.Body) || !bytes.Equal(got.Digest, m.Digest) {
			t.Fatalf("Redeliver changed the body or the digest: %q %x, want %q %x", got.Body, got.Digest, m.Body, m.Digest)
		}
		page := due(t, s, storage.DueQuery{Kind: storage.DueDelivery, Before: to.Add(second)})
		wantIDs(t, "Due(DueDelivery) after Redeliver", ids(page), m.ID())
		if dls := deadLetters(t, s, "", 10); len(dls) != 0 {
			t.Fatalf("DeadLetters after Redeliver: %d, want none", len(dls))
		}
		// It is live again: finishing it works as for any message.
		wantErr(t, "Delete", s.Delete(t.Context(), m.ID()), nil)
		wantNotFound(t, s, m.ID())
	}
}

func testRedeliverNotDead(t *testing.T, s storage.Store) {
	live := NewMessage("trade", "pay-succ", true)
	save(t, s, live)
	wantErr(t, "Redeliver of a live message", s.Redeliver(t.Context(), live.ID()), storage.ErrNotFound)
	wantErr(t, "Redeliver of a missing message", s.Redeliver(t.Context(), RandomID()), storage.ErrNotFound)
	if got := get(t, s, live.ID()); got.DeliverCount != live.DeliverCount {
		t.Fatal("a refused Redeliver changed the live message")
	}
}
