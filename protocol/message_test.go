package protocol

import (
	"errors"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

func TestNewPacketRequiresRequiredFields(t *testing.T) {
	noId := sampleHeader()
	noId.MessageId = nil
	tests := []struct {
		name string
		cmd  CmdType
		msg  proto.Message
	}{
		{"header without messageId", CmdStringMessage, &StringMessage{Header: noId, Body: proto.String("x")}},
		{"string message without header", CmdStringMessage, &StringMessage{Body: proto.String("x")}},
		{"bytes message without body", CmdBytesMessage, &BytesMessage{Header: sampleHeader()}},
		{"entry without value", CmdStringMessage, &StringMessage{Header: func() *Header {
			h := sampleHeader()
			h.Properties = append(h.Properties, &Entry{Key: proto.String("k")})
			return h
		}(), Body: proto.String("x")}},
		{"empty heartbeat", CmdHeartbeat, &HeartBeat{}},
		{"conn auth without feedback", CmdConnAuth, &ConnAuthAck{Status: proto.Bool(true)}},
		{"tx ack without header", CmdTxAck, &TxACKPacket{Status: proto.Int32(1), Feedback: proto.String("")}},
		{"binding without bindType", CmdBindings, &BindingsPacket{GroupId: proto.String("g"),
			Bindings: []*Binding{{GroupId: proto.String("g"), Topic: proto.String("t"), MessageType: proto.String("m")}}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p, err := NewPacket(1, tc.cmd, tc.msg)
			if err == nil {
				t.Fatalf("NewPacket = %+v, want an error", p)
			}
			if !strings.Contains(err.Error(), tc.cmd.String()) {
				t.Errorf("error %q does not name the command", err)
			}
			dst := []byte("keep")
			out, err := AppendMessage(dst, 1, tc.cmd, tc.msg)
			if err == nil {
				t.Fatal("AppendMessage: want an error")
			}
			if string(out) != "keep" {
				t.Fatalf("AppendMessage on error returned %q, want dst unchanged", out)
			}
		})
	}
}

func TestOptionalFieldsMayBeOmitted(t *testing.T) {
	// The fields that v1 declares optional: warmingupSec, DeliverAck.feedback,
	// createTime and snappy.
	h := sampleHeader()
	h.CreateTime, h.Snappy, h.Properties = nil, nil, nil
	for _, s := range []sample{
		{CmdConnMeta, &ConnMeta{GroupId: proto.String("g"), SecretKey: proto.String("k")}},
		{CmdDeliverAck, &DeliverAck{MessageId: proto.String("m"), Topic: proto.String("t"), MessageType: proto.String("mt"),
			GroupId: proto.String("g"), Status: proto.Bool(true)}},
		{CmdStringMessage, &StringMessage{Header: h, Body: proto.String("")}},
	} {
		p, err := NewPacket(1, s.cmd, s.msg)
		if err != nil {
			t.Errorf("%s: %v", s.cmd, err)
			continue
		}
		if _, err := p.Decode(); err != nil {
			t.Errorf("%s: Decode: %v", s.cmd, err)
		}
	}
}

func TestDecodeRequiresRequiredFields(t *testing.T) {
	// Marshal with AllowPartial to get a body that a careless peer might send.
	noId := sampleHeader()
	noId.MessageId = nil
	partial, err := proto.MarshalOptions{AllowPartial: true}.Marshal(&StringMessage{Header: noId, Body: proto.String("x")})
	if err != nil {
		t.Fatal(err)
	}
	p := &Packet{Opaque: 77, Cmd: CmdStringMessage, Body: partial}
	if m, err := p.Decode(); err == nil {
		t.Fatalf("Decode = %v, want an error for the missing messageId", m)
	} else if !strings.Contains(err.Error(), "STRING_MESSAGE") || !strings.Contains(err.Error(), "opaque 77") {
		t.Errorf("error %q does not name the command and opaque", err)
	}
	if err := p.DecodeInto(&StringMessage{}); err == nil {
		t.Fatal("DecodeInto: want an error for the missing messageId")
	}

	// An empty body misses every required field of every message.
	for _, s := range samples() {
		if m, err := (&Packet{Cmd: s.cmd}).Decode(); err == nil {
			t.Errorf("%s: Decode of an empty body = %v, want an error", s.cmd, m)
		}
	}
}

func TestDecodeGarbage(t *testing.T) {
	for _, body := range [][]byte{{0xff}, {0x0a, 0x05, 'a'}, {0x08}} {
		for _, s := range samples() {
			if _, err := (&Packet{Cmd: s.cmd, Body: body}).Decode(); err == nil {
				t.Errorf("%s: Decode(%x) succeeded", s.cmd, body)
			}
		}
	}
}

func TestDecodeUnknownCommand(t *testing.T) {
	_, err := (&Packet{Cmd: 0x99}).Decode()
	if !errors.Is(err, ErrUnknownCommand) || !strings.Contains(err.Error(), "0x99") {
		t.Fatalf("Decode of cmd 0x99: %v", err)
	}
	if _, err := NewMessage(0); !errors.Is(err, ErrUnknownCommand) {
		t.Fatalf("NewMessage(0): %v", err)
	}
}

func TestNewMessageCoversEveryKnownCommand(t *testing.T) {
	for c := 0; c < 256; c++ {
		cmd := CmdType(c)
		m, err := NewMessage(cmd)
		if cmd.Known() != (err == nil) {
			t.Errorf("%s: Known() = %t but NewMessage error = %v", cmd, cmd.Known(), err)
		}
		if err == nil && m == nil {
			t.Errorf("%s: nil message", cmd)
		}
	}
}

func TestDecodeInto(t *testing.T) {
	want := samples()[7].msg.(*StringMessage)
	p := mustPacket(t, 1, CmdStringMessage, want)
	var got StringMessage
	if err := p.DecodeInto(&got); err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(&got, want) {
		t.Fatalf("DecodeInto = %v, want %v", &got, want)
	}
}

func TestMessageCmd(t *testing.T) {
	if c := MessageCmd(&StringMessage{}); c != CmdStringMessage {
		t.Errorf("MessageCmd(StringMessage) = %s", c)
	}
	if c := MessageCmd(&BytesMessage{}); c != CmdBytesMessage {
		t.Errorf("MessageCmd(BytesMessage) = %s", c)
	}
}

func TestMarshalUnmarshalClone(t *testing.T) {
	m := samples()[6].msg.(*BytesMessage)
	b, err := Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	var got BytesMessage
	if err := Unmarshal(b, &got); err != nil || !proto.Equal(&got, m) {
		t.Fatalf("Unmarshal = %v, %v", &got, err)
	}
	c := Clone(m)
	c.Header.Topic = proto.String("other")
	if m.GetHeader().GetTopic() != "trade" {
		t.Fatal("Clone shares the header with the original")
	}
}

// TestWireContract pins the schema to the table in ARCHITECTURE.md: field
// numbers and required labels are what v1 clients parse. Fields of our own
// are optional and numbered above v1's.
func TestWireContract(t *testing.T) {
	type field struct {
		num      protoreflect.FieldNumber
		required bool
		repeated bool
	}
	contract := map[proto.Message]map[string]field{
		&HeartBeat{}:       {"version": {1, true, false}},
		&ConnMeta{}:        {"groupId": {1, true, false}, "secretKey": {2, true, false}, "warmingupSec": {3, false, false}},
		&ConnAuthAck{}:     {"status": {1, true, false}, "feedback": {2, true, false}},
		&MessageStoreAck{}: {"messageId": {1, true, false}, "status": {2, true, false}, "feedback": {3, true, false}},
		&DeliverAck{}: {"messageId": {1, true, false}, "topic": {2, true, false}, "messageType": {3, true, false},
			"groupId": {4, true, false}, "status": {5, true, false}, "feedback": {6, false, false}},
		&TxACKPacket{}: {"header": {1, true, false}, "status": {2, true, false}, "feedback": {3, true, false}},
		&Entry{}:       {"key": {1, true, false}, "value": {2, true, false}},
		&Header{}: {"messageId": {1, true, false}, "topic": {2, true, false}, "messageType": {3, true, false},
			"expiredTime": {4, true, false}, "deliveryLimit": {5, true, false}, "groupId": {6, true, false},
			"commit": {7, true, false}, "fly": {8, true, false}, "properties": {9, false, true},
			"createTime": {10, false, false}, "snappy": {11, false, false},
			// Not in v1 (optional, above the numbers in use): delayed delivery.
			"deliverAt": {12, false, false}},
		&BytesMessage{}:  {"header": {1, true, false}, "body": {2, true, false}},
		&StringMessage{}: {"header": {1, true, false}, "body": {2, true, false}},
	}
	for m, fields := range contract {
		md := m.ProtoReflect().Descriptor()
		if md.Syntax() != protoreflect.Proto2 {
			t.Errorf("%s is not proto2", md.FullName())
		}
		if md.Fields().Len() != len(fields) {
			t.Errorf("%s has %d fields, the contract %d", md.FullName(), md.Fields().Len(), len(fields))
		}
		for name, want := range fields {
			fd := md.Fields().ByName(protoreflect.Name(name))
			if fd == nil {
				t.Errorf("%s.%s missing", md.FullName(), name)
				continue
			}
			if fd.Number() != want.num {
				t.Errorf("%s.%s = %d, want %d", md.FullName(), name, fd.Number(), want.num)
			}
			if got := fd.Cardinality() == protoreflect.Required; got != want.required {
				t.Errorf("%s.%s required = %t, want %t", md.FullName(), name, got, want.required)
			}
			if got := fd.Cardinality() == protoreflect.Repeated; got != want.repeated {
				t.Errorf("%s.%s repeated = %t, want %t", md.FullName(), name, got, want.repeated)
			}
		}
	}
}
