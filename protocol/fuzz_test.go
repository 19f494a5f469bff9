package protocol

import (
	"bytes"
	"errors"
	"io"
	"math"
	"testing"

	"google.golang.org/protobuf/proto"
)

// fuzzMaxBody keeps the fuzzer's allocations small.
const fuzzMaxBody = 4096

// FuzzReadPacket feeds arbitrary bytes to a Reader: it must return packets
// or errors, never panic, and every packet it returns must survive a round
// trip through Encode. More seeds are in testdata/fuzz/FuzzReadPacket.
func FuzzReadPacket(f *testing.F) {
	var stream []byte
	for i, s := range samples() {
		p, err := NewPacket(uint32(i+1), s.cmd, s.msg)
		if err != nil {
			f.Fatal(err)
		}
		wire := p.Encode()
		f.Add(wire)
		f.Add(wire[:len(wire)-1]) // truncated body
		stream = append(stream, wire...)
	}
	f.Add(stream)
	f.Add([]byte{})
	f.Add(rawHeader(1, byte(CmdHeartbeat), 0, 0, 0)[:10])                                       // truncated header
	f.Add(rawHeader(1, byte(CmdBytesMessage), 0, 0, fuzzMaxBody+1))                             // over the limit
	f.Add(rawHeader(1, byte(CmdBytesMessage), 0, 0, math.MaxInt32))                             // far over the limit
	f.Add(rawHeader(1, byte(CmdStringMessage), 0, 0, -1))                                       // negative length
	f.Add(append(rawHeader(1, 0xee, 0, 0, 3), 1, 2, 3))                                         // unknown command
	f.Add(append(rawHeader(math.MaxUint32, byte(CmdTxAck), -1, -1, 4), 0x0a, 0x02, 0x0a, 0x00)) // bad body, odd header
	f.Add([]byte("GET / HTTP/1.1\r\nHost: kiteq\r\n\r\n"))                                      // garbage

	f.Fuzz(func(t *testing.T, data []byte) {
		r := NewReader(bytes.NewReader(data), fuzzMaxBody)
		consumed := 0
		for {
			p, err := r.ReadPacket()
			if err != nil {
				if p != nil {
					t.Fatalf("ReadPacket returned a packet with error %v", err)
				}
				var fe *FrameError
				if err != io.EOF && !errors.As(err, &fe) {
					t.Fatalf("ReadPacket on a bytes.Reader: unexpected error %v (%T)", err, err)
				}
				if err == io.EOF && consumed != len(data) {
					t.Fatalf("io.EOF after %d of %d bytes", consumed, len(data))
				}
				_ = err.Error()
				return
			}
			if !p.Cmd.Known() || len(p.Body) > fuzzMaxBody {
				t.Fatalf("ReadPacket accepted %s with a body of %d bytes", p.Cmd, len(p.Body))
			}
			wire := p.Encode()
			if !bytes.Equal(wire, data[consumed:consumed+len(wire)]) {
				t.Fatalf("re-encoded packet differs from the bytes it was read from")
			}
			consumed += len(wire)
			again, err := NewReader(bytes.NewReader(wire), fuzzMaxBody).ReadPacket()
			if err != nil {
				t.Fatalf("re-encoded packet does not parse: %v", err)
			}
			if !samePacket(p, again) {
				t.Fatalf("round trip changed the packet: %+v != %+v", p, again)
			}

			msg, err := p.Decode()
			if err != nil {
				continue
			}
			// A body that decodes must encode again, and to the same message.
			q, err := NewPacket(p.Opaque, p.Cmd, msg)
			if err != nil {
				t.Fatalf("decoded %s does not encode: %v", p.Cmd, err)
			}
			back, err := q.Decode()
			if err != nil {
				t.Fatalf("re-encoded %s does not decode: %v", p.Cmd, err)
			}
			if !proto.Equal(msg, back) {
				t.Fatalf("%s changed in a round trip: %v != %v", p.Cmd, msg, back)
			}
		}
	})
}
