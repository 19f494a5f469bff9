package filestore

import (
	"context"
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
		SuccGroups: []string{"ok"}, FailGroups: []string{"bad"}}
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
	if !m.Committed || m.DeliverCount != 0 || len(m.FailGroups) != 0 || len(m.SuccGroups) != 1 || m.SuccGroups[0] != "ok" {
		t.Fatalf("after a restart: committed %v, count %d, groups %q %q", m.Committed, m.DeliverCount, m.SuccGroups, m.FailGroups)
	}
	if dl, err := s.DeadLetters(ctx, "", 10); err != nil || len(dl) != 0 {
		t.Fatalf("dead letters after a restart: %d, %v", len(dl), err)
	}
}
