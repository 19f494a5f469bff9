package storagetest

import (
	"bytes"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/kiteq/kiteq/storage"
)

// The cases of Message.Digest: a Save of an id the store holds is a
// duplicate only when the Digests are equal or either is unknown (nil);
// another Digest is another message, refused with ErrConflict, and what
// is stored stays as it was.

// forged returns another message under m's id: another body, from another
// producer group, as a client that learned the id would publish it.
func forged(m *storage.Message) *storage.Message {
	f := m.Clone()
	f.Body = []byte("forged " + m.ID())
	f.Digest = storage.Digest("storagetest-forger", f.Protocol())
	return f
}

// wantConflict checks that Save of m stores nothing and wraps ErrConflict.
func wantConflict(t *testing.T, s storage.Store, what string, m *storage.Message) {
	t.Helper()
	stored, err := s.Save(t.Context(), m)
	if stored || !errors.Is(err, storage.ErrConflict) {
		t.Fatalf("%s: Save of %s with another digest: got (%v, %v), want (false, ErrConflict)", what, m.ID(), stored, err)
	}
}

// wantDuplicate checks that Save of m stores nothing and succeeds.
func wantDuplicate(t *testing.T, s storage.Store, what string, m *storage.Message) {
	t.Helper()
	stored, err := s.Save(t.Context(), m)
	if stored || err != nil {
		t.Fatalf("%s: Save of %s again: got (%v, %v), want (false, nil)", what, m.ID(), stored, err)
	}
}

func testSaveDigestRetry(t *testing.T, s storage.Store) {
	want := NewMessage("trade", "pay-succ", false)
	save(t, s, want)
	// A retry carries the same Digest; the delivery state is the broker's,
	// not part of it.
	retry := want.Clone()
	retry.DeliverCount = 4
	retry.NextDeliverTime = now().Add(time.Hour)
	wantDuplicate(t, s, "retry", retry)
	wantSame(t, "Get after a retry", get(t, s, want.ID()), want)
}

func testSaveConflict(t *testing.T, s storage.Store) {
	for _, committed := range []bool{true, false} {
		want := NewMessage("trade", "pay-succ", committed)
		save(t, s, want)
		wantConflict(t, s, fmt.Sprintf("committed=%v", committed), forged(want))
		wantSame(t, "Get after a conflicting Save", get(t, s, want.ID()), want)
		kind := storage.DueDelivery
		if !committed {
			kind = storage.DueTxCheck
		}
		page := due(t, s, storage.DueQuery{Kind: kind, Before: now().Add(time.Hour)})
		if len(page) != 1 {
			t.Fatalf("Due after a conflicting Save: %q, want only %s", ids(page), want.ID())
		}
		wantSame(t, "Due after a conflicting Save", page[0], want)
		// The message's own retry is still a duplicate.
		wantDuplicate(t, s, "retry after a conflict", want.Clone())
		wantErr(t, "Delete", s.Delete(t.Context(), want.ID()), nil)
		wantErr(t, "Rollback", s.Rollback(t.Context(), want.ID()), nil)
	}
}

func testSaveDigestUnknown(t *testing.T, s storage.Store) {
	// Stored without a Digest (as before digests existed): any Save of the
	// id is a duplicate.
	old := NewMessage("trade", "pay-succ", true)
	old.Digest = nil
	save(t, s, old)
	wantDuplicate(t, s, "stored digest unknown", forged(old))
	wantSame(t, "Get of a message stored without a digest", get(t, s, old.ID()), old)

	// Saved again without a Digest: a duplicate of whatever is stored.
	want := NewMessage("trade", "pay-succ", true)
	save(t, s, want)
	again := forged(want)
	again.Digest = nil
	wantDuplicate(t, s, "saved digest unknown", again)
	wantSame(t, "Get after a Save without a digest", get(t, s, want.ID()), want)
}

func testSaveConflictDeadLetter(t *testing.T, s storage.Store) {
	want := NewMessage("trade", "pay-succ", false)
	save(t, s, want)
	wantErr(t, "DeadLetter", s.DeadLetter(t.Context(), want.ID(), "no decision"), nil)
	wantDuplicate(t, s, "dead-lettered", want.Clone())
	wantConflict(t, s, "dead-lettered", forged(want))
	wantNotFound(t, s, want.ID())
	dls := deadLetters(t, s, "", 10)
	if len(dls) != 1 {
		t.Fatalf("DeadLetters: got %d, want 1", len(dls))
	}
	wantSame(t, "DeadLetters after a conflicting Save", dls[0].Message, want)

	// Put back, it is the same message: the same answers.
	wantErr(t, "Redeliver", s.Redeliver(t.Context(), want.ID()), nil)
	wantConflict(t, s, "redelivered", forged(want))
	wantDuplicate(t, s, "redelivered", want.Clone())
	got := get(t, s, want.ID())
	if !bytes.Equal(got.Digest, want.Digest) || !bytes.Equal(got.Body, want.Body) {
		t.Fatalf("Get after Redeliver: digest %x body %q, want %x %q", got.Digest, got.Body, want.Digest, want.Body)
	}
}

// testSaveConflictConcurrent saves each of a few ids from goroutines that
// start together, with three messages under the id: the one, another
// (another Digest) and one whose Digest is unknown. Exactly one Save
// stores; every other reports a duplicate when its Digest is equal to the
// winner's or either is unknown, and ErrConflict otherwise. Which saver
// has which message turns with each id, so that whichever the scheduler
// favours, each message wins some.
func testSaveConflictConcurrent(t *testing.T, s storage.Store) {
	const ids, savers = 12, 9
	for round := range ids {
		one := NewMessage("trade", "pay-succ", false)
		other := forged(one)
		unknown := one.Clone()
		unknown.Body, unknown.Digest = []byte("unknown "+one.ID()), nil
		variants := []*storage.Message{one, other, unknown}

		type result struct {
			stored bool
			err    error
		}
		results := make([]result, savers)
		start := make(chan struct{})
		var wg sync.WaitGroup
		variant := func(g int) *storage.Message { return variants[(g+round)%len(variants)] }
		for g := range savers {
			m := variant(g).Clone()
			wg.Go(func() {
				<-start
				stored, err := s.Save(t.Context(), m)
				results[g] = result{stored, err}
			})
		}
		close(start)
		wg.Wait()

		winner := -1
		for g, r := range results {
			if r.stored {
				if winner >= 0 {
					t.Fatalf("id %s: saved by savers %d and %d, want exactly one", one.ID(), winner, g)
				}
				winner = g
			}
		}
		if winner < 0 {
			t.Fatalf("id %s: no Save stored it: %v", one.ID(), results)
		}
		won := variant(winner)
		for g, r := range results {
			if g == winner {
				if r.err != nil {
					t.Fatalf("id %s: saver %d stored it and failed: %v", one.ID(), g, r.err)
				}
				continue
			}
			m := variant(g)
			conflict := len(m.Digest) > 0 && len(won.Digest) > 0 && !bytes.Equal(m.Digest, won.Digest)
			switch {
			case conflict && !errors.Is(r.err, storage.ErrConflict):
				t.Fatalf("id %s: saver %d (digest %x) after %x won: got (false, %v), want ErrConflict",
					one.ID(), g, m.Digest, won.Digest, r.err)
			case !conflict && r.err != nil:
				t.Fatalf("id %s: saver %d (digest %x) after %x won: got (false, %v), want a duplicate",
					one.ID(), g, m.Digest, won.Digest, r.err)
			}
		}
		wantSame(t, "Get after concurrent Saves", get(t, s, one.ID()), won)
	}
}

// A Place is where a persistent store keeps its messages. Each call opens
// the store kept there as the last one left it; the suite closes one
// before it opens the next.
type Place func(t *testing.T) storage.Store

// RunPersistent runs the cases that only a store which keeps its messages
// across Close and open passes (the file store, not the memory store).
// fresh returns a new, empty Place for each case.
func RunPersistent(t *testing.T, fresh func(t *testing.T) Place) {
	tests := []struct {
		name string
		fn   func(t *testing.T, open Place)
	}{
		{"DigestSurvivesReopen", testDigestSurvivesReopen},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) { tc.fn(t, fresh(t)) })
	}
}

// openAt opens the store kept at open, closed when the test ends (again,
// when the test closed it: that error is of no interest).
func openAt(t *testing.T, open Place) storage.Store {
	t.Helper()
	s := open(t)
	if s == nil {
		t.Fatal("open returned a nil store")
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// reopen closes s and opens what it kept.
func reopen(t *testing.T, s storage.Store, open Place) storage.Store {
	t.Helper()
	if err := s.Close(); err != nil {
		t.Fatalf("Close before reopening: %v", err)
	}
	return openAt(t, open)
}

func testDigestSurvivesReopen(t *testing.T, open Place) {
	s := openAt(t, open)
	committed := NewMessage("trade", "pay-succ", true)
	uncommitted := NewMessage("trade", "pay-succ", false)
	delivered := NewMessage("trade", "pay-succ", true)
	dead := NewMessage("trade", "pay-succ", false)
	redelivered := NewMessage("trade", "pay-succ", true)
	unknown := NewMessage("trade", "pay-succ", true)
	unknown.Digest = nil
	for _, m := range []*storage.Message{committed, uncommitted, delivered, dead, redelivered, unknown} {
		save(t, s, m)
	}
	d := storage.DeliveryResult{MessageID: delivered.ID(), DeliverCount: 2, NextDeliverTime: now().Add(-time.Minute),
		SuccGroups: []string{"s-a"}, FailGroups: []string{"s-b"}, FailCounts: []int32{2}}
	wantErr(t, "RecordDelivery", s.RecordDelivery(t.Context(), d), nil)
	delivered.DeliverCount, delivered.NextDeliverTime = d.DeliverCount, d.NextDeliverTime
	delivered.SuccGroups, delivered.FailGroups, delivered.FailCounts = d.SuccGroups, d.FailGroups, d.FailCounts
	wantErr(t, "DeadLetter", s.DeadLetter(t.Context(), dead.ID(), "no decision"), nil)
	wantErr(t, "DeadLetter", s.DeadLetter(t.Context(), redelivered.ID(), "delivery limit reached"), nil)
	wantErr(t, "Redeliver", s.Redeliver(t.Context(), redelivered.ID()), nil)

	s = reopen(t, s, open)
	for _, m := range []*storage.Message{committed, uncommitted, delivered, unknown} {
		wantSame(t, "Get after reopening", get(t, s, m.ID()), m)
	}
	if got := get(t, s, redelivered.ID()); !bytes.Equal(got.Digest, redelivered.Digest) {
		t.Fatalf("Get of a redelivered message after reopening: digest %x, want %x", got.Digest, redelivered.Digest)
	}
	dls := deadLetters(t, s, "", 10)
	if len(dls) != 1 {
		t.Fatalf("DeadLetters after reopening: got %d, want 1", len(dls))
	}
	wantSame(t, "DeadLetters after reopening", dls[0].Message, dead)
	saved := map[string]*storage.Message{committed.ID(): committed, uncommitted.ID(): uncommitted,
		delivered.ID(): delivered, unknown.ID(): unknown}
	for _, kind := range []storage.DueKind{storage.DueDelivery, storage.DueTxCheck} {
		for _, m := range allDue(t, s, kind, now().Add(time.Hour), 0) {
			if want := saved[m.ID()]; want != nil {
				wantSame(t, "Due after reopening", m, want)
			}
		}
	}
	for _, m := range []*storage.Message{committed, uncommitted, delivered, dead, redelivered} {
		wantConflict(t, s, "after reopening", forged(m))
		wantDuplicate(t, s, "after reopening", m.Clone())
	}
	wantDuplicate(t, s, "stored without a digest, after reopening", forged(unknown))
	wantSame(t, "Get after Saves of reused ids", get(t, s, committed.ID()), committed)
}
