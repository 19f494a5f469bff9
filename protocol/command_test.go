package protocol

import (
	"fmt"
	"testing"
)

func TestCmdTypeString(t *testing.T) {
	known := map[CmdType]string{
		0x01: "HEARTBEAT", 0x02: "CONN_META", 0x03: "CONN_AUTH", 0x04: "MESSAGE_STORE_ACK",
		0x05: "DELIVER_ACK", 0x06: "TX_ACK", 0x11: "BYTES_MESSAGE", 0x12: "STRING_MESSAGE",
		0x21: "BINDINGS", 0x22: "BINDINGS_ACK",
	}
	for c := 0; c < 256; c++ {
		cmd := CmdType(c)
		want, ok := known[cmd]
		if !ok {
			want = fmt.Sprintf("CMD(0x%02x)", c)
		}
		if got := cmd.String(); got != want {
			t.Errorf("CmdType(0x%02x).String() = %q, want %q", c, got, want)
		}
		if cmd.Known() != ok {
			t.Errorf("CmdType(0x%02x).Known() = %t, want %t", c, cmd.Known(), ok)
		}
	}
}

func TestV1CommandCodes(t *testing.T) {
	// The v1 codes are the wire contract; they never change.
	codes := []struct {
		cmd  CmdType
		code uint8
	}{
		{CmdHeartbeat, 0x01}, {CmdConnMeta, 0x02}, {CmdConnAuth, 0x03}, {CmdMessageStoreAck, 0x04},
		{CmdDeliverAck, 0x05}, {CmdTxAck, 0x06}, {CmdBytesMessage, 0x11}, {CmdStringMessage, 0x12},
	}
	for _, c := range codes {
		if uint8(c.cmd) != c.code {
			t.Errorf("%s = 0x%02x, want 0x%02x", c.cmd, uint8(c.cmd), c.code)
		}
	}
}

func TestTxStatusString(t *testing.T) {
	for s, want := range map[TxStatus]string{TxUnknown: "unknown", TxCommit: "commit", TxRollback: "rollback", 7: "TxStatus(7)", -1: "TxStatus(-1)"} {
		if got := s.String(); got != want {
			t.Errorf("TxStatus(%d).String() = %q, want %q", int32(s), got, want)
		}
	}
	if TxUnknown != 0 || TxCommit != 1 || TxRollback != 2 {
		t.Fatal("TX_ACK status codes changed")
	}
}
