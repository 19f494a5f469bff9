package filestore

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/storage"
)

// The disk-full test: a child process (this test binary, running
// TestDiskFullChild) lowers its file-size limit (RLIMIT_FSIZE) below the
// segment size, so that a write past the limit fails with EFBIG as it
// would with ENOSPC, and saves until Save fails. The parent then opens the
// store without the limit and checks that every acknowledged message is
// there and nothing else.

const (
	diskFullEnv   = "KITEQ_FILESTORE_DISKFULL_CHILD"
	diskFullLimit = 256 << 10
	diskFullBody  = 3000
)

func diskFullOptions(o *Options) {
	o.Sync = SyncAlways
	o.SegmentSize = 1 << 20 // larger than the limit: the limit, not a roll, ends the segment
}

func TestDiskFull(t *testing.T) {
	dir := t.TempDir()
	cmd, stderr := childCommand("TestDiskFullChild", diskFullEnv+"="+dir)
	out, err := cmd.Output()
	t.Logf("child output:\n%s", summarize(out))
	if err != nil {
		t.Fatalf("child: %v\nstderr: %s", err, tail(stderr.Bytes(), 4000))
	}
	acked := make(map[string]bool)
	var failed []string
	done := false
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		switch {
		case len(f) == 2 && f[0] == "ack":
			acked[f[1]] = true
		case len(f) == 2 && f[0] == "failed":
			failed = append(failed, f[1])
		case len(f) == 1 && f[0] == "done":
			done = true
		}
	}
	if !done {
		t.Fatalf("the child did not finish\nstderr: %s", tail(stderr.Bytes(), 4000))
	}
	if len(failed) == 0 {
		t.Fatal("no Save failed under the file-size limit")
	}

	// The child closed the store after a failed write; the log must be
	// clean already: the failed write was cut back, not left torn.
	records := checkSegmentsClean(t, dir)
	if records != len(acked) {
		t.Errorf("the log holds %d records, want %d: one per acknowledged save", records, len(acked))
	}
	s, logs, err := openObserved(dir, diskFullOptions)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	checkRepairLog(t, checkOpenLog(t, logs), nil)
	want := make(map[string]mstate)
	for id := range acked {
		want[id] = mstate{present: true, committed: true, next: diskFullNext, bodyLen: diskFullBody}
	}
	if diffs, _ := checkStore(context.Background(), s, single(want, failed...)); len(diffs) > 0 {
		t.Fatalf("after reopening without the limit:\n%s", strings.Join(diffs, "\n"))
	}
	t.Logf("%d saves acknowledged (some after the limit was raised), %d failed; all acknowledged found, no failed one", len(acked), len(failed))
}

// summarize shortens the child's list of acknowledged ids.
func summarize(out []byte) string {
	var keep []string
	acks := 0
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if strings.HasPrefix(l, "ack ") {
			acks++
			continue
		}
		if acks > 0 {
			keep = append(keep, fmt.Sprintf("(%d acks)", acks))
			acks = 0
		}
		keep = append(keep, l)
	}
	if acks > 0 {
		keep = append(keep, fmt.Sprintf("(%d acks)", acks))
	}
	return strings.Join(keep, "\n")
}

var diskFullNext = time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC).UnixMilli()

// TestDiskFullChild is the child of TestDiskFull; TestMain leaves it out
// of a plain run.
func TestDiskFullChild(t *testing.T) {
	dir := os.Getenv(diskFullEnv)
	var orig syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_FSIZE, &orig); err != nil {
		t.Fatal(err)
	}
	// Past the limit the kernel sends SIGXFSZ, which kills by default;
	// ignored, the write fails with EFBIG instead.
	signal.Ignore(syscall.SIGXFSZ)
	if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &syscall.Rlimit{Cur: diskFullLimit, Max: orig.Max}); err != nil {
		t.Fatal(err)
	}
	o := DefaultOptions(dir)
	diskFullOptions(&o)
	s, err := Open(o, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	var mu sync.Mutex
	acked := []string{}
	save := func() (string, error) {
		id := protocol.MessageId()
		stored, err := s.Save(ctx, faultMessage(id, true, diskFullNext, diskFullBody))
		if err == nil && !stored {
			t.Errorf("save %s: not stored and no error", id)
		}
		mu.Lock()
		defer mu.Unlock()
		if err != nil {
			fmt.Printf("failed %s\n", id)
			return id, err
		}
		acked = append(acked, id)
		fmt.Printf("ack %s\n", id)
		return id, nil
	}
	checkEFBIG := func(err error) {
		if !errors.Is(err, syscall.EFBIG) {
			t.Errorf("a save past the limit failed with %v: want an error that wraps EFBIG", err)
		}
	}

	// Phase 1: four savers at once, so that failing writes carry batches
	// of several records; they stop at the first failure.
	var stop atomic.Bool
	var wg sync.WaitGroup
	var firstErr atomic.Value
	for range 4 {
		wg.Go(func() {
			for i := 0; i < 1000 && !stop.Load(); i++ {
				if _, err := save(); err != nil {
					firstErr.CompareAndSwap(nil, err)
					stop.Store(true)
				}
			}
		})
	}
	wg.Wait()
	if firstErr.Load() == nil {
		t.Fatalf("no save failed with the file size limited to %d bytes", diskFullLimit)
	}
	fmt.Printf("phase 1: %d saves acknowledged, then: %v\n", len(acked), firstErr.Load())
	checkEFBIG(firstErr.Load().(error))

	// Phase 2: one saver. What still fits after the cut-back is taken;
	// then every further save of the same size fails: the store refuses
	// writes while it cannot write.
	for i := 0; ; i++ {
		if i == 100 {
			t.Fatal("100 more saves were acknowledged with the file size limited")
		}
		if _, err := save(); err != nil {
			checkEFBIG(err)
			break
		}
	}
	for range 5 {
		id, err := save()
		if err == nil {
			t.Errorf("save %s was acknowledged while the file cannot grow", id)
			continue
		}
		checkEFBIG(err)
		if _, err := s.Get(ctx, id); !errors.Is(err, storage.ErrNotFound) {
			t.Errorf("get of the failed save %s: %v, want ErrNotFound", id, err)
		}
	}
	for _, id := range acked {
		m, err := s.Get(ctx, id)
		if err != nil {
			t.Fatalf("get %s after the failures: %v", id, err)
		}
		if !bytes.Equal(m.Body, faultBody(id, diskFullBody)) {
			t.Fatalf("get %s after the failures: body differs", id)
		}
	}
	// The failed writes were cut back: the segment ends with the last
	// acknowledged record, so a crash now would need no repair, and the
	// next write does not follow a torn one.
	if n := checkSegmentsClean(t, dir); n != len(acked) {
		t.Errorf("after the failures the log holds %d whole records, want %d (one per acknowledged save)", n, len(acked))
	}
	fmt.Printf("phase 2: %d saves acknowledged in all, every acknowledged one readable; saves keep failing; the log ends with the last acknowledged record\n", len(acked))

	// Phase 3: room again. The store cut the failed write back to its last
	// good record and did not give up, so saves work again.
	if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &orig); err != nil {
		t.Fatal(err)
	}
	before := len(acked)
	for range 10 {
		if _, err := save(); err != nil {
			t.Errorf("save after the limit was raised: %v", err)
		}
	}
	fmt.Printf("phase 3: limit raised, %d of 10 saves acknowledged\n", len(acked)-before)
	if err := s.Close(); err != nil {
		t.Errorf("close: %v", err)
	}
	if !t.Failed() {
		fmt.Println("done")
	}
}
