package protocol

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"strings"
	"testing"
	"testing/iotest"

	"google.golang.org/protobuf/proto"
)

func TestRoundTripEveryCommand(t *testing.T) {
	for i, s := range samples() {
		t.Run(s.cmd.String(), func(t *testing.T) {
			opaque := uint32(1000 + i)
			p := mustPacket(t, opaque, s.cmd, s.msg)
			p.Version = 1
			p.Extension = -42

			wire := p.Encode()
			if len(wire) != HeaderLen+len(p.Body) {
				t.Fatalf("encoded %d bytes, want %d", len(wire), HeaderLen+len(p.Body))
			}
			r := NewReader(bytes.NewReader(wire), 0)
			got, err := r.ReadPacket()
			if err != nil {
				t.Fatalf("ReadPacket: %v", err)
			}
			if !samePacket(got, p) {
				t.Fatalf("ReadPacket = %+v, want %+v", got, p)
			}
			msg, err := got.Decode()
			if err != nil {
				t.Fatalf("Decode: %v", err)
			}
			if !proto.Equal(msg, s.msg) {
				t.Fatalf("Decode = %v, want %v", msg, s.msg)
			}
			if _, err := r.ReadPacket(); err != io.EOF {
				t.Fatalf("after the only packet: err = %v, want io.EOF", err)
			}
		})
	}
}

func TestAppendMessageMatchesNewPacket(t *testing.T) {
	prefix := []byte("already here")
	for i, s := range samples() {
		want := mustPacket(t, uint32(i), s.cmd, s.msg).Encode()
		got, err := AppendMessage(append([]byte(nil), prefix...), uint32(i), s.cmd, s.msg)
		if err != nil {
			t.Fatalf("AppendMessage(%s): %v", s.cmd, err)
		}
		if !bytes.HasPrefix(got, prefix) {
			t.Fatalf("AppendMessage(%s) lost the bytes already in dst", s.cmd)
		}
		if !bytes.Equal(got[len(prefix):], want) {
			t.Fatalf("AppendMessage(%s) = %x, want %x", s.cmd, got[len(prefix):], want)
		}
	}
}

func TestBackToBackPackets(t *testing.T) {
	ss := samples()
	var stream []byte
	var want []*Packet
	for i := 0; i < 200; i++ {
		s := ss[i%len(ss)]
		var err error
		// Alternate both encoders, and vary the header fields.
		if i%2 == 0 {
			p := mustPacket(t, uint32(i)*7919, s.cmd, s.msg)
			p.Version = int16(i % 3)
			p.Extension = int64(i) << 40
			stream = AppendPacket(stream, p)
			want = append(want, p)
		} else {
			stream, err = AppendMessage(stream, math.MaxUint32-uint32(i), s.cmd, s.msg)
			if err != nil {
				t.Fatal(err)
			}
			want = append(want, mustPacket(t, math.MaxUint32-uint32(i), s.cmd, s.msg))
		}
	}
	// An empty body is a valid frame too.
	empty := &Packet{Opaque: 7, Cmd: CmdHeartbeat}
	stream = AppendPacket(stream, empty)
	want = append(want, empty)

	readers := map[string]func([]byte) io.Reader{
		"whole":   func(b []byte) io.Reader { return bytes.NewReader(b) },
		"onebyte": func(b []byte) io.Reader { return iotest.OneByteReader(bytes.NewReader(b)) },
		"bufio":   func(b []byte) io.Reader { return bufio.NewReaderSize(bytes.NewReader(b), 16) },
	}
	for name, mk := range readers {
		t.Run(name, func(t *testing.T) {
			r := NewReader(mk(stream), 0)
			for i, w := range want {
				read := r.ReadPacket
				if i%3 == 1 {
					read = r.ReadReused // the same framing, either way
				}
				got, err := read()
				if err != nil {
					t.Fatalf("packet %d: %v", i, err)
				}
				if !samePacket(got, w) {
					t.Fatalf("packet %d = %+v, want %+v", i, got, w)
				}
				if _, err := got.Decode(); err != nil && len(w.Body) > 0 {
					t.Fatalf("packet %d: Decode: %v", i, err)
				}
			}
			for k := 0; k < 2; k++ {
				if p, err := r.ReadPacket(); err != io.EOF {
					t.Fatalf("at end: (%v, %v), want io.EOF", p, err)
				}
			}
		})
	}
}

func TestHeaderLayout(t *testing.T) {
	p := &Packet{Opaque: 0x01020304, Cmd: CmdStringMessage, Version: -2, Extension: 0x1122334455667788, Body: []byte("xyz")}
	got := p.Encode()
	want := append(rawHeader(0x01020304, 0x12, -2, 0x1122334455667788, 3), "xyz"...)
	if !bytes.Equal(got, want) {
		t.Fatalf("Encode = %x, want %x", got, want)
	}
	h, n, err := ParseHeader(got, DefaultMaxBody)
	if err != nil || n != 3 || h.Opaque != p.Opaque || h.Cmd != p.Cmd || h.Version != p.Version || h.Extension != p.Extension {
		t.Fatalf("ParseHeader = %+v, %d, %v", h, n, err)
	}
}

func TestReadPacketEmptyStream(t *testing.T) {
	p, err := NewReader(bytes.NewReader(nil), 0).ReadPacket()
	if p != nil || err != io.EOF {
		t.Fatalf("ReadPacket on empty stream = (%v, %v), want (nil, io.EOF)", p, err)
	}
}

// frameErr reads one packet from data and returns its *FrameError.
func frameErr(t *testing.T, data []byte, maxBody int) *FrameError {
	t.Helper()
	p, err := NewReader(bytes.NewReader(data), maxBody).ReadPacket()
	if p != nil {
		t.Fatalf("ReadPacket returned a packet %+v with error %v", p, err)
	}
	var fe *FrameError
	if !errors.As(err, &fe) {
		t.Fatalf("ReadPacket error %v (%T), want *FrameError", err, err)
	}
	// ReadReused fails the same way, also with body memory from before.
	r := NewReader(io.MultiReader(bytes.NewReader(mustPacket(t, 1, CmdHeartbeat, &HeartBeat{Version: proto.Int64(1)}).Encode()),
		bytes.NewReader(data)), maxBody)
	if _, err := r.ReadReused(); err != nil {
		t.Fatal(err)
	}
	p, err2 := r.ReadReused()
	if p != nil || err2 == nil || err2.Error() != err.Error() {
		t.Fatalf("ReadReused = (%+v, %v), want the error of ReadPacket: %v", p, err2, err)
	}
	return fe
}

// ReadReused hands out one packet and one body's memory again and again,
// and does not keep a large body's.
func TestReadReusedReusesMemory(t *testing.T) {
	small := []byte(strings.Repeat("a", 600))
	large := []byte(strings.Repeat("b", maxReusedBody+1))
	var stream []byte
	for i, body := range [][]byte{small, small[:100], large, small} {
		stream = AppendPacket(stream, &Packet{Opaque: uint32(i + 1), Cmd: CmdBytesMessage, Body: body})
	}
	r := NewReader(bytes.NewReader(stream), 0)
	var first *Packet
	var firstBody *byte
	for i, want := range [][]byte{small, small[:100], large, small} {
		p, err := r.ReadReused()
		if err != nil {
			t.Fatalf("packet %d: %v", i, err)
		}
		if p.Opaque != uint32(i+1) || !bytes.Equal(p.Body, want) {
			t.Fatalf("packet %d: opaque %d, %d body bytes, want opaque %d, %d bytes", i, p.Opaque, len(p.Body), i+1, len(want))
		}
		switch i {
		case 0:
			first, firstBody = p, &p.Body[0]
		case 1:
			if p != first || &p.Body[0] != firstBody {
				t.Fatal("the second packet did not reuse the first's packet and body memory")
			}
		case 3:
			if &p.Body[0] == firstBody || cap(p.Body) > maxReusedBody {
				t.Fatalf("after a %d-byte body, the next one reused memory of %d bytes", len(large), cap(p.Body))
			}
		}
	}
	if _, err := r.ReadReused(); err != io.EOF {
		t.Fatalf("at end: %v, want io.EOF", err)
	}
}

func TestReadPacketFrameErrors(t *testing.T) {
	valid := mustPacket(t, 9, CmdStringMessage, samples()[7].msg).Encode()
	bodyLen := int64(len(valid) - HeaderLen)

	tests := []struct {
		name     string
		data     []byte
		maxBody  int
		want     error
		wantLen  int64
		contains []string
	}{
		{name: "truncated header", data: valid[:7], want: ErrShortHeader, wantLen: 7,
			contains: []string{"7 of 19 bytes"}},
		{name: "one byte of header", data: valid[:1], want: ErrShortHeader, wantLen: 1},
		{name: "truncated body", data: valid[:len(valid)-1], want: ErrShortBody, wantLen: bodyLen,
			contains: []string{"STRING_MESSAGE", fmt.Sprint(bodyLen), fmt.Sprintf("got %d bytes", bodyLen-1), "opaque 9"}},
		{name: "header only", data: valid[:HeaderLen], want: ErrShortBody, wantLen: bodyLen,
			contains: []string{"got 0 bytes"}},
		{name: "over default limit", data: rawHeader(3, byte(CmdBytesMessage), 0, 0, DefaultMaxBody+1), want: ErrBodyTooLarge,
			wantLen: DefaultMaxBody + 1, contains: []string{"BYTES_MESSAGE", "2097153", "opaque 3"}},
		{name: "max int32 length", data: rawHeader(3, byte(CmdBytesMessage), 0, 0, math.MaxInt32), want: ErrBodyTooLarge,
			wantLen: math.MaxInt32},
		{name: "over custom limit", data: rawHeader(4, byte(CmdHeartbeat), 0, 0, 101), maxBody: 100, want: ErrBodyTooLarge,
			wantLen: 101, contains: []string{"HEARTBEAT", "101"}},
		{name: "negative length", data: rawHeader(5, byte(CmdDeliverAck), 0, 0, -1), want: ErrNegativeLength,
			wantLen: -1, contains: []string{"DELIVER_ACK", "-1"}},
		{name: "most negative length", data: rawHeader(5, byte(CmdDeliverAck), 0, 0, math.MinInt32), want: ErrNegativeLength,
			wantLen: math.MinInt32},
		{name: "unknown command", data: append(rawHeader(6, 0x7f, 0, 0, 2), 0, 0), want: ErrUnknownCommand,
			wantLen: 2, contains: []string{"0x7f", "opaque 6"}},
		{name: "command zero", data: rawHeader(6, 0, 0, 0, 0), want: ErrUnknownCommand, contains: []string{"0x00"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fe := frameErr(t, tc.data, tc.maxBody)
			if !errors.Is(fe, tc.want) {
				t.Fatalf("error %v does not wrap %v", fe, tc.want)
			}
			if fe.Length != tc.wantLen {
				t.Errorf("Length = %d, want %d", fe.Length, tc.wantLen)
			}
			msg := fe.Error()
			if !strings.HasPrefix(msg, tc.want.Error()) {
				t.Errorf("message %q does not start with %q", msg, tc.want.Error())
			}
			for _, c := range tc.contains {
				if !strings.Contains(msg, c) {
					t.Errorf("message %q does not contain %q", msg, c)
				}
			}
		})
	}
}

func TestReadPacketStopsAfterFrameError(t *testing.T) {
	// A reader that lost its framing must not hand out a packet made of
	// what follows; the caller closes the connection.
	data := append(rawHeader(1, byte(CmdHeartbeat), 0, 0, -5), mustPacket(t, 2, CmdHeartbeat, samples()[0].msg).Encode()...)
	if fe := frameErr(t, data, 0); !errors.Is(fe, ErrNegativeLength) {
		t.Fatalf("got %v", fe)
	}
}

func TestCustomBodyLimit(t *testing.T) {
	for _, limit := range []int{1, 100, 1 << 16} {
		t.Run(fmt.Sprint(limit), func(t *testing.T) {
			body := bytes.Repeat([]byte{0xab}, limit)
			atLimit := (&Packet{Opaque: 1, Cmd: CmdBytesMessage, Body: body}).Encode()
			over := (&Packet{Opaque: 2, Cmd: CmdBytesMessage, Body: append(body, 0xcd)}).Encode()
			r := NewReader(bytes.NewReader(append(atLimit, over...)), limit)
			p, err := r.ReadPacket()
			if err != nil {
				t.Fatalf("body of exactly %d bytes: %v", limit, err)
			}
			if !bytes.Equal(p.Body, body) {
				t.Fatalf("body changed")
			}
			_, err = r.ReadPacket()
			var fe *FrameError
			if !errors.Is(err, ErrBodyTooLarge) || !errors.As(err, &fe) || fe.Opaque != 2 || fe.Length != int64(limit+1) {
				t.Fatalf("body of %d bytes with limit %d: err = %v, want ErrBodyTooLarge", limit+1, limit, err)
			}
		})
	}
}

func TestDefaultBodyLimitExactlyAccepted(t *testing.T) {
	body := make([]byte, DefaultMaxBody)
	wire := (&Packet{Opaque: 1, Cmd: CmdBytesMessage, Body: body}).Encode()
	p, err := NewReader(bytes.NewReader(wire), 0).ReadPacket()
	if err != nil {
		t.Fatalf("body of exactly DefaultMaxBody: %v", err)
	}
	if len(p.Body) != DefaultMaxBody {
		t.Fatalf("body length %d", len(p.Body))
	}
	wire = (&Packet{Opaque: 1, Cmd: CmdBytesMessage, Body: append(body, 0)}).Encode()
	if _, err := NewReader(bytes.NewReader(wire), 0).ReadPacket(); !errors.Is(err, ErrBodyTooLarge) {
		t.Fatalf("body of DefaultMaxBody+1: err = %v, want ErrBodyTooLarge", err)
	}
}

func TestParseHeaderShort(t *testing.T) {
	_, _, err := ParseHeader(make([]byte, HeaderLen-1), DefaultMaxBody)
	var fe *FrameError
	if !errors.As(err, &fe) || !errors.Is(err, ErrShortHeader) || fe.Length != HeaderLen-1 {
		t.Fatalf("ParseHeader(18 bytes) = %v", err)
	}
}

func TestReadPacketPassesIOErrors(t *testing.T) {
	boom := errors.New("connection reset")
	wire := mustPacket(t, 1, CmdHeartbeat, samples()[0].msg).Encode()
	for _, n := range []int{0, 5, HeaderLen, len(wire) - 1} {
		r := NewReader(io.MultiReader(bytes.NewReader(wire[:n]), iotest.ErrReader(boom)), 0)
		_, err := r.ReadPacket()
		if !errors.Is(err, boom) {
			t.Fatalf("after %d bytes: err = %v, want %v", n, err, boom)
		}
		var fe *FrameError
		if errors.As(err, &fe) {
			t.Fatalf("after %d bytes: an I/O error came back as a FrameError: %v", n, err)
		}
	}
}

func TestFrameErrorUnknownErr(t *testing.T) {
	// The default branch must format any wrapped error without panicking.
	fe := &FrameError{Err: errors.New("custom"), Cmd: CmdTxAck, Length: 3}
	if got := fe.Error(); !strings.Contains(got, "custom") || !strings.Contains(got, "TX_ACK") {
		t.Fatalf("Error() = %q", got)
	}
	if errors.Unwrap(fe) != fe.Err {
		t.Fatal("Unwrap")
	}
}
