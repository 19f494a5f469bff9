package filestore

import (
	"testing"

	"go.uber.org/zap/zaptest"

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
