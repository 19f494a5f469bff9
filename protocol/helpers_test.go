package protocol

import (
	"testing"

	"google.golang.org/protobuf/proto"
)

// sampleHeader returns a header with every field set, the way a broker
// sends it to a v1 client.
func sampleHeader() *Header {
	return &Header{
		MessageId:     proto.String("0123456789abcdef0123456789abcdef"),
		Topic:         proto.String("trade"),
		MessageType:   proto.String("pay-succ"),
		ExpiredTime:   proto.Int64(-1),
		DeliveryLimit: proto.Int32(100),
		GroupId:       proto.String("s-mts-test"),
		Commit:        proto.Bool(true),
		Fly:           proto.Bool(false),
		Properties: []*Entry{
			{Key: proto.String("order"), Value: proto.String("42")},
			{Key: proto.String("region"), Value: proto.String("eu")},
		},
		CreateTime: proto.Int64(1700000000),
		Snappy:     proto.Bool(false),
	}
}

type sample struct {
	cmd CmdType
	msg proto.Message
}

// samples returns one fully populated message for every command.
func samples() []sample {
	return []sample{
		{CmdHeartbeat, &HeartBeat{Version: proto.Int64(1700000000)}},
		{CmdConnMeta, &ConnMeta{GroupId: proto.String("s-mts-test"), SecretKey: proto.String("secret"), WarmingupSec: proto.Int32(30)}},
		{CmdConnAuth, &ConnAuthAck{Status: proto.Bool(true), Feedback: proto.String("welcome")}},
		{CmdMessageStoreAck, &MessageStoreAck{MessageId: proto.String(MessageId()), Status: proto.Bool(true), Feedback: proto.String("stored")}},
		{CmdDeliverAck, &DeliverAck{MessageId: proto.String(MessageId()), Topic: proto.String("trade"), MessageType: proto.String("pay-succ"),
			GroupId: proto.String("s-mts-test"), Status: proto.Bool(false), Feedback: proto.String("retry later")}},
		{CmdTxAck, &TxACKPacket{Header: sampleHeader(), Status: proto.Int32(int32(TxCommit)), Feedback: proto.String("committed")}},
		{CmdBytesMessage, &BytesMessage{Header: sampleHeader(), Body: []byte{0, 1, 2, 0xff, 0xfe}}},
		{CmdStringMessage, &StringMessage{Header: sampleHeader(), Body: proto.String("hello, kiteq ✓")}},
		{CmdBindings, &BindingsPacket{GroupId: proto.String("s-mts-test"), Bindings: []*Binding{
			{GroupId: proto.String("s-mts-test"), Topic: proto.String("trade"), MessageType: proto.String("pay-succ"),
				BindType: proto.Int32(BindDirect), Version: proto.String("1.0.0"), Watermark: proto.Int32(1000), Persistent: proto.Bool(true)},
			{GroupId: proto.String("s-mts-test"), Topic: proto.String("feed"), MessageType: proto.String("*"),
				BindType: proto.Int32(BindFanout)},
		}}},
		{CmdBindingsAck, &BindingsAck{Status: proto.Bool(true), Feedback: proto.String("ok")}},
	}
}

// mustPacket builds the packet of msg or fails the test.
func mustPacket(tb testing.TB, opaque uint32, cmd CmdType, msg proto.Message) *Packet {
	tb.Helper()
	p, err := NewPacket(opaque, cmd, msg)
	if err != nil {
		tb.Fatalf("NewPacket(%s): %v", cmd, err)
	}
	return p
}

// rawHeader builds a header by hand, so tests can write what the encoder
// never would (negative lengths, unknown commands).
func rawHeader(opaque uint32, cmd byte, version int16, ext int64, bodyLen int32) []byte {
	b := make([]byte, HeaderLen)
	b[0], b[1], b[2], b[3] = byte(opaque>>24), byte(opaque>>16), byte(opaque>>8), byte(opaque)
	b[4] = cmd
	b[5], b[6] = byte(uint16(version)>>8), byte(uint16(version))
	for i := 0; i < 8; i++ {
		b[7+i] = byte(uint64(ext) >> (56 - 8*i))
	}
	u := uint32(bodyLen)
	b[15], b[16], b[17], b[18] = byte(u>>24), byte(u>>16), byte(u>>8), byte(u)
	return b
}

func samePacket(a, b *Packet) bool {
	return a.Opaque == b.Opaque && a.Cmd == b.Cmd && a.Version == b.Version &&
		a.Extension == b.Extension && string(a.Body) == string(b.Body)
}
