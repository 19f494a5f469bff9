package filestore

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/storage"
)

// Two recSave records as the store wrote them before digests existed (the
// second with FailCounts, the last field then), of message
// 0123456789abcdef0123456789abcdef: committed, count 2, due at
// 1700000000000, SuccGroups [s-a], body "old body".
const (
	oldSaveRecord       = "8700000010ac7891010123456789abcdef0123456789abcdef01000480a0abfef9620103732d610000005b0a203031323334353637383961626364656630313233343536373839616263646566120574726164651a087061792d7375636320ffffffffffffffffff0128ffffffffffffffffff01320c6f6c642d70726f647563657238014000086f6c6420626f6479"
	oldSaveRecordCounts = "8d000000ee274c96010123456789abcdef0123456789abcdef01000480a0abfef9620103732d610103732d6200005b0a203031323334353637383961626364656630313233343536373839616263646566120574726164651a087061792d7375636320ffffffffffffffffff0128ffffffffffffffffff01320c6f6c642d70726f647563657238014000086f6c6420626f64790104"
	oldRecordID         = "0123456789abcdef0123456789abcdef"
)

func decodeEncoded(t *testing.T, enc []byte) *record {
	t.Helper()
	n, crc, err := parseRecordHeader(enc)
	if err != nil {
		t.Fatal(err)
	}
	if n != len(enc)-recordHeaderLen {
		t.Fatalf("record length %d, encoded %d", n, len(enc)-recordHeaderLen)
	}
	r, err := decodeRecord(enc[recordHeaderLen:], crc)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// The digest is the last field of a recSave: a record written before it
// existed decodes with none, and one with it decodes with it, whichever of
// the fail-state fields before it are empty.
func TestDigestRecordField(t *testing.T) {
	for _, tc := range []struct {
		hex    string
		fail   []string
		counts []int32
	}{{oldSaveRecord, nil, nil}, {oldSaveRecordCounts, []string{"s-b"}, []int32{2}}} {
		enc, err := hex.DecodeString(tc.hex)
		if err != nil {
			t.Fatal(err)
		}
		r := decodeEncoded(t, enc)
		m, err := r.message()
		if err != nil {
			t.Fatal(err)
		}
		if r.digest != nil || m.Digest != nil {
			t.Fatalf("an old record decodes with digest %x / %x, want none", r.digest, m.Digest)
		}
		if m.ID() != oldRecordID || string(m.Body) != "old body" || m.DeliverCount != 2 || !slices.Equal(m.SuccGroups, []string{"s-a"}) ||
			!slices.Equal(m.FailGroups, tc.fail) || !slices.Equal(m.FailCounts, tc.counts) {
			t.Fatalf("old record decoded as %s body %q count %d groups %q %q counts %v", m.ID(), m.Body, m.DeliverCount,
				m.SuccGroups, m.FailGroups, m.FailCounts)
		}
		// The same record written now: the old bytes when it has no digest.
		if again := appendRecord(nil, r); !bytes.Equal(again, enc) {
			t.Fatalf("re-encoded without a digest:\n%x\nwant the old bytes\n%x", again, enc)
		}
	}

	id, _ := parseID(protocol.MessageId())
	digest := bytes.Repeat([]byte{0xd1}, storage.DigestLen)
	for _, tc := range []struct {
		name   string
		fail   []string
		counts []int32
		due    []int64
	}{
		{"no fail state", nil, nil, nil},
		{"counts", []string{"b"}, []int32{4}, nil},
		{"due", []string{"b"}, nil, []int64{42}},
		{"counts and due", []string{"b", "c"}, []int32{4, 1}, []int64{42, 43}},
	} {
		r := decodeEncoded(t, appendRecord(nil, &record{kind: recSave, id: id, fail: tc.fail,
			failCounts: tc.counts, failDue: tc.due, header: []byte{}, body: []byte("b"), digest: digest}))
		if !bytes.Equal(r.digest, digest) || !slices.Equal(r.failCounts, tc.counts) || !slices.Equal(r.failDue, tc.due) {
			t.Fatalf("%s: decoded digest %x counts %v due %v", tc.name, r.digest, r.failCounts, r.failDue)
		}
	}
}

// A store whose log holds records written before digests existed opens
// with their messages, Digest nil: any Save of their ids is a duplicate.
func TestDigestOldLog(t *testing.T) {
	dir := t.TempDir()
	enc, err := hex.DecodeString(oldSaveRecord)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(segmentPath(dir, 1), enc, 0o644); err != nil {
		t.Fatal(err)
	}
	s := openTest(t, dir, nil)
	defer s.Close()
	ctx := context.Background()
	m, err := s.Get(ctx, oldRecordID)
	if err != nil {
		t.Fatal(err)
	}
	if m.Digest != nil || string(m.Body) != "old body" {
		t.Fatalf("old message: digest %x body %q", m.Digest, m.Body)
	}
	retry := m.Clone()
	retry.Body = []byte("another body")
	retry.Digest = storage.Digest("a-producer", retry.Protocol())
	if stored, err := s.Save(ctx, retry); stored || err != nil {
		t.Fatalf("Save of an id stored without a digest: (%v, %v), want (false, nil)", stored, err)
	}
}

// Compaction rewrites a message's recSave with its digest, so a reused id
// is refused after its message was copied out of the oldest segment, and
// after a restart: for live messages, one with a delivery record, a dead
// letter and one put back by Redeliver.
func TestDigestSurvivesCompaction(t *testing.T) {
	dir := t.TempDir()
	mutate := func(o *Options) { o.SegmentSize, o.Sync = 64<<10, SyncNever }
	s, logs, err := openObserved(dir, mutate)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }()
	ctx := context.Background()

	type kept struct {
		m    *storage.Message
		dead bool
	}
	var keep []kept
	for i := range 40 {
		id := protocol.MessageId()
		m := faultMessage(id, i%2 == 0, time.Now().UnixMilli(), 1<<10)
		m.Digest = storage.Digest("the-producer", m.Protocol())
		if _, err := s.Save(ctx, m); err != nil {
			t.Fatal(err)
		}
		switch i % 10 {
		case 0: // live
		case 2: // live, with a delivery record
			if err := s.RecordDelivery(ctx, storage.DeliveryResult{MessageID: id, DeliverCount: 1, NextDeliverTime: time.Now(),
				FailGroups: []string{"g"}, FailCounts: []int32{1}}); err != nil {
				t.Fatal(err)
			}
		case 4: // dead-lettered
			if err := s.DeadLetter(ctx, id, "expired"); err != nil {
				t.Fatal(err)
			}
		case 6: // dead-lettered and put back
			if err := s.DeadLetter(ctx, id, "expired"); err != nil {
				t.Fatal(err)
			}
			if err := s.Redeliver(ctx, id); err != nil {
				t.Fatal(err)
			}
		default:
			if err := s.Delete(ctx, id); err != nil {
				t.Fatal(err)
			}
			continue
		}
		keep = append(keep, kept{m, i%10 == 4})
	}
	finishRound(t, s, 40, 1<<10) // fills the first segment; the log moves on
	first := segmentFiles(t, dir)[0]
	compactAway(t, s, first, logs)

	check := func(when string) {
		t.Helper()
		dead := map[string]*storage.Message{}
		dls, err := s.DeadLetters(ctx, "", 100)
		if err != nil {
			t.Fatal(err)
		}
		for _, dl := range dls {
			dead[dl.Message.ID()] = dl.Message
		}
		for _, k := range keep {
			got := dead[k.m.ID()]
			if !k.dead {
				if got, err = s.Get(ctx, k.m.ID()); err != nil {
					t.Fatalf("%s: Get %s: %v", when, k.m.ID(), err)
				}
			}
			if got == nil {
				t.Fatalf("%s: dead letter %s is missing", when, k.m.ID())
			}
			if !bytes.Equal(got.Digest, k.m.Digest) || !bytes.Equal(got.Body, k.m.Body) {
				t.Fatalf("%s: message %s (dead %v): digest %x, %d-byte body; want digest %x, the %d-byte body saved",
					when, k.m.ID(), k.dead, got.Digest, len(got.Body), k.m.Digest, len(k.m.Body))
			}
			other := k.m.Clone()
			other.Body = []byte("forged")
			other.Digest = storage.Digest("another-producer", other.Protocol())
			if stored, err := s.Save(ctx, other); stored || !errors.Is(err, storage.ErrConflict) {
				t.Fatalf("%s: Save of another message under %s: (%v, %v), want ErrConflict", when, k.m.ID(), stored, err)
			}
			if stored, err := s.Save(ctx, k.m.Clone()); stored || err != nil {
				t.Fatalf("%s: Save of %s again: (%v, %v), want a duplicate", when, k.m.ID(), stored, err)
			}
		}
	}
	check("after compaction")
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if s, _, err = openObserved(dir, mutate); err != nil {
		t.Fatal(err)
	}
	check("after compaction and a restart")
}
