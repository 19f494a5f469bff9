package filestore

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest/observer"

	"github.com/kiteq/kiteq/protocol"
)

// finishRound saves n messages of bodyLen bytes and deletes them.
func finishRound(t *testing.T, s *Store, n, bodyLen int) {
	t.Helper()
	ctx := context.Background()
	for range n {
		id := protocol.MessageId()
		if _, err := s.Save(ctx, faultMessage(id, true, time.Now().UnixMilli(), bodyLen)); err != nil {
			t.Fatal(err)
		}
		if err := s.Delete(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
}

// compactAway drives maintain with small finished rounds until the segment
// file seg is gone (compacted, then removed), at most 10 s.
func compactAway(t *testing.T, s *Store, seg string, logs *observer.ObservedLogs) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(maintainEvery) {
		if _, err := os.Stat(seg); os.IsNotExist(err) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s is still there after 10 s; logged: %v", filepath.Base(seg), logs.FilterMessage("file store compaction").All())
		}
		finishRound(t, s, 5, 100)
	}
}

func trashFiles(t *testing.T, dir string) []string {
	t.Helper()
	trash, err := filepath.Glob(filepath.Join(dir, "*"+trashSuffix))
	if err != nil {
		t.Fatal(err)
	}
	return trash
}

// A finished segment leaves the log by a rename and is removed in the
// background; Close waits for the removals, and Open removes what a run
// that stopped before them left.
func TestDeletedSegmentsAreRemoved(t *testing.T) {
	dir := t.TempDir()
	mutate := func(o *Options) { o.SegmentSize, o.Sync = 64<<10, SyncNever }
	s, _, err := openObserved(dir, mutate)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	keep := protocol.MessageId()
	if _, err := s.Save(ctx, faultMessage(keep, true, time.Now().UnixMilli(), 100)); err != nil {
		t.Fatal(err)
	}
	for range 20 { // 20 × 64 KiB of finished messages, written over a second
		finishRound(t, s, 60, 1<<10)
		time.Sleep(maintainEvery)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if trash := trashFiles(t, dir); len(trash) > 0 {
		t.Fatalf("after Close, deleted segments are left: %v", trash)
	}
	if n := len(segmentFiles(t, dir)); n > 3 {
		t.Fatalf("%d segments after 20 segments of finished messages, want at most 3", n)
	}

	// What a crash between the rename and the removal leaves: files that
	// look like segments but are not in the log.
	for _, name := range []string{"0000000001.seg" + trashSuffix, "0000000002.seg" + trashSuffix} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte("not a segment"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	s, logs, err := openObserved(dir, mutate)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	checkOpenLog(t, logs)
	if trash := trashFiles(t, dir); len(trash) > 0 {
		t.Fatalf("Open left deleted segments: %v", trash)
	}
	if _, err := s.Get(ctx, keep); err != nil {
		t.Fatalf("the live message: %v", err)
	}
}

// Compaction reads only the saves the index still has where they lie, so
// a damaged record of a finished message does not stop the segment that
// holds it from being reclaimed; the live messages are copied intact.
func TestCompactionSkipsFinishedRecordsUnread(t *testing.T) {
	dir := t.TempDir()
	mutate := func(o *Options) { o.SegmentSize, o.Sync = 64<<10, SyncNever }
	s, logs, err := openObserved(dir, mutate)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }()
	ctx := context.Background()

	// The first segment: a few live messages among finished ones.
	var live []string
	for i := range 40 {
		id := protocol.MessageId()
		if _, err := s.Save(ctx, faultMessage(id, true, time.Now().UnixMilli(), 1<<10)); err != nil {
			t.Fatal(err)
		}
		if i%10 == 0 {
			live = append(live, id)
		} else if err := s.Delete(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	finishRound(t, s, 40, 1<<10) // fills it; the log moves on
	first := segmentFiles(t, dir)[0]
	if len(segmentFiles(t, dir)) < 2 {
		t.Fatal("the log did not move past its first segment")
	}

	// Damage the body of a finished message's save in it.
	data, err := os.ReadFile(first)
	if err != nil {
		t.Fatal(err)
	}
	recs, _, _ := parseSegment(data)
	damaged := false
	for _, r := range recs {
		payload := data[r.off+8 : r.end()]
		id := hex.EncodeToString(payload[1:17])
		if recordKind(payload[0]) != recSave || strings.Contains(strings.Join(live, " "), id) {
			continue
		}
		f, err := os.OpenFile(first, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteAt([]byte{^payload[len(payload)-1]}, r.end()-1); err != nil {
			t.Fatal(err)
		}
		f.Close()
		damaged = true
		break
	}
	if !damaged {
		t.Fatal("no save of a finished message in the first segment")
	}

	// Writes drive maintain: the first segment is compacted, then removed.
	compactAway(t, s, first, logs)
	if n := logs.FilterMessage("file store compaction").Len(); n > 0 {
		t.Fatalf("compaction failed %d times: %v", n, logs.FilterMessage("file store compaction").All())
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s, _, err = openObserved(dir, mutate)
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range live {
		m, err := s.Get(ctx, id)
		if err != nil {
			t.Fatalf("live message %s after compaction and a restart: %v", id, err)
		}
		if want := faultBody(id, 1<<10); string(m.Body) != string(want) {
			t.Fatalf("live message %s: body changed", id)
		}
	}
}

// A record damaged after the store opened, whose length now covers the
// live save behind it, leads the quick walk past that save: compaction
// notices the live message left behind and walks the segment again,
// checking every record, which reports the damage. The segment is kept.
func TestCompactionChecksASegmentItLeftLiveMessagesIn(t *testing.T) {
	dir := t.TempDir()
	mutate := func(o *Options) { o.SegmentSize, o.Sync = 64<<10, SyncNever }
	s, logs, err := openObserved(dir, mutate)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	dead, live := protocol.MessageId(), protocol.MessageId()
	for _, id := range []string{dead, live} {
		if _, err := s.Save(ctx, faultMessage(id, true, time.Now().UnixMilli(), 1<<10)); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Delete(ctx, dead); err != nil {
		t.Fatal(err)
	}
	finishRound(t, s, 60, 1<<10) // the log moves past the first segment
	first := segmentFiles(t, dir)[0]
	data, err := os.ReadFile(first)
	if err != nil {
		t.Fatal(err)
	}
	recs, _, _ := parseSegment(data)
	if len(recs) < 2 || hex.EncodeToString(data[recs[1].off+9:recs[1].off+25]) != live {
		t.Fatal("the first segment does not start with the two saves")
	}
	// The dead save's length now covers the live save too.
	f, err := os.OpenFile(first, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	binary.LittleEndian.PutUint32(data[0:4], uint32(recs[0].size+recs[1].size-8))
	if _, err := f.WriteAt(data[0:4], 0); err != nil {
		t.Fatal(err)
	}
	f.Close()

	for deadline := time.Now().Add(10 * time.Second); logs.FilterMessage("file store compaction").Len() == 0; time.Sleep(maintainEvery) {
		if time.Now().After(deadline) {
			t.Fatalf("the damage was not reported within 10 s; logged: %v", logs.All())
		}
		finishRound(t, s, 5, 100)
	}
	if logs.FilterMessage("file store: compaction left live messages in a segment; checking every record of it").Len() != 1 {
		t.Fatalf("the second walk was not logged once: %v", logs.All())
	}
	if _, err := os.Stat(first); err != nil {
		t.Fatalf("the segment with the live message is gone: %v", err)
	}
	if _, err := s.Get(ctx, live); err != nil {
		t.Fatalf("the live message: %v", err)
	}
}
