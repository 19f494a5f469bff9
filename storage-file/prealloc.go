package filestore

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// With fsync=always or interval, segments are preallocated: written full of
// zeros and fsynced before they are used. An fsync after appending to a file
// must also commit the file's new size and blocks to the file system's
// journal; an fsync after overwriting blocks that already exist writes only
// the data. On the disks KiteQ was measured on that halves the cost of a
// group commit of a few dozen records.
//
// A background goroutine keeps one spare segment ready under spareName; a
// roll renames it into place. When the spare is not ready in time the roll
// creates a plain file and appends to it, as with fsync=never.

const spareName = "spare.tmp"

// preparer makes spare segments off the writer's path.
type preparer struct {
	dir     string
	size    int64
	reserve int64         // the room saves leave (room.go): a spare does not take it either
	req     chan struct{} // make a spare
	done    chan error    // the spare is ready, or why not
	busy    bool          // a spare is being made
	have    bool          // a spare is ready
	err     error         // why the last spare could not be made
	// finished counts the spares made or given up, as ready saw them:
	// each changed the free space (room.go reads it again).
	finished int
	quit     chan struct{}
	exit     chan struct{}
}

func newPreparer(dir string, size, reserve int64) *preparer {
	p := &preparer{dir: dir, size: size, reserve: reserve, req: make(chan struct{}, 1), done: make(chan error, 1),
		quit: make(chan struct{}), exit: make(chan struct{})}
	go p.run()
	return p
}

func (p *preparer) path() string { return filepath.Join(p.dir, spareName) }

func (p *preparer) run() {
	defer close(p.exit)
	for {
		select {
		case <-p.quit:
			return
		case <-p.req:
			p.done <- p.make()
		}
	}
}

// make writes the spare: zeros, fsynced, so that its blocks exist on disk.
// The zeros go straight to the disk (O_DIRECT) where the file system
// allows it: through the page cache they would cost as much CPU as the
// log's own writes.
func (p *preparer) make() error {
	// Never take the room that appends need: a spare is made only when
	// the disk has room for it, for one more segment and for the reserve.
	free, err := statfs(p.dir)
	if err != nil {
		return err
	}
	if free < 2*p.size+p.reserve {
		return p.tooFew(free)
	}
	f, err := os.OpenFile(p.path(), os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	err = writeZeros(f, p.size)
	if serr := f.Sync(); err == nil {
		err = serr
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(p.path())
	}
	return err
}

func (p *preparer) tooFew(free int64) error {
	return fmt.Errorf("%d bytes free, too few for a spare segment of %d beside one more and the reserve of %d", free, p.size, p.reserve)
}

// writeZeros fills the empty file f with size zeros: the whole blocks
// directly when the file system allows it, the rest through f.
func writeZeros(f *os.File, size int64) error {
	const chunk = 1 << 20
	zeros := alignedZeros(chunk)
	fill := func(w *os.File, from, to int64) error {
		for off := from; off < to; off += chunk {
			if _, err := w.WriteAt(zeros[:min(chunk, to-off)], off); err != nil {
				return err
			}
		}
		return nil
	}
	aligned := int64(0)
	if d, err := openForDirectIO(f.Name(), os.O_WRONLY); err == nil {
		aligned = size / directBlock * directBlock
		err := fill(d, 0, aligned)
		if cerr := d.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
	}
	return fill(f, aligned, size)
}

// request starts making a spare unless one is ready or being made, or
// the disk, with free bytes free now, has no room for it (make).
func (p *preparer) request(free int64) {
	if p.busy || p.have {
		return
	}
	if free < 2*p.size+p.reserve {
		p.err = p.tooFew(free)
		return
	}
	p.busy = true
	p.req <- struct{}{}
}

// ready reports whether a spare can be taken now.
func (p *preparer) ready() bool {
	if p.busy {
		select {
		case err := <-p.done:
			p.busy, p.finished = false, p.finished+1
			p.have = err == nil
			p.err = err
		default:
		}
	}
	return p.have
}

// take returns the path of a ready spare, or "" when none is ready now.
func (p *preparer) take() (string, error) {
	if !p.ready() {
		err := p.err
		p.err = nil
		if err != nil {
			return "", fmt.Errorf("prepare a segment: %w", err)
		}
		return "", nil
	}
	p.have = false
	return p.path(), nil
}

func (p *preparer) close() {
	close(p.quit)
	<-p.exit
	os.Remove(p.path())
}

// allZero reports whether the bytes of f from off to its end are all zero:
// the unused tail of a preallocated segment.
func allZero(f *os.File, off, size int64) (bool, error) {
	buf := make([]byte, 1<<20)
	zero := make([]byte, len(buf))
	for off < size {
		n, err := f.ReadAt(buf[:min(int64(len(buf)), size-off)], off)
		if n > 0 && !bytes.Equal(buf[:n], zero[:n]) {
			return false, nil
		}
		off += int64(n)
		if err == io.EOF {
			break
		}
		if err != nil {
			return false, err
		}
	}
	return true, nil
}
