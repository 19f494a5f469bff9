// Package filestore is KiteQ's durable store on local files: an
// append-only log of messages and of their state changes, in segments,
// with a checksum on every record, and an index in memory rebuilt from the
// log at open.
//
// Durability follows Options.Sync. With SyncAlways (the default) a call
// returns once its record is on disk, and calls running at the same time
// share one fsync. After a crash at any byte, Open truncates a torn tail
// and keeps every record before it. A record damaged anywhere else costs
// only itself: Open skips it, keeps the records after it, copies its bytes
// to quarantine/ and reports it (recover.go).
//
// Space: segments whose messages are all finished are deleted, oldest
// first; the oldest segment is rewritten (its live messages copied to the
// head of the log) when it is mostly finished or when finished data behind
// it exceeds what is live. Deleting only from the oldest end keeps every
// tombstone until the message it finishes is gone from disk.
package filestore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/kiteq/kiteq/protocol"

	"github.com/kiteq/kiteq/storage"
)

// Store is the file store. It is safe for concurrent use.
type Store struct {
	opts Options
	log  *zap.Logger
	// Now is the clock of Commit; set it before the store is shared.
	Now func() time.Time

	lockFile *os.File
	remover  *remover // removes deleted segments (dropOldest)

	// mu guards the index, the queue of records for the writer, and the
	// store's state. Lock order: mu, then segMu.
	mu      sync.Mutex
	idx     *index
	pending map[msgID]queued // records queued and not yet applied, by id
	q       writeQueue       // records for the writer
	batch   *batch           // the callers waiting for q
	// saving holds the Digest of each save in pending, so that a Save of
	// the same id that waited for it decides on it.
	saving map[msgID][]byte
	// gatherTarget: the writer is gathering a batch of this many records
	// and wants to be woken only when it is full (0: at every record).
	gatherTarget int
	failed       error // set after a failure the store cannot undo: refuse writes
	closed       bool

	// segMu keeps a segment file open while it is read; the writer takes it
	// exclusively to delete a segment.
	segMu sync.RWMutex
	segs  map[uint32]*segment

	// Writer state, owned by the writer goroutine.
	spare      writeQueue // swapped with q at each flush
	active     *segment
	activeSize int64
	segIDs     []uint32 // ascending; the last one is active
	dirty      bool     // written since the last fsync
	// handedOff: the active segment's bytes before it have been handed to
	// the kernel's writeback (fsync=interval and never), so that the fsync
	// of a full segment when it rolls finds little left to write.
	handedOff int64
	compactAt int64 // next offset to look at in the oldest segment
	// compactVerify: compaction walks the oldest segment again, decoding
	// and checking every record (compactStep).
	compactVerify bool
	prep          *preparer // nil with fsync=never
	// preallocated: the active segment came full of zeros. When it did not
	// (a new store, a repaired tail), the writer moves to a spare as soon
	// as one is ready.
	preallocated bool
	// direct writes the active segment with O_DIRECT|O_DSYNC when it is
	// preallocated and the policy is fsync=always (direct.go); nil when
	// writes go through the page cache.
	direct         *directWriter
	noDirectLogged bool
	lastMaint      time.Time
	lastBatch      int           // records in the last batch written
	lastWrite      time.Duration // how long writing it took
	maintErr       error         // a segment could not be deleted: delete no more
	// skipped are the damaged regions that recovery found between good
	// records of each segment, which compaction steps over; damage is
	// every region it found (Damage).
	skipped map[uint32][]damagedSpan
	damage  []Damage
	space   room // the disk's free space and the reserve (room.go)

	// savedWaited, when set (tests), runs after a Save waited for a queued
	// record of its id and before it decides.
	savedWaited func()

	wake chan struct{}
	stop chan struct{}
	done chan struct{}
}

// queued is a record waiting in a batch.
type queued struct {
	b *batch
	i int
}

// batch is the callers whose records one write of the writer carries.
type batch struct {
	done chan struct{}
	n    int   // records in the batch
	ok   int   // records [0, ok) are on disk and applied
	err  error // why the others failed
	// errs, when not nil, is the outcome of each record instead of ok and
	// err: some were refused for want of room (writeBatch).
	errs []error
}

// result is the outcome of record i: nil when it is on disk and applied.
func (b *batch) result(i int) error {
	if b.errs != nil {
		return b.errs[i]
	}
	if i >= b.ok {
		return b.err
	}
	return nil
}

func newBatch() *batch { return &batch{done: make(chan struct{})} }

var _ storage.Store = (*Store)(nil)

// Open opens (creating if needed) the store in opts.Dir, rebuilds its index
// from the segments, and logs what recovery did: one line, and one more
// for each damaged region it skipped or cut off. A segment missing from
// the middle of the log is an error unless opts.AcceptMissingSegments.
func Open(opts Options, log *zap.Logger) (*Store, error) {
	if log == nil {
		log = zap.NewNop()
	}
	if opts.SegmentSize <= 0 || opts.CompactRatio < 0 || opts.CompactRatio > 1 || (opts.Sync == SyncInterval && opts.Every <= 0) || opts.Reserve < 0 {
		return nil, fmt.Errorf("file store: invalid options %+v", opts)
	}
	if err := os.MkdirAll(opts.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("file store: %w", err)
	}
	lock, err := lockDir(opts.Dir)
	if err != nil {
		return nil, fmt.Errorf("file store: %w", err)
	}
	s := &Store{
		opts: opts, log: log, Now: time.Now, lockFile: lock,
		idx: newIndex(), pending: make(map[msgID]queued), saving: make(map[msgID][]byte), batch: newBatch(),
		segs: make(map[uint32]*segment), space: newRoom(opts.Dir, opts.reserve()),
		wake: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{}),
	}
	os.Remove(filepath.Join(opts.Dir, spareName)) // left by a run that stopped
	removeTrash(opts.Dir, log)
	if opts.Sync != SyncNever {
		s.prep = newPreparer(opts.Dir, opts.SegmentSize, opts.reserve())
	}
	if err := s.recover(); err != nil {
		if s.prep != nil {
			s.prep.close()
		}
		s.closeFiles()
		return nil, fmt.Errorf("file store: %s: %w", opts.Dir, err)
	}
	s.remover = newRemover(log)
	if s.prep != nil && !s.preallocated {
		s.requestSpare()
	}
	go s.run()
	return s, nil
}

// roll closes the active segment for writing and starts the next one: the
// spare that the preparer made, or a new empty file.
func (s *Store) roll() error {
	next := uint32(1)
	if n := len(s.segIDs); n > 0 {
		next = s.segIDs[n-1] + 1
	}
	if s.active != nil {
		// The zeros after the last record are of no use in a closed segment.
		// What the segment holds must be durable before the log goes on: a
		// failure here is one the store cannot take back.
		if err := s.active.f.Truncate(s.activeSize); err != nil {
			s.fail(fmt.Errorf("truncate %s: %w", s.active.f.Name(), err))
			return err
		}
		s.preallocated = false // its room is gone, should the roll fail (heldRoom)
		if s.dirty || s.prep != nil {
			if err := s.active.f.Sync(); err != nil {
				s.fail(fmt.Errorf("fsync %s: %w", s.active.f.Name(), err))
				return err
			}
			s.dirty = false
		}
	}
	path := segmentPath(s.opts.Dir, next)
	var seg *segment
	if s.prep != nil {
		spare, err := s.prep.take()
		if err != nil {
			s.log.Warn("file store: no preallocated segment", zap.Error(err))
		}
		if spare != "" {
			if err := os.Rename(spare, path); err != nil {
				return err
			}
			if seg, err = openSegment(s.opts.Dir, next, false); err != nil {
				os.Remove(path)
				return err
			}
		}
	}
	s.preallocated = seg != nil
	if seg == nil {
		var err error
		if seg, err = openSegment(s.opts.Dir, next, true); err != nil {
			return err
		}
	}
	if err := syncDir(s.opts.Dir); err != nil {
		seg.f.Close()
		os.Remove(path) // the next roll creates it again
		return err
	}
	s.segMu.Lock()
	s.segs[next] = seg
	s.segMu.Unlock()
	s.mu.Lock()
	s.idx.seg(next)
	s.mu.Unlock()
	s.segIDs = append(s.segIDs, next)
	if s.direct != nil {
		s.direct.close()
		s.direct = nil
	}
	return s.setActive(seg, 0) // a new segment: nothing to sync, no error
}

// setActive makes seg, whose log ends at size, the segment that writes
// append to, written directly when it can be. Direct I/O is only faster:
// when the segment cannot be opened for it, writes go through the page
// cache.
func (s *Store) setActive(seg *segment, size int64) error {
	s.active, s.activeSize, s.handedOff = seg, size, size
	if s.opts.Sync != SyncAlways || !s.preallocated || s.opts.SegmentSize%directBlock != 0 {
		return nil
	}
	if size > 0 {
		// A direct write makes only its own blocks durable. Records that an
		// earlier run left in the page cache (with fsync=never, or killed
		// before its fsync) must reach the disk first: were they lost, the
		// log would end before the records written after them.
		if err := syscall.Fdatasync(int(seg.f.Fd())); err != nil {
			return fmt.Errorf("fsync %s: %w", seg.f.Name(), err)
		}
	}
	d, err := openDirect(seg, size)
	switch {
	case err != nil:
		s.log.Warn("file store: cannot open the segment for direct I/O; writes go through the page cache and fsync",
			zap.String("segment", seg.f.Name()), zap.Error(err))
	case d == nil && !s.noDirectLogged:
		s.noDirectLogged = true
		s.log.Info("file store: the file system refuses direct I/O; writes go through the page cache and fsync",
			zap.String("dir", s.opts.Dir))
	}
	s.direct = d
	return nil
}

// enqueueLocked queues r for the writer, framed as enc (appendRecord;
// nil: encode it here), and returns the batch to wait for and the
// record's place in it. The caller holds s.mu.
func (s *Store) enqueueLocked(r *record, enc []byte) (*batch, int) {
	s.q.add(r, enc)
	b := s.batch
	i := b.n
	b.n++
	if s.gatherTarget == 0 || b.n >= s.gatherTarget {
		select {
		case s.wake <- struct{}{}:
		default:
		}
	}
	return b, i
}

// wait blocks until the writer has dealt with record i of b.
func (s *Store) wait(ctx context.Context, op string, b *batch, i int) error {
	select {
	case <-b.done:
	case <-ctx.Done():
		// The record is queued and will be written; the caller only stops
		// waiting for it.
		return fmt.Errorf("file store: %s: %w", op, ctx.Err())
	}
	if err := b.result(i); err != nil {
		return fmt.Errorf("file store: %s: %w", op, err)
	}
	return nil
}

// writable reports why the store takes no writes now, if it does not.
func (s *Store) writableLocked(op string) error {
	switch {
	case s.closed:
		return fmt.Errorf("file store: %s: %w", op, storage.ErrClosed)
	case s.failed != nil:
		return fmt.Errorf("file store: %s: refusing writes after a failure: %w", op, s.failed)
	}
	return nil
}

// run is the writer goroutine: it takes what callers queued, writes it in
// one go, fsyncs as the policy says, applies it to the index, and releases
// the callers; then it reclaims space a little at a time.
func (s *Store) run() {
	defer close(s.done)
	var tick <-chan time.Time
	if s.opts.Sync == SyncInterval {
		t := time.NewTicker(s.opts.Every)
		defer t.Stop()
		tick = t.C
	}
	// Space is reclaimed after writes, and now and then when there are
	// none: finishing messages is a write too, but a store that was just
	// opened may hold finished segments.
	idle := time.NewTicker(time.Second)
	defer idle.Stop()
	for {
		select {
		case <-s.wake:
		case <-tick:
			s.syncIfDirty()
			continue
		case <-idle.C:
			s.maintain()
			continue
		case <-s.stop:
			s.flush()
			s.syncIfDirty()
			return
		}
		s.gather()
		s.flush()
		s.maintain()
	}
}

// queued is the number of records waiting for the writer.
func (s *Store) queued() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.batch.n
}

// gather lets the next batch fill before it is written. The callers that
// the last write released are about to queue their next records; writing
// before they have would split them into two batches and two fsyncs. So
// the writer waits until the queue holds as many records as the last batch
// had, or until as long as the last write took has passed. While records
// keep coming it waits by yielding to the goroutines that can run (the
// callers on their way back) rather than by sleeping: a sleeping writer
// has to be woken by the last caller, which costs about as long as the
// callers take to queue their records. When none has come for
// gatherSpin, it sleeps until the batch is full or the time is up.
// With the other policies a write costs no fsync and the callers do not
// wait for one: the writer only yields a few times while the batch grows
// (protocol.Gather), which saves write calls under load and delays nobody
// when idle.
func (s *Store) gather() {
	if s.opts.Sync != SyncAlways {
		protocol.Gather(s.queued)
		return
	}
	if s.lastBatch <= 1 {
		return
	}
	s.mu.Lock()
	n := s.batch.n
	if n >= s.lastBatch {
		s.mu.Unlock()
		return
	}
	s.gatherTarget = s.lastBatch // callers wake the writer only when it is full
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.gatherTarget = 0
		s.mu.Unlock()
	}()
	start := time.Now()
	deadline := start.Add(min(s.lastWrite, maxGather))
	for now, progress := start, start; now.Before(deadline) && now.Sub(progress) < gatherSpin; now = time.Now() {
		runtime.Gosched()
		s.mu.Lock()
		m := s.batch.n
		s.mu.Unlock()
		if m >= s.lastBatch {
			return
		}
		if m > n {
			n, progress = m, now
		}
	}
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	for {
		select {
		case <-s.wake:
		case <-t.C:
			return
		case <-s.stop:
			return
		}
		s.mu.Lock()
		full := s.batch.n >= s.lastBatch
		s.mu.Unlock()
		if full {
			return
		}
	}
}

// gatherSpin is how long gather yields without a new record before it
// sleeps instead.
const gatherSpin = 20 * time.Microsecond

// maxGather bounds the wait of gather.
const maxGather = time.Millisecond

// flush writes and applies what is queued.
func (s *Store) flush() {
	s.mu.Lock()
	w, b := s.q, s.batch
	s.q, s.batch = s.spare, newBatch()
	failed := s.failed
	s.mu.Unlock()
	if b.n == 0 {
		s.spare = w
		return
	}
	start := time.Now()
	if failed != nil {
		// Queued before the failure: nothing more goes to the log.
		b.ok, b.err = 0, fmt.Errorf("refusing writes after a failure: %w", failed)
	} else {
		s.writeBatch(&w, b)
	}
	s.lastBatch, s.lastWrite = b.n, time.Since(start)
	s.mu.Lock()
	for i := range w.recs {
		if q, ok := s.pending[w.recs[i].id]; ok && q.b == b {
			delete(s.pending, w.recs[i].id)
			delete(s.saving, w.recs[i].id)
		}
	}
	s.mu.Unlock()
	close(b.done)
	w.reset()
	s.spare = w
}

// write appends the queued records to the log, rolling segments as
// needed, makes them as durable as the policy says, and applies them to
// the index. It returns how many records made it, and why the rest failed.
func (s *Store) write(w *writeQueue) (int, error) {
	recs, sizes := w.recs, w.sizes
	positions := w.positions[:0]
	written, off := 0, 0
	synced := 0 // records made durable by a roll
	rollFailed := false
	var err error
	if s.prep != nil && !s.preallocated && s.activeSize > 0 && s.prep.ready() {
		if err := s.roll(); err != nil {
			return 0, fmt.Errorf("start segment: %w", err)
		}
	}
	for written < len(recs) {
		// The run of records that fit in the active segment; a record
		// larger than a segment gets a segment of its own.
		n, end := 0, written
		// A run never leaves 1 to 7 bytes: too few for a record header,
		// they would read as a torn record at the next open.
		for end < len(recs) {
			if e := s.activeSize + int64(n) + int64(sizes[end]); e != s.opts.SegmentSize &&
				e > s.opts.SegmentSize-recordHeaderLen && s.activeSize+int64(n) != 0 {
				break
			}
			n += int(sizes[end])
			end++
		}
		if end == written {
			if err = s.roll(); err != nil {
				err = fmt.Errorf("start segment: %w", err)
				rollFailed = true
				break
			}
			synced = written
			continue
		}
		if s.direct != nil {
			err = s.direct.writeAt(w.buf[off:off+n], s.activeSize)
			if errors.Is(err, syscall.EINVAL) {
				// The device refuses this direct write (an alignment it
				// needs): nothing was written. Write through the page cache.
				s.log.Warn("file store: a direct write was refused; writes go through the page cache and fsync",
					zap.String("segment", s.active.f.Name()), zap.Error(err))
				s.direct.close()
				s.direct, err = nil, nil
			} else if err != nil {
				err = s.undoDirectWrite(err, n)
				break
			}
		}
		if s.direct == nil {
			if _, err = s.active.f.WriteAt(w.buf[off:off+n], s.activeSize); err != nil {
				err = s.undoWrite(err)
				break
			}
			s.dirty = true
			s.handOff(s.activeSize + int64(n))
		}
		s.grew(int64(n))
		for i := written; i < end; i++ {
			positions = append(positions, pos{seg: s.active.id, off: uint32(s.activeSize), size: sizes[i]})
			s.activeSize += int64(sizes[i])
		}
		off += n
		written = end
		if s.prep != nil && s.activeSize > s.opts.SegmentSize/2 {
			s.requestSpare() // the next segment, ready before it is needed
		}
	}
	w.positions = positions
	if rollFailed && s.opts.Sync == SyncAlways && s.dirty {
		// The roll failed before it fsynced what this batch wrote since
		// the last good roll, and the store has stopped taking writes.
		// (When it failed later, at the next segment, those records are
		// on disk: they count, and the callers are told so.)
		written = synced
	}
	if written > synced && s.opts.Sync == SyncAlways && s.dirty {
		if serr := s.active.f.Sync(); serr != nil {
			// After a failed fsync the kernel may have dropped the dirty
			// pages: nothing written since the last good fsync can be
			// trusted, and the store stops taking writes.
			s.fail(fmt.Errorf("fsync %s: %w", s.active.f.Name(), serr))
			written, err = synced, serr
		} else {
			s.dirty = false
		}
	}
	s.mu.Lock()
	for i := range written {
		s.idx.seg(positions[i].seg).size = int64(positions[i].off) + int64(positions[i].size)
		s.idx.apply(&recs[i], positions[i])
	}
	s.mu.Unlock()
	if written < len(recs) && err == nil {
		err = errors.New("not written")
	}
	return written, err
}

// writeQueue is records encoded for one write, with what applying each
// needs.
type writeQueue struct {
	buf       []byte
	recs      []record // payload fields cleared: the index keeps none
	sizes     []uint32
	positions []pos // scratch of write
}

func (w *writeQueue) add(r *record, enc []byte) {
	before := len(w.buf)
	if enc != nil {
		w.buf = append(w.buf, enc...)
	} else {
		w.buf = appendRecord(w.buf, r)
	}
	w.sizes = append(w.sizes, uint32(len(w.buf)-before))
	w.recs = append(w.recs, *r)
	last := &w.recs[len(w.recs)-1]
	last.header, last.body, last.succ, last.fail, last.failCounts, last.failDue = nil, nil, nil, nil, nil, nil
	last.digest = nil
}

func (w *writeQueue) len() int { return len(w.recs) }

func (w *writeQueue) reset() {
	if cap(w.buf) > 8<<20 {
		w.buf = nil // do not keep a burst's buffer forever
	}
	w.buf = w.buf[:0]
	clear(w.recs)
	w.recs = w.recs[:0]
	w.sizes = w.sizes[:0]
}

// undoWrite cuts the active segment back after a failed write, so that
// the log ends with the last good record and the store can write again
// once the disk has room. When even that fails, the store stops taking
// writes.
func (s *Store) undoWrite(werr error) error {
	if terr := s.active.f.Truncate(s.activeSize); terr != nil {
		s.fail(fmt.Errorf("append to the log: %v; then truncate: %w", werr, terr))
	}
	return fmt.Errorf("append to the log: %w", werr)
}

// undoDirectWrite deals with a failed direct write of n bytes at the end
// of the log. The write may have reached the disk in part, and its error
// may be the failure of the sync that O_DSYNC makes: unless it says the
// disk is full, the store stops taking writes, as after a failed fsync.
// When it does, the bytes written are zeroed, so that no record of a
// refused write can reappear at the next open.
func (s *Store) undoDirectWrite(werr error, n int) error {
	if !noRoom(werr) {
		s.fail(fmt.Errorf("write %s: %w", s.active.f.Name(), werr))
	} else if zerr := s.direct.zero(s.activeSize, n); zerr != nil {
		s.fail(fmt.Errorf("append to the log: %v; then zero the failed write: %w", werr, zerr))
	}
	return fmt.Errorf("append to the log: %w", werr)
}

func (s *Store) fail(err error) {
	s.mu.Lock()
	if s.failed == nil {
		s.failed = err
	}
	s.mu.Unlock()
	s.log.Error("file store refuses writes from now on", zap.Error(err))
}

// writebackChunk is how much the page-cache policies (fsync=interval and
// never) let a segment gather before they start its writeback.
const writebackChunk = 1 << 20

// handOff starts the writeback of the active segment up to end once a
// chunk has gathered, without waiting for it. With fsync=never nothing
// else did until the segment rolled, and then its fsync wrote the whole
// segment while every save waited: a stall of tens of milliseconds every
// 64 MiB. The fsync=always policy syncs every write anyway.
func (s *Store) handOff(end int64) {
	if s.opts.Sync == SyncAlways || end-s.handedOff < writebackChunk {
		return
	}
	const syncFileRangeWrite = 0x2 // SYNC_FILE_RANGE_WRITE: start writeback, do not wait
	// Advisory: an error here shows again at the fsync that counts.
	syscall.SyncFileRange(int(s.active.f.Fd()), s.handedOff, end-s.handedOff, syncFileRangeWrite)
	s.handedOff = end
}

func (s *Store) syncIfDirty() {
	if !s.dirty {
		return
	}
	if err := s.active.f.Sync(); err != nil {
		s.fail(fmt.Errorf("fsync %s: %w", s.active.f.Name(), err))
		return
	}
	s.dirty = false
}

// Close flushes what is queued, fsyncs, and releases the directory. Later
// calls return storage.ErrClosed.
func (s *Store) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return fmt.Errorf("file store: close: %w", storage.ErrClosed)
	}
	s.closed = true
	s.mu.Unlock()
	close(s.stop)
	<-s.done
	s.remover.close()
	if s.direct != nil {
		s.direct.close()
	}
	if s.prep != nil {
		s.prep.close()
	}
	s.mu.Lock()
	err := s.failed
	s.mu.Unlock()
	if cerr := s.closeFiles(); err == nil {
		err = cerr
	}
	return err
}

func (s *Store) closeFiles() error {
	var err error
	s.segMu.Lock()
	for _, seg := range s.segs {
		if cerr := seg.f.Close(); err == nil {
			err = cerr
		}
	}
	s.segs = nil
	s.segMu.Unlock()
	s.lockFile.Close() // releases the flock
	return err
}

// now returns the store's clock in milliseconds.
func (s *Store) nowMillis() int64 { return s.Now().UnixMilli() }

func notFound(op, id string) error {
	return fmt.Errorf("file store: %s %s: %w", op, id, storage.ErrNotFound)
}

// encPool holds the buffers Save frames records in.
var encPool = sync.Pool{New: func() any { return new([]byte) }}

// Save stores a new message with its Digest. An id that exists (live or
// dead-lettered) changes nothing: Save reports false, and an error
// wrapping storage.ErrConflict when the two Digests are known and differ.
func (s *Store) Save(ctx context.Context, m *storage.Message) (bool, error) {
	if m == nil || m.Header == nil {
		return false, fmt.Errorf("file store: save: %w: no header", storage.ErrInvalid)
	}
	id, ok := parseID(m.ID())
	if !ok {
		return false, fmt.Errorf("file store: save: %w: message id %q", storage.ErrInvalid, m.ID())
	}
	if err := storage.CheckFailState(m.FailGroups, m.FailCounts, m.FailDue); err != nil {
		return false, fmt.Errorf("file store: save %s: %w", m.ID(), err)
	}
	if err := ctx.Err(); err != nil {
		return false, fmt.Errorf("file store: save: %w", err)
	}
	st := state(0)
	if m.Committed {
		st = flagCommitted
	}
	r, err := saveRecord(id, m, st, "", 0)
	if err != nil {
		return false, err
	}
	if n := len(r.header) + len(r.body) + len(r.digest); n > maxRecordLen-128 {
		return false, fmt.Errorf("file store: save: %w: message of %d bytes, over the %d-byte record limit",
			storage.ErrInvalid, n, maxRecordLen-128)
	}
	// Framed and checksummed before the lock is taken: the lock is what
	// concurrent savers queue on.
	encp := encPool.Get().(*[]byte)
	enc := appendRecord((*encp)[:0], r)
	defer func() {
		if cap(enc) <= 64<<10 {
			*encp = enc
			encPool.Put(encp)
		}
	}()

	for {
		s.mu.Lock()
		if err := s.writableLocked("save"); err != nil {
			s.mu.Unlock()
			return false, err
		}
		if e, exists := s.idx.entries[id]; exists {
			return false, s.duplicateUnlock(e, m)
		}
		if other, queuedAlready := s.pending[id]; queuedAlready {
			// The same id is being saved (or was just finished). A save of
			// it that succeeded decides ours: the index may no longer hold
			// that message (delivered, acknowledged and deleted meanwhile),
			// and storing ours would deliver it twice. After a finish, or a
			// save that failed, the index decides.
			digest, save := s.saving[id]
			s.mu.Unlock()
			err := s.wait(ctx, "save "+m.ID(), other.b, other.i)
			if err != nil && ctx.Err() != nil {
				return false, err
			}
			if s.savedWaited != nil {
				s.savedWaited()
			}
			if err == nil && save {
				return false, duplicateOf(digest, m)
			}
			continue
		}
		b, i := s.enqueueLocked(r, enc)
		s.pending[id] = queued{b, i}
		// Cloned: a caller that stops waiting may reuse m.
		s.saving[id] = bytes.Clone(m.Digest)
		s.mu.Unlock()
		if err := s.wait(ctx, "save "+m.ID(), b, i); err != nil {
			return false, err
		}
		return true, nil
	}
}

// duplicateUnlock is Save's answer for m, whose id the index holds as e:
// nil for a retry of the same publish (equal Digests, or either unknown),
// ErrConflict for another message. The caller holds mu, which is released.
//
// The stored Digest is read from e's recSave, as Get reads it, rather than
// kept in the index: 16 bytes more per entry would add a tenth to what
// every pending message costs in memory (BenchmarkIndexMemory, ~170 B),
// for a compare that only a retried or reused id needs.
func (s *Store) duplicateUnlock(e entry, m *storage.Message) error {
	if len(m.Digest) == 0 {
		s.mu.Unlock()
		return nil
	}
	s.segMu.RLock() // lock order: mu, then segMu; the segment stays while held
	s.mu.Unlock()
	r, err := s.readRecord(e.save)
	s.segMu.RUnlock()
	if err != nil {
		return fmt.Errorf("file store: save %s: read the stored message to compare: %w", m.ID(), err)
	}
	return duplicateOf(r.digest, m)
}

// duplicateOf is Save's answer for m when a message of its id with the
// Digest stored is held: nil when the Digests are equal or either is
// unknown, else ErrConflict.
func duplicateOf(stored []byte, m *storage.Message) error {
	if len(stored) == 0 || len(m.Digest) == 0 || bytes.Equal(stored, m.Digest) {
		return nil
	}
	// No digest in the error: it may reach the producer that reused the id.
	return fmt.Errorf("file store: save %s: %w", m.ID(), storage.ErrConflict)
}

// change validates a state change of id under the lock and queues its
// record; decide returns the record to write, nil for nothing to do, or an
// error.
func (s *Store) change(ctx context.Context, op, idStr string, decide func(e entry, ok bool) (*record, error)) error {
	id, valid := parseID(idStr)
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("file store: %s: %w", op, err)
	}
	for {
		s.mu.Lock()
		if err := s.writableLocked(op); err != nil {
			s.mu.Unlock()
			return err
		}
		var e entry
		ok := false
		if valid {
			if other, busy := s.pending[id]; busy {
				// A record of this id is queued and not applied yet: decide
				// on the state after it, not before.
				s.mu.Unlock()
				if err := s.wait(ctx, op+" "+idStr, other.b, other.i); err != nil && ctx.Err() != nil {
					return err
				}
				continue
			}
			e, ok = s.idx.entries[id]
		}
		r, err := decide(e, ok)
		if err != nil || r == nil {
			s.mu.Unlock()
			return err
		}
		r.id = id
		b, i := s.enqueueLocked(r, nil)
		s.pending[id] = queued{b, i}
		s.mu.Unlock()
		return s.wait(ctx, op+" "+idStr, b, i)
	}
}

// Commit marks an uncommitted message committed and due now.
func (s *Store) Commit(ctx context.Context, id string) error {
	return s.change(ctx, "commit", id, func(e entry, ok bool) (*record, error) {
		switch {
		case !ok || e.state.dead():
			return nil, notFound("commit", id)
		case e.state.committed():
			return nil, nil
		}
		return &record{kind: recCommit, next: s.nowMillis()}, nil
	})
}

// Rollback deletes an uncommitted message; a missing one succeeds.
func (s *Store) Rollback(ctx context.Context, id string) error {
	return s.change(ctx, "rollback", id, func(e entry, ok bool) (*record, error) {
		switch {
		case !ok || e.state.dead():
			return nil, nil
		case e.state.committed():
			return nil, fmt.Errorf("file store: rollback %s: %w (committed)", id, storage.ErrDecided)
		}
		return &record{kind: recRollback}, nil
	})
}

// RecordDelivery stores the outcome of a delivery round.
func (s *Store) RecordDelivery(ctx context.Context, d storage.DeliveryResult) error {
	if err := storage.CheckFailState(d.FailGroups, d.FailCounts, d.FailDue); err != nil {
		return fmt.Errorf("file store: record delivery %s: %w", d.MessageID, err)
	}
	return s.change(ctx, "record delivery", d.MessageID, func(e entry, ok bool) (*record, error) {
		if !ok || e.state.dead() {
			return nil, notFound("record delivery", d.MessageID)
		}
		return &record{kind: recDelivery, count: d.DeliverCount, next: toMillis(d.NextDeliverTime),
			succ: d.SuccGroups, fail: d.FailGroups, failCounts: d.FailCounts, failDue: toMillisAll(d.FailDue)}, nil
	})
}

// Delete removes a finished message; a missing one succeeds, a dead
// letter stays.
func (s *Store) Delete(ctx context.Context, id string) error {
	return s.change(ctx, "delete", id, func(e entry, ok bool) (*record, error) {
		if !ok || e.state.dead() {
			return nil, nil
		}
		return &record{kind: recDelete}, nil
	})
}

// DeadLetter moves a live message to the dead-letter queue.
func (s *Store) DeadLetter(ctx context.Context, id string, reason string) error {
	return s.change(ctx, "dead-letter", id, func(e entry, ok bool) (*record, error) {
		if !ok || e.state.dead() {
			return nil, notFound("dead-letter", id)
		}
		return &record{kind: recDead, reason: reason, at: s.nowMillis()}, nil
	})
}

// Redeliver puts a dead letter back for delivery: committed, due now,
// its count reset, the groups that acknowledged it kept.
func (s *Store) Redeliver(ctx context.Context, id string) error {
	return s.change(ctx, "redeliver", id, func(e entry, ok bool) (*record, error) {
		if !ok || !e.state.dead() {
			return nil, notFound("redeliver", id)
		}
		s.segMu.RLock() // lock order: mu, then segMu
		m, err := s.load(e)
		s.segMu.RUnlock()
		if err != nil {
			return nil, err
		}
		return &record{kind: recRedeliver, next: s.nowMillis(), succ: m.SuccGroups}, nil
	})
}

// Get returns a copy of the live message with that id.
func (s *Store) Get(ctx context.Context, idStr string) (*storage.Message, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("file store: get: %w", err)
	}
	id, ok := parseID(idStr)
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, fmt.Errorf("file store: get: %w", storage.ErrClosed)
	}
	e, found := s.idx.entries[id]
	if !ok || !found || e.state.dead() {
		s.mu.Unlock()
		return nil, notFound("get", idStr)
	}
	s.segMu.RLock()
	s.mu.Unlock()
	defer s.segMu.RUnlock()
	return s.load(e)
}

// Due pages through due messages in (NextDeliverTime, id) order.
func (s *Store) Due(ctx context.Context, q storage.DueQuery) ([]*storage.Message, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("file store: due: %w", err)
	}
	limit := q.Limit
	if limit <= 0 {
		limit = 100
	}
	tree := 0
	if q.Kind == storage.DueTxCheck {
		tree = 1
	}
	before := toMillis(q.Before)
	after := dueKey{next: toMillis(q.After.Time)}
	if q.After.IsZero() {
		after.next = math.MinInt64 // the beginning, before 1970 too
	}
	// Start at the cursor's time and skip the keys at that time whose id is
	// not above the cursor's: ids order as their hex strings do, and a
	// cursor id need not be a message id. A cursor between two milliseconds
	// is after every key of the earlier one.
	afterID := q.After.ID
	if !q.After.Time.IsZero() && q.After.Time.After(time.UnixMilli(after.next)) {
		after.next++
		afterID = ""
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, fmt.Errorf("file store: due: %w", storage.ErrClosed)
	}
	var es []entry
	s.idx.due[tree].AscendAfter(after, true, func(k dueKey) bool {
		if k.next > before || len(es) == limit {
			return false
		}
		if afterID != "" && k.next == after.next && k.id.String() <= afterID {
			return true
		}
		es = append(es, s.idx.entries[k.id])
		return true
	})
	s.segMu.RLock()
	s.mu.Unlock()
	defer s.segMu.RUnlock()
	out := make([]*storage.Message, 0, len(es))
	w := newPageWindows(es)
	for _, e := range es {
		m, err := s.loadFrom(w, e)
		if err != nil {
			return nil, err
		}
		out = append(out, m)
	}
	return out, nil
}

// DeadLetters pages through the dead-letter queue in id order.
func (s *Store) DeadLetters(ctx context.Context, afterID string, limit int) ([]*storage.DeadLetter, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("file store: dead letters: %w", err)
	}
	if limit <= 0 {
		limit = 100
	}
	// Seek to the first id whose hex is above afterID, which need not be a
	// message id: ids order as their hex strings do.
	var from msgID
	if afterID != "" {
		padded := []byte(afterID)
		if len(padded) > protocol.MessageIdLen {
			padded = padded[:protocol.MessageIdLen]
		}
		for len(padded) < protocol.MessageIdLen {
			padded = append(padded, '0')
		}
		for i, c := range padded {
			if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
				// Past the hex alphabet: no id at this prefix is larger.
				if c > 'f' {
					for j := i; j < len(padded); j++ {
						padded[j] = 'f'
					}
				} else {
					for j := i; j < len(padded); j++ {
						padded[j] = '0'
					}
				}
				break
			}
		}
		from, _ = parseID(string(padded))
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, fmt.Errorf("file store: dead letters: %w", storage.ErrClosed)
	}
	type dead struct {
		e    entry
		info deadInfo
	}
	var ds []dead
	s.idx.deadIDs.AscendAfter(from, true, func(id msgID) bool {
		if len(ds) == limit {
			return false
		}
		if afterID != "" && id.String() <= afterID {
			return true
		}
		ds = append(ds, dead{s.idx.entries[id], s.idx.dead[id]})
		return true
	})
	s.segMu.RLock()
	s.mu.Unlock()
	defer s.segMu.RUnlock()
	out := make([]*storage.DeadLetter, 0, len(ds))
	es := make([]entry, len(ds))
	for i, d := range ds {
		es[i] = d.e
	}
	w := newPageWindows(es)
	for _, d := range ds {
		m, err := s.loadFrom(w, d.e)
		if err != nil {
			return nil, err
		}
		out = append(out, &storage.DeadLetter{Message: m, Reason: d.info.reason, At: fromMillis(d.info.at)})
	}
	return out, nil
}

// readRecord reads the record at p. The caller holds segMu for reading.
func (s *Store) readRecord(p pos) (*record, error) {
	return s.readRecordFrom(nil, p)
}

// readRecordFrom reads the record at p, through w when w is not nil. The
// caller holds segMu for reading.
func (s *Store) readRecordFrom(w *readWindow, p pos) (*record, error) {
	seg := s.segs[p.seg]
	if seg == nil {
		return nil, fmt.Errorf("file store: segment %d is gone", p.seg)
	}
	buf := make([]byte, p.size)
	if err := w.readAt(seg, buf, p); err != nil {
		return nil, fmt.Errorf("file store: read %s at %d: %w", seg.f.Name(), p.off, err)
	}
	n, crc, err := parseRecordHeader(buf)
	if err == nil && n != len(buf)-recordHeaderLen {
		err = fmt.Errorf("%w: length %d where %d was written", errCorrupt, n, len(buf)-recordHeaderLen)
	}
	var r *record
	if err == nil {
		r, err = decodeRecord(buf[recordHeaderLen:], crc)
	}
	if err != nil {
		return nil, fmt.Errorf("file store: %s at %d: %w", seg.f.Name(), p.off, err)
	}
	return r, nil
}

// readWindow serves the reads of a page of messages from one larger read
// of the segment at a time. A page's records often lie close together (a
// message's save, and the delivery record written when it waited, in the
// order they came), so a page costs a few reads rather than one or two a
// message: draining a backlog spent a tenth of its time in pread calls.
// A read goes no further than the page's last record in that segment
// (ends): never over what the writer may be writing (with direct I/O a
// buffered read there could leave stale pages behind), and no more than
// the page needs. The records are copied out of the window, which no
// message keeps.
type readWindow struct {
	ends map[uint32]int64 // the end of the page's last record in each segment
	seg  uint32
	off  int64
	buf  []byte
}

// readWindowSize is the most one read of a window takes.
const readWindowSize = 256 << 10

// pageWindows are the windows of one page: saves and delivery records
// each have their own, as a message's delivery record may lie far from
// its save.
type pageWindows struct{ saves, deliveries readWindow }

// newPageWindows returns the windows for a page of entries; the caller
// took them from the index under mu.
func newPageWindows(es []entry) *pageWindows {
	ends := make(map[uint32]int64)
	note := func(p pos) {
		if p.size > 0 {
			ends[p.seg] = max(ends[p.seg], int64(p.off)+int64(p.size))
		}
	}
	for _, e := range es {
		note(e.save)
		note(e.delivery)
	}
	return &pageWindows{saves: readWindow{ends: ends}, deliveries: readWindow{ends: ends}}
}

// readAt fills dst with the bytes of seg at p, from w's window (read
// anew when it does not hold them), or directly when w is nil.
func (w *readWindow) readAt(seg *segment, dst []byte, p pos) error {
	off, end := int64(p.off), int64(p.off)+int64(len(dst))
	if w == nil || len(dst) > readWindowSize/2 || w.ends[p.seg] < end {
		_, err := seg.f.ReadAt(dst, off)
		return err
	}
	if w.buf == nil || w.seg != p.seg || off < w.off || end > w.off+int64(len(w.buf)) {
		if cap(w.buf) < readWindowSize {
			w.buf = make([]byte, readWindowSize)
		}
		n, err := seg.f.ReadAt(w.buf[:min(readWindowSize, w.ends[p.seg]-off)], off)
		if n < len(dst) {
			w.buf = w.buf[:0]
			if err == nil {
				err = io.ErrUnexpectedEOF
			}
			return err
		}
		w.seg, w.off, w.buf = p.seg, off, w.buf[:n]
	}
	copy(dst, w.buf[off-w.off:])
	return nil
}

// load rebuilds the message of e from its records. The caller holds segMu
// for reading.
func (s *Store) load(e entry) (*storage.Message, error) {
	return s.loadFrom(nil, e)
}

// loadFrom is load, reading through the windows of a page (nil: none).
func (s *Store) loadFrom(w *pageWindows, e entry) (*storage.Message, error) {
	var saves, deliveries *readWindow
	if w != nil {
		saves, deliveries = &w.saves, &w.deliveries
	}
	sr, err := s.readRecordFrom(saves, e.save)
	if err != nil {
		return nil, err
	}
	m, err := sr.message()
	if err != nil {
		return nil, err
	}
	m.Committed = e.state.committed()
	if m.Committed {
		m.Header.Commit = new(true)
	}
	m.DeliverCount = e.count
	m.NextDeliverTime = fromMillis(e.next)
	if e.delivery.size > 0 {
		dr, err := s.readRecordFrom(deliveries, e.delivery)
		if err != nil {
			return nil, err
		}
		m.SuccGroups, m.FailGroups, m.FailCounts, m.FailDue = dr.succ, dr.fail, dr.failCounts, fromMillisAll(dr.failDue)
	}
	return m, nil
}
