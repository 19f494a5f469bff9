package protocol

import (
	"bytes"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"
)

// benchStringMessage is a message with every header field set and a
// 512-byte body.
func benchStringMessage() *StringMessage {
	return &StringMessage{Header: sampleHeader(), Body: proto.String(strings.Repeat("k", 512))}
}

func BenchmarkEncodeStringMessage(b *testing.B) {
	msg := benchStringMessage()
	buf, err := AppendMessage(nil, 1, CmdStringMessage, msg)
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(buf)))
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		buf, err = AppendMessage(buf[:0], uint32(i), CmdStringMessage, msg)
		if err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkDecodeStringMessage(b *testing.B) {
	wire, err := AppendMessage(nil, 1, CmdStringMessage, benchStringMessage())
	if err != nil {
		b.Fatal(err)
	}
	src := bytes.NewReader(wire)
	r := NewReader(src, 0)
	b.SetBytes(int64(len(wire)))
	b.ReportAllocs()
	for b.Loop() {
		// The Reader consumed exactly one packet, so its buffer is empty
		// and it reads the next one from the rewound source.
		src.Reset(wire)
		p, err := r.ReadPacket()
		if err != nil {
			b.Fatal(err)
		}
		if _, err := p.Decode(); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkReadPacket(b *testing.B) {
	wire, err := AppendMessage(nil, 1, CmdStringMessage, benchStringMessage())
	if err != nil {
		b.Fatal(err)
	}
	src := bytes.NewReader(wire)
	r := NewReader(src, 0)
	b.SetBytes(int64(len(wire)))
	b.ReportAllocs()
	for b.Loop() {
		src.Reset(wire)
		if _, err := r.ReadPacket(); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkMessageId(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		_ = MessageId()
	}
}
