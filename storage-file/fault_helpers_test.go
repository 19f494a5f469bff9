package filestore

// Helpers shared by the fault tests (crash_test.go, repair_test.go,
// diskfull_test.go, space_test.go, lock_test.go): messages whose body can
// be rebuilt from their id, a model of what the store must hold, a
// comparison of the model with what the store returns, an independent
// reader of the record framing on disk, and re-running the test binary as
// a child process.

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"hash/fnv"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/storage"
)

// faultBody is the body of message id when it is n bytes long: printable
// bytes drawn from a generator seeded by the id, so a reader that knows id
// and n can check every byte.
func faultBody(id string, n int) []byte {
	if n == 0 {
		return nil
	}
	h := fnv.New64a()
	h.Write([]byte(id))
	r := rand.New(rand.NewPCG(h.Sum64(), uint64(n)))
	b := make([]byte, n)
	for i := range b {
		b[i] = 'a' + byte(r.IntN(26))
	}
	return b
}

// faultCmd is how message id is delivered: half the ids are bytes messages.
func faultCmd(id string) protocol.CmdType {
	if id[len(id)-1]%2 == 0 {
		return protocol.CmdBytesMessage
	}
	return protocol.CmdStringMessage
}

// faultMessage builds the message the fault tests save.
func faultMessage(id string, committed bool, nextMs int64, bodyLen int) *storage.Message {
	h := &protocol.Header{
		MessageId: new(id), Topic: new("trade"), MessageType: new("pay-succ"),
		ExpiredTime: new(int64(-1)), DeliveryLimit: new(int32(-1)), GroupId: new("fault-producer"),
		Commit: new(committed), Fly: new(false),
		Properties: []*protocol.Entry{{Key: new("k"), Value: new("v-" + id[:6])}},
	}
	return &storage.Message{
		Cmd: faultCmd(id), Header: h, Body: faultBody(id, bodyLen), Committed: committed,
		NextDeliverTime: time.UnixMilli(nextMs),
	}
}

// mstate is what the store must hold for one id.
type mstate struct {
	present   bool // false: Get and Due do not know the id, nor DeadLetters
	dead      bool
	reason    string
	atMin     int64 // dead: the dead-letter time is at least this (unix ms)
	committed bool
	count     int32
	next      int64 // unix ms; -1: any time at or after nextMin (a commit whose time is unknown)
	nextMin   int64
	succ      []string
	fail      []string
	counts    []int32 // FailCounts
	bodyLen   int
}

// fop is one acknowledged (or attempted) call on the store.
type fop struct {
	kind      string // save, resave, commit, rollback, delivery, delete, dead
	id        string
	committed bool  // save
	next      int64 // save, delivery; commit when known, else -1
	nextMin   int64 // commit: the commit time is at least this
	bodyLen   int   // save
	count     int32 // delivery
	succ      []string
	fail      []string
	reason    string // dead
	atMin     int64  // dead
}

func (o fop) String() string {
	switch o.kind {
	case "save":
		return fmt.Sprintf("save %s committed=%v next=%d body=%d", o.id, o.committed, o.next, o.bodyLen)
	case "delivery":
		return fmt.Sprintf("delivery %s count=%d next=%d succ=%v fail=%v", o.id, o.count, o.next, o.succ, o.fail)
	case "dead":
		return fmt.Sprintf("dead %s %q", o.id, o.reason)
	case "commit":
		return fmt.Sprintf("commit %s next=%d", o.id, o.next)
	}
	return o.kind + " " + o.id
}

// applyOp returns the state of o.id after o, from st, with the rules the
// log is replayed by: a change to an id that is absent (or in a state the
// change does not apply to) changes nothing.
func applyOp(st mstate, o fop) mstate {
	switch o.kind {
	case "save":
		if st.present {
			return st // an existing id: Save changes nothing
		}
		return mstate{present: true, committed: o.committed, next: o.next, bodyLen: o.bodyLen}
	case "resave":
		return st
	case "commit":
		if st.present && !st.dead && !st.committed {
			st.committed = true
			st.next, st.nextMin = o.next, o.nextMin
			st.count = 0 // the transaction checks were not deliveries
		}
	case "rollback":
		if st.present && !st.dead && !st.committed {
			return mstate{}
		}
	case "delivery":
		if st.present && !st.dead {
			st.count, st.next = o.count, o.next
			st.succ, st.fail = slices.Clone(o.succ), slices.Clone(o.fail)
		}
	case "delete":
		if st.present && !st.dead {
			return mstate{}
		}
	case "dead":
		if st.present && !st.dead {
			st.dead, st.reason, st.atMin = true, o.reason, o.atMin
		}
	default:
		panic("unknown op " + o.kind)
	}
	return st
}

// replay applies ops in order to an empty model.
func replay(ops []fop) map[string]mstate {
	m := make(map[string]mstate)
	for _, o := range ops {
		st := applyOp(m[o.id], o)
		if st.present {
			m[o.id] = st
		} else {
			delete(m, o.id)
		}
	}
	return m
}

// got is what the store returns for one id.
type got struct {
	present bool
	dead    bool
	reason  string
	at      int64
	m       *storage.Message
}

// diffState describes how g differs from want, or returns "".
func diffState(id string, g got, want mstate) string {
	if g.present != want.present || g.dead != want.dead {
		return fmt.Sprintf("present/dead: got %v/%v, want %v/%v", g.present, g.dead, want.present, want.dead)
	}
	if !g.present {
		return ""
	}
	var d []string
	if g.dead {
		if g.reason != want.reason {
			d = append(d, fmt.Sprintf("reason: got %q, want %q", g.reason, want.reason))
		}
		if g.at < want.atMin {
			d = append(d, fmt.Sprintf("dead-letter time %d before the call began (%d)", g.at, want.atMin))
		}
	}
	m := g.m
	if m.ID() != id {
		d = append(d, fmt.Sprintf("id: got %s", m.ID()))
	}
	if m.Committed != want.committed || m.Header.GetCommit() != want.committed {
		d = append(d, fmt.Sprintf("committed: got %v (header %v), want %v", m.Committed, m.Header.GetCommit(), want.committed))
	}
	if m.DeliverCount != want.count {
		d = append(d, fmt.Sprintf("DeliverCount: got %d, want %d", m.DeliverCount, want.count))
	}
	next := m.NextDeliverTime.UnixMilli()
	if want.next == -1 {
		if next < want.nextMin {
			d = append(d, fmt.Sprintf("NextDeliverTime: got %d, want at least %d", next, want.nextMin))
		}
	} else if next != want.next {
		d = append(d, fmt.Sprintf("NextDeliverTime: got %d, want %d", next, want.next))
	}
	if !slices.Equal(m.SuccGroups, want.succ) && (len(m.SuccGroups) != 0 || len(want.succ) != 0) {
		d = append(d, fmt.Sprintf("SuccGroups: got %q, want %q", m.SuccGroups, want.succ))
	}
	if !slices.Equal(m.FailGroups, want.fail) && (len(m.FailGroups) != 0 || len(want.fail) != 0) {
		d = append(d, fmt.Sprintf("FailGroups: got %q, want %q", m.FailGroups, want.fail))
	}
	if !slices.Equal(m.FailCounts, want.counts) {
		d = append(d, fmt.Sprintf("FailCounts: got %v, want %v", m.FailCounts, want.counts))
	}
	if m.Cmd != faultCmd(id) {
		d = append(d, fmt.Sprintf("Cmd: got %v", m.Cmd))
	}
	if !bytes.Equal(m.Body, faultBody(id, want.bodyLen)) {
		d = append(d, fmt.Sprintf("Body: got %d bytes, want %d (or different content)", len(m.Body), want.bodyLen))
	}
	if m.Header.GetTopic() != "trade" || m.Header.GetGroupId() != "fault-producer" ||
		len(m.Header.GetProperties()) != 1 || m.Header.GetProperties()[0].GetValue() != "v-"+id[:6] {
		d = append(d, fmt.Sprintf("Header: got %v", m.Header))
	}
	return strings.Join(d, "; ")
}

// resolved is the model state that matches g exactly (a commit or dead
// letter whose time was unknown gets the time g shows).
func resolved(g got, want mstate) mstate {
	if want.present && want.next == -1 {
		want.next = g.m.NextDeliverTime.UnixMilli()
	}
	if want.dead {
		want.atMin = g.at
	}
	return want
}

// farFuture is a Before that every message in the fault tests is due at.
var farFuture = time.Now().Add(100 * 365 * 24 * time.Hour)

// dueIDs pages through Due of kind and checks the order.
func dueIDs(ctx context.Context, s *Store, kind storage.DueKind) ([]string, error) {
	var ids []string
	var after storage.Cursor
	for {
		page, err := s.Due(ctx, storage.DueQuery{Kind: kind, Before: farFuture, After: after, Limit: 257})
		if err != nil {
			return nil, err
		}
		for _, m := range page {
			if c := m.Cursor(); !after.IsZero() && c.Compare(after) <= 0 {
				return nil, fmt.Errorf("due kind %d: %s at %v comes after the cursor %v", kind, m.ID(), m.NextDeliverTime, after)
			}
			after = m.Cursor()
			ids = append(ids, m.ID())
		}
		if len(page) < 257 {
			return ids, nil
		}
	}
}

// deadLetters pages through the whole dead-letter queue.
func deadLetters(ctx context.Context, s *Store) (map[string]*storage.DeadLetter, error) {
	out := make(map[string]*storage.DeadLetter)
	after := ""
	for {
		page, err := s.DeadLetters(ctx, after, 101)
		if err != nil {
			return nil, err
		}
		for _, d := range page {
			if d.Message.ID() <= after {
				return nil, fmt.Errorf("dead letters out of order: %s after %s", d.Message.ID(), after)
			}
			after = d.Message.ID()
			out[after] = d
		}
		if len(page) < 101 {
			return out, nil
		}
	}
}

// checkStore compares the store with the model. For each id the model
// lists the states it may be in (more than one when a call was in flight at
// a crash). It returns the differences, and the model narrowed to what the
// store holds. Due and DeadLetters must list exactly the model's live and
// dead ids.
func checkStore(ctx context.Context, s *Store, model map[string][]mstate) (diffs []string, narrowed map[string]mstate) {
	narrowed = make(map[string]mstate, len(model))
	dls, err := deadLetters(ctx, s)
	if err != nil {
		return []string{"DeadLetters: " + err.Error()}, nil
	}
	var due [2]map[string]bool
	for k, kind := range []storage.DueKind{storage.DueDelivery, storage.DueTxCheck} {
		ids, err := dueIDs(ctx, s, kind)
		if err != nil {
			return []string{"Due: " + err.Error()}, nil
		}
		due[k] = make(map[string]bool, len(ids))
		for _, id := range ids {
			if due[k][id] {
				diffs = append(diffs, fmt.Sprintf("Due kind %d returns %s twice", kind, id))
			}
			due[k][id] = true
		}
	}
	ids := make([]string, 0, len(model))
	for id := range model {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		var g got
		m, err := s.Get(ctx, id)
		switch {
		case err == nil:
			g = got{present: true, m: m}
		case errors.Is(err, storage.ErrNotFound):
			if d := dls[id]; d != nil {
				g = got{present: true, dead: true, reason: d.Reason, at: d.At.UnixMilli(), m: d.Message}
			}
		default:
			diffs = append(diffs, fmt.Sprintf("%s: Get: %v", id, err))
			continue
		}
		var why []string
		matched := false
		for _, want := range model[id] {
			if d := diffState(id, g, want); d != "" {
				why = append(why, d)
				continue
			}
			narrowed[id] = resolved(g, want)
			matched = true
			break
		}
		if !matched {
			diffs = append(diffs, fmt.Sprintf("%s: %s", id, strings.Join(why, " | or | ")))
			continue
		}
		live := g.present && !g.dead
		if live && g.m.Committed != due[0][id] || live && !g.m.Committed != due[1][id] || !live && (due[0][id] || due[1][id]) {
			diffs = append(diffs, fmt.Sprintf("%s: present=%v dead=%v but in Due(delivery)=%v Due(tx check)=%v",
				id, g.present, g.dead, due[0][id], due[1][id]))
		}
	}
	for k := range due {
		for id := range due[k] {
			if _, ok := model[id]; !ok {
				diffs = append(diffs, fmt.Sprintf("Due kind %d returns %s, which was never saved", k, id))
			}
		}
	}
	for id := range dls {
		if _, ok := model[id]; !ok {
			diffs = append(diffs, fmt.Sprintf("DeadLetters returns %s, which was never saved", id))
		}
	}
	return diffs, narrowed
}

// single turns a model with one state per id into checkStore's form; absent
// ids are kept so that checkStore asks for them.
func single(m map[string]mstate, absent ...string) map[string][]mstate {
	out := make(map[string][]mstate, len(m)+len(absent))
	for id, st := range m {
		out[id] = []mstate{st}
	}
	for _, id := range absent {
		if _, ok := out[id]; !ok {
			out[id] = []mstate{{}}
		}
	}
	return out
}

// openObserved opens the store with a logger that records every entry.
func openObserved(dir string, mutate func(*Options)) (*Store, *observer.ObservedLogs, error) {
	core, logs := observer.New(zapcore.DebugLevel)
	o := DefaultOptions(dir)
	if mutate != nil {
		mutate(&o)
	}
	s, err := Open(o, zap.New(core))
	return s, logs, err
}

// checkOpenLog checks that Open logged its recovery line last, and before
// it only lines that report a damaged region (logSkipped, logCut), and
// returns the recovery line.
func checkOpenLog(t *testing.T, logs *observer.ObservedLogs) observer.LoggedEntry {
	t.Helper()
	line, _ := openLogLines(t, logs)
	return line
}

// openLogLines is checkOpenLog, returning the damage lines too.
func openLogLines(t *testing.T, logs *observer.ObservedLogs) (observer.LoggedEntry, []observer.LoggedEntry) {
	t.Helper()
	all := logs.All()
	ok := len(all) > 0 && strings.HasPrefix(all[len(all)-1].Message, "file store opened")
	for _, e := range all[:max(len(all)-1, 0)] {
		ok = ok && e.Level == zapcore.WarnLevel && (e.Message == logSkipped || e.Message == logCut)
	}
	if !ok {
		var msgs []string
		for _, e := range all {
			msgs = append(msgs, fmt.Sprintf("%s %q %v", e.Level, e.Message, e.ContextMap()))
		}
		t.Fatalf("Open logged %d entries, want one \"file store opened…\" line, after a line for each damaged region: %s", len(all), strings.Join(msgs, "; "))
	}
	return all[len(all)-1], all[:len(all)-1]
}

// diskRecord is where a record lies in a segment file.
type diskRecord struct {
	off, size int64
}

func (r diskRecord) end() int64 { return r.off + r.size }

var faultCRC = crc32.MakeTable(crc32.Castagnoli)

// parseSegment reads the framing of a segment file (u32 length, u32
// CRC-32C of the payload, payload) on its own, without the store's code.
// It returns the whole, checksummed records; zeroFrom, the offset from
// which the file holds only zeros (the unused part of a preallocated
// segment), or -1; and badAt, the offset where reading stopped on anything
// else, or -1.
func parseSegment(data []byte) (recs []diskRecord, zeroFrom, badAt int64) {
	off := int64(0)
	for off < int64(len(data)) {
		if allZeros(data[off:]) {
			return recs, off, -1
		}
		if int64(len(data))-off < 8 {
			return recs, -1, off
		}
		n := int64(binary.LittleEndian.Uint32(data[off:]))
		crc := binary.LittleEndian.Uint32(data[off+4:])
		if n < 17 || off+8+n > int64(len(data)) || crc32.Checksum(data[off+8:off+8+n], faultCRC) != crc {
			return recs, -1, off
		}
		recs = append(recs, diskRecord{off, 8 + n})
		off += 8 + n
	}
	return recs, -1, -1
}

func allZeros(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// segmentFiles lists the segment files of dir in log order.
func segmentFiles(t testing.TB, dir string) []string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(dir, "*.seg"))
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(files) // zero-padded numbers: name order is log order
	return files
}

// diskUse returns the number of segment files in dir and the total size
// of every file in it but the lock (segments, and whatever else the store
// keeps there, such as a preallocated spare segment).
func diskUse(t testing.TB, dir string) (segments int, bytes int64) {
	t.Helper()
	segments = len(segmentFiles(t, dir))
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.Name() == "LOCK" || !e.Type().IsRegular() {
			continue
		}
		info, err := e.Info()
		if err != nil {
			continue // removed meanwhile
		}
		bytes += info.Size()
	}
	return segments, bytes
}

// checkSegmentsClean fails unless every segment file of dir is a sequence
// of whole, checksummed records up to its end; the last one may end in
// zeros (the unused part of a preallocated segment), the others may not.
func checkSegmentsClean(t testing.TB, dir string) (records int) {
	t.Helper()
	files := segmentFiles(t, dir)
	for i, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		recs, zeroFrom, bad := parseSegment(data)
		if bad >= 0 {
			t.Fatalf("%s: unreadable bytes at offset %d of %d", f, bad, len(data))
		}
		if zeroFrom >= 0 && i < len(files)-1 {
			t.Fatalf("%s, not the last segment, ends in %d bytes of zeros from offset %d", f, int64(len(data))-zeroFrom, zeroFrom)
		}
		records += len(recs)
	}
	return records
}

// childCommand runs this test binary again, running only the test named
// test, with env set. The child's stderr goes to stderr.
func childCommand(test string, env ...string) (*exec.Cmd, *bytes.Buffer) {
	cmd := exec.Command(os.Args[0], "-test.run=^"+test+"$", "-test.count=1", "-test.timeout=60s")
	cmd.Env = append(os.Environ(), env...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	return cmd, &stderr
}

// tail returns the last n bytes of b, for error messages.
func tail(b []byte, n int) string {
	if len(b) > n {
		return "…" + string(b[len(b)-n:])
	}
	return string(b)
}
