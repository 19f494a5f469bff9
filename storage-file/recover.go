package filestore

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"go.uber.org/zap"
)

// Recovery reads every segment frame by frame. A frame that is torn or
// corrupt costs only itself: reading resynchronises on the next good frame
// after it, the damaged bytes are copied to quarantine/ and reported, and
// the segment stays as it is. Only the end of the active segment is ever
// cut off, and only when no good frame follows the damage there: it is
// where an append torn by a crash lies, and where the next append goes.

// Damage is a region of the log that the store could not read when it
// opened.
type Damage struct {
	Segment string // the segment file
	Offset  int64
	Length  int64
	// ProbableID and ProbableKind are read from where the first damaged
	// record keeps its kind and message id, so they are unverified; empty
	// when the region is too short, the kind byte is no record's or the
	// id's bytes are zeros.
	ProbableID   string
	ProbableKind string
	// Cut: the region ended the active segment and was cut off (an append
	// torn by a crash, or its last records damaged). Otherwise the bytes
	// stay in their segment and are skipped at every open.
	Cut bool
	// Quarantine is the copy of the bytes, "" when none could be made.
	Quarantine string
	Reason     string
}

// Damage returns what the store skipped or cut off when it opened, so
// that an operator (or the broker's admin API) can see it after the log
// line has scrolled away.
func (s *Store) Damage() []Damage { return slices.Clone(s.damage) }

// The messages of the per-region log lines.
const (
	logSkipped = "file store: skipped a damaged region of the log"
	logCut     = "file store: cut a torn or damaged end off the active segment"
	logMissing = "file store: started without missing segments (accept-missing-segments=true)"
)

// quarantineDir, in the store's directory, holds a copy of every damaged
// region, named <segment>.<offset>.bad.
const quarantineDir = "quarantine"

// recover replays every segment into the index, skipping what cannot be
// read, and opens the last segment for appending.
func (s *Store) recover() error {
	start := time.Now()
	s.skipped = make(map[uint32][]damagedSpan)
	ids, err := listSegments(s.opts.Dir)
	if err != nil {
		return err
	}
	if ids, err = s.fillMissing(ids); err != nil {
		return err
	}
	records := 0
	var truncated []zap.Field
	var bytes int64
	lastZeroTail := false
	for i, id := range ids {
		seg, err := openSegment(s.opts.Dir, id, false)
		if err != nil {
			return err
		}
		s.segs[id] = seg
		s.segIDs = append(s.segIDs, id)
		active := i == len(ids)-1
		res, err := scan(seg, active, s.idx.apply)
		if err != nil {
			return fmt.Errorf("read %s: %w", seg.f.Name(), err)
		}
		records += res.records
		lastZeroTail = res.zeroTail
		for j, d := range res.damaged {
			last := res.tail && j == len(res.damaged)-1
			if !last {
				// Compaction walks the segment's records: not these bytes.
				s.skipped[id] = append(s.skipped[id], d)
			}
			s.damage = append(s.damage, s.quarantine(seg, d, active && last))
		}
		if active && res.tail {
			// The next append goes at the end of the last good record: never
			// after unreadable bytes, which the next open would take for
			// damage in the middle of the segment.
			if err := seg.f.Truncate(res.end); err != nil {
				return fmt.Errorf("truncate %s: %w", seg.f.Name(), err)
			}
			if err := seg.f.Sync(); err != nil {
				return fmt.Errorf("sync %s: %w", seg.f.Name(), err)
			}
			truncated = append(truncated, zap.String(fmt.Sprintf("truncated_%010d", id),
				fmt.Sprintf("%d bytes at offset %d: %v", res.size-res.end, res.end, res.damaged[len(res.damaged)-1].why)))
		}
		if res.zeroTail && !active {
			// A closed segment keeps no preallocated tail (a crash came
			// between the roll and its truncation).
			if err := seg.f.Truncate(res.end); err != nil {
				return fmt.Errorf("truncate %s: %w", seg.f.Name(), err)
			}
		}
		s.idx.seg(id).size = res.end
		bytes += res.end
	}
	if len(s.segIDs) == 0 {
		if err := s.roll(); err != nil {
			return err
		}
	} else {
		last := s.segIDs[len(s.segIDs)-1]
		s.preallocated = lastZeroTail
		if err := s.setActive(s.segs[last], s.idx.seg(last).size); err != nil {
			return err
		}
	}
	var damagedBytes int64
	for _, d := range s.damage {
		damagedBytes += d.Length
		s.logDamage(d)
	}
	fields := []zap.Field{
		zap.String("dir", s.opts.Dir), zap.Stringer("fsync", s.opts.Sync), zap.Int("segments", len(s.segIDs)),
		zap.Int64("bytes", bytes), zap.Int("records", records), zap.Int("live", s.idx.live),
		zap.Int("deadLetters", len(s.idx.dead)), zap.Duration("took", time.Since(start)),
	}
	if len(s.damage) > 0 {
		fields = append(fields, zap.Int("damagedRegions", len(s.damage)), zap.Int64("damagedBytes", damagedBytes))
		s.log.Warn("file store opened after repairing torn or corrupt records", append(fields, truncated...)...)
	} else {
		s.log.Info("file store opened", fields...)
	}
	return nil
}

// quarantine copies the bytes of d to the quarantine directory (a copy an
// earlier open made is kept) and describes them.
func (s *Store) quarantine(seg *segment, d damagedSpan, cut bool) Damage {
	dm := Damage{Segment: seg.f.Name(), Offset: d.off, Length: d.end - d.off, Cut: cut, Reason: d.why.Error()}
	if dm.Length >= minFrame {
		var b [recordPrefixLen]byte
		_, err := seg.f.ReadAt(b[:], d.off+recordHeaderLen)
		if k := recordKind(b[0]); err == nil && k >= recSave && k <= recRedeliver && [16]byte(b[1:]) != ([16]byte{}) {
			var id msgID
			copy(id[:], b[1:])
			dm.ProbableID, dm.ProbableKind = id.String(), recordKind(b[0]).String()
		}
	}
	qdir := filepath.Join(s.opts.Dir, quarantineDir)
	name := filepath.Join(qdir, fmt.Sprintf("%s.%d.bad", filepath.Base(seg.f.Name()), d.off))
	if st, err := os.Stat(name); err == nil && st.Size() == dm.Length {
		dm.Quarantine = name
		return dm
	}
	// A copy never takes the room the log needs (its reserve, and a
	// segment): without one the bytes stay in their segment, unless cut.
	if free, err := statfs(s.opts.Dir); err == nil && free < dm.Length+s.opts.reserve()+s.opts.SegmentSize {
		dm.Reason += fmt.Sprintf("; no copy in %s: %d bytes free, too few beside the reserve", qdir, free)
		return dm
	}
	if err := copyDurably(name, io.NewSectionReader(seg.f, d.off, dm.Length)); err != nil {
		dm.Reason += fmt.Sprintf("; no copy in %s: %v", qdir, err)
		return dm
	}
	dm.Quarantine = name
	return dm
}

// copyDurably writes what r holds to the file name, which is whole on disk
// when it exists.
func copyDurably(name string, r io.Reader) error {
	dir := filepath.Dir(name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	tmp := name + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	_, err = io.Copy(f, r)
	if serr := f.Sync(); err == nil {
		err = serr
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, name)
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	return syncDir(dir)
}

// logDamage writes the one line that reports a damaged region, with what
// losing its record probably did, judged from the index after recovery.
func (s *Store) logDamage(d Damage) {
	msg := logSkipped
	if d.Cut {
		msg = logCut
	}
	fields := []zap.Field{zap.String("segment", d.Segment), zap.Int64("offset", d.Offset), zap.Int64("length", d.Length)}
	if d.ProbableID != "" {
		fields = append(fields, zap.String("probableId", d.ProbableID), zap.String("probableKind", d.ProbableKind),
			zap.String("likelyEffect", s.likelyEffect(d)))
	}
	if d.Quarantine != "" {
		fields = append(fields, zap.String("quarantine", d.Quarantine))
	}
	s.log.Warn(msg, append(fields, zap.String("reason", d.Reason))...)
}

// likelyEffect says what the loss of a record of d's probable kind and id
// does, given what the index holds of that id now. A lost rollback or
// commit leaves the message undecided, so the broker asks its producer
// group again, and only that group's answer delivers it (no other record
// of the log can: a commit after a rollback is never written).
func (s *Store) likelyEffect(d Damage) string {
	id, _ := parseID(d.ProbableID)
	e, held := s.idx.entries[id]
	switch {
	case d.ProbableKind == recSave.String() && !held:
		return "that message is lost"
	case d.ProbableKind == recSave.String():
		return "another copy of that message was kept"
	case !held:
		return "none: no message of that id is held"
	case e.state.dead() && d.ProbableKind == recRedeliver.String():
		return "the message stays in the dead-letter queue"
	case e.state.dead():
		return "the message is in the dead-letter queue"
	case !e.state.committed():
		return "the transaction is undecided: its producer group is asked to commit or roll it back"
	case d.ProbableKind == recDelivery.String():
		return "an older delivery state: groups that received the message may receive it again"
	}
	return "the message is delivered again"
}

// fillMissing checks that the segment numbers are consecutive, as roll
// makes them: dropOldest deletes only the oldest, one at a time and
// durably before the next, so a gap is never a deletion of the store's
// own. A gap is an error, unless the options accept the loss: then the
// missing files are made empty, so the log is whole again and the next
// open does not stop.
func (s *Store) fillMissing(ids []uint32) ([]uint32, error) {
	var missing []string
	n := 0
	for i := 1; i < len(ids); i++ {
		gap := int(ids[i] - ids[i-1] - 1)
		for k := 0; k < gap && len(missing) < 10; k++ {
			missing = append(missing, filepath.Base(segmentPath(s.opts.Dir, ids[i-1]+1+uint32(k))))
		}
		n += gap
	}
	if n == 0 {
		return ids, nil
	}
	list := strings.Join(missing, ", ")
	if n > len(missing) {
		list += fmt.Sprintf(" and %d more", n-len(missing))
	}
	span := fmt.Sprintf("%s to %s", filepath.Base(segmentPath(s.opts.Dir, ids[0])), filepath.Base(segmentPath(s.opts.Dir, ids[len(ids)-1])))
	if !s.opts.AcceptMissingSegments {
		return nil, fmt.Errorf("segment files are missing from the middle of the log (%s; segments are only deleted from its start): %s. "+
			"The messages and state changes they held are lost, and messages they finished would be delivered again. "+
			"Restore the files from a backup; or, to start without them and accept that loss, "+
			"open the store once with accept-missing-segments=true in its URI (-db=file://…?accept-missing-segments=true)", span, list)
	}
	if n > maxMissingSegments {
		return nil, fmt.Errorf("%d segment files are missing from the middle of the log (%s): more than the %d that accept-missing-segments fills in; is %s a stray file?",
			n, span, maxMissingSegments, filepath.Base(segmentPath(s.opts.Dir, ids[len(ids)-1])))
	}
	var all []uint32
	for i, id := range ids {
		if i > 0 {
			for m := ids[i-1] + 1; m < id; m++ {
				f, err := os.OpenFile(segmentPath(s.opts.Dir, m), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
				if err != nil {
					return nil, fmt.Errorf("make the missing segment empty: %w", err)
				}
				f.Close()
				all = append(all, m)
			}
		}
		all = append(all, id)
	}
	if err := syncDir(s.opts.Dir); err != nil {
		return nil, fmt.Errorf("make the missing segments empty: sync %s: %w", s.opts.Dir, err)
	}
	s.log.Warn(logMissing, zap.String("dir", s.opts.Dir), zap.Int("missing", n), zap.String("segments", list),
		zap.String("effect", "the messages and state changes they held are lost; they are empty files now"))
	return all, nil
}

// maxMissingSegments bounds the gap that accept-missing-segments fills
// with empty files: a larger one is more likely a stray file name.
const maxMissingSegments = 100_000

// segReader reads a segment at open through a window of it.
type segReader struct {
	f      *os.File
	size   int64
	win    []byte // bytes of the file from winOff
	winOff int64
	big    []byte // a payload too large for the window
}

const scanWindow = 1 << 20

// minPayload is a record's kind and message id, the shortest payload;
// minFrame is the shortest record.
const (
	minPayload = 1 + 16
	minFrame   = recordHeaderLen + minPayload
)

// at returns the n bytes of the file at off, which the caller has checked
// lie within it. The slice is good until the next call.
func (r *segReader) at(off int64, n int) ([]byte, error) {
	if off >= r.winOff && off+int64(n) <= r.winOff+int64(len(r.win)) {
		i := off - r.winOff
		return r.win[i : i+int64(n)], nil
	}
	if n > scanWindow/2 {
		if cap(r.big) < n {
			r.big = make([]byte, n)
		}
		b := r.big[:n]
		if k, err := r.f.ReadAt(b, off); k < n {
			return nil, fmt.Errorf("read %s at %d: %w", r.f.Name(), off, err)
		}
		return b, nil
	}
	if r.win == nil {
		r.win = make([]byte, scanWindow)
	}
	m := min(int64(cap(r.win)), r.size-off)
	k, err := r.f.ReadAt(r.win[:m], off)
	if int64(k) < m {
		r.win = r.win[:0]
		if err == nil {
			err = io.ErrUnexpectedEOF
		}
		return nil, fmt.Errorf("read %s at %d: %w", r.f.Name(), off, err)
	}
	r.win, r.winOff = r.win[:m], off
	return r.win[:n], nil
}

// frameAt reads the record at off: its length plausible and within the
// file, its checksum and structure right. Damage is reported wrapping
// errCorrupt; any other error is one of reading.
func (r *segReader) frameAt(off int64) (*record, int, error) {
	if r.size-off < recordHeaderLen {
		return nil, 0, fmt.Errorf("%w: torn record header: %d bytes", errCorrupt, r.size-off)
	}
	h, err := r.at(off, recordHeaderLen)
	if err != nil {
		return nil, 0, err
	}
	n, crc, err := parseRecordHeader(h)
	if err != nil {
		return nil, 0, err
	}
	if off+recordHeaderLen+int64(n) > r.size {
		return nil, 0, fmt.Errorf("%w: torn record: %d bytes announced, %d left", errCorrupt, n, r.size-off-recordHeaderLen)
	}
	p, err := r.at(off+recordHeaderLen, n)
	if err != nil {
		return nil, 0, err
	}
	rec, err := decodeRecord(p, crc)
	if err != nil {
		return nil, 0, err
	}
	return rec, recordHeaderLen + n, nil
}

// goodFrameAt reports whether a good record starts at c: the cheap tests
// of its header first, then its structure, then its checksum.
func (r *segReader) goodFrameAt(c int64) (bool, error) {
	if r.size-c < minFrame {
		return false, nil
	}
	h, err := r.at(c, recordHeaderLen+1)
	if err != nil {
		return false, err
	}
	n := int64(binary.LittleEndian.Uint32(h))
	crc := binary.LittleEndian.Uint32(h[4:])
	if !plausibleFrame(recordKind(h[8]), n) || c+recordHeaderLen+n > r.size {
		return false, nil
	}
	// Random bytes often frame as a record many megabytes long: the
	// lengths of its fields rule most of them out before its payload is
	// read whole.
	if ok, err := r.fieldsFit(c+recordHeaderLen, n); !ok || err != nil {
		return false, err
	}
	p, err := r.at(c+recordHeaderLen, int(n))
	if err != nil {
		return false, err
	}
	if _, err := decodePayload(p); err != nil {
		return false, nil
	}
	return crc32.Checksum(p, crcTable) == crc, nil
}

// fieldsFit reports whether the n-byte payload at off has the fields of a
// record of its kind (decodePayload's), ending exactly at its end. It
// reads the fields' lengths where they lie, not the bytes they cover.
func (r *segReader) fieldsFit(off, n int64) (bool, error) {
	q := fieldReader{r: r, at: off, end: off + n}
	kind := recordKind(q.byte())
	q.skip(16)
	switch kind {
	case recSave:
		if st := state(q.byte()); st&^(flagCommitted|flagDead) != 0 {
			return false, nil
		}
		q.byte() // cmd
		q.varint()
		q.varint()
		q.strings()
		q.strings()
		q.bytes() // reason
		q.varint()
		q.bytes() // header
		q.bytes() // body
		q.failState()
		if q.at < q.end {
			q.bytes() // digest
		}
	case recCommit:
		q.varint()
	case recRollback, recDelete:
	case recDelivery, recRedeliver:
		q.varint()
		q.varint()
		q.strings()
		q.strings()
		q.failState()
	case recDead:
		q.bytes()
		q.varint()
	default:
		return false, nil
	}
	return q.err == nil && !q.bad && q.at == q.end, q.err
}

// fieldReader walks the fields of a payload in a segment; the first
// failure sticks.
type fieldReader struct {
	r       *segReader
	at, end int64
	bad     bool
	err     error
	tiny    [binary.MaxVarintLen64]byte
}

// peek returns up to a varint's bytes at q.at, fewer at the payload's end.
func (q *fieldReader) peek() []byte {
	k := min(int64(len(q.tiny)), q.end-q.at)
	r := q.r
	if q.at >= r.winOff && q.at+k <= r.winOff+int64(len(r.win)) {
		return r.win[q.at-r.winOff : q.at-r.winOff+k]
	}
	b := q.tiny[:k]
	if m, err := r.f.ReadAt(b, q.at); int64(m) < k {
		q.err = fmt.Errorf("read %s at %d: %w", r.f.Name(), q.at, err)
		q.bad = true
	}
	return b
}

func (q *fieldReader) skip(n int64) {
	if n < 0 || n > q.end-q.at {
		q.bad = true
	}
	if !q.bad {
		q.at += n
	}
}

func (q *fieldReader) byte() byte {
	if q.bad || q.at >= q.end {
		q.bad = true
		return 0
	}
	c := q.peek()[0]
	q.skip(1)
	return c
}

// varint reads a varint's bytes (a uvarint's too) and returns them as a
// uvarint.
func (q *fieldReader) varint() uint64 {
	if q.bad {
		return 0
	}
	v, k := binary.Uvarint(q.peek())
	if k <= 0 {
		q.bad = true
		return 0
	}
	q.skip(int64(k))
	return v
}

func (q *fieldReader) bytes() {
	if n := q.varint(); n > uint64(q.end-q.at) {
		q.bad = true
	} else {
		q.skip(int64(n))
	}
}

func (q *fieldReader) strings() {
	n := q.varint()
	if n > uint64(q.end-q.at) {
		q.bad = true
	}
	for i := uint64(0); i < n && !q.bad; i++ {
		q.bytes()
	}
}

// failState walks decoder.failState's two optional lists of varints.
func (q *fieldReader) failState() {
	for range 2 {
		if q.bad || q.at == q.end {
			return
		}
		n := q.varint()
		if n > uint64(q.end-q.at) {
			q.bad = true
		}
		for i := uint64(0); i < n && !q.bad; i++ {
			q.varint()
		}
	}
}

// plausibleFrame: a record of kind may have a payload of n bytes.
func plausibleFrame(kind recordKind, n int64) bool {
	switch kind {
	case recRollback, recDelete:
		return n == minPayload
	case recCommit:
		return n > minPayload && n <= minPayload+binary.MaxVarintLen64
	case recSave, recDelivery, recRedeliver, recDead:
		return n > minPayload && n <= maxRecordLen
	}
	return false
}

// damageEnd finds where the damage that begins at off ends: at the next
// good record (found), or, when none follows, where the bytes that are
// not zeros end.
//
// A message body is a client's bytes and can hold bytes that frame as
// records, so a frame inside the damaged record is never taken for the
// next record on its own, in any segment: bit rot hits closed segments
// too. The damaged record ends, in this order of evidence:
//   - where its header says, when its payload has a record's fields over
//     that length and a good record, the end of the file or zeros follow
//     (its content alone is damaged);
//   - where its own checksum proves it ends, over a payload with a
//     record's fields (its length field alone is damaged);
//   - where its header says, when a good record, the end of the file or
//     zeros follow there;
//   - else (more than one field damaged, or bytes that are no header) at
//     the first good record at or after that end, or before it when a
//     chain of good records from there reaches it. When the header's
//     length overruns the file or is none, the chain must reach the end
//     of the data; in the active segment such a header is the start of an
//     append torn by a crash, whose body is all that follows it, and only
//     the checksum ends it.
func (r *segReader) damageEnd(off int64, active bool) (int64, bool, error) {
	var n int64
	var crc uint32
	if r.size-off >= recordHeaderLen {
		h, err := r.at(off, recordHeaderLen)
		if err != nil {
			return 0, false, err
		}
		n, crc = int64(binary.LittleEndian.Uint32(h)), binary.LittleEndian.Uint32(h[4:])
	}
	plausible := n >= minPayload && n <= maxRecordLen
	claimedEnd := off + recordHeaderLen + n
	within := plausible && claimedEnd <= r.size
	if within {
		fit, err := r.fieldsFit(off+recordHeaderLen, n)
		if err != nil {
			return 0, false, err
		}
		if fit {
			if claimedEnd == r.size {
				return claimedEnd, false, nil
			}
			ok, err := r.goodFrameAt(claimedEnd)
			if err != nil {
				return 0, false, err
			}
			if ok {
				return claimedEnd, true, nil
			}
			zero, err := allZero(r.f, claimedEnd, r.size)
			if err != nil {
				return 0, false, err
			}
			if zero {
				return claimedEnd, false, nil
			}
		}
	}

	// The checksum proves an end c when it matches the first c-off bytes
	// after the header; it is summed on as the candidates grow.
	proofLast := min(r.size, off+recordHeaderLen+maxRecordLen)
	sum, summed := uint32(0), off+recordHeaderLen
	proves := func(c int64) (bool, error) {
		if c-off < minFrame || c < summed || c > proofLast {
			return false, nil
		}
		for summed < c {
			k := min(c-summed, scanWindow/2)
			p, err := r.at(summed, int(k))
			if err != nil {
				return false, err
			}
			sum = crc32.Update(sum, crcTable, p)
			summed += k
		}
		if sum != crc {
			return false, nil
		}
		return r.fieldsFit(off+recordHeaderLen, c-off-recordHeaderLen)
	}
	if r.size-off >= recordHeaderLen {
		next, err := r.nextFrame(off+minFrame, proofLast, proves)
		if err != nil || next >= 0 {
			return next, err == nil, err
		}
	}
	dataEnd, err := r.dataEnd(off)
	if err != nil {
		return 0, false, err
	}
	// No good record follows the proven end: the damage ends the data
	// (a record's last bytes may be zeros, so the proof looks into them).
	for c := max(dataEnd, off+minFrame); c <= min(proofLast, dataEnd+maxZeroProof); c++ {
		if ok, err := proves(c); err != nil || ok {
			return dataEnd, false, err
		}
	}
	if ok, err := proves(r.size); err != nil || ok {
		return dataEnd, false, err
	}

	if within {
		if claimedEnd == r.size || claimedEnd >= dataEnd {
			return claimedEnd, false, nil
		}
		ok, err := r.goodFrameAt(claimedEnd)
		if err != nil || ok {
			return claimedEnd, err == nil, err
		}
	} else if active && plausible {
		return dataEnd, false, nil
	}
	// A chain of good frames from c reaches the claimed end, or the end of
	// the data when there is none; the frames of a chain that fell short
	// are not tried again.
	target := claimedEnd
	if !within {
		target = dataEnd
	}
	short := make(map[int64]bool)
	accept := func(c int64) (bool, error) {
		if within && c >= claimedEnd {
			return true, nil
		}
		var walked []int64
		for x := c; ; {
			if x >= target {
				return true, nil
			}
			ok, err := r.goodFrameAt(x)
			if err != nil {
				return false, err
			}
			if !ok || short[x] {
				break
			}
			walked = append(walked, x)
			h, err := r.at(x, 4)
			if err != nil {
				return false, err
			}
			x += recordHeaderLen + int64(binary.LittleEndian.Uint32(h))
		}
		for _, x := range walked {
			short[x] = true
		}
		return false, nil
	}
	next, err := r.nextFrame(off+1, r.size, accept)
	if err != nil || next >= 0 {
		return next, err == nil, err
	}
	return dataEnd, false, nil
}

// maxZeroProof bounds how far into the zeros that end a segment the
// checksum of a damaged record is tried.
const maxZeroProof = 64 << 10

// nextFrame returns the offset of the first good frame in [from, limit]
// that accept takes, or -1 when there is none.
func (r *segReader) nextFrame(from, limit int64, accept func(c int64) (bool, error)) (int64, error) {
	const chunk = 64 << 10
	last := min(limit, r.size-minFrame) // the last offset a record fits at
	for c := from; c <= last; {
		// The bytes of the header and kind of every offset in [c, c+k].
		b, err := r.at(c, int(min(chunk, last-c+recordHeaderLen+1)))
		if err != nil {
			return -1, err
		}
		cand := int64(-1)
		i := 0
		for ; i+recordHeaderLen+1 <= len(b); i++ {
			if binary.LittleEndian.Uint64(b[i:]) == 0 {
				i += 4 // no length that is not zero starts in these 5 offsets
				continue
			}
			n := int64(binary.LittleEndian.Uint32(b[i:]))
			if plausibleFrame(recordKind(b[i+recordHeaderLen]), n) && c+int64(i)+recordHeaderLen+n <= r.size {
				cand = c + int64(i)
				break
			}
		}
		if cand < 0 {
			c += int64(i) // every offset before it was looked at, or cannot start a record
			continue
		}
		ok, err := r.goodFrameAt(cand)
		if err == nil && ok {
			ok, err = accept(cand)
		}
		if err != nil {
			return -1, err
		}
		if ok {
			return cand, nil
		}
		c = cand + 1
	}
	return -1, nil
}

// dataEnd returns the offset after the last byte in [off, size) that is
// not zero: what follows it is the unused part of a preallocated segment.
func (r *segReader) dataEnd(off int64) (int64, error) {
	buf := make([]byte, min(scanWindow, r.size-off))
	for end := r.size; end > off; {
		from := max(off, end-int64(len(buf)))
		b := buf[:end-from]
		if k, err := r.f.ReadAt(b, from); k < len(b) {
			return 0, fmt.Errorf("read %s at %d: %w", r.f.Name(), from, err)
		}
		for i := len(b) - 1; i >= 0; i-- {
			if b[i] != 0 {
				return from + int64(i) + 1, nil
			}
		}
		end = from
	}
	return off, nil
}
