package filestore

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
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

// The recovery tests damage the records of a log written by buildLog (one
// record per call) and check that Open loses exactly the damaged records:
// the store holds the calls with those left out, replayed by the rules of
// the log; each damaged region is reported once, with its probable message
// id, and copied to quarantine/.

// damageWant is a damaged region that Open must report.
type damageWant struct {
	seg    string // the segment's base name
	off    int64
	length int64  // -1: any
	id     string // the probable id; "" when it is not checked
	cut    bool
}

// checkDamage checks the damage lines Open logged and s.Damage() against
// want, in log order, and that quarantine/ holds each region's bytes as
// they were in before (the segments' bytes before Open, by base name).
func checkDamage(t *testing.T, s *Store, lines []observer.LoggedEntry, want []damageWant, before map[string][]byte) {
	t.Helper()
	got := s.Damage()
	if len(lines) != len(want) || len(got) != len(want) {
		var msgs []string
		for _, l := range lines {
			msgs = append(msgs, fmt.Sprintf("%q %v", l.Message, l.ContextMap()))
		}
		t.Fatalf("Open reported %d damaged regions (Damage: %d), want %d %+v: %s", len(lines), len(got), len(want), want, strings.Join(msgs, "; "))
	}
	for i, w := range want {
		f, d := lines[i].ContextMap(), got[i]
		msg := logSkipped
		if w.cut {
			msg = logCut
		}
		seg, _ := f["segment"].(string)
		off, _ := f["offset"].(int64)
		length, _ := f["length"].(int64)
		if lines[i].Message != msg || filepath.Base(seg) != w.seg || off != w.off || (w.length >= 0 && length != w.length) {
			t.Fatalf("damaged region %d: logged %q %v, want %q in %s at offset %d, %d bytes", i, lines[i].Message, f, msg, w.seg, w.off, w.length)
		}
		if d.Segment != seg || d.Offset != off || d.Length != length || d.Cut != w.cut {
			t.Fatalf("damaged region %d: Damage() says %+v, the log %v", i, d, f)
		}
		if id, _ := f["probableId"].(string); w.id != "" && (id != w.id || d.ProbableID != w.id) {
			t.Fatalf("damaged region %d: probable id %q (Damage: %q), want %s", i, id, d.ProbableID, w.id)
		}
		q, _ := f["quarantine"].(string)
		copied, err := os.ReadFile(q)
		if err != nil || q != d.Quarantine || filepath.Base(filepath.Dir(q)) != quarantineDir {
			t.Fatalf("damaged region %d: quarantine %q (Damage: %q): %v", i, q, d.Quarantine, err)
		}
		if b := before[w.seg]; !bytes.Equal(copied, b[off:off+length]) {
			t.Fatalf("damaged region %d: quarantine %s does not hold the region's %d bytes", i, q, length)
		}
	}
}

// checkSummary checks Open's last line: a warning when anything was
// damaged, with a truncated_<segment> field for each cut (repairs gives
// the start of its text), else an info line.
func checkSummary(t *testing.T, line observer.LoggedEntry, damaged bool, repairs map[string]string) {
	t.Helper()
	if !damaged {
		checkRepairLog(t, line, nil)
		return
	}
	if line.Level != zapcore.WarnLevel {
		t.Fatalf("Open found damage but logged %s %q", line.Level, line.Message)
	}
	got := 0
	for k, v := range line.ContextMap() {
		if !strings.HasPrefix(k, "truncated_") {
			continue
		}
		got++
		if s, _ := v.(string); !strings.HasPrefix(s, repairs[k]) || repairs[k] == "" {
			t.Fatalf("Open logged %s=%q, want %v", k, s, repairs)
		}
	}
	if got != len(repairs) {
		t.Fatalf("Open logged %d truncations, want %v: %v", got, repairs, line.ContextMap())
	}
}

// openDamaged opens dir and checks what Open logged and what the store
// holds against want (ids not in want must be absent).
func openDamaged(t *testing.T, dir string, mutate func(*Options), want map[string]mstate, ids []string,
	repairs map[string]string, damage []damageWant, before map[string][]byte) *Store {
	t.Helper()
	s, logs, err := openObserved(dir, mutate)
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	line, lines := openLogLines(t, logs)
	checkSummary(t, line, len(damage) > 0, repairs)
	checkDamage(t, s, lines, damage, before)
	if diffs, _ := checkStore(context.Background(), s, single(want, ids...)); len(diffs) > 0 {
		s.Close()
		if len(diffs) > 10 {
			diffs = append(diffs[:10], fmt.Sprintf("… and %d more", len(diffs)-10))
		}
		t.Fatalf("the store differs from the calls without the damaged records:\n%s", strings.Join(diffs, "\n"))
	}
	return s
}

// saveAndReopen checks that the store takes a new message after the
// repair, appended where the next open reads it: the reopened store holds
// it beside the rest, and reports again only the regions that were
// skipped (those cut off are gone).
func saveAndReopen(t *testing.T, s *Store, dir string, mutate func(*Options), want map[string]mstate, ids []string,
	damage []damageWant, before map[string][]byte) {
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
	var still []damageWant
	for _, d := range damage {
		if !d.cut {
			still = append(still, d)
		}
	}
	s = openDamaged(t, dir, mutate, after, ids, nil, still, before)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}

// without returns ops but those whose index is in lost.
func without(ops []fop, lost map[int]bool) []fop {
	var out []fop
	for i, o := range ops {
		if !lost[i] {
			out = append(out, o)
		}
	}
	return out
}

// The case: one byte flipped in the first record of a closed
// segment made Open truncate the whole segment, and every message saved in
// it was lost. Now that one record is: the others are read, the segment is
// kept as it is, and the message is named in the log.
func TestDamagedFirstRecordOfClosedSegmentCostsOnlyIt(t *testing.T) {
	dir := t.TempDir()
	mutate := func(o *Options) { o.SegmentSize, o.Sync = 64<<10, SyncNever }
	s := openTest(t, dir, mutate)
	ctx := context.Background()
	next := time.Now().UnixMilli()
	var ids []string
	for range 300 {
		id := protocol.MessageId()
		if stored, err := s.Save(ctx, faultMessage(id, true, next, 700)); err != nil || !stored {
			t.Fatalf("save: stored=%v err=%v", stored, err)
		}
		ids = append(ids, id)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	files := segmentFiles(t, dir)
	if len(files) < 3 {
		t.Fatalf("want at least 3 segments, have %d", len(files))
	}
	data, err := os.ReadFile(files[1])
	if err != nil {
		t.Fatal(err)
	}
	recs, _, _ := parseSegment(data)
	victim := hex.EncodeToString(data[recs[0].off+9 : recs[0].off+25])
	data[recs[0].end()-1] ^= 0x40 // a byte of its body
	if err := os.WriteFile(files[1], data, 0o644); err != nil {
		t.Fatal(err)
	}

	want := make(map[string]mstate)
	for _, id := range ids {
		if id != victim {
			want[id] = mstate{present: true, committed: true, next: next, bodyLen: 700}
		}
	}
	name := filepath.Base(files[1])
	damage := []damageWant{{seg: name, off: 0, length: recs[0].size, id: victim}}
	before := map[string][]byte{name: data}
	s = openDamaged(t, dir, mutate, want, []string{victim}, nil, damage, before)
	if got := fileSize(t, files[1]); got != int64(len(data)) {
		t.Fatalf("%s is %d bytes after Open, was %d: Open cut it", name, got, len(data))
	}
	saveAndReopen(t, s, dir, mutate, want, []string{victim}, damage, before)
	t.Logf("%d messages in %d segments; the first record of %s damaged: %d of them kept", len(ids), len(files), name, len(want))
}

// TestRecoverDamageInClosedSegments damages the first, a middle and the
// last record of every closed segment (small segments make many), a run
// of records zeroed across, records of each kind, and several records at
// once. Open loses exactly the damaged records and leaves every segment
// as it was. What losing a record means: a lost save loses its message; a
// lost finish (delete, rollback, dead letter) brings its message back, to
// be delivered again (at least once allows it) or, when it was rolled
// back, undecided, so that only its producer group can commit it; a lost
// commit leaves the transaction undecided, and the broker asks again; a
// lost delivery record brings back the state before it. The model is the
// calls with the lost ones left out, replayed by the rules of the log.
func TestRecoverDamageInClosedSegments(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	base := t.TempDir()
	// Small segments, and no compaction: CompactRatio 0 disables the
	// "mostly finished" rule, and few finished bytes keep the other rule
	// from firing, so the log holds exactly one record per call (buildLog
	// checks). fsync=never: segments roll only when full.
	mutate := func(o *Options) { o.SegmentSize = 4 << 10; o.CompactRatio = 0; o.Sync = SyncNever }
	ops, names, data, recs := buildLog(t, filepath.Join(base, "orig"), mutate, rng, 300, 0, 500, 40, 15)
	if len(names) < 5 {
		t.Fatalf("want several segments, have %d", len(names))
	}
	ids := allIDs(ops)
	first := make([]int, len(names)+1) // the index of each segment's first call
	for i := range names {
		first[i+1] = first[i] + len(recs[i])
	}

	type hit struct {
		seg, rec int
		zero     bool // zero 512 bytes from the middle of the record, else flip a bit in it
	}
	var cases [][]hit
	closed := len(names) - 1
	for i := range closed {
		n := len(recs[i])
		for _, j := range []int{0, n / 2, n - 1} {
			cases = append(cases, []hit{{i, j, false}})
		}
	}
	mid := len(names) / 2
	cases = append(cases, []hit{{mid, min(1, len(recs[mid])-1), true}})
	kinds := make(map[recordKind]bool)
	for i := range closed {
		for j, r := range recs[i] {
			if k := recordKind(data[i][r.off+8]); !kinds[k] && j > 0 && j < len(recs[i])-1 {
				kinds[k] = true
				cases = append(cases, []hit{{i, j, false}})
			}
		}
	}
	cases = append(cases, []hit{{0, 1, false}, {0, 2, false}, {mid, 0, false}, {closed - 1, len(recs[closed-1]) - 1, false}})

	lost, resurrected, undecided, forgotten := 0, 0, 0, 0
	for ci, hits := range cases {
		files := make(map[string][]byte)
		for i, name := range names {
			files[name] = data[i]
		}
		damaged := make(map[int]bool) // by call
		hitSegs := make(map[int]bool)
		flipped := make(map[int]int64) // by call: the offset of a byte changed in it
		for _, h := range hits {
			r := recs[h.seg][h.rec]
			b := append([]byte(nil), files[names[h.seg]]...)
			at := r.off + r.size/2
			if h.zero {
				end := min(at+512, int64(len(b)))
				clear(b[at:end])
				for j, q := range recs[h.seg] {
					if q.off < end && q.end() > at {
						damaged[first[h.seg]+j] = true
						flipped[first[h.seg]+j] = max(at, q.off)
					}
				}
			} else {
				b[at] ^= 0x10
				damaged[first[h.seg]+h.rec] = true
				flipped[first[h.seg]+h.rec] = at
			}
			files[names[h.seg]] = b
			hitSegs[h.seg] = true
		}
		// The regions: each run of damaged records, up to the next good
		// record or, at the end of the segment, to its last byte that is
		// not zero.
		var damage []damageWant
		for i, name := range names {
			if !hitSegs[i] {
				continue
			}
			for j := 0; j < len(recs[i]); j++ {
				g := first[i] + j
				if !damaged[g] {
					continue
				}
				d := damageWant{seg: name, off: recs[i][j].off}
				if at := flipped[g]; at < d.off+8 || at >= d.off+25 { // not its kind or id
					d.id = ops[g].id
				}
				for j+1 < len(recs[i]) && damaged[g+1] {
					j, g = j+1, g+1
				}
				d.length = -1 // at the end of the segment: the record's length, or up to its last byte that is not zero
				if j+1 < len(recs[i]) {
					d.length = recs[i][j+1].off - d.off
				}
				damage = append(damage, d)
			}
		}

		want := replay(without(ops, damaged))
		full := replay(ops)
		for id, st := range want {
			f, ok := full[id]
			switch {
			case !ok && !st.committed:
				undecided++ // rolled back, back undecided
			case !ok:
				resurrected++
			case f.committed && !st.committed:
				forgotten++
			}
		}
		for g := range damaged {
			if ops[g].kind == "save" {
				lost++
			}
		}

		dir := filepath.Join(base, fmt.Sprintf("case-%d", ci))
		writeCase(t, dir, files)
		s := openDamaged(t, dir, mutate, want, ids, nil, damage, files)
		for _, name := range names {
			if got, err := os.ReadFile(filepath.Join(dir, name)); err != nil || !bytes.Equal(got, files[name]) {
				t.Fatalf("case %d: Open changed %s (%v)", ci, name, err)
			}
		}
		if ci%4 == 0 {
			saveAndReopen(t, s, dir, mutate, want, ids, damage, files)
		} else if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		os.RemoveAll(dir)
	}
	t.Logf("%d calls in %d segments; %d cases: over all of them %d acknowledged saves lost, %d finished messages back, %d rolled back ones back undecided, %d commits forgotten",
		len(ops), len(names), len(cases), lost, resurrected, undecided, forgotten)
	if lost == 0 || resurrected == 0 || undecided == 0 || forgotten == 0 {
		t.Errorf("the cases never lost a save (%d), a finish (%d), a rollback (%d) or a commit (%d): they test less than they claim",
			lost, resurrected, undecided, forgotten)
	}
}

// A lost rollback brings its message back undecided, never delivered: it
// waits for a transaction check, which only its producer group answers,
// and the log says so.
func TestLostRollbackLeavesTheMessageUndecided(t *testing.T) {
	dir := t.TempDir()
	mutate := func(o *Options) { o.SegmentSize, o.Sync = 64<<10, SyncNever }
	s := openTest(t, dir, mutate)
	ctx := context.Background()
	tx := protocol.MessageId()
	if _, err := s.Save(ctx, faultMessage(tx, false, time.Now().UnixMilli(), 100)); err != nil {
		t.Fatal(err)
	}
	if err := s.Rollback(ctx, tx); err != nil {
		t.Fatal(err)
	}
	for range 200 { // the rollback's segment is closed
		if _, err := s.Save(ctx, faultMessage(protocol.MessageId(), true, time.Now().UnixMilli(), 700)); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	first := segmentFiles(t, dir)[0]
	data, err := os.ReadFile(first)
	if err != nil {
		t.Fatal(err)
	}
	recs, _, _ := parseSegment(data)
	if recordKind(data[recs[1].off+8]) != recRollback {
		t.Fatal("setup: the second record is not the rollback")
	}
	data[recs[1].off+4] ^= 1 // its checksum
	if err := os.WriteFile(first, data, 0o644); err != nil {
		t.Fatal(err)
	}
	s, logs, err := openObserved(dir, mutate)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	_, lines := openLogLines(t, logs)
	if len(lines) != 1 || lines[0].ContextMap()["probableId"] != tx || lines[0].ContextMap()["probableKind"] != "rollback" ||
		!strings.Contains(fmt.Sprint(lines[0].ContextMap()["likelyEffect"]), "producer group is asked") {
		t.Fatalf("Open logged %v", lines)
	}
	if got := getState(t, s, tx); got != "uncommitted" {
		t.Fatalf("the message whose rollback was lost is %s", got)
	}
	page, err := s.Due(ctx, storage.DueQuery{Kind: storage.DueDelivery, Before: farFuture, Limit: 1000})
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range page {
		if m.ID() == tx {
			t.Fatal("the message whose rollback was lost is due for delivery")
		}
	}
	checks, err := s.Due(ctx, storage.DueQuery{Kind: storage.DueTxCheck, Before: farFuture})
	if err != nil || len(checks) != 1 || checks[0].ID() != tx {
		t.Fatalf("due for a transaction check: %v %v, want %s", checks, err, tx)
	}
}

// The active segment with a damaged record in its middle, and a torn
// append after its last record or not: the record is skipped, the torn
// bytes are cut off (copied to quarantine first), and new records go
// right after the last good one, through direct I/O when the segment is
// preallocated and kept so; a reopen finds them, and the skipped record
// again, nothing else.
func TestActiveSegmentDamageAndTornTail(t *testing.T) {
	for _, c := range []struct {
		policy SyncPolicy
		torn   bool
	}{{SyncNever, true}, {SyncAlways, true}, {SyncAlways, false}} {
		t.Run(fmt.Sprintf("%s/torn=%v", c.policy, c.torn), func(t *testing.T) {
			dir := t.TempDir()
			const segment = 64 << 10
			mutate := func(o *Options) { o.SegmentSize, o.Sync = segment, c.policy }
			s := openTest(t, dir, mutate)
			ctx := context.Background()
			next := time.Now().UnixMilli()
			var ids []string
			for i := range 30 {
				id := protocol.MessageId()
				if _, err := s.Save(ctx, faultMessage(id, true, next, 300)); err != nil {
					t.Fatal(err)
				}
				ids = append(ids, id)
				if i == 0 && c.policy == SyncAlways {
					time.Sleep(200 * time.Millisecond) // the spare is ready: the next save moves to it
				}
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			files := segmentFiles(t, dir)
			path := files[len(files)-1]
			name := filepath.Base(path)
			data, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			recs, zeroFrom, _ := parseSegment(data)
			if len(recs) < 5 {
				t.Fatalf("setup: %d records in the last segment", len(recs))
			}
			if c.policy == SyncNever {
				data = append(data, make([]byte, 8<<10)...) // a zero tail, as preallocation leaves it
				zeroFrom = recs[len(recs)-1].end()
			} else if zeroFrom < 0 || int64(len(data)) != segment {
				t.Fatal("setup: the last segment is not a preallocated one")
			}
			victim := recs[2]
			victimID := hex.EncodeToString(data[victim.off+9 : victim.off+25])
			data[victim.off+30] ^= 0xff
			damage := []damageWant{{seg: name, off: victim.off, length: victim.size, id: victimID}}
			var repairs map[string]string
			wantSize := int64(len(data))
			if c.torn {
				// A torn append: the start of a record, its header intact.
				torn := appendRecord(nil, &record{kind: recSave, header: []byte("h"), body: bytes.Repeat([]byte("x"), 500)})
				copy(data[zeroFrom:], torn[:200])
				damage = append(damage, damageWant{seg: name, off: zeroFrom, length: -1, cut: true})
				key := "truncated_" + strings.TrimSuffix(name, ".seg")
				repairs = map[string]string{key: fmt.Sprintf("%d bytes at offset %d", int64(len(data))-zeroFrom, zeroFrom)}
				wantSize = zeroFrom
			}
			if err := os.WriteFile(path, data, 0o644); err != nil {
				t.Fatal(err)
			}
			want := make(map[string]mstate)
			for _, id := range ids {
				if id != victimID {
					want[id] = mstate{present: true, committed: true, next: next, bodyLen: 300}
				}
			}
			before := map[string][]byte{name: data}
			s = openDamaged(t, dir, mutate, want, []string{victimID}, repairs, damage, before)
			if got := fileSize(t, path); got != wantSize {
				t.Fatalf("the active segment is %d bytes after Open, want %d", got, wantSize)
			}
			if direct := s.direct != nil; c.policy == SyncAlways && !c.torn && !direct {
				t.Log("the file system refuses direct I/O: the direct writer is not exercised")
			}
			saveAndReopen(t, s, dir, mutate, want, []string{victimID}, damage, before)
		})
	}
}

// Compaction walks the oldest segment's records to copy its live
// messages forward: it steps over a region that recovery skipped (here a
// record whose length field reads as 4 GiB, which the walk cannot get
// past), copies the live messages behind it, and the segment is
// reclaimed; after that no open reports the damage.
func TestCompactionStepsOverSkippedDamage(t *testing.T) {
	dir := t.TempDir()
	mutate := func(o *Options) { o.SegmentSize, o.Sync = 64<<10, SyncNever }
	s, _, err := openObserved(dir, mutate)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	var live, finished []string
	for i := range 40 {
		id := protocol.MessageId()
		if _, err := s.Save(ctx, faultMessage(id, true, time.Now().UnixMilli(), 1<<10)); err != nil {
			t.Fatal(err)
		}
		if i%10 == 9 {
			live = append(live, id)
		} else {
			finished = append(finished, id)
		}
	}
	finishRound(t, s, 40, 1<<10) // fills the first segment; the log moves on
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	first := segmentFiles(t, dir)[0]
	data, err := os.ReadFile(first)
	if err != nil {
		t.Fatal(err)
	}
	recs, _, _ := parseSegment(data)
	if hex.EncodeToString(data[recs[2].off+9:recs[2].off+25]) != finished[2] {
		t.Fatal("setup: the third record is not the third save")
	}
	binary.LittleEndian.PutUint32(data[recs[2].off:], 0xffffffff)
	if err := os.WriteFile(first, data, 0o644); err != nil {
		t.Fatal(err)
	}

	s, logs, err := openObserved(dir, mutate)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }()
	if _, lines := openLogLines(t, logs); len(lines) != 1 || lines[0].ContextMap()["offset"] != recs[2].off {
		t.Fatalf("Open reported %v", lines)
	}
	for _, id := range finished {
		if err := s.Delete(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	compactAway(t, s, first, logs)
	if n := logs.FilterMessage("file store compaction").Len(); n > 0 {
		t.Fatalf("compaction failed %d times: %v", n, logs.FilterMessage("file store compaction").All())
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s, logs, err = openObserved(dir, mutate)
	if err != nil {
		t.Fatal(err)
	}
	if line := checkOpenLog(t, logs); line.Level != zapcore.InfoLevel {
		t.Fatalf("after the damaged segment was reclaimed, Open logged %s %q %v", line.Level, line.Message, line.ContextMap())
	}
	for _, id := range live {
		m, err := s.Get(ctx, id)
		if err != nil {
			t.Fatalf("live message %s after compaction and a restart: %v", id, err)
		}
		if !bytes.Equal(m.Body, faultBody(id, 1<<10)) {
			t.Fatalf("live message %s: body changed", id)
		}
	}
}

// Segment numbers are consecutive and only the oldest is ever deleted, so
// a segment missing from the middle of the log is a loss: Open refuses,
// naming the files and the way out. With accept-missing-segments it opens
// without them (they become empty files, so later opens need nothing) and
// says so. A missing first segment is what a reclaimed one looks like.
func TestMissingMiddleSegment(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	base := t.TempDir()
	mutate := func(o *Options) { o.SegmentSize = 4 << 10; o.CompactRatio = 0; o.Sync = SyncNever }
	ops, names, data, recs := buildLog(t, filepath.Join(base, "orig"), mutate, rng, 200, 0, 500, 45, 8)
	if len(names) < 5 {
		t.Fatalf("want several segments, have %d", len(names))
	}
	ids := allIDs(ops)
	first := make([]int, len(names)+1)
	for i := range names {
		first[i+1] = first[i] + len(recs[i])
	}
	for ci, gone := range [][]int{{1}, {2, 3}, {0}} {
		dir := filepath.Join(base, fmt.Sprintf("case-%d", ci))
		files := make(map[string][]byte)
		lost := make(map[int]bool)
		missing := make(map[int]bool)
		for _, i := range gone {
			missing[i] = true
			for g := first[i]; g < first[i+1]; g++ {
				lost[g] = true
			}
		}
		for i, name := range names {
			if !missing[i] {
				files[name] = data[i]
			}
		}
		writeCase(t, dir, files)
		want := replay(without(ops, lost))
		if gone[0] == 0 {
			s := openDamaged(t, dir, mutate, want, ids, nil, nil, nil)
			s.Close()
			continue
		}

		_, err := Open(func() Options { o := DefaultOptions(dir); mutate(&o); return o }(), nil)
		if err == nil {
			t.Fatalf("%v missing: Open succeeded", gone)
		}
		for _, i := range gone {
			if !strings.Contains(err.Error(), names[i]) {
				t.Fatalf("%v missing: the error does not name %s: %v", gone, names[i], err)
			}
		}
		if !strings.Contains(err.Error(), "accept-missing-segments=true") {
			t.Fatalf("the error does not say how to start anyway: %v", err)
		}
		if left := segmentFiles(t, dir); len(left) != len(files) {
			t.Fatalf("the refused Open changed the directory: %v", left)
		}

		accept := func(o *Options) { mutate(o); o.AcceptMissingSegments = true }
		s, logs, err := openObserved(dir, accept)
		if err != nil {
			t.Fatalf("open with AcceptMissingSegments: %v", err)
		}
		all := logs.All()
		if len(all) != 2 || all[0].Message != logMissing || !strings.Contains(fmt.Sprint(all[0].ContextMap()["segments"]), names[gone[0]]) ||
			all[1].Level != zapcore.InfoLevel {
			t.Fatalf("Open with AcceptMissingSegments logged %v", all)
		}
		if diffs, _ := checkStore(context.Background(), s, single(want, ids...)); len(diffs) > 0 {
			t.Fatalf("the store differs from the calls of the segments left:\n%s", strings.Join(diffs, "\n"))
		}
		s.Close()
		for _, i := range gone {
			if fileSize(t, filepath.Join(dir, names[i])) != 0 {
				t.Fatalf("%s is not an empty file", names[i])
			}
		}
		s = openDamaged(t, dir, mutate, want, ids, nil, nil, nil) // without the option now
		s.Close()
	}
}

func TestParseURIAcceptMissingSegments(t *testing.T) {
	o, err := ParseURI("file:///var/lib/kiteq?accept-missing-segments=true")
	if err != nil || !o.AcceptMissingSegments {
		t.Fatalf("%+v %v", o, err)
	}
	if o, err := ParseURI("file:///var/lib/kiteq"); err != nil || o.AcceptMissingSegments {
		t.Fatalf("the default: %+v %v", o, err)
	}
	if _, err := ParseURI("file:///var/lib/kiteq?accept-missing-segments=maybe"); err == nil || !strings.Contains(err.Error(), "accept-missing-segments") {
		t.Fatalf("a bad value: %v", err)
	}
}

// An append torn by a crash at the end of the active segment can leave
// the start of a large record whose body (a client's bytes) frames as
// records: here a delete of another message and the save of a message
// never sent. Those are not records of the log: the torn record is cut
// off whole, with the file ending where it is torn and with zeros after
// it, and no frame inside it is applied.
func TestTornAppendWithRecordsInItsBodyIsCutWhole(t *testing.T) {
	for _, zeros := range []int{0, 16 << 10} {
		t.Run(fmt.Sprintf("zeros=%d", zeros), func(t *testing.T) {
			dir := t.TempDir()
			mutate := func(o *Options) { o.SegmentSize, o.Sync = 64<<10, SyncNever }
			s := openTest(t, dir, mutate)
			ctx := context.Background()
			next := time.Now().UnixMilli()
			victim := protocol.MessageId()
			if _, err := s.Save(ctx, faultMessage(victim, true, next, 100)); err != nil {
				t.Fatal(err)
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			vid, _ := parseID(victim)
			forged := protocol.MessageId()
			fm := faultMessage(forged, true, next, 10)
			fid, _ := parseID(forged)
			fr, err := saveRecord(fid, fm, flagCommitted, "", 0)
			if err != nil {
				t.Fatal(err)
			}
			body := appendRecord(nil, &record{kind: recDelete, id: vid})
			body = appendRecord(body, fr)
			body = append(body, bytes.Repeat([]byte("p"), 4000)...)
			torn := appendRecord(nil, &record{kind: recSave, id: msgID{1}, header: []byte("h"), body: body})
			path := segmentFiles(t, dir)[0]
			data, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			end := int64(len(data))
			data = append(data, torn[:len(torn)-2000]...) // torn after the frames in its body
			data = append(data, make([]byte, zeros)...)
			if err := os.WriteFile(path, data, 0o644); err != nil {
				t.Fatal(err)
			}
			name := filepath.Base(path)
			want := map[string]mstate{victim: {present: true, committed: true, next: next, bodyLen: 100}}
			repairs := map[string]string{"truncated_" + strings.TrimSuffix(name, ".seg"): fmt.Sprintf("%d bytes at offset %d", int64(len(data))-end, end)}
			damage := []damageWant{{seg: name, off: end, length: -1, cut: true}}
			s = openDamaged(t, dir, mutate, want, []string{forged}, repairs, damage, map[string][]byte{name: data})
			defer s.Close()
			if got := fileSize(t, path); got != end {
				t.Fatalf("the segment is %d bytes after Open, want %d", got, end)
			}
		})
	}
}

// A message body is a client's bytes and can hold correctly framed
// records. When one bit of the length of the record that carries it flips
// (bit 0 of byte 1: 256 bytes more or fewer), the frames in its body are
// not records of the log, in a closed segment as in the active one: here a
// delete of another message, the commit of an undecided one and the save
// of a message never sent. The carrier alone is lost, and reported as one
// region of its own length.
func TestFramesInTheBodyOfARecordWithADamagedLength(t *testing.T) {
	for _, closed := range []bool{true, false} {
		// The two carriers' lengths differ by 256: the flip lengthens one
		// and shortens the other, and the frames lie in the last 256 bytes.
		for _, pad := range []int{300, 556} {
			t.Run(fmt.Sprintf("closed=%v/pad=%d", closed, pad), func(t *testing.T) {
				dir := t.TempDir()
				mutate := func(o *Options) { o.SegmentSize, o.Sync = 64<<10, SyncNever }
				s := openTest(t, dir, mutate)
				ctx := context.Background()
				next := time.Now().UnixMilli()
				want := make(map[string]mstate)
				save := func(id string, committed bool, body []byte) {
					t.Helper()
					m := faultMessage(id, committed, next, 100)
					if body != nil {
						m.Body = body
					}
					if stored, err := s.Save(ctx, m); err != nil || !stored {
						t.Fatalf("save: stored=%v err=%v", stored, err)
					}
					want[id] = mstate{present: true, committed: committed, next: next, bodyLen: 100}
				}
				victim, txn := protocol.MessageId(), protocol.MessageId()
				save(victim, true, nil)
				save(txn, false, nil)
				vid, _ := parseID(victim)
				tid, _ := parseID(txn)
				forged := protocol.MessageId()
				fid, _ := parseID(forged)
				fr, err := saveRecord(fid, faultMessage(forged, true, next, 10), flagCommitted, "", 0)
				if err != nil {
					t.Fatal(err)
				}
				body := bytes.Repeat([]byte("p"), pad)
				body = appendRecord(body, &record{kind: recDelete, id: vid})
				body = appendRecord(body, &record{kind: recCommit, id: tid, next: next})
				body = appendRecord(body, fr)
				body = append(body, "qqqqqqqq"...)
				carrier := protocol.MessageId()
				save(carrier, true, body)
				delete(want, carrier)
				more := 3
				if closed {
					more = 500 // 64 KiB segments: the carrier's is closed
				}
				for range more {
					save(protocol.MessageId(), true, nil)
				}
				if err := s.Close(); err != nil {
					t.Fatal(err)
				}
				files := segmentFiles(t, dir)
				cid, _ := parseID(carrier)
				var path string
				var data []byte
				var rec diskRecord
				for i, f := range files {
					b, err := os.ReadFile(f)
					if err != nil {
						t.Fatal(err)
					}
					recs, _, _ := parseSegment(b)
					for _, r := range recs {
						if bytes.Equal(b[r.off+9:r.off+25], cid[:]) {
							if closed == (i == len(files)-1) {
								t.Fatalf("setup: the carrier is in segment %d of %d", i+1, len(files))
							}
							path, data, rec = f, b, r
						}
					}
				}
				if path == "" || rec.end() == int64(len(data)) {
					t.Fatal("setup: the carrier is not a record with one after it")
				}
				data[rec.off+1] ^= 1
				if err := os.WriteFile(path, data, 0o644); err != nil {
					t.Fatal(err)
				}
				name := filepath.Base(path)
				damage := []damageWant{{seg: name, off: rec.off, length: rec.size, id: carrier}}
				before := map[string][]byte{name: data}
				s = openDamaged(t, dir, mutate, want, []string{carrier, forged}, nil, damage, before)
				if got := fileSize(t, path); got != int64(len(data)) {
					t.Fatalf("%s is %d bytes after Open, was %d", name, got, len(data))
				}
				if err := s.Close(); err != nil {
					t.Fatal(err)
				}
			})
		}
	}
}
