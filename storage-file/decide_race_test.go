package filestore

import (
	"context"
	"errors"
	"sync"
	"testing"

	"github.com/kiteq/kiteq/storage"
	"github.com/kiteq/kiteq/storage/storagetest"
)

// Concurrent Commit and Rollback of one message: exactly one decision
// wins; the other gets ErrDecided (rollback after commit) or ErrNotFound
// (commit after rollback), as the memory store does. A nil Commit means
// the message is stored and committed.
func TestConcurrentDecisions(t *testing.T) {
	s := openTest(t, t.TempDir(), nil)
	defer s.Close()
	ctx := context.Background()
	both, lost := 0, 0
	for range 300 {
		m := storagetest.NewMessage("t", "x", false)
		if _, err := s.Save(ctx, m); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		var cerr, rerr error
		wg.Go(func() { cerr = s.Commit(ctx, m.ID()) })
		wg.Go(func() { rerr = s.Rollback(ctx, m.ID()) })
		wg.Wait()
		if cerr == nil && rerr == nil {
			both++
		}
		if _, err := s.Get(ctx, m.ID()); cerr == nil && errors.Is(err, storage.ErrNotFound) {
			lost++
		}
	}
	if both > 0 || lost > 0 {
		t.Fatalf("of 300 concurrent Commit/Rollback pairs, %d had both acknowledged, and %d Commits were acknowledged for a message that is gone", both, lost)
	}
}
