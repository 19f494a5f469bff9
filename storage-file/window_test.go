package filestore

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/storage"
)

// Due reads a page through one window of the segment at a time: records
// of every size, across window and segment ends, with delivery records
// between them, come back as Get reads them one by one.
func TestDueReadsThroughWindowsAsGetDoes(t *testing.T) {
	mutate := func(o *Options) { o.SegmentSize, o.Sync = 1<<20, SyncNever }
	s, _, err := openObserved(t.TempDir(), mutate)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	sizes := []int{10, 700, 5 << 10, readWindowSize/2 - 100, readWindowSize/2 + 100, 300, 64 << 10, 1}
	base := time.Now().Add(-time.Hour).UnixMilli()
	var ids []string
	for i := range 120 {
		id := protocol.MessageId()
		if _, err := s.Save(ctx, faultMessage(id, true, base+int64(i), sizes[i%len(sizes)])); err != nil {
			t.Fatal(err)
		}
		if i%3 == 0 {
			d := storage.DeliveryResult{MessageID: id, DeliverCount: 1, NextDeliverTime: time.UnixMilli(base + int64(i)),
				SuccGroups: []string{"a"}, FailGroups: []string{"b"}, FailCounts: []int32{1}}
			if err := s.RecordDelivery(ctx, d); err != nil {
				t.Fatal(err)
			}
		}
		ids = append(ids, id)
	}
	if n := len(segmentFiles(t, s.opts.Dir)); n < 3 {
		t.Fatalf("%d segments, want the messages spread over 3 or more", n)
	}
	page, err := s.Due(ctx, storage.DueQuery{Kind: storage.DueDelivery, Before: time.Now(), Limit: len(ids)})
	if err != nil {
		t.Fatal(err)
	}
	if len(page) != len(ids) {
		t.Fatalf("Due returned %d messages, want %d", len(page), len(ids))
	}
	for i, m := range page {
		if m.ID() != ids[i] {
			t.Fatalf("message %d is %s, want %s", i, m.ID(), ids[i])
		}
		want, err := s.Get(ctx, m.ID())
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(m.Body, want.Body) || m.Header.GetMessageId() != want.Header.GetMessageId() ||
			len(m.FailGroups) != len(want.FailGroups) || m.DeliverCount != want.DeliverCount {
			t.Fatalf("message %d (%d-byte body) read through the window differs from Get's", i, len(want.Body))
		}
	}
}
