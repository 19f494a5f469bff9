package filestore

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/storage"
)

// TestSpaceBoundedUnderSteadyTraffic: a small, old backlog that is never
// finished, then steady traffic whose messages are all finished. Written
// bytes grow without end; the segments on disk must not.
//
// The bound, from the policy in compact.go: the writer runs maintain at
// most every maintainEvery (50 ms), after a write. One run deletes every
// oldest segment with nothing live, then compacts the oldest segment left
// when it is mostly finished (live bytes < CompactRatio of its size) —
// here the segment holding the backlog (~110 KiB live of 1 MiB), which is
// copied, whole, to the head of the log; the next run deletes it and every
// finished segment up to the copy. So the backlog moves to the head, and
// everything behind it goes, within two runs (~100 ms) of the backlog's
// segment being rolled. Traffic paced at 1 MiB per 25 ms writes 4
// segments in 100 ms; with the active segment and the one holding the
// backlog that is 6. The test allows 8 segments while traffic flows, and
// once traffic pauses (a write now and then keeps maintain running) 2
// segments; in bytes, one segment more than that for a preallocated spare
// segment the store may keep in the directory.
func TestSpaceBoundedUnderSteadyTraffic(t *testing.T) {
	const (
		segment    = 1 << 20
		backlogN   = 100
		backlogLen = 1 << 10
		rounds     = 40 // of roundMsgs × roundLen = 1 MiB: 40 MiB written in all
		roundMsgs  = 64
		roundLen   = 16 << 10
		roundPace  = 25 * time.Millisecond
		maxBusy    = 8
		maxIdle    = 2
	)
	dir := t.TempDir()
	mutate := func(o *Options) { o.SegmentSize = segment }
	s, _, err := openObserved(dir, mutate)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }() // s is reopened below
	ctx := context.Background()

	// A new store's first segment is not preallocated: the writer moves to
	// a preallocated one at its first write after the spare is ready
	// (prealloc.go). The backlog starts there, as in a store that has run
	// for a while; otherwise it would straddle the two, and take two
	// rounds of compaction to move.
	for deadline := time.Now().Add(10 * time.Second); len(segmentFiles(t, dir)) < 2; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the store did not move to a preallocated segment within 10 s")
		}
		id := protocol.MessageId()
		if _, err := s.Save(ctx, faultMessage(id, true, time.Now().UnixMilli(), 10)); err != nil {
			t.Fatal(err)
		}
		if err := s.Delete(ctx, id); err != nil {
			t.Fatal(err)
		}
	}

	// The backlog: committed messages with a delivery round behind them,
	// uncommitted ones (one with a transaction check recorded), dead
	// letters. Compaction must carry every part of their state.
	model := make(map[string]mstate)
	now := time.Now().UnixMilli()
	for i := range backlogN {
		id := protocol.MessageId()
		committed := i%5 != 0
		if _, err := s.Save(ctx, faultMessage(id, committed, now-int64(i), backlogLen)); err != nil {
			t.Fatal(err)
		}
		st := mstate{present: true, committed: committed, next: now - int64(i), bodyLen: backlogLen}
		if i%3 == 0 {
			d := storage.DeliveryResult{MessageID: id, DeliverCount: 2, NextDeliverTime: time.UnixMilli(now + int64(i)*1000),
				SuccGroups: []string{"g1"}, FailGroups: []string{"g2", "g3"}, FailCounts: []int32{2, 1}}
			if err := s.RecordDelivery(ctx, d); err != nil {
				t.Fatal(err)
			}
			st.count, st.next, st.succ, st.fail, st.counts = 2, d.NextDeliverTime.UnixMilli(), d.SuccGroups, d.FailGroups, d.FailCounts
		}
		if i%10 == 1 {
			st.dead, st.reason, st.atMin = true, fmt.Sprintf("backlog-%d", i), time.Now().UnixMilli()
			if err := s.DeadLetter(ctx, id, st.reason); err != nil {
				t.Fatal(err)
			}
		}
		model[id] = st
	}
	segs := segmentFiles(t, dir)
	backlogSeg := segs[len(segs)-1]
	check := func(when string) {
		t.Helper()
		if diffs, _ := checkStore(ctx, s, single(model)); len(diffs) > 0 {
			t.Fatalf("%s: the backlog differs:\n%s", when, strings.Join(diffs, "\n"))
		}
	}

	// One round of traffic: save roundMsgs messages from 8 goroutines, then
	// finish them all.
	round := func(r int) {
		var wg sync.WaitGroup
		errs := make(chan error, roundMsgs)
		for w := range 8 {
			wg.Go(func() {
				var ids []string
				for range roundMsgs / 8 {
					id := protocol.MessageId()
					if _, err := s.Save(ctx, faultMessage(id, true, time.Now().UnixMilli(), roundLen)); err != nil {
						errs <- fmt.Errorf("round %d worker %d: save: %w", r, w, err)
						return
					}
					ids = append(ids, id)
				}
				for _, id := range ids {
					if err := s.Delete(ctx, id); err != nil {
						errs <- fmt.Errorf("round %d worker %d: delete: %w", r, w, err)
						return
					}
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
	}
	// settle keeps writing a little (maintain runs only after a write)
	// until the log is down to maxIdle segments, or fails after 10 s.
	settle := func(when string) (int, int64, time.Duration) {
		t.Helper()
		start := time.Now()
		for {
			files, bytes := diskUse(t, dir)
			if files <= maxIdle && bytes <= (maxIdle+1)*segment {
				return files, bytes, time.Since(start)
			}
			if time.Since(start) > 10*time.Second {
				t.Fatalf("%s: traffic paused for 10 s and the log still has %d segments, %d KiB (want at most %d segments)",
					when, files, bytes>>10, maxIdle)
			}
			id := protocol.MessageId()
			if _, err := s.Save(ctx, faultMessage(id, true, time.Now().UnixMilli(), 10)); err != nil {
				t.Fatal(err)
			}
			if err := s.Delete(ctx, id); err != nil {
				t.Fatal(err)
			}
			time.Sleep(maintainEvery + 10*time.Millisecond)
		}
	}

	var written int64
	maxFiles, maxBytes := 0, int64(0)
	start := time.Now()
	for r := range rounds {
		began := time.Now()
		round(r)
		written += roundMsgs * roundLen
		files, bytes := diskUse(t, dir)
		maxFiles, maxBytes = max(maxFiles, files), max(maxBytes, bytes)
		if files > maxBusy || bytes > (maxBusy+1)*segment {
			t.Fatalf("round %d: %d MiB written, the log has %d segments, %d KiB (want at most %d segments)",
				r, written>>20, files, bytes>>10, maxBusy)
		}
		if r%10 == 9 {
			files, bytes, took := settle(fmt.Sprintf("round %d", r))
			t.Logf("round %d: %d MiB written; at most %d segments, %d KiB so far; after a pause %d segments, %d KiB (in %v)",
				r, written>>20, maxFiles, maxBytes>>10, files, bytes>>10, took.Round(time.Millisecond))
			check(fmt.Sprintf("round %d", r))
		}
		time.Sleep(roundPace - time.Since(began))
	}
	t.Logf("%d MiB written in %v; the log never had more than %d segments, %d KiB",
		written>>20, time.Since(start).Round(time.Millisecond), maxFiles, maxBytes>>10)
	if first := segmentFiles(t, dir)[0]; first <= backlogSeg {
		t.Errorf("the segment that took the backlog, %s, is still there: the oldest is %s", backlogSeg, first)
	}

	// The backlog is intact after a reopen too.
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s, logs, err := openObserved(dir, mutate)
	if err != nil {
		t.Fatal(err)
	}
	checkRepairLog(t, checkOpenLog(t, logs), nil)
	check("after reopen")
	files, bytes := diskUse(t, dir)
	t.Logf("after reopen: %d segments, %d KiB; %d backlog messages intact", files, bytes>>10, backlogN)
}
