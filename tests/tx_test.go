package tests

import (
	"errors"
	"testing"
	"time"

	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/registry/binding"
)

// TestTransactionCommitAndRollback: SendTxStringMessage stores the
// message uncommitted; a committing doTx has it delivered, a rolling-back
// or failing doTx never does.
func TestTransactionCommitAndRollback(t *testing.T) {
	b := startBroker(t, nil)
	rec := newRecorder("c")
	startClient(t, b.uri(), "g", rec, nil, binding.Bind_Fanout("g", "trade", 100, true))
	producer := startClient(t, b.uri(), "producer", newRecorder("producer"), []string{"trade"})

	commit := newMessage("trade", "order", "commit")
	ran := false
	if err := producer.SendTxStringMessage(commit, func(m *protocol.StringMessage) (bool, error) {
		ran = true
		return true, nil
	}); err != nil || !ran {
		t.Fatalf("commit: ran %t, %v", ran, err)
	}
	rollback := newMessage("trade", "order", "rollback")
	if err := producer.SendTxStringMessage(rollback, func(*protocol.StringMessage) (bool, error) { return false, nil }); err != nil {
		t.Fatal(err)
	}
	failed := newMessage("trade", "order", "failed")
	localErr := errors.New("insufficient balance")
	if err := producer.SendTxStringMessage(failed, func(*protocol.StringMessage) (bool, error) { return true, localErr }); !errors.Is(err, localErr) {
		t.Fatalf("doTx error: got %v, want it wrapped", err)
	}

	eventually(t, 5*time.Second, "committed message delivered", func() bool { return rec.count(commit.GetHeader().GetMessageId()) == 1 })
	eventually(t, 5*time.Second, "two rollbacks", func() bool { return b.Stats().RolledBack == 2 })
	time.Sleep(300 * time.Millisecond)
	for _, m := range []*protocol.StringMessage{rollback, failed} {
		if n := rec.count(m.GetHeader().GetMessageId()); n != 0 {
			t.Errorf("rolled-back message %q delivered %d times", m.GetBody(), n)
		}
	}
	if st := b.Stats(); st.Committed != 1 || st.Finished != 1 {
		t.Fatalf("committed %d finished %d, want 1 and 1", st.Committed, st.Finished)
	}
}
