package filestore

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/storage"
)

// The repair tests write a known sequence of calls, each of which appends
// exactly one record, then damage a copy of the log (cut it, flip a bit,
// zero a block) and check what Open makes of it against the calls whose
// records lie wholly before the damage.

// writeOps makes n calls on s, chosen at random among those that are valid
// for the messages it holds, and returns them in log order. savePct is the
// share of Saves, finishPct the share of calls that finish a message
// (rollback, delete, dead letter). The first three messages saved are
// never finished, so the oldest segment always holds something live and is
// never deleted behind the test's back.
func writeOps(t *testing.T, s *Store, rng *rand.Rand, n, bodyMax, savePct, finishPct int) []fop {
	t.Helper()
	ctx := context.Background()
	var ops []fop
	var live []string
	states := make(map[string]mstate)
	anchors := make(map[string]bool)
	for len(ops) < n {
		if len(live) == 0 || rng.IntN(100) < savePct {
			o := fop{kind: "save", id: protocol.MessageId(), committed: rng.IntN(100) < 70,
				next: time.Now().UnixMilli() - int64(rng.IntN(10_000)), bodyLen: rng.IntN(bodyMax + 1)}
			if stored, err := s.Save(ctx, faultMessage(o.id, o.committed, o.next, o.bodyLen)); err != nil || !stored {
				t.Fatalf("save: stored=%v err=%v", stored, err)
			}
			if len(anchors) < 3 {
				anchors[o.id] = true
			}
			live = append(live, o.id)
			states[o.id] = applyOp(mstate{}, o)
			ops = append(ops, o)
			continue
		}
		k := rng.IntN(len(live))
		id := live[k]
		st := states[id]
		finish := !anchors[id] && rng.IntN(100) < finishPct
		var o fop
		var err error
		switch {
		case finish && !st.committed:
			o = fop{kind: "rollback", id: id}
			err = s.Rollback(ctx, id)
		case finish && rng.IntN(3) > 0:
			o = fop{kind: "delete", id: id}
			err = s.Delete(ctx, id)
		case finish:
			o = fop{kind: "dead", id: id, reason: fmt.Sprintf("reason-%d", rng.IntN(100)), atMin: time.Now().UnixMilli()}
			err = s.DeadLetter(ctx, id, o.reason)
		case !st.committed && rng.IntN(2) == 0:
			o = fop{kind: "commit", id: id}
			if err = s.Commit(ctx, id); err == nil {
				var m *storage.Message
				if m, err = s.Get(ctx, id); err == nil {
					o.next = m.NextDeliverTime.UnixMilli()
				}
			}
		default:
			o = fop{kind: "delivery", id: id, count: st.count + 1, next: time.Now().UnixMilli() + int64(rng.IntN(3_600_000))}
			for _, g := range []string{"a", "bb", "ccc"} {
				switch rng.IntN(3) {
				case 1:
					o.succ = append(o.succ, g)
				case 2:
					o.fail = append(o.fail, g)
				}
			}
			err = s.RecordDelivery(ctx, storage.DeliveryResult{MessageID: id, DeliverCount: o.count,
				NextDeliverTime: time.UnixMilli(o.next), SuccGroups: o.succ, FailGroups: o.fail})
		}
		if err != nil {
			t.Fatalf("%v: %v", o, err)
		}
		st = applyOp(st, o)
		if st.present && !st.dead {
			states[id] = st
		} else {
			delete(states, id)
			live[k] = live[len(live)-1]
			live = live[:len(live)-1]
		}
		ops = append(ops, o)
	}
	return ops
}

// allIDs lists every id the calls name, so that the checks ask the store
// for finished ones too.
func allIDs(ops []fop) []string {
	var ids []string
	seen := make(map[string]bool)
	for _, o := range ops {
		if !seen[o.id] {
			seen[o.id] = true
			ids = append(ids, o.id)
		}
	}
	return ids
}

// repairCase lays out a damaged copy of the log in dir: files maps a
// segment's base name to its bytes.
func writeCase(t *testing.T, dir string, files map[string][]byte) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func fileSize(t *testing.T, path string) int64 {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}

// checkRepairLog checks the one line Open logged: an info line when
// nothing was repaired, else a warning with one truncated_<segment> field
// per repaired segment, whose text starts "<n> bytes at offset <off>".
func checkRepairLog(t *testing.T, line observer.LoggedEntry, want map[string]string) {
	t.Helper()
	fields := line.ContextMap()
	got := make(map[string]string)
	for k, v := range fields {
		if strings.HasPrefix(k, "truncated_") {
			got[k], _ = v.(string)
		}
	}
	if len(want) == 0 {
		if line.Level != zapcore.InfoLevel || len(got) != 0 {
			t.Fatalf("nothing to repair, but Open logged %s %q %v", line.Level, line.Message, fields)
		}
		return
	}
	if line.Level != zapcore.WarnLevel || !strings.Contains(line.Message, "repair") {
		t.Fatalf("Open repaired the log but logged %s %q", line.Level, line.Message)
	}
	if len(got) != len(want) {
		t.Fatalf("Open logged repairs %v, want %v", got, want)
	}
	for k, prefix := range want {
		if !strings.HasPrefix(got[k], prefix) {
			t.Fatalf("Open logged %s=%q, want it to start %q", k, got[k], prefix)
		}
	}
}

// openAndCheck opens dir, checks the log line and the contents against
// want (and that ids not in want are absent), and returns the store. When
// orClean is set, Open may also find nothing to repair (an info line).
func openAndCheck(t *testing.T, dir string, mutate func(*Options), want map[string]mstate, ids []string, repairs map[string]string, orClean bool) (s *Store, repaired bool) {
	t.Helper()
	s, logs, err := openObserved(dir, mutate)
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	line := checkOpenLog(t, logs)
	if orClean && line.Level == zapcore.InfoLevel {
		checkRepairLog(t, line, nil)
	} else {
		checkRepairLog(t, line, repairs)
		repaired = len(repairs) > 0
	}
	if diffs, _ := checkStore(context.Background(), s, single(want, ids...)); len(diffs) > 0 {
		s.Close()
		if len(diffs) > 10 {
			diffs = append(diffs[:10], fmt.Sprintf("… and %d more", len(diffs)-10))
		}
		t.Fatalf("the store differs from the calls before the damage:\n%s", strings.Join(diffs, "\n"))
	}
	return s, repaired
}

// saveAfterRepair checks that a repaired store takes a new message that a
// reopen still finds, beside everything that was there.
func saveAfterRepair(t *testing.T, s *Store, dir string, mutate func(*Options), want map[string]mstate, ids []string) {
	t.Helper()
	id := protocol.MessageId()
	next := time.Now().UnixMilli()
	if stored, err := s.Save(context.Background(), faultMessage(id, true, next, 33)); err != nil || !stored {
		t.Fatalf("save after the repair: stored=%v err=%v", stored, err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	after := make(map[string]mstate, len(want)+1)
	for k, v := range want {
		after[k] = v
	}
	after[id] = mstate{present: true, committed: true, next: next, bodyLen: 33}
	s, _ = openAndCheck(t, dir, mutate, after, ids, nil, false)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	checkSegmentsClean(t, dir)
}

// buildLog writes n calls to a new store in dir and returns them with the
// segment files (base name and bytes, a preallocated tail included) and
// their records, checking that the log holds exactly one record per call.
func buildLog(t *testing.T, dir string, mutate func(*Options), rng *rand.Rand, n, tail, bodyMax, savePct, finishPct int) (ops []fop, names []string, data [][]byte, recs [][]diskRecord) {
	t.Helper()
	s, _, err := openObserved(dir, mutate)
	if err != nil {
		t.Fatal(err)
	}
	ops = writeOps(t, s, rng, n-tail, bodyMax, savePct, finishPct)
	// The last calls have small records, so that every byte of them can
	// be cut at.
	ops = append(ops, writeOps(t, s, rng, tail, 40, 30, 30)...)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	total := 0
	for _, f := range segmentFiles(t, dir) {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		r, _, bad := parseSegment(b)
		if bad >= 0 {
			t.Fatalf("%s: unreadable at %d before any damage", f, bad)
		}
		names, data, recs = append(names, filepath.Base(f)), append(data, b), append(recs, r)
		total += len(r)
	}
	if total != len(ops) {
		t.Fatalf("the log holds %d records for %d calls: the store wrote more than one record per call "+
			"(compaction?), so the test cannot tell which calls a damaged record held", total, len(ops))
	}
	return ops, names, data, recs
}

// repairOptions: one segment large enough for the whole log of the
// single-segment repair tests. fsync=never, so the store does not move to
// a preallocated spare segment; the tests put zero tails in themselves.
func repairOptions(o *Options) {
	o.SegmentSize = 64 << 10
	o.Sync = SyncNever
}

// TestRepairTruncatedTail cuts the only segment at every byte of its last
// six records, and at a sample of offsets before them: Open keeps every
// record wholly before the cut, truncates the file to the end of the last
// of them, says so in its one log line, and the store takes writes again.
// A third of the cuts are also tried with 4 KiB of zeros after the cut, as
// a torn append to a preallocated segment leaves it: what lies before the
// zeros decides. Bytes that are not zeros are cut off; zeros right after a
// whole record are the unused end of the segment, which Open may keep (the
// next append overwrites them) or cut.
func TestRepairTruncatedTail(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	base := t.TempDir()
	ops, names, data, segRecs := buildLog(t, filepath.Join(base, "orig"), repairOptions, rng, 100, 8, 600, 40, 20)
	if len(names) != 1 {
		t.Fatalf("want one segment, have %d", len(names))
	}
	recs := segRecs[0]
	seg := data[0][:recs[len(recs)-1].end()] // without a preallocated tail
	ids := allIDs(ops)
	segKey := "truncated_" + strings.TrimSuffix(names[0], ".seg")

	// The model after the first k calls, for every k.
	models := make([]map[string]mstate, len(ops)+1)
	for k := range models {
		models[k] = replay(ops[:k])
	}

	tailStart := recs[len(recs)-6].off
	var cuts []int64
	for c := tailStart; c <= int64(len(seg)); c++ {
		cuts = append(cuts, c)
	}
	for range 40 {
		cuts = append(cuts, rng.Int64N(tailStart))
	}
	start := time.Now()
	cases, keptZeros := 0, 0
	for i, c := range cuts {
		k := 0
		for k < len(recs) && recs[k].end() <= c {
			k++
		}
		end := int64(0)
		if k > 0 {
			end = recs[k-1].end()
		}
		for _, pad := range []int64{0, 4096} {
			if pad > 0 && i%3 != 0 {
				continue
			}
			cases++
			// Zeros right after the last whole record (the cut bytes of a
			// torn record may be zeros too) may stay.
			orClean := pad > 0 && allZeros(seg[end:c])
			var repairs map[string]string
			if end != c+pad {
				repairs = map[string]string{segKey: fmt.Sprintf("%d bytes at offset %d", c+pad-end, end)}
			}
			dir := filepath.Join(base, fmt.Sprintf("cut-%d-%d", c, pad))
			writeCase(t, dir, map[string][]byte{names[0]: append(seg[:c:c], make([]byte, pad)...)})
			s, repaired := openAndCheck(t, dir, repairOptions, models[k], ids, repairs, orClean)
			wantSize := end
			if !repaired {
				wantSize = c + pad
				keptZeros++
			}
			if got := fileSize(t, filepath.Join(dir, names[0])); got != wantSize {
				t.Fatalf("cut at %d, %d zeros after: the segment is %d bytes after Open, want %d (the end of the last whole record)", c, pad, got, wantSize)
			}
			// A later Save and reopen work: checked at every record
			// boundary and on every sixth cut.
			if end == c || c-end == 1 || i%6 == 0 {
				saveAfterRepair(t, s, dir, repairOptions, models[k], ids)
			} else if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			os.RemoveAll(dir)
		}
	}
	t.Logf("%d calls, %d bytes; %d cases: cut at %d offsets (every byte of the last 6 records, %d bytes, and 40 before), a third also with zeros after; %d opened with nothing to repair; in %v",
		len(ops), len(seg), cases, len(cuts), int64(len(seg))-tailStart, keptZeros, time.Since(start).Round(time.Millisecond))
}

// TestRepairBitFlips flips one bit at every byte of the last records of
// the only segment, which ends in a preallocated zero tail, and every bit
// of the last record's header. A damaged record with good ones after it
// costs only itself: Open skips it, leaves the file as it is and reports
// it with its message id (unless the flip is in the id). A damaged last
// record is the torn or damaged end of the active segment: Open cuts the
// file at its start. A bit flipped in the zeros after the last record is
// damage too: the zeros are cut off and every record kept.
func TestRepairBitFlips(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	base := t.TempDir()
	ops, names, data, segRecs := buildLog(t, filepath.Join(base, "orig"), repairOptions, rng, 120, 6, 400, 40, 20)
	if len(names) != 1 {
		t.Fatalf("want one segment, have %d", len(names))
	}
	recs := segRecs[0]
	lastEnd := recs[len(recs)-1].end()
	seg := append(data[0][:lastEnd:lastEnd], make([]byte, 4096)...) // a zero tail, as preallocation leaves it
	ids := allIDs(ops)
	segKey := "truncated_" + strings.TrimSuffix(names[0], ".seg")
	type flip struct {
		off int64
		bit uint
	}
	var flips []flip
	for j := len(recs) - 4; j < len(recs); j++ {
		for off := recs[j].off; off < recs[j].end(); off++ {
			flips = append(flips, flip{off, uint(off % 8)})
		}
	}
	for _, j := range []int{len(recs) - 2, len(recs) - 1} {
		for off := recs[j].off; off < recs[j].off+8; off++ {
			for bit := range uint(8) {
				flips = append(flips, flip{off, bit})
			}
		}
	}
	for _, d := range []int64{0, 1, 3, 4, 7, 8, 9, 100, 4095} {
		flips = append(flips, flip{lastEnd + d, uint(d % 8)})
	}
	start := time.Now()
	skipped := 0
	for i, f := range flips {
		j := 0
		for j < len(recs) && recs[j].end() <= f.off {
			j++
		}
		damaged := append([]byte(nil), seg...)
		damaged[f.off] ^= 1 << f.bit
		var want map[string]mstate
		var dw damageWant
		cutAt := int64(-1)
		switch {
		case j < len(recs)-1:
			want = replay(without(ops, map[int]bool{j: true}))
			dw = damageWant{seg: names[0], off: recs[j].off, length: recs[j].size}
			if f.off < recs[j].off+8 || f.off >= recs[j].off+25 { // not its kind or id
				dw.id = ops[j].id
			}
			skipped++
		case j == len(recs)-1:
			want, cutAt = replay(ops[:j]), recs[j].off
		default:
			want, cutAt = replay(ops), lastEnd
		}
		var repairs map[string]string
		wantSize := int64(len(seg))
		if cutAt >= 0 {
			dw = damageWant{seg: names[0], off: cutAt, length: -1, cut: true}
			repairs = map[string]string{segKey: fmt.Sprintf("%d bytes at offset %d", int64(len(seg))-cutAt, cutAt)}
			wantSize = cutAt
		}
		dir := filepath.Join(base, fmt.Sprintf("flip-%d", i))
		writeCase(t, dir, map[string][]byte{names[0]: damaged})
		before := map[string][]byte{names[0]: damaged}
		s := openDamaged(t, dir, repairOptions, want, ids, repairs, []damageWant{dw}, before)
		if got := fileSize(t, filepath.Join(dir, names[0])); got != wantSize {
			t.Fatalf("bit %d of byte %d flipped: the segment is %d bytes after Open, want %d", f.bit, f.off, got, wantSize)
		}
		if i%8 == 0 {
			saveAndReopen(t, s, dir, repairOptions, want, ids, []damageWant{dw}, before)
		} else if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		os.RemoveAll(dir)
	}
	t.Logf("%d calls; %d single-bit flips in the last 4 records and in the zeros after them (%d skipped a record with good ones after it), in %v",
		len(ops), len(flips), skipped, time.Since(start).Round(time.Millisecond))
}
