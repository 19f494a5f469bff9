package filestore

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/storage"
)

// The disk-full tests run on a small tmpfs, which they mount (make test
// runs as root).

func mountTmpfs(t *testing.T, size int64) string {
	t.Helper()
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, fmt.Sprintf("size=%d", size)); err != nil {
		t.Fatalf("cannot mount a tmpfs (the test runs as root, as make test does): %v", err)
	}
	t.Cleanup(func() { syscall.Unmount(dir, syscall.MNT_DETACH) })
	return dir
}

func fsUsed(t *testing.T, dir string) int64 {
	t.Helper()
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Blocks-st.Bfree) * st.Bsize
}

// fillWithSaves saves messages of bodyLen bytes from four goroutines until
// a save fails, and returns the ids saved, uncommitted ones (every eighth)
// apart, and the first error.
func fillWithSaves(t *testing.T, s *Store, bodyLen int) (committed, uncommitted []string, err error) {
	t.Helper()
	ctx := context.Background()
	var mu sync.Mutex
	var first error
	var stop atomic.Bool
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			for i := 0; i < 100000 && !stop.Load(); i++ {
				id := protocol.MessageId()
				c := (w*100000+i)%8 != 0
				stored, err := s.Save(ctx, faultMessage(id, c, time.Now().UnixMilli(), bodyLen))
				mu.Lock()
				switch {
				case err != nil:
					if first == nil {
						first = err
					}
					stop.Store(true)
				case !stored:
					t.Errorf("save %s: not stored and no error", id)
				case c:
					committed = append(committed, id)
				default:
					uncommitted = append(uncommitted, id)
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return committed, uncommitted, first
}

// checkFull checks that err refuses a save for want of room, as the
// producer will read it.
func checkFull(t *testing.T, err error) {
	t.Helper()
	if !errors.Is(err, storage.ErrFull) || !strings.Contains(err.Error(), "disk is full") || !strings.Contains(err.Error(), "reserve=") {
		t.Errorf("a save on a full disk failed with %v: want an error that wraps storage.ErrFull and says the disk is full and what the store keeps (reserve=)", err)
	}
}

// TestDiskFullFinishingReclaims: saves fill a small disk; then every
// message is finished (deleted, committed and deleted, rolled back, a few
// dead-lettered), while saves go on being tried, so that batches mix
// refused saves and state records. Every state change must succeed,
// finished segments must leave the disk, and saves must work again
// without a reopen; a reopen finds what was kept and nothing finished.
func TestDiskFullFinishingReclaims(t *testing.T) {
	const (
		size    = 12 << 20
		segment = 1 << 20
		bodyLen = 8 << 10
	)
	mnt := mountTmpfs(t, size)
	dir := filepath.Join(mnt, "store")
	opts := func(o *Options) { o.Sync = SyncAlways; o.SegmentSize = segment }
	s := openTest(t, dir, opts)
	defer func() { s.Close() }() // reopened below
	ctx := context.Background()

	committed, uncommitted, err := fillWithSaves(t, s, bodyLen)
	if err == nil {
		t.Fatalf("%d saves of %d bytes on a %d MiB disk and none failed", len(committed)+len(uncommitted), bodyLen, size>>20)
	}
	checkFull(t, err)
	usedFull := fsUsed(t, mnt)
	t.Logf("%d committed and %d uncommitted saves, then: %v (%d KiB used of %d KiB)",
		len(committed), len(uncommitted), err, usedFull>>10, size>>10)
	for range 3 {
		if _, err := s.Save(ctx, faultMessage(protocol.MessageId(), true, time.Now().UnixMilli(), bodyLen)); err == nil {
			t.Error("a save was taken on a full disk")
		} else {
			checkFull(t, err)
		}
	}

	// Saves keep being tried while everything is finished.
	stopSaves := make(chan struct{})
	var saverWG sync.WaitGroup
	var tried atomic.Int64
	var late sync.Map // saves taken while finishing: kept
	saverWG.Go(func() {
		for {
			select {
			case <-stopSaves:
				return
			default:
			}
			id := protocol.MessageId()
			tried.Add(1)
			if _, err := s.Save(ctx, faultMessage(id, true, time.Now().UnixMilli(), bodyLen)); err == nil {
				late.Store(id, true)
			}
		}
	})
	dead := committed[:3]
	var failures atomic.Int64
	var firstFailure atomic.Value
	fail := func(op, id string, err error) {
		if err != nil {
			failures.Add(1)
			firstFailure.CompareAndSwap(nil, fmt.Errorf("%s %s: %w", op, id, err))
		}
	}
	work := make(chan func(), 64)
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for f := range work {
				f()
			}
		})
	}
	for i, id := range committed {
		switch {
		case i < len(dead):
			work <- func() { fail("dead-letter", id, s.DeadLetter(ctx, id, "kept")) }
		case i%3 == 0:
			work <- func() {
				fail("record delivery", id, s.RecordDelivery(ctx, storage.DeliveryResult{MessageID: id, DeliverCount: 1,
					NextDeliverTime: time.Now().Add(time.Second), SuccGroups: []string{"a"}, FailGroups: []string{"b"}, FailCounts: []int32{1}}))
				fail("delete", id, s.Delete(ctx, id))
			}
		default:
			work <- func() { fail("delete", id, s.Delete(ctx, id)) }
		}
	}
	for i, id := range uncommitted {
		if i%2 == 0 {
			work <- func() { fail("rollback", id, s.Rollback(ctx, id)) }
		} else {
			work <- func() {
				fail("commit", id, s.Commit(ctx, id))
				fail("delete", id, s.Delete(ctx, id))
			}
		}
	}
	close(work)
	wg.Wait()
	if n := failures.Load(); n > 0 {
		t.Fatalf("%d state changes failed on the full disk, the first: %v", n, firstFailure.Load())
	}

	// Saves work again by themselves, and the disk empties.
	deadline := time.Now().Add(15 * time.Second)
	for {
		id := protocol.MessageId()
		_, err := s.Save(ctx, faultMessage(id, true, time.Now().UnixMilli(), bodyLen))
		if err == nil {
			late.Store(id, true)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("every message was finished and saves still fail 15 s on: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	close(stopSaves)
	saverWG.Wait()
	for fsUsed(t, mnt) > usedFull/2 {
		if time.Now().After(deadline) {
			t.Fatalf("every message was finished and %d KiB of the disk are still used (%d KiB when it was full)", fsUsed(t, mnt)>>10, usedFull>>10)
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("finished everything while %d saves were tried; disk use %d KiB -> %d KiB", tried.Load(), usedFull>>10, fsUsed(t, mnt)>>10)
	var kept []string
	for range 100 {
		id := protocol.MessageId()
		if _, err := s.Save(ctx, faultMessage(id, true, time.Now().UnixMilli(), bodyLen)); err != nil {
			t.Fatalf("save after the disk was reclaimed: %v", err)
		}
		kept = append(kept, id)
	}
	late.Range(func(k, _ any) bool { kept = append(kept, k.(string)); return true })

	// A reopen finds the dead letters and the messages saved since, and
	// nothing that was finished.
	if err := s.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	s = openTest(t, dir, opts)
	due, err := dueIDs(ctx, s, storage.DueDelivery)
	if err != nil {
		t.Fatal(err)
	}
	checkSameIDs(t, "due after a reopen", due, kept)
	dls, err := deadLetters(ctx, s)
	if err != nil {
		t.Fatal(err)
	}
	var dlIDs []string
	for id := range dls {
		dlIDs = append(dlIDs, id)
	}
	checkSameIDs(t, "dead letters after a reopen", dlIDs, dead)
	if unc, err := dueIDs(ctx, s, storage.DueTxCheck); err != nil || len(unc) != 0 {
		t.Errorf("after a reopen %d uncommitted messages are left (%v), want none", len(unc), err)
	}
}

func checkSameIDs(t *testing.T, what string, got, want []string) {
	t.Helper()
	w := make(map[string]bool, len(want))
	for _, id := range want {
		w[id] = true
	}
	extra, missing := 0, 0
	g := make(map[string]bool, len(got))
	for _, id := range got {
		g[id] = true
		if !w[id] {
			extra++
		}
	}
	for id := range w {
		if !g[id] {
			missing++
		}
	}
	if extra > 0 || missing > 0 {
		t.Errorf("%s: %d ids, want %d: %d not expected (finished, yet back), %d missing", what, len(got), len(want), extra, missing)
	}
}

// TestDiskFullMixedBatch: one batch holds a save the disk has no room for
// and deletes it has room for. The save is refused and the deletes are
// written.
func TestDiskFullMixedBatch(t *testing.T) {
	mnt := mountTmpfs(t, 4<<20)
	dir := filepath.Join(mnt, "store")
	s := openTest(t, dir, func(o *Options) { o.Sync = SyncNever; o.SegmentSize = 1 << 20 })
	defer s.Close()
	ctx := context.Background()
	var ids []string
	for range 64 {
		id := protocol.MessageId()
		if _, err := s.Save(ctx, faultMessage(id, true, time.Now().UnixMilli(), 16<<10)); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	fillDisk(t, mnt, 16<<10)

	// Queued under one hold of the lock: the writer takes them as one batch.
	big := protocol.MessageId()
	r, err := saveRecord(mustID(t, big), faultMessage(big, true, 0, 64<<10), flagCommitted, "", 0)
	if err != nil {
		t.Fatal(err)
	}
	type wait struct {
		op string
		b  *batch
		i  int
	}
	var waits []wait
	s.mu.Lock()
	b, i := s.enqueueLocked(r, nil)
	s.pending[r.id] = queued{b, i}
	waits = append(waits, wait{"save " + big, b, i})
	for _, id := range ids {
		d := &record{kind: recDelete, id: mustID(t, id)}
		b, i := s.enqueueLocked(d, nil)
		s.pending[d.id] = queued{b, i}
		waits = append(waits, wait{"delete " + id, b, i})
	}
	s.mu.Unlock()
	if waits[0].b != waits[len(waits)-1].b {
		t.Fatal("the records were not queued as one batch")
	}
	failed, kept := 0, 0
	var first error
	for j, w := range waits {
		err := s.wait(ctx, w.op, w.b, w.i)
		switch {
		case j == 0 && err == nil:
			t.Errorf("the save of %d KiB was taken with %d KiB free", 64, 16)
		case j == 0:
			checkFull(t, err)
		case err != nil:
			failed++
			if first == nil {
				first = err
			}
		}
	}
	for _, id := range ids {
		if _, err := s.Get(ctx, id); !errors.Is(err, storage.ErrNotFound) {
			kept++
		}
	}
	if failed > 0 || kept > 0 {
		t.Errorf("%d of %d deletes behind a save that did not fit in the same batch failed (the first: %v); %d of the messages are still there",
			failed, len(ids), first, kept)
	}
}

// TestDiskFullWriteFailsUnderEstimate: the free space read before a batch
// says it fits (the disk is shared: another writer took the room since),
// and the write of a save and deletes fails with ENOSPC. The save is
// refused with storage.ErrFull; the deletes are written alone.
func TestDiskFullWriteFailsUnderEstimate(t *testing.T) {
	mnt := mountTmpfs(t, 4<<20)
	orig := statfs
	statfs = func(string) (int64, error) { return 1 << 40, nil }
	defer func() { statfs = orig }()
	dir := filepath.Join(mnt, "store")
	s := openTest(t, dir, func(o *Options) { o.Sync = SyncNever; o.SegmentSize = 1 << 20 })
	defer s.Close()
	ctx := context.Background()
	var ids []string
	for range 32 {
		id := protocol.MessageId()
		if _, err := s.Save(ctx, faultMessage(id, true, time.Now().UnixMilli(), 16<<10)); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	fillDisk(t, mnt, 8<<10)
	big := protocol.MessageId()
	r, err := saveRecord(mustID(t, big), faultMessage(big, true, 0, 64<<10), flagCommitted, "", 0)
	if err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	sb, si := s.enqueueLocked(r, nil)
	s.pending[r.id] = queued{sb, si}
	type wait struct {
		id string
		b  *batch
		i  int
	}
	var waits []wait
	for _, id := range ids {
		d := &record{kind: recDelete, id: mustID(t, id)}
		b, i := s.enqueueLocked(d, nil)
		s.pending[d.id] = queued{b, i}
		waits = append(waits, wait{id, b, i})
	}
	s.mu.Unlock()
	err = s.wait(ctx, "save "+big, sb, si)
	if !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("the save that did not fit failed with %v: want an error that wraps ENOSPC", err)
	}
	checkFull(t, err)
	failed := 0
	for _, w := range waits {
		if err := s.wait(ctx, "delete "+w.id, w.b, w.i); err != nil {
			if failed == 0 {
				t.Errorf("delete %s, behind a save that failed with ENOSPC in the same batch: %v", w.id, err)
			}
			failed++
		}
	}
	if failed > 0 {
		t.Errorf("%d of %d deletes failed", failed, len(waits))
	}
}

// TestDiskFullResumesWhenTheDiskGrows: saves fill the disk, the file
// system is made larger, and saves work again without a reopen; when the
// larger disk fills, the store again keeps its reserve, in which finishing
// every message works.
func TestDiskFullResumesWhenTheDiskGrows(t *testing.T) {
	mnt := mountTmpfs(t, 6<<20)
	dir := filepath.Join(mnt, "store")
	s := openTest(t, dir, func(o *Options) { o.Sync = SyncAlways; o.SegmentSize = 1 << 20 })
	defer s.Close()
	ctx := context.Background()
	c1, u1, err := fillWithSaves(t, s, 8<<10)
	if err == nil {
		t.Fatal("no save failed on a 6 MiB disk")
	}
	checkFull(t, err)
	if err := syscall.Mount("tmpfs", mnt, "tmpfs", syscall.MS_REMOUNT, "size=12m"); err != nil {
		t.Fatalf("grow the tmpfs: %v", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := s.Save(ctx, faultMessage(protocol.MessageId(), true, time.Now().UnixMilli(), 8<<10))
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the disk grew by 6 MiB and saves still fail 10 s on: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	c2, u2, err := fillWithSaves(t, s, 8<<10)
	if err == nil {
		t.Fatal("no save failed on a 12 MiB disk")
	}
	checkFull(t, err)
	t.Logf("%d saves on 6 MiB, %d more after it grew to 12 MiB", len(c1)+len(u1), len(c2)+len(u2))
	all := append(append(c1, c2...), append(u1, u2...)...)
	for i, id := range all {
		if err := s.Delete(ctx, id); err != nil {
			t.Fatalf("delete %s on the full disk, after %d of %d: %v", id, i, len(all), err)
		}
	}
}

// fillDisk fills the file system at dir until about leave bytes are free.
func fillDisk(t *testing.T, dir string, leave int64) {
	t.Helper()
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	free := int64(st.Bavail) * st.Bsize
	if free <= leave {
		return
	}
	if err := os.WriteFile(filepath.Join(dir, "filler"), make([]byte, free-leave), 0o644); err != nil {
		t.Fatalf("fill the disk: %v", err)
	}
}

func mustID(t *testing.T, s string) msgID {
	t.Helper()
	id, ok := parseID(s)
	if !ok {
		t.Fatalf("bad id %q", s)
	}
	return id
}

// TestParseURIReserve: reserve= sets the reserve; without it the reserve
// is one segment.
func TestParseURIReserve(t *testing.T) {
	for _, tc := range []struct {
		uri  string
		want int64
	}{
		{"file:///d", 64 << 20},
		{"file:///d?segment=8MiB", 8 << 20},
		{"file:///d?segment=8MiB&reserve=256MiB", 256 << 20},
		{"file:///d?reserve=1MiB", 1 << 20},
	} {
		o, err := ParseURI(tc.uri)
		if err != nil {
			t.Errorf("ParseURI(%q): %v", tc.uri, err)
			continue
		}
		if got := o.reserve(); got != tc.want {
			t.Errorf("ParseURI(%q): reserve %d, want %d", tc.uri, got, tc.want)
		}
	}
	for _, uri := range []string{"file:///d?reserve=512KiB", "file:///d?reserve=lots", "file:///d?reserve=-1MiB"} {
		if _, err := ParseURI(uri); err == nil || !strings.Contains(err.Error(), "reserve=") {
			t.Errorf("ParseURI(%q) = %v, want an error that names reserve=", uri, err)
		}
	}
}

// TestReserveHoldsWithoutTimedRefresh: the free space is read only at
// open, near the reserve and as spares are made (the timed refresh never
// comes, as in a fill faster than roomRefresh). Each spare takes a
// segment from the free space; were it counted as room all the same, the
// saves would eat the reserve and fail on ENOSPC. They must be refused
// with the reserve kept, and the deletes of all of them must fit.
func TestReserveHoldsWithoutTimedRefresh(t *testing.T) {
	const (
		size    = 12 << 20
		segment = 1 << 20
		bodyLen = 8 << 10
	)
	orig := roomRefresh
	roomRefresh = time.Hour
	defer func() { roomRefresh = orig }()
	mnt := mountTmpfs(t, size)
	s := openTest(t, filepath.Join(mnt, "store"), func(o *Options) { o.Sync = SyncAlways; o.SegmentSize = segment })
	defer s.Close()
	ctx := context.Background()
	var saved []string
	var err error
	for range 2 * size / bodyLen {
		id := protocol.MessageId()
		if _, err = s.Save(ctx, faultMessage(id, true, time.Now().UnixMilli(), bodyLen)); err != nil {
			break
		}
		saved = append(saved, id)
	}
	if err == nil {
		t.Fatalf("%d saves of %d bytes on a %d MiB disk and none failed", len(saved), bodyLen, size>>20)
	}
	checkFull(t, err)
	if errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("after %d saves, one failed on the disk itself, not refused to keep the reserve: %v", len(saved), err)
	}
	for _, id := range saved {
		if err := s.Delete(ctx, id); err != nil {
			t.Fatalf("delete %s on the full disk: %v", id, err)
		}
	}
}
