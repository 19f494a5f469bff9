package filestore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"go.uber.org/zap/zaptest/observer"

	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/storage"
)

// preallocatedStore makes dir hold one preallocated segment of size bytes,
// so that a store opened on it writes directly from its first record.
func preallocatedStore(t *testing.T, dir string, size int64) {
	t.Helper()
	if err := os.WriteFile(segmentPath(dir, 1), make([]byte, size), 0o644); err != nil {
		t.Fatal(err)
	}
}

// refuseDirectIO makes the file system refuse O_DIRECT until the test ends.
func refuseDirectIO(t *testing.T) {
	orig := openForDirectIO
	openForDirectIO = func(string, int) (*os.File, error) { return nil, syscall.EINVAL }
	t.Cleanup(func() { openForDirectIO = orig })
}

// directSizes are body sizes whose records end before, at and after block
// boundaries.
var directSizes = []int{0, 1, 100, 3900, 4000, 4096, 5000, 8191, 8192, 12000, 2, 700, 65536, 33, 4033}

// directOps runs one fixed sequence of calls against the store in dir: saves
// whose records end before, at and after block boundaries, state changes,
// and a restart in the middle, so that the next direct write starts in a
// block written by the run before it.
func directOps(t *testing.T, dir string, mutate func(*Options)) (ids []string, observed []*observer.ObservedLogs) {
	t.Helper()
	ctx := context.Background()
	const now = 1_700_000_000_000
	open := func() *Store {
		s, logs, err := openObserved(dir, mutate)
		if err != nil {
			t.Fatal(err)
		}
		s.Now = func() time.Time { return time.UnixMilli(now + 5) }
		observed = append(observed, logs)
		return s
	}
	s := open()
	for round := range 2 {
		for i, n := range directSizes {
			id := fmt.Sprintf("%030x%02x", round*len(directSizes)+i, round)
			ids = append(ids, id)
			if _, err := s.Save(ctx, faultMessage(id, i%3 != 0, now, n)); err != nil {
				t.Fatal(err)
			}
			switch i % 4 {
			case 0:
				if err := s.Commit(ctx, id); err != nil {
					t.Fatal(err)
				}
			case 1:
				d := storage.DeliveryResult{MessageID: id, DeliverCount: 1, NextDeliverTime: time.UnixMilli(now + 1000),
					SuccGroups: []string{"g1"}, FailGroups: []string{"g2"}}
				if err := s.RecordDelivery(ctx, d); err != nil {
					t.Fatal(err)
				}
			case 2:
				if err := s.Delete(ctx, id); err != nil {
					t.Fatal(err)
				}
			}
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		if round == 0 {
			s = open()
		}
	}
	return ids, observed
}

// The direct path (a block written again with what it held, padded with
// zeros) and the page-cache path write the same log, byte for byte, across
// a restart; a file system that refuses O_DIRECT is said once in the log.
func TestDirectAndPageCacheWriteTheSameLog(t *testing.T) {
	const segment = 1 << 20
	mutate := func(o *Options) { o.Sync = SyncAlways; o.SegmentSize = segment }

	directDir := t.TempDir()
	preallocatedStore(t, directDir, segment)
	var directWrites atomic.Int64
	orig := pwrite
	pwrite = func(f *os.File, b []byte, off int64) error {
		directWrites.Add(1)
		return orig(f, b, off)
	}
	ids, _ := directOps(t, directDir, mutate)
	pwrite = orig
	if directWrites.Load() < int64(len(ids)) {
		t.Fatalf("%d direct writes for %d saves: the store did not write directly", directWrites.Load(), len(ids))
	}

	cacheDir := t.TempDir()
	preallocatedStore(t, cacheDir, segment)
	refuseDirectIO(t)
	_, logs := directOps(t, cacheDir, mutate)
	for i, l := range logs {
		if n := l.FilterMessageSnippet("refuses direct I/O").Len(); n != 1 {
			t.Errorf("open %d: %d log lines say the file system refuses direct I/O, want 1", i+1, n)
		}
	}

	direct := must(os.ReadFile(segmentPath(directDir, 1)))
	cache := must(os.ReadFile(segmentPath(cacheDir, 1)))
	if len(segmentFiles(t, directDir)) != 1 || len(segmentFiles(t, cacheDir)) != 1 {
		t.Fatalf("setup: the log did not fit in one segment")
	}
	recs, zeroFrom, bad := parseSegment(direct)
	if bad >= 0 || zeroFrom < 0 {
		t.Fatalf("direct segment: unreadable at %d, zeros from %d", bad, zeroFrom)
	}
	if !bytes.Equal(direct[:zeroFrom], cache[:zeroFrom]) || !allZeros(cache[zeroFrom:]) {
		i := 0
		for i < len(direct) && i < len(cache) && direct[i] == cache[i] {
			i++
		}
		t.Fatalf("the logs differ from byte %d (direct: %d bytes of records, %d records)", i, zeroFrom, len(recs))
	}

	// And the store reads it back.
	s := openTest(t, directDir, mutate)
	defer s.Close()
	for i, id := range ids {
		want := "committed" // saved committed, or committed by Commit
		if i%len(directSizes)%3 == 0 && i%len(directSizes)%4 != 0 {
			want = "uncommitted"
		}
		if i%len(directSizes)%4 == 2 {
			want = "absent" // deleted
		}
		if got := getState(t, s, id); got != want {
			t.Errorf("message %s: %s, want %s", id, got, want)
		}
	}
}

// A direct write that fails for want of room is undone: the callers get
// an error, the store takes the next writes, and after a restart the
// refused messages are not there, even though their bytes had reached the
// disk before the error and the next record, of the same size as the first
// refused one, leaves the second one whole behind it.
func TestDirectWriteWithoutRoomIsUndone(t *testing.T) {
	const segment = 1 << 20
	dir := t.TempDir()
	preallocatedStore(t, dir, segment)
	mutate := func(o *Options) { o.Sync = SyncAlways; o.SegmentSize = segment }
	s := openTest(t, dir, mutate)
	ctx := context.Background()
	now := time.Now().UnixMilli()
	before := []string{saveOne(t, s), saveOne(t, s)}

	orig := pwrite
	var calls atomic.Int32
	pwrite = func(f *os.File, b []byte, off int64) error {
		if err := orig(f, b, off); err != nil || calls.Add(1) > 1 {
			return err
		}
		return syscall.ENOSPC // the first write: written, but reported as failed
	}
	// Two saves in one write; the first ends at a block boundary, so the
	// zeros that pad the next write to its block leave the second whole.
	refused := []string{protocol.MessageId(), protocol.MessageId()}
	end := segSize(s, 1)
	first := 3000
	for (end+recordSize(t, refused[0], now, first))%directBlock != 0 {
		first++
	}
	holdWriter(s)
	errs := make(chan error, len(refused))
	for i, id := range refused {
		go func() {
			_, err := s.Save(ctx, faultMessage(id, true, now, []int{first, 3000}[i]))
			errs <- err
		}()
		waitQueued(t, s, id)
	}
	releaseWriter(s)
	for range refused {
		if err := <-errs; !errors.Is(err, syscall.ENOSPC) {
			t.Fatalf("save whose direct write failed with ENOSPC: %v, want that error", err)
		}
	}
	pwrite = orig
	// The store goes on: the next record takes the place of the first
	// refused one, exactly.
	after := protocol.MessageId()
	if _, err := s.Save(ctx, faultMessage(after, true, now, first)); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openTest(t, dir, mutate)
	defer s.Close()
	for _, id := range append(before, after) {
		if got := getState(t, s, id); got != "committed" {
			t.Errorf("acknowledged message %s: %s after a restart", id, got)
		}
	}
	for _, id := range refused {
		if got := getState(t, s, id); got != "absent" {
			t.Errorf("refused message %s: %s after a restart, want absent", id, got)
		}
	}
}

// recordSize is the size on disk of the record that saves
// faultMessage(id, true, next, bodyLen).
func recordSize(t *testing.T, id string, next int64, bodyLen int) int64 {
	mid, _ := parseID(id)
	r, err := saveRecord(mid, faultMessage(id, true, next, bodyLen), flagCommitted, "", 0)
	if err != nil {
		t.Fatal(err)
	}
	return int64(len(appendRecord(nil, r)))
}

// Any other error of a direct write may be a failed sync: the store stops
// taking writes, as after a failed fsync, and keeps what it acknowledged.
func TestDirectWriteErrorStopsWrites(t *testing.T) {
	const segment = 1 << 20
	dir := t.TempDir()
	preallocatedStore(t, dir, segment)
	mutate := func(o *Options) { o.Sync = SyncAlways; o.SegmentSize = segment }
	s := openTest(t, dir, mutate)
	acked := []string{saveOne(t, s), saveOne(t, s)}

	orig := pwrite
	pwrite = func(*os.File, []byte, int64) error { return syscall.EIO }
	ctx := context.Background()
	if _, err := s.Save(ctx, faultMessage(protocol.MessageId(), true, time.Now().UnixMilli(), 100)); !errors.Is(err, syscall.EIO) {
		t.Fatalf("save whose direct write failed with EIO: %v", err)
	}
	pwrite = orig
	_, err := s.Save(ctx, faultMessage(protocol.MessageId(), true, time.Now().UnixMilli(), 100))
	if err == nil || !bytes.Contains([]byte(err.Error()), []byte("refusing writes after a failure")) {
		t.Fatalf("save after a failed direct write: %v, want a refusal", err)
	}
	s.Close()
	s = openTest(t, dir, mutate)
	defer s.Close()
	for _, id := range acked {
		if got := getState(t, s, id); got != "committed" {
			t.Errorf("acknowledged message %s: %s after a restart", id, got)
		}
	}
}

// The spare segment is whole zeros whatever its size, with direct I/O and
// without it (a file system that refuses O_DIRECT, such as an old tmpfs).
func TestSpareSegmentIsAllZeros(t *testing.T) {
	const segment = 3<<20 + 5000 // over the 1 MiB chunk, not whole blocks nor of chunks
	for _, direct := range []bool{true, false} {
		t.Run(fmt.Sprint("direct=", direct), func(t *testing.T) {
			if !direct {
				refuseDirectIO(t)
			}
			dir := t.TempDir()
			s := openTest(t, dir, func(o *Options) { o.SegmentSize = segment })
			defer s.Close()
			saveOne(t, s) // a new store asks for a spare at once
			path := filepath.Join(dir, spareName)
			deadline := time.Now().Add(10 * time.Second)
			for {
				if st, err := os.Stat(path); err == nil && st.Size() == segment {
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("no spare segment of the segment size")
				}
				time.Sleep(20 * time.Millisecond)
			}
			// The last write gives the file its size: everything before it
			// is written.
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if len(b) != segment || !allZeros(b) {
				t.Fatalf("spare: %d bytes, all zero %v", len(b), allZeros(b))
			}
		})
	}
}

// cachestat reports the dirty pages of f in the page cache (Linux 6.5+).
func dirtyPages(t *testing.T, f *os.File) uint64 {
	t.Helper()
	var rng struct{ off, len uint64 }
	var cs struct{ cache, dirty, writeback, evicted, recentlyEvicted uint64 }
	const sysCachestat = 451
	if _, _, errno := syscall.Syscall6(sysCachestat, f.Fd(), uintptr(unsafe.Pointer(&rng)), uintptr(unsafe.Pointer(&cs)), 0, 0, 0); errno != 0 {
		t.Fatalf("cachestat: %v", errno)
	}
	return cs.dirty
}

// Records that an earlier run left in the page cache (fsync=never, or a
// kill before an fsync) reach the disk before the first direct write of
// this run: a direct write makes only its own blocks durable, and a power
// loss that took those pages would end the log before the new records.
func TestDirectWriterFlushesWhatAnEarlierRunLeftInTheCache(t *testing.T) {
	const segment = 1 << 20
	// The bytes of a log of 50 records, as a run with fsync=never wrote them.
	src := t.TempDir()
	s := openTest(t, src, func(o *Options) { o.Sync = SyncNever; o.SegmentSize = segment })
	for range 50 {
		saveOne(t, s)
	}
	s.Close()
	log := must(os.ReadFile(segmentPath(src, 1)))

	dir := t.TempDir()
	preallocatedStore(t, dir, segment)
	f := must(os.OpenFile(segmentPath(dir, 1), os.O_RDWR, 0))
	defer f.Close()
	if _, err := f.WriteAt(log, 0); err != nil { // through the page cache, not synced
		t.Fatal(err)
	}
	if dirtyPages(t, f) == 0 {
		t.Fatal("setup: the written records are not dirty in the page cache")
	}
	s = openTest(t, dir, func(o *Options) { o.SegmentSize = segment })
	defer s.Close()
	if s.direct == nil {
		t.Fatal("setup: the store does not write directly")
	}
	if n := dirtyPages(t, f); n != 0 {
		t.Fatalf("%d pages of the earlier run are still dirty when direct writes begin", n)
	}
}
