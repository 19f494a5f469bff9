package protocol

import "fmt"

// CmdType is the command code in byte 4 of a packet header.
type CmdType uint8

// Command codes of the wire protocol. The v1 codes keep their meaning; new
// commands take new codes.
const (
	CmdHeartbeat       CmdType = 0x01
	CmdConnMeta        CmdType = 0x02
	CmdConnAuth        CmdType = 0x03
	CmdMessageStoreAck CmdType = 0x04
	CmdDeliverAck      CmdType = 0x05
	CmdTxAck           CmdType = 0x06
	CmdBytesMessage    CmdType = 0x11
	CmdStringMessage   CmdType = 0x12
	CmdBindings        CmdType = 0x21
	CmdBindingsAck     CmdType = 0x22
)

var cmdNames = [256]string{
	CmdHeartbeat:       "HEARTBEAT",
	CmdConnMeta:        "CONN_META",
	CmdConnAuth:        "CONN_AUTH",
	CmdMessageStoreAck: "MESSAGE_STORE_ACK",
	CmdDeliverAck:      "DELIVER_ACK",
	CmdTxAck:           "TX_ACK",
	CmdBytesMessage:    "BYTES_MESSAGE",
	CmdStringMessage:   "STRING_MESSAGE",
	CmdBindings:        "BINDINGS",
	CmdBindingsAck:     "BINDINGS_ACK",
}

// Known reports whether c is a command of this protocol.
func (c CmdType) Known() bool { return cmdNames[c] != "" }

func (c CmdType) String() string {
	if n := cmdNames[c]; n != "" {
		return n
	}
	return fmt.Sprintf("CMD(0x%02x)", uint8(c))
}

// TxStatus is the decision carried by TX_ACK.
type TxStatus int32

const (
	TxUnknown  TxStatus = 0
	TxCommit   TxStatus = 1
	TxRollback TxStatus = 2
)

func (s TxStatus) String() string {
	switch s {
	case TxUnknown:
		return "unknown"
	case TxCommit:
		return "commit"
	case TxRollback:
		return "rollback"
	}
	return fmt.Sprintf("TxStatus(%d)", int32(s))
}

// Binding types, as in the ZooKeeper JSON and in Binding.bindType.
const (
	BindDirect int32 = 0
	BindRegx   int32 = 1
	BindFanout int32 = 2
)
