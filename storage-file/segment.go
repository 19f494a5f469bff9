package filestore

import (
	"bufio"
	"errors"
	"fmt"
	"io"
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
	bad     error // why reading stopped before size, if it did
	// zeroTail: the bytes from end to size are zeros, the unused part of a
	// preallocated segment.
	zeroTail bool
}

// scan reads every record of seg in order and calls fn with each. It stops
// at the first record that is torn or corrupt and reports where.
func scan(seg *segment, fn func(r *record, p pos)) (scanResult, error) {
	st, err := seg.f.Stat()
	if err != nil {
		return scanResult{}, err
	}
	res := scanResult{size: st.Size()}
	br := bufio.NewReaderSize(io.NewSectionReader(seg.f, 0, res.size), 1<<20)
	var hdr [recordHeaderLen]byte
	var payload []byte
	for res.end < res.size {
		if _, err := io.ReadFull(br, hdr[:]); err != nil {
			res.bad = fmt.Errorf("torn record header: %w", err)
			return res, nil
		}
		n, crc, err := parseRecordHeader(hdr[:])
		if err != nil {
			// Zeros from here to the end are the unused part of a
			// preallocated segment: the log ends cleanly here.
			if hdr == ([recordHeaderLen]byte{}) {
				if zero, zerr := allZero(seg.f, res.end, res.size); zerr != nil {
					return res, zerr
				} else if zero {
					res.zeroTail = true
					return res, nil
				}
			}
			res.bad = err
			return res, nil
		}
		if res.end+recordHeaderLen+int64(n) > res.size {
			res.bad = fmt.Errorf("torn record: %d bytes announced, %d left", n, res.size-res.end-recordHeaderLen)
			return res, nil
		}
		if cap(payload) < n {
			payload = make([]byte, n)
		}
		payload = payload[:n]
		if _, err := io.ReadFull(br, payload); err != nil {
			return res, err
		}
		r, err := decodeRecord(payload, crc)
		if err != nil {
			res.bad = err
			return res, nil
		}
		size := recordHeaderLen + n
		fn(r, pos{seg: seg.id, off: uint32(res.end), size: uint32(size)})
		res.records++
		res.end += int64(size)
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
