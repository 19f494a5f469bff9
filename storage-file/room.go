package filestore

import (
	"fmt"
	"math"
	"slices"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/kiteq/kiteq/storage"
)

// Disk full. The records that finish messages (commit, rollback, delivery
// results, deletes, dead letters) are what gives the disk back: once a
// segment's messages are all finished it is deleted. So the store keeps a
// reserve of room (Options.Reserve) that only they and compaction may use:
// a save, or a Redeliver (which makes a live message again), is refused
// with storage.ErrFull when writing it would leave less room than the
// reserve. A batch that mixes refused saves and state records writes the
// state records. Nothing waits for room: a save is taken again as soon as
// finished segments are deleted or the file system grows.
//
// Room is what the log can write without taking a block it does not hold:
// the file system's free space, plus the unused part of the active segment
// and the whole spare when they were preallocated (their blocks are the
// store's already), less a whole segment while a spare is being made (the
// preparer takes its blocks from the free space). The free space is read
// with statfs every roomRefresh, at every write near the reserve and once
// each spare is made or given up, and in between lowered by what the log
// appends outside preallocated blocks.

// roomRefresh is how often the free space is read far from the reserve;
// tests lengthen it.
var roomRefresh = 100 * time.Millisecond

// statfs reads the free space of the file system at dir; tests replace it.
var statfs = func(dir string) (int64, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return 0, err
	}
	return int64(st.Bavail) * st.Bsize, nil
}

// room is the writer's view of the disk's free space. The writer goroutine
// owns it.
type room struct {
	dir     string
	reserve int64
	free    int64     // at the last statfs, less what the log appended since outside preallocated blocks
	at      time.Time // of the last statfs; zero: read it at the next look
	ok      bool      // the last statfs worked (when not, nothing is refused)
	errLog  time.Time // last statfs error logged
	// short: the last look refused publishes. refused counts them since
	// the last log line, logged at most every roomLogEvery; warned: one
	// was logged and their end was not yet.
	short   bool
	refused int
	logged  time.Time
	warned  bool
	// compactDebt is the live bytes that a compaction under way still has
	// to copy: room that publishes may not take, or it could not finish.
	compactDebt int64
	// spares is the preparer's count of spares made or given up at the
	// last statfs: a spare's blocks leave the free space as it is made,
	// and free does not see it until it is read again.
	spares int
}

const roomLogEvery = 10 * time.Second

func newRoom(dir string, reserve int64) room { return room{dir: dir, reserve: reserve} }

// refresh reads the free space again.
func (r *room) refresh(log *zap.Logger) {
	free, err := statfs(r.dir)
	r.at = time.Now()
	if err != nil {
		r.ok = false
		if time.Since(r.errLog) >= roomLogEvery {
			r.errLog = time.Now()
			log.Warn("file store: cannot read the free space; no save is refused for want of room", zap.String("dir", r.dir), zap.Error(err))
		}
		return
	}
	r.free, r.ok = free, true
}

// heldRoom is the room of the log in blocks it holds already: the rest of
// a preallocated active segment and a spare that is ready; less a segment
// while a spare is being made: the free space was read before it began
// (requestSpare), and the preparer is taking the segment's blocks from it.
func (s *Store) heldRoom() int64 {
	var n int64
	if s.preallocated {
		n += max(0, s.opts.SegmentSize-s.activeSize)
	}
	if s.prep != nil {
		if s.prep.ready() {
			n += s.opts.SegmentSize
		} else if s.prep.busy {
			n -= s.opts.SegmentSize
		}
	}
	return n
}

// requestSpare asks the preparer for the next spare segment. The free
// space is read first, before the preparer takes any of it: until the
// spare is made, heldRoom counts its whole segment as taken, and a
// request the disk has no room for is not made at all.
func (s *Store) requestSpare() {
	if s.prep.ready() || s.prep.busy {
		return
	}
	r := &s.space
	r.refresh(s.log)
	r.spares = s.prep.finished
	free := r.free
	if !r.ok {
		free = math.MaxInt64 // the preparer reads it again, and fails with why
	}
	s.prep.request(free)
}

// roomFor returns the room the log has for a write of need bytes, reading
// the free space again when the last reading is old, a spare was made or
// given up since, or the write comes near the reserve; ok is false when
// the free space cannot be read.
func (s *Store) roomFor(need int64) (room int64, ok bool) {
	r := &s.space
	held := s.heldRoom() // first: it notes a spare just made
	spareDone := s.prep != nil && s.prep.finished != r.spares
	if r.at.IsZero() || spareDone || time.Since(r.at) >= roomRefresh || r.free+held-need < r.reserve+2*s.opts.SegmentSize {
		if s.prep != nil {
			r.spares = s.prep.finished
		}
		r.refresh(s.log)
	}
	return r.free + held, r.ok
}

// grew notes that n bytes were appended at the end of the active segment
// (before activeSize moves past them): what falls outside a preallocated
// segment took free space.
func (s *Store) grew(n int64) {
	from := s.activeSize
	if s.preallocated {
		from = max(from, s.opts.SegmentSize)
	}
	if end := s.activeSize + n; end > from {
		s.space.free -= end - from
	}
}

// publishes reports whether a record of kind k adds a live message: the
// records that are refused first when the disk is short.
func publishes(k recordKind) bool { return k == recSave || k == recRedeliver }

// admit returns, for each record of w, whether it is refused for want of
// room; nil when none is. Records are taken in order: a publish only when
// the room left after it is at least the reserve (and what a compaction
// under way still needs), every other record always (a write that finds
// no room fails, as it would have).
func (s *Store) admit(w *writeQueue) []bool {
	need := int64(len(w.buf))
	room, ok := s.roomFor(need)
	r := &s.space
	if !ok || room-need-r.compactDebt >= r.reserve {
		if r.short && slices.ContainsFunc(w.recs, func(r record) bool { return publishes(r.kind) }) {
			s.roomAgain()
		}
		return nil
	}
	var refused []bool
	taken := false // a publish
	avail := room - r.compactDebt
	for i := range w.recs {
		size := int64(w.sizes[i])
		if publishes(w.recs[i].kind) {
			if avail-size < r.reserve {
				if refused == nil {
					refused = make([]bool, w.len())
				}
				refused[i] = true
				continue
			}
			taken = true
		}
		avail -= size
	}
	if refused == nil {
		if taken {
			s.roomAgain()
		}
		return nil
	}
	s.noteRefused(refused, room)
	return refused
}

// noteRefused counts the publishes refused, and logs it at most every
// roomLogEvery: a disk at the edge may refuse and take them in turns.
func (s *Store) noteRefused(refused []bool, room int64) {
	r := &s.space
	for _, x := range refused {
		if x {
			r.refused++
		}
	}
	r.short = true
	if time.Since(r.logged) < roomLogEvery {
		return
	}
	s.log.Warn("file store: disk full: refusing new messages, keeping the reserve for the records that finish messages",
		zap.String("dir", s.opts.Dir), zap.Int64("roomBytes", room), zap.Int64("reserveBytes", r.reserve),
		zap.Int64("compactionBytes", r.compactDebt), zap.Int("refused", r.refused))
	r.refused, r.logged, r.warned = 0, time.Now(), true
}

// roomAgain notes that publishes are taken again, and logs it once after
// their refusal was logged.
func (s *Store) roomAgain() {
	r := &s.space
	if !r.short {
		return
	}
	r.short = false
	if !r.warned {
		return
	}
	r.warned = false
	s.log.Info("file store: room again: taking new messages", zap.String("dir", s.opts.Dir),
		zap.Int64("freeBytes", r.free), zap.Int("refusedSinceLastLog", r.refused))
}

// fullError is the error of a publish refused for want of room; cause is
// the failed write, if one failed.
func (s *Store) fullError(cause error) error {
	r := &s.space
	room := r.free + s.heldRoom()
	msg := fmt.Sprintf("disk is full: %s free in %s, and the store wants %s free after a new message (reserve=%s, kept for the records that finish messages); it takes new messages again once finished ones free their segments or the disk has room",
		formatSize(max(0, room)), s.opts.Dir, formatSize(r.reserve+r.compactDebt), uriSize(r.reserve))
	if cause != nil {
		return fmt.Errorf("%s: %w: %w", msg, storage.ErrFull, cause)
	}
	return fmt.Errorf("%s: %w", msg, storage.ErrFull)
}

// roomToCompact reports whether a compaction step of the oldest segment,
// whose live bytes are live, may run: only when the room left after
// copying all of them keeps half the reserve for the records that finish
// messages. A compaction stopped halfway holds its copies and frees
// nothing.
func (s *Store) roomToCompact(live int64) bool {
	room, ok := s.roomFor(live)
	return !ok || room-live >= s.space.reserve/2
}

// formatSize writes n bytes for a person: "1 MiB", "820 KiB", "1.5 GiB".
func formatSize(n int64) string {
	for _, u := range []struct {
		name string
		size int64
	}{{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}} {
		if n >= u.size {
			v := float64(n) / float64(u.size)
			if n%u.size == 0 || v >= 100 {
				return fmt.Sprintf("%.0f %s", v, u.name)
			}
			return fmt.Sprintf("%.1f %s", v, u.name)
		}
	}
	return fmt.Sprintf("%d bytes", n)
}

// uriSize writes n as the file:// URI takes it: "64MiB".
func uriSize(n int64) string {
	for _, u := range []struct {
		name string
		size int64
	}{{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}} {
		if n%u.size == 0 {
			return fmt.Sprintf("%d%s", n/u.size, u.name)
		}
	}
	return fmt.Sprint(n)
}

// writeBatch writes the records of b, which w holds, and sets their
// outcome in b. Publishes the disk has no room for are refused and the
// other records written. When a write fails for want of room all the same
// (the file system is shared, and its free space was read before), the
// publishes after the failure are refused and the state records behind
// them are tried again alone: a save that did not fit must not cost the
// records that would give the room back.
func (s *Store) writeBatch(w *writeQueue, b *batch) {
	refused := s.admit(w)
	if refused == nil {
		ok, err := s.write(w)
		if ok == w.len() || !noRoom(err) {
			b.ok, b.err = ok, err
			return
		}
		s.space.at = time.Time{} // read the free space at the next look
		b.errs = make([]error, w.len())
		var retry []int
		for i := ok; i < w.len(); i++ {
			if publishes(w.recs[i].kind) {
				b.errs[i] = s.fullError(err)
			} else {
				retry = append(retry, i)
			}
		}
		if len(retry) == w.len()-ok {
			// Nothing but state records failed: writing them again alone
			// would fail again.
			for _, i := range retry {
				b.errs[i] = err
			}
			return
		}
		s.writeSome(w, retry, b.errs)
		return
	}
	b.errs = make([]error, w.len())
	keep := make([]int, 0, w.len())
	full := s.fullError(nil)
	for i, r := range refused {
		if r {
			b.errs[i] = full
		} else {
			keep = append(keep, i)
		}
	}
	s.writeSome(w, keep, b.errs)
}

// writeSome writes the records of w at the places idx (ascending), in
// order, and sets errs at the places of those that failed.
func (s *Store) writeSome(w *writeQueue, idx []int, errs []error) {
	if len(idx) == 0 {
		return
	}
	var sub writeQueue
	off, next := 0, 0
	for i := range w.recs {
		size := int(w.sizes[i])
		if next < len(idx) && idx[next] == i {
			sub.buf = append(sub.buf, w.buf[off:off+size]...)
			sub.sizes = append(sub.sizes, w.sizes[i])
			sub.recs = append(sub.recs, w.recs[i])
			next++
		}
		off += size
	}
	ok, err := s.write(&sub)
	if ok < len(idx) && noRoom(err) {
		s.space.at = time.Time{}
	}
	for j := ok; j < len(idx); j++ {
		if publishes(sub.recs[j].kind) && noRoom(err) {
			errs[idx[j]] = s.fullError(err)
		} else {
			errs[idx[j]] = err
		}
	}
}
