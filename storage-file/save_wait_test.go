package filestore

import (
	"context"
	"errors"
	"testing"

	"github.com/kiteq/kiteq/storage"
	"github.com/kiteq/kiteq/storage/storagetest"
)

// A Save that waited for a queued save of its id decides on that record
// when it succeeded: the first copy may have been delivered, acknowledged
// and deleted before the waiter takes the lock again, and the index then
// says nothing of it. A retry (equal Digest, or none) is not stored a
// second time, to be delivered twice; another message is a conflict. When
// the awaited record failed, the waiter saves its own.
//
// The awaited record is planted in pending with its batch already done,
// the first copy saved and deleted before; savedWaited clears the entry
// after the wait, as the writer does before it releases the batch.
func TestSaveAfterAWaitedSaveOfItsID(t *testing.T) {
	ctx := context.Background()
	s := openTest(t, t.TempDir(), nil)
	defer s.Close()
	for _, c := range []struct {
		name   string
		digest func(first, retry []byte) []byte // the retry's Digest
		failed bool                             // the awaited record failed
		stored bool
		err    error
	}{
		{name: "same digest", digest: func(first, _ []byte) []byte { return first }},
		{name: "no digest", digest: func([]byte, []byte) []byte { return nil }},
		{name: "other digest", digest: func(_, other []byte) []byte { return other }, err: storage.ErrConflict},
		{name: "awaited failed", digest: func(first, _ []byte) []byte { return first }, failed: true, stored: true},
	} {
		t.Run(c.name, func(t *testing.T) {
			first := storagetest.NewMessage("trade", "pay-succ", true)
			if stored, err := s.Save(ctx, first); err != nil || !stored {
				t.Fatalf("save: stored=%v err=%v", stored, err)
			}
			if err := s.Delete(ctx, first.ID()); err != nil {
				t.Fatal(err)
			}
			id, _ := parseID(first.ID())
			b := newBatch()
			b.n = 1
			if c.failed {
				b.err = errors.New("planted: the write failed")
			} else {
				b.ok = 1
			}
			close(b.done)
			s.mu.Lock()
			s.pending[id], s.saving[id] = queued{b, 0}, first.Digest
			s.mu.Unlock()
			waited := 0
			s.savedWaited = func() {
				waited++
				s.mu.Lock()
				delete(s.pending, id)
				delete(s.saving, id)
				s.mu.Unlock()
			}
			defer func() { s.savedWaited = nil }()

			retry := *first
			retry.Digest = c.digest(first.Digest, storagetest.NewMessage("trade", "pay-succ", true).Digest)
			stored, err := s.Save(ctx, &retry)
			if waited != 1 {
				t.Fatalf("the Save waited for the queued record %d times, want 1", waited)
			}
			if stored != c.stored || !errors.Is(err, c.err) || (c.err == nil) != (err == nil) {
				t.Fatalf("Save after the awaited save: stored=%v err=%v, want stored=%v err=%v", stored, err, c.stored, c.err)
			}
			_, gerr := s.Get(ctx, first.ID())
			if held := gerr == nil; held != c.stored {
				t.Fatalf("after the Save the store holds the message: %v (Get: %v), want %v", held, gerr, c.stored)
			}
		})
	}
}
