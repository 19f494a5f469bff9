package filestore

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/storage"
	"github.com/kiteq/kiteq/storage/storagetest"
)

func openTest(t *testing.T, dir string, mutate func(*Options)) *Store {
	t.Helper()
	o := DefaultOptions(dir)
	if mutate != nil {
		mutate(&o)
	}
	s, err := Open(o, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestConformance(t *testing.T) {
	for _, policy := range []SyncPolicy{SyncAlways, SyncNever} {
		t.Run(policy.String(), func(t *testing.T) {
			storagetest.Run(t, func(t *testing.T) storage.Store {
				return openTest(t, t.TempDir(), func(o *Options) { o.Sync = policy })
			})
			storagetest.RunPersistent(t, func(t *testing.T) storagetest.Place {
				dir := t.TempDir()
				return func(t *testing.T) storage.Store { return openTest(t, dir, func(o *Options) { o.Sync = policy }) }
			})
		})
	}
}

// A dead letter put back is live after a restart, as Redeliver left it.
func TestRedeliverSurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	s := openTest(t, dir, nil)
	id := protocol.MessageId()
	if _, err := s.Save(ctx, faultMessage(id, false, time.Now().UnixMilli(), 300)); err != nil {
		t.Fatal(err)
	}
	d := storage.DeliveryResult{MessageID: id, DeliverCount: 4, NextDeliverTime: time.Now().Add(time.Hour),
		SuccGroups: []string{"ok"}, FailGroups: []string{"bad"}, FailCounts: []int32{4}}
	if err := s.RecordDelivery(ctx, d); err != nil {
		t.Fatal(err)
	}
	if err := s.DeadLetter(ctx, id, "no transaction decision after 10 checks"); err != nil {
		t.Fatal(err)
	}
	if err := s.Redeliver(ctx, id); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openTest(t, dir, nil)
	defer s.Close()
	m, err := s.Get(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if !m.Committed || m.DeliverCount != 0 || len(m.FailGroups) != 0 || len(m.FailCounts) != 0 || len(m.SuccGroups) != 1 || m.SuccGroups[0] != "ok" {
		t.Fatalf("after a restart: committed %v, count %d, groups %q %q", m.Committed, m.DeliverCount, m.SuccGroups, m.FailGroups)
	}
	if dl, err := s.DeadLetters(ctx, "", 10); err != nil || len(dl) != 0 {
		t.Fatalf("dead letters after a restart: %d, %v", len(dl), err)
	}
}

// FailCounts and FailDue are the last fields of their records, written
// only when there are values: a record without them (as written before
// they existed) decodes with none, and both survive a restart.
func TestFailCountsRecordField(t *testing.T) {
	id, _ := parseID(protocol.MessageId())
	old := appendRecord(nil, &record{kind: recDelivery, id: id, count: 3, next: 42,
		succ: []string{"a"}, fail: []string{"b", "c"}})
	withCounts := appendRecord(nil, &record{kind: recDelivery, id: id, count: 3, next: 42,
		succ: []string{"a"}, fail: []string{"b", "c"}, failCounts: []int32{3, 1}})
	if len(withCounts) <= len(old) {
		t.Fatalf("record with counts %d bytes, without %d", len(withCounts), len(old))
	}
	for _, tc := range []struct {
		enc  []byte
		want []int32
	}{{old, nil}, {withCounts, []int32{3, 1}}} {
		n, crc, err := parseRecordHeader(tc.enc)
		if err != nil {
			t.Fatal(err)
		}
		r, err := decodeRecord(tc.enc[recordHeaderLen:recordHeaderLen+n], crc)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(r.failCounts, tc.want) || !slices.Equal(r.fail, []string{"b", "c"}) {
			t.Fatalf("decoded counts %v for groups %q, want %v", r.failCounts, r.fail, tc.want)
		}
	}
	// Counts that do not match the groups are corruption.
	bad := appendRecord(nil, &record{kind: recDelivery, id: id, fail: []string{"b"}, failCounts: []int32{1, 2}})
	n, crc, _ := parseRecordHeader(bad)
	if _, err := decodeRecord(bad[recordHeaderLen:recordHeaderLen+n], crc); !errors.Is(err, errCorrupt) {
		t.Fatalf("decode of 2 counts for 1 group: %v, want errCorrupt", err)
	}

	dir := t.TempDir()
	ctx := context.Background()
	s := openTest(t, dir, nil)
	sid := protocol.MessageId()
	m := faultMessage(sid, true, time.Now().UnixMilli(), 10)
	m.FailGroups, m.FailCounts = []string{"x"}, []int32{7}
	if _, err := s.Save(ctx, m); err != nil {
		t.Fatal(err)
	}
	did := protocol.MessageId()
	if _, err := s.Save(ctx, faultMessage(did, true, time.Now().UnixMilli(), 10)); err != nil {
		t.Fatal(err)
	}
	due := []time.Time{time.UnixMilli(time.Now().Add(time.Minute).UnixMilli()), time.UnixMilli(time.Now().Add(time.Hour).UnixMilli())}
	if err := s.RecordDelivery(ctx, storage.DeliveryResult{MessageID: did, DeliverCount: 5, NextDeliverTime: time.Now(),
		FailGroups: []string{"y", "z"}, FailCounts: []int32{5, 2}, FailDue: due}); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openTest(t, dir, nil)
	defer s.Close()
	for id, want := range map[string][]int32{sid: {7}, did: {5, 2}} {
		got, err := s.Get(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got.FailCounts, want) {
			t.Fatalf("FailCounts after a restart: %v, want %v", got.FailCounts, want)
		}
		if id == did && !slices.EqualFunc(got.FailDue, due, time.Time.Equal) {
			t.Fatalf("FailDue after a restart: %v, want %v", got.FailDue, due)
		}
	}
	// Due times without counts: the counts field is written, empty.
	only := appendRecord(nil, &record{kind: recDelivery, id: id, fail: []string{"b"}, failDue: []int64{42}})
	n, crc, _ = parseRecordHeader(only)
	r, err := decodeRecord(only[recordHeaderLen:recordHeaderLen+n], crc)
	if err != nil || len(r.failCounts) != 0 || !slices.Equal(r.failDue, []int64{42}) {
		t.Fatalf("decode of due times without counts: %v, counts %v, due %v", err, r.failCounts, r.failDue)
	}
}
