package filestore

// Regression tests for bugs found in review. Each test names the expected
// behaviour; the comment above it describes the bug it catches.

import (
	"context"
	"errors"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/storage"
)

// holdWriter stops the writer from being woken by new records, so that
// records queued by several callers end up in one batch; releaseWriter
// lets it write them. The writer must be idle when holdWriter is called.
func holdWriter(s *Store) {
	s.mu.Lock()
	s.gatherTarget = 1 << 30
	s.mu.Unlock()
	select { // a stale wake-up would write a batch of what is queued so far
	case <-s.wake:
	default:
	}
}

func releaseWriter(s *Store) {
	s.mu.Lock()
	s.gatherTarget = 0
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// waitQueued waits until a record of id is queued for the writer.
func waitQueued(t *testing.T, s *Store, id string) {
	t.Helper()
	mid, _ := parseID(id)
	for start := time.Now(); ; time.Sleep(time.Millisecond) {
		s.mu.Lock()
		_, ok := s.pending[mid]
		s.mu.Unlock()
		if ok {
			return
		}
		if time.Since(start) > 5*time.Second {
			t.Fatalf("no record of %s was queued", id)
		}
	}
}

// segSize is the size the index gives segment id (the end of its last
// applied record).
func segSize(s *Store, id uint32) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	if st := s.idx.segs[id]; st != nil {
		return st.size
	}
	return -1
}

// getState is what Get says of id: "absent", "committed" or "uncommitted".
func getState(t *testing.T, s *Store, id string) string {
	t.Helper()
	m, err := s.Get(context.Background(), id)
	switch {
	case errors.Is(err, storage.ErrNotFound):
		return "absent"
	case err != nil:
		t.Fatalf("get %s: %v", id, err)
	case m.Committed:
		return "committed"
	}
	return "uncommitted"
}

// limitOpenFiles makes every further open of a file descriptor fail with
// EMFILE ("too many open files") until the returned func is called.
func limitOpenFiles(t *testing.T) (restore func()) {
	t.Helper()
	var orig syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &orig); err != nil {
		t.Fatal(err)
	}
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatalf("no /proc/self/fd: %v", err)
	}
	open := make(map[int]bool)
	for _, e := range ents {
		if n, err := strconv.Atoi(e.Name()); err == nil {
			open[n] = true
		}
	}
	lowest := 0 // the lowest free descriptor: every new one would be at or above it
	for open[lowest] {
		lowest++
	}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &syscall.Rlimit{Cur: uint64(lowest), Max: orig.Max}); err != nil {
		t.Fatal(err)
	}
	return func() {
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &orig); err != nil {
			t.Fatal(err)
		}
	}
}

// Bug (store.go write, rollFailed): with fsync=always, when a roll fails
// after it has fsynced the segment it closes (os.Rename, openSegment or
// syncDir fails: EMFILE, ENOSPC on the directory), write sets
// written = synced and so reports the records of the batch that were
// already written to the old segment as failed and does not apply them,
// although they are on disk and the store goes on taking writes (roll did
// not call s.fail). The index then disagrees with the log. Here: an
// uncommitted message X; a batch [Commit X, Save Y] where the commit fits
// in the active segment and Y needs a roll that fails. Commit returns an
// error and Get says uncommitted, so Rollback succeeds and Get says gone;
// after a restart the log replays the commit first, ignores the rollback,
// and X is back, committed, and would be delivered.
func TestRollFailureKeepsIndexAndLogInAgreement(t *testing.T) {
	dir := t.TempDir()
	const segment = 8 << 10
	mutate := func(o *Options) { o.Sync = SyncAlways; o.SegmentSize = segment }
	s := openTest(t, dir, mutate)
	defer func() { s.Close() }()
	ctx := context.Background()
	now := time.Now().UnixMilli()

	saveOne(t, s) // segment 1, not preallocated; a spare is being made
	time.Sleep(200 * time.Millisecond)
	x := protocol.MessageId()
	if _, err := s.Save(ctx, faultMessage(x, false, now, 10)); err != nil {
		t.Fatal(err)
	}
	// X went to segment 2, the spare renamed into place.
	if segSize(s, 2) <= 0 {
		t.Fatalf("setup: the store did not move to a preallocated segment 2")
	}
	// Fill segment 2 until the commit of X fits and a 3000-byte save does not.
	for segment-segSize(s, 2) >= 1500 {
		if _, err := s.Save(ctx, faultMessage(protocol.MessageId(), true, now, 1000)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := os.Stat(segmentPath(dir, 3)); err == nil {
		t.Fatal("setup: segment 3 exists already")
	}

	holdWriter(s)
	cerr := make(chan error, 1)
	go func() { cerr <- s.Commit(ctx, x) }()
	waitQueued(t, s, x)
	y := protocol.MessageId()
	yerr := make(chan error, 1)
	go func() {
		_, err := s.Save(ctx, faultMessage(y, true, now, 3000))
		yerr <- err
	}()
	waitQueued(t, s, y)
	restore := limitOpenFiles(t) // the roll cannot open segment 3
	releaseWriter(s)
	commitErr, saveErr := <-cerr, <-yerr
	restore()
	if saveErr == nil {
		t.Fatal("setup: the save that needed a roll succeeded although no file could be opened")
	}
	t.Logf("commit: %v; save needing the roll: %v", commitErr, saveErr)

	if getState(t, s, x) == "uncommitted" {
		if err := s.Rollback(ctx, x); err != nil {
			t.Fatalf("rollback of the uncommitted %s: %v", x, err)
		}
	}
	before := getState(t, s, x)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openTest(t, dir, mutate)
	if after := getState(t, s, x); after != before {
		t.Fatalf("message %s was %s before the restart and is %s after it (commit returned %v)", x, before, after, commitErr)
	}
}

// Bug (store.go run/flush, compact.go maintain): after a failed fsync the
// store "refuses writes", but only new calls are refused: the writer goes
// on compacting and deleting segments. The pages of the batch whose fsync
// failed may have been dropped by the kernel (here: written to /dev/null,
// whose fsync fails), yet activeSize moved past them; compaction then
// copies an old live message behind that hole, a later fsync succeeds (the
// kernel reports a writeback error once), and the segment that held the
// original is deleted. At the next open the hole ends the log, the copy is
// cut off with it, and a message acknowledged long before the failure is
// gone.
func TestNoCompactionOrDeletionAfterFailedFsync(t *testing.T) {
	dir := t.TempDir()
	const segment = 64 << 10
	ctx := context.Background()
	now := time.Now().UnixMilli()

	// Segment 1: one live message K among finished ones.
	s := openTest(t, dir, func(o *Options) { o.Sync = SyncNever; o.SegmentSize = segment; o.CompactRatio = 0 })
	k := protocol.MessageId()
	if _, err := s.Save(ctx, faultMessage(k, true, now, 1000)); err != nil {
		t.Fatal(err)
	}
	for range 20 {
		id := protocol.MessageId()
		if _, err := s.Save(ctx, faultMessage(id, true, now, 2000)); err != nil {
			t.Fatal(err)
		}
		if err := s.Delete(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if n := len(segmentFiles(t, dir)); n != 1 {
		t.Fatalf("setup: %d segments, want 1", n)
	}
	// Segment 2: a preallocated segment just rolled into (a renamed spare).
	if err := os.WriteFile(segmentPath(dir, 2), make([]byte, segment), 0o644); err != nil {
		t.Fatal(err)
	}

	mutate := func(o *Options) { o.Sync = SyncAlways; o.SegmentSize = segment }
	s, logs, err := openObserved(dir, mutate)
	if err != nil {
		t.Fatal(err)
	}
	devNull, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer devNull.Close()
	readOnly, err := os.Open(segmentPath(dir, 2))
	if err != nil {
		t.Fatal(err)
	}
	defer readOnly.Close()
	// The next write's pages are lost and its fsync fails; a direct write
	// fails (a write with O_DSYNC reports a failed sync as its own error).
	s.mu.Lock()
	real := s.active.f
	s.active.f = devNull
	var realDirect *os.File
	if s.direct != nil {
		realDirect = s.direct.f
		s.direct.f = readOnly
	}
	s.mu.Unlock()
	z := protocol.MessageId()
	if _, err := s.Save(ctx, faultMessage(z, true, now, 100)); err == nil {
		t.Fatal("setup: the save whose fsync failed succeeded")
	}
	if logs.FilterMessage("file store refuses writes from now on").Len() == 0 {
		t.Fatal("setup: the store did not fail")
	}
	// The kernel has reported the error; later fsyncs succeed again.
	time.Sleep(300 * time.Millisecond) // the writer is idle
	s.mu.Lock()
	s.active.f = real
	if realDirect != nil {
		s.direct.f = realDirect
	}
	s.mu.Unlock()

	for start := time.Now(); time.Since(start) < 3500*time.Millisecond; time.Sleep(50 * time.Millisecond) {
		if _, err := os.Stat(segmentPath(dir, 1)); err != nil {
			break
		}
	}
	_, statErr := os.Stat(segmentPath(dir, 1))
	s.Close() // reports the failure
	s = openTest(t, dir, mutate)
	defer s.Close()
	if got := getState(t, s, k); got != "committed" {
		t.Fatalf("message %s, acknowledged before the failed fsync, is %s after a restart (segment 1 deleted after the failure: %v)",
			k, got, statErr != nil)
	}
}

// Bug (store.go Save; record.go maxRecordLen): Save accepts a message
// whose record is longer than maxRecordLen (64 MiB) and acknowledges it;
// the broker's -max-body has no upper bound, so such a message can reach
// the store. At the next open parseRecordHeader calls the length
// corruption: the segment is cut at that record, and the message and
// every record after it in the segment (here, message B) are lost.
func TestOversizedMessageIsRefusedNotLostAtRestart(t *testing.T) {
	dir := t.TempDir()
	mutate := func(o *Options) { o.Sync = SyncNever; o.SegmentSize = 256 << 20 }
	s := openTest(t, dir, mutate)
	ctx := context.Background()
	now := time.Now().UnixMilli()
	a, h, b := protocol.MessageId(), protocol.MessageId(), protocol.MessageId()
	if _, err := s.Save(ctx, faultMessage(a, true, now, 10)); err != nil {
		t.Fatal(err)
	}
	big := faultMessage(h, true, now, 0)
	big.Body = make([]byte, maxRecordLen+1)
	_, herr := s.Save(ctx, big)
	big = nil
	if _, err := s.Save(ctx, faultMessage(b, true, now, 10)); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openTest(t, dir, mutate)
	defer s.Close()
	for _, c := range []struct {
		id, what string
		acked    bool
	}{{a, "the message before", true}, {h, "the oversized message", herr == nil}, {b, "the message after", true}} {
		if got := getState(t, s, c.id); c.acked && got != "committed" {
			t.Errorf("%s (%s), acknowledged, is %s after a restart (the oversized save returned %v)", c.what, c.id, got, herr)
		}
	}
}

// Bug (store.go write, the fit check): a run of records fits when it ends
// at or before SegmentSize, so it may leave 1 to 7 bytes of a preallocated
// segment unused. Close does not truncate the active segment, and at the
// next open scan cannot read an 8-byte header from those zeros: a clean
// shutdown is reported as a repair ("torn record header") and the segment
// truncated.
func TestCleanCloseOfFullPreallocatedSegmentNeedsNoRepair(t *testing.T) {
	dir := t.TempDir()
	const segment = 4 << 10
	mutate := func(o *Options) { o.Sync = SyncAlways; o.SegmentSize = segment }
	s := openTest(t, dir, mutate)
	ctx := context.Background()
	now := time.Now().UnixMilli()
	saveOne(t, s)
	time.Sleep(200 * time.Millisecond) // the spare is ready
	saveOne(t, s)                      // moves to the spare: segment 2
	if segSize(s, 2) <= 0 {
		t.Fatal("setup: the store did not move to a preallocated segment 2")
	}
	// One message whose record leaves exactly 5 bytes of segment 2.
	want := segment - segSize(s, 2) - 5
	var m *storage.Message
	for n := 0; m == nil && n < int(want); n++ {
		c := faultMessage(protocol.MessageId(), true, now, n)
		id, _ := parseID(c.ID())
		r, err := saveRecord(id, c, flagCommitted, "", 0)
		if err != nil {
			t.Fatal(err)
		}
		r.next = toMillis(c.NextDeliverTime)
		if int64(len(appendRecord(nil, r))) == want {
			m = c
		}
	}
	if m == nil {
		t.Fatalf("setup: no body length makes a record of %d bytes", want)
	}
	if _, err := s.Save(ctx, m); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s2, logs, err := openObserved(dir, mutate)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	line := checkOpenLog(t, logs)
	for k, v := range line.ContextMap() {
		if strings.HasPrefix(k, "truncated_") {
			t.Errorf("after a clean Close, Open repaired %s: %v", k, v)
		}
	}
	if got := getState(t, s2, m.ID()); got != "committed" {
		t.Errorf("the last message is %s", got)
	}
}

// Bug (store.go Due): the zero Cursor is turned into dueKey{next: 0}, the
// Unix epoch, and the walk starts there, so a due message whose
// NextDeliverTime is before 1970 (a clock reset to the epoch, a zero-ish
// retry time) is never returned by a first page, although the contract
// says the zero Cursor starts at the beginning (the memory store returns
// it).
func TestDueFromZeroCursorReturnsMessagesBefore1970(t *testing.T) {
	s := openTest(t, t.TempDir(), func(o *Options) { o.Sync = SyncNever })
	defer s.Close()
	ctx := context.Background()
	id := protocol.MessageId()
	if _, err := s.Save(ctx, faultMessage(id, true, -5000, 10)); err != nil {
		t.Fatal(err)
	}
	page, err := s.Due(ctx, storage.DueQuery{Kind: storage.DueDelivery, Before: time.Now()})
	if err != nil {
		t.Fatal(err)
	}
	if len(page) != 1 || page[0].ID() != id {
		t.Fatalf("Due from the zero cursor returned %d messages, want the one due at %v", len(page), time.UnixMilli(-5000).UTC())
	}
}

// Bug (prealloc.go make): the preparer writes zeros until the spare has a
// whole segment or the disk is full, and only then removes it. With less
// than a segment free it takes every free byte for as long as it writes,
// and it tries again at every write past half a segment that is not
// preallocated (request after each failure); the appends of that segment
// fail with ENOSPC meanwhile, so saves fail although the disk has room.
// The test runs on a small tmpfs, which it mounts (make test runs as root).
func TestSpareDoesNotTakeTheRoomSavesNeed(t *testing.T) {
	dir := mountTmpfs(t, 12<<20)
	const segment = 8 << 20
	// 6 MiB free: not enough for a spare segment, plenty for the saves
	// below and the 1 MiB reserve they leave (room.go).
	if err := os.WriteFile(dir+"/filler", make([]byte, 6<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	s := openTest(t, dir+"/store", func(o *Options) { o.Sync = SyncAlways; o.SegmentSize = segment; o.Reserve = 1 << 20 })
	defer s.Close()
	ctx := context.Background()
	now := time.Now().UnixMilli()
	acked, failed := 0, 0
	var firstErr error
	for int64(acked)*(16<<10) < 4<<20+512<<10 && failed < 1000 {
		if _, err := s.Save(ctx, faultMessage(protocol.MessageId(), true, now, 16<<10)); err != nil {
			failed++
			if firstErr == nil {
				firstErr = err
			}
			continue
		}
		acked++
	}
	if failed > 0 {
		t.Fatalf("%d saves failed (first: %v) while the file system had room for them; %d acknowledged", failed, firstErr, acked)
	}
}
