package protocol

import "testing"

func TestTxResponse(t *testing.T) {
	h := sampleHeader()
	tx := NewTxResponse(h)
	if tx.Header != h {
		t.Fatal("NewTxResponse lost the header")
	}
	if tx.Status() != TxUnknown {
		t.Fatalf("new response: status %s, want unknown", tx.Status())
	}
	tx.Commit()
	if tx.Status() != TxCommit {
		t.Fatalf("after Commit: %s", tx.Status())
	}
	tx.Rollback()
	if tx.Status() != TxRollback {
		t.Fatalf("after Rollback: %s", tx.Status())
	}
	tx.Unknown("db busy")
	if tx.Status() != TxUnknown || tx.Feedback != "db busy" {
		t.Fatalf("after Unknown: %s %q", tx.Status(), tx.Feedback)
	}
	tx.Commit()
	if tx.Status() != TxCommit {
		t.Fatalf("Commit after Unknown: %s", tx.Status())
	}
}
