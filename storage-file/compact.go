package filestore

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"go.uber.org/zap"
)

// maintainEvery spaces the space checks of a busy writer.
const maintainEvery = 50 * time.Millisecond

// recordPrefixLen is the start of every record's payload: its kind and
// its message id.
const recordPrefixLen = 1 + len(msgID{})

// compactChunk bounds the bytes of the oldest segment looked at in one
// step, so writes wait for compaction only briefly.
const compactChunk = 4 << 20

// maintain reclaims space: it deletes the oldest segments while nothing in
// them is live, and compacts the oldest one a chunk at a time when it is
// mostly finished or when finished data behind it outweighs what is live.
// Only the oldest segment is ever deleted, so a tombstone is never deleted
// before the record it finishes.
func (s *Store) maintain() {
	s.mu.Lock()
	failed := s.failed
	s.mu.Unlock()
	if failed != nil || s.maintErr != nil || time.Since(s.lastMaint) < maintainEvery {
		// After a failure the log may hold a hole that ends it at the
		// next open: nothing may be copied behind it nor deleted.
		return
	}
	s.lastMaint = time.Now()
	for len(s.segIDs) > 1 {
		oldest := s.segIDs[0]
		s.mu.Lock()
		live := s.idx.segs[oldest].live
		liveBytes := s.idx.segs[oldest].liveBytes
		compact := s.needsCompactionLocked(oldest)
		s.mu.Unlock()
		if live == 0 {
			if err := s.dropOldest(); err != nil {
				s.maintErr = err
				s.log.Error("file store stops reclaiming space", zap.Error(err))
				return
			}
			continue
		}
		switch {
		case !compact:
			s.space.compactDebt = 0
		case !s.roomToCompact(liveBytes):
			// Copies that cannot all be made free nothing and take the
			// room that finishing messages needs: wait for room. One
			// under way keeps what it still needs from new messages.
			s.space.compactDebt = 0
			if s.compactAt > 0 {
				s.space.compactDebt = liveBytes
			}
			compact = false
		}
		if compact {
			if err := s.compactStep(oldest); err != nil {
				s.log.Error("file store compaction", zap.Uint32("segment", oldest), zap.Error(err))
			}
		}
		return
	}
}

// needsCompactionLocked: the oldest segment is mostly finished, or the
// finished bytes of the log exceed its live bytes (and two segments).
func (s *Store) needsCompactionLocked(oldest uint32) bool {
	o := s.idx.segs[oldest]
	if float64(o.liveBytes) < s.opts.CompactRatio*float64(o.size) {
		return true
	}
	var size, live int64
	for _, id := range s.segIDs[:len(s.segIDs)-1] {
		st := s.idx.segs[id]
		size += st.size
		live += st.liveBytes
	}
	return size-live > max(live, 2*s.opts.SegmentSize)
}

// dropOldest deletes the oldest segment, which holds nothing live. What
// compaction copied out of it is made durable first.
func (s *Store) dropOldest() error {
	if s.dirty {
		if err := s.active.f.Sync(); err != nil {
			s.fail(fmt.Errorf("fsync %s: %w", s.active.f.Name(), err))
			return err
		}
		s.dirty = false
	}
	oldest := s.segIDs[0]
	s.mu.Lock()
	delete(s.idx.segs, oldest)
	s.mu.Unlock()
	s.segMu.Lock()
	seg := s.segs[oldest]
	delete(s.segs, oldest)
	s.segMu.Unlock()
	s.segIDs = s.segIDs[1:]
	delete(s.skipped, oldest)
	s.compactAt, s.compactVerify = 0, false
	s.space.compactDebt = 0
	seg.f.Close()
	// The segment leaves the log by a rename, which is quick, and the
	// file is removed in the background (s.remover). Removing a segment
	// frees its blocks and drops its pages from the page cache: 20 ms for
	// 64 MiB, a stall of every write behind it. Where the rename fails (a
	// full directory block on a full disk) the file is removed here.
	name, trash := seg.f.Name(), seg.f.Name()+trashSuffix
	renamed := os.Rename(name, trash) == nil
	if !renamed {
		if err := os.Remove(name); err != nil {
			return fmt.Errorf("delete %s: %w", name, err)
		}
	}
	// Durable before the next deletion: were this file to come back after
	// a crash while a newer one did not, its messages would lose their
	// tombstones.
	if err := syncDir(s.opts.Dir); err != nil {
		return fmt.Errorf("sync %s: %w", s.opts.Dir, err)
	}
	if renamed {
		s.remover.remove(trash)
	}
	s.log.Debug("segment deleted", zap.Uint32("segment", oldest))
	return nil
}

// trashSuffix names a segment that left the log and waits to be removed.
const trashSuffix = ".deleted"

// removeTrash removes the deleted segments a run that stopped left
// behind; the log does not read them (listSegments), so a failure is only
// logged.
func removeTrash(dir string, log *zap.Logger) {
	names, err := os.ReadDir(dir)
	if err != nil {
		log.Warn("file store: list deleted segments", zap.Error(err))
		return
	}
	for _, n := range names {
		if strings.HasSuffix(n.Name(), segmentSuffix+trashSuffix) {
			if err := os.Remove(filepath.Join(dir, n.Name())); err != nil {
				log.Warn("file store: remove a deleted segment", zap.Error(err))
			}
		}
	}
}

// remover removes deleted segments one after another, off the writer's
// path: removals at once would contend for the file system.
type remover struct {
	log   *zap.Logger
	files chan string
	done  chan struct{}
}

func newRemover(log *zap.Logger) *remover {
	r := &remover{log: log, files: make(chan string, 64), done: make(chan struct{})}
	go r.run()
	return r
}

func (r *remover) run() {
	defer close(r.done)
	for f := range r.files {
		if err := os.Remove(f); err != nil {
			r.log.Warn("file store: remove a deleted segment (the next open removes it)", zap.Error(err))
		}
	}
}

// remove removes the file in the background; at once when 64 wait.
func (r *remover) remove(f string) {
	select {
	case r.files <- f:
	default:
		if err := os.Remove(f); err != nil {
			r.log.Warn("file store: remove a deleted segment (the next open removes it)", zap.Error(err))
		}
	}
}

// close removes what waits, then returns.
func (r *remover) close() {
	close(r.files)
	<-r.done
}

// compactStep copies the live messages of the next chunk of the oldest
// segment to the head of the log, each as one recSave with its whole
// state. The writer is the only goroutine that applies records, so the
// state read here is still current when the copies are applied.
func (s *Store) compactStep(oldest uint32) error {
	seg := s.segs[oldest] // only the writer deletes segments: no lock needed
	s.mu.Lock()
	size := s.idx.segs[oldest].size
	s.mu.Unlock()
	// The damaged regions that recovery skipped are stepped over, never
	// read as records: a step walks one run of good records at most.
	end := size
	for _, d := range s.skipped[oldest] {
		if d.end <= s.compactAt {
			continue
		}
		if d.off <= s.compactAt {
			s.compactAt = d.end
			continue
		}
		end = d.off
		break
	}
	if s.compactAt >= size {
		// Everything was copied, and applied: the segment is deleted once
		// nothing in it is live. Something live left means the walk missed
		// a save (a record damaged since the store opened, whose length
		// led it astray): walk it again, checking every record.
		s.mu.Lock()
		live := s.idx.segs[oldest].live
		s.mu.Unlock()
		if live > 0 && !s.compactVerify {
			s.log.Error("file store: compaction left live messages in a segment; checking every record of it",
				zap.Uint32("segment", oldest), zap.Int("live", live))
			s.compactAt, s.compactVerify = 0, true
		}
		return nil
	}
	type candidate struct {
		r *record
		p pos
	}
	var cands []candidate
	br := bufio.NewReaderSize(io.NewSectionReader(seg.f, s.compactAt, end-s.compactAt), 256<<10)
	at := s.compactAt
	var hdr [recordHeaderLen]byte
	for at < end && at-s.compactAt < compactChunk {
		if _, err := io.ReadFull(br, hdr[:]); err != nil {
			return fmt.Errorf("read %s at %d: %w", seg.f.Name(), at, err)
		}
		n, crc, err := parseRecordHeader(hdr[:])
		if err != nil {
			return fmt.Errorf("%s at %d: %w", seg.f.Name(), at, err)
		}
		p := pos{seg: oldest, off: uint32(at), size: uint32(recordHeaderLen + n)}
		// Only a save the index still has at this place is copied. The
		// others, most of a segment that is compacted, are skipped unread
		// by their kind and id: decoding them cost compaction steps of
		// 10 ms, which writes waited for.
		prefix, err := br.Peek(min(n, recordPrefixLen))
		if err != nil {
			return fmt.Errorf("read %s at %d: %w", seg.f.Name(), at, err)
		}
		if len(prefix) < recordPrefixLen {
			return fmt.Errorf("%s at %d: %w: %d-byte payload", seg.f.Name(), at, errCorrupt, n)
		}
		var id msgID
		copy(id[:], prefix[1:])
		keep := recordKind(prefix[0]) == recSave
		if keep {
			s.mu.Lock()
			e, ok := s.idx.entries[id]
			s.mu.Unlock()
			keep = ok && e.save == p
		}
		at += int64(p.size)
		if !keep && !s.compactVerify {
			if _, err := br.Discard(n); err != nil {
				return fmt.Errorf("read %s at %d: %w", seg.f.Name(), p.off, err)
			}
			continue
		}
		payload := make([]byte, n)
		if _, err := io.ReadFull(br, payload); err != nil {
			return fmt.Errorf("read %s at %d: %w", seg.f.Name(), p.off, err)
		}
		r, err := decodeRecord(payload, crc)
		if err != nil {
			return fmt.Errorf("%s at %d: %w", seg.f.Name(), p.off, err)
		}
		if keep {
			cands = append(cands, candidate{r, p})
		}
	}

	type live struct {
		r    *record
		e    entry
		info deadInfo
	}
	var lives []live
	s.mu.Lock()
	for _, c := range cands {
		if e, ok := s.idx.entries[c.r.id]; ok && e.save == c.p {
			lives = append(lives, live{c.r, e, s.idx.dead[c.r.id]})
		}
	}
	s.mu.Unlock()

	var w writeQueue
	for _, l := range lives {
		r := *l.r
		r.state, r.count, r.next = l.e.state, l.e.count, l.e.next
		r.reason, r.at = l.info.reason, l.info.at
		if l.e.delivery.size > 0 {
			dr, err := s.readRecord(l.e.delivery)
			if err != nil {
				return err
			}
			r.succ, r.fail, r.failCounts, r.failDue = dr.succ, dr.fail, dr.failCounts, dr.failDue
		}
		w.add(&r, nil)
	}
	if w.len() > 0 {
		if n, err := s.write(&w); err != nil {
			return fmt.Errorf("copy %d of %d live messages: %w", w.len()-n, w.len(), err)
		}
	}
	s.log.Debug("compacted", zap.Uint32("segment", oldest), zap.Int64("from", s.compactAt), zap.Int64("to", at),
		zap.Int("copied", w.len()))
	s.compactAt = at
	s.mu.Lock()
	s.space.compactDebt = s.idx.segs[oldest].liveBytes // what is left to copy: new messages leave room for it
	s.mu.Unlock()
	return nil
}
