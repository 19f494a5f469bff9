package filestore

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
)

const segmentSuffix = ".seg"

// segment is one file of the log, named by its number.
type segment struct {
	id uint32
	f  *os.File
}

func segmentPath(dir string, id uint32) string {
	return filepath.Join(dir, fmt.Sprintf("%010d%s", id, segmentSuffix))
}

// listSegments returns the segment numbers in dir, ascending.
func listSegments(dir string) ([]uint32, error) {
	names, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var ids []uint32
	for _, n := range names {
		base, ok := strings.CutSuffix(n.Name(), segmentSuffix)
		if !ok {
			continue
		}
		id, err := strconv.ParseUint(base, 10, 32)
		if err != nil {
			return nil, fmt.Errorf("unexpected file %s in the store directory", n.Name())
		}
		ids = append(ids, uint32(id))
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	return ids, nil
}

func openSegment(dir string, id uint32, create bool) (*segment, error) {
	flags := os.O_RDWR
	if create {
		flags |= os.O_CREATE | os.O_EXCL
	}
	f, err := os.OpenFile(segmentPath(dir, id), flags, 0o644)
	if err != nil {
		return nil, err
	}
	return &segment{id: id, f: f}, nil
}

// scanResult is what reading a segment found.
type scanResult struct {
	records int
	end     int64 // offset after the last good record
	size    int64 // size of the file
	// damaged are the regions that hold no readable record, in log order:
	// each was skipped, and reading went on at the next good record.
	damaged []damagedSpan
	// tail: the last damaged region ends the segment (what follows it, if
	// anything, is zeros): no good record comes after it.
	tail bool
	// zeroTail: the bytes from end to size are zeros, the unused part of a
	// preallocated segment.
	zeroTail bool
}

// damagedSpan is a region of a segment that holds no readable record.
type damagedSpan struct {
	off, end int64
	why      error // what was wrong with the frame at off
}

// scan reads every record of seg in order and calls fn with each. A frame
// that is torn or corrupt is skipped: reading resynchronises on the next
// good record after it (recover.go), so one damaged record costs only
// itself. active says seg is the last segment, the only one a crash can
// have left a torn append in.
func scan(seg *segment, active bool, fn func(r *record, p pos)) (scanResult, error) {
	st, err := seg.f.Stat()
	if err != nil {
		return scanResult{}, err
	}
	res := scanResult{size: st.Size()}
	sr := &segReader{f: seg.f, size: res.size}
	for off := int64(0); off < res.size; {
		r, n, err := sr.frameAt(off)
		if err == nil {
			fn(r, pos{seg: seg.id, off: uint32(off), size: uint32(n)})
			res.records++
			off += int64(n)
			res.end = off
			continue
		}
		if !errors.Is(err, errCorrupt) {
			return res, err
		}
		// Zeros from here to the end are the unused part of a preallocated
		// segment: the log ends cleanly here.
		if zero, zerr := allZero(seg.f, off, res.size); zerr != nil {
			return res, zerr
		} else if zero {
			res.zeroTail = true
			return res, nil
		}
		next, found, rerr := sr.damageEnd(off, active)
		if rerr != nil {
			return res, rerr
		}
		res.damaged = append(res.damaged, damagedSpan{off: off, end: next, why: err})
		if !found {
			res.tail = true
			return res, nil
		}
		off = next
	}
	return res, nil
}

// syncDir makes the creation, renaming or removal of files in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// lockDir takes an exclusive lock on dir/LOCK, so that two processes never
// open one store.
func lockDir(dir string) (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(dir, "LOCK"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("%s is in use by another process (it holds %s)", dir, f.Name())
		}
		return nil, fmt.Errorf("lock %s: %w", f.Name(), err)
	}
	return f, nil
}
