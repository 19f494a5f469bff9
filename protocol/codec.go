package protocol

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// HeaderLen is the size of the fixed packet header:
// opaque u32 | cmdType u8 | version i16 | extension i64 | bodyLen i32, big-endian.
const HeaderLen = 19

// DefaultMaxBody is the v1 limit on a packet body.
const DefaultMaxBody = 2 << 20

// Packet is one frame of the wire protocol: the header fields and the
// protobuf body.
type Packet struct {
	Opaque    uint32
	Cmd       CmdType
	Version   int16
	Extension int64
	Body      []byte
}

// Frame errors. A decoder that returns one of them has lost the framing of
// its stream: the connection must be closed.
var (
	ErrShortHeader    = errors.New("protocol: truncated packet header")
	ErrShortBody      = errors.New("protocol: truncated packet body")
	ErrBodyTooLarge   = errors.New("protocol: packet body exceeds limit")
	ErrNegativeLength = errors.New("protocol: negative body length")
	ErrUnknownCommand = errors.New("protocol: unknown command")
)

// FrameError tells which packet broke the framing and why. It wraps one of
// the Err* values above.
type FrameError struct {
	Err    error
	Cmd    CmdType
	Opaque uint32
	// Length is the body length that the header declared; for
	// ErrShortHeader it is the number of header bytes read.
	Length int64
	// Read is the number of body bytes read before the stream ended
	// (ErrShortBody only).
	Read int64
}

func (e *FrameError) Error() string {
	switch {
	case errors.Is(e.Err, ErrUnknownCommand):
		return fmt.Sprintf("%v 0x%02x (opaque %d)", e.Err, uint8(e.Cmd), e.Opaque)
	case errors.Is(e.Err, ErrShortHeader):
		return fmt.Sprintf("%v: %d of %d bytes", e.Err, e.Length, HeaderLen)
	case errors.Is(e.Err, ErrShortBody):
		return fmt.Sprintf("%v: %s body length %d, got %d bytes (opaque %d)", e.Err, e.Cmd, e.Length, e.Read, e.Opaque)
	default:
		return fmt.Sprintf("%v: %s body length %d (opaque %d)", e.Err, e.Cmd, e.Length, e.Opaque)
	}
}

func (e *FrameError) Unwrap() error { return e.Err }

// Reader reads packets from a stream. It is not safe for concurrent use.
type Reader struct {
	r       *bufio.Reader
	maxBody int
	hdr     [HeaderLen]byte

	reused Packet // ReadReused's packet, and its body's memory
}

// NewReader returns a Reader that accepts bodies up to maxBody bytes
// (DefaultMaxBody when maxBody <= 0).
func NewReader(r io.Reader, maxBody int) *Reader {
	if maxBody <= 0 {
		maxBody = DefaultMaxBody
	}
	br, ok := r.(*bufio.Reader)
	if !ok {
		br = bufio.NewReaderSize(r, 64<<10)
	}
	return &Reader{r: br, maxBody: maxBody}
}

// ReadPacket reads the next packet. It returns io.EOF only on a clean end of
// stream between packets; anything else that breaks the framing is a
// *FrameError, and I/O errors are returned as they are.
func (r *Reader) ReadPacket() (*Packet, error) {
	p := new(Packet)
	if err := r.read(p, nil); err != nil {
		return nil, err
	}
	return p, nil
}

// maxReusedBody bounds the body memory ReadReused keeps between packets:
// a connection keeps its bufio buffer too, and a broker has many.
const maxReusedBody = 16 << 10

// ReadReused reads the next packet as ReadPacket does, into a packet and
// body memory that the Reader reuses: they are valid until the next read.
// A reader that is done with each packet before it reads the next (it
// decodes the body, which copies what it keeps) saves two allocations a
// packet.
func (r *Reader) ReadReused() (*Packet, error) {
	p := &r.reused
	buf := p.Body[:0]
	if cap(buf) > maxReusedBody {
		buf = nil
	}
	*p = Packet{}
	if err := r.read(p, buf); err != nil {
		p.Body = buf
		return nil, err
	}
	return p, nil
}

// read reads the next packet into p, its body into buf when it fits.
func (r *Reader) read(p *Packet, buf []byte) error {
	n, err := io.ReadFull(r.r, r.hdr[:])
	if err != nil {
		if err == io.EOF {
			return io.EOF
		}
		if err == io.ErrUnexpectedEOF {
			return &FrameError{Err: ErrShortHeader, Length: int64(n)}
		}
		return err
	}
	length, err := parseHeader(p, r.hdr[:], r.maxBody)
	if err != nil {
		return err
	}
	if buf != nil && cap(buf) >= length {
		p.Body = buf[:length]
	} else {
		p.Body = make([]byte, length)
	}
	if m, err := io.ReadFull(r.r, p.Body); err != nil {
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return &FrameError{Err: ErrShortBody, Cmd: p.Cmd, Opaque: p.Opaque, Length: int64(length), Read: int64(m)}
		}
		return err
	}
	return nil
}

// ParseHeader decodes a 19-byte header and checks it against maxBody. It
// returns the packet without its body and the body length that follows.
func ParseHeader(b []byte, maxBody int) (*Packet, int, error) {
	p := new(Packet)
	length, err := parseHeader(p, b, maxBody)
	if err != nil {
		return nil, 0, err
	}
	return p, length, nil
}

func parseHeader(p *Packet, b []byte, maxBody int) (int, error) {
	if len(b) < HeaderLen {
		return 0, &FrameError{Err: ErrShortHeader, Length: int64(len(b))}
	}
	*p = Packet{
		Opaque:    binary.BigEndian.Uint32(b[0:4]),
		Cmd:       CmdType(b[4]),
		Version:   int16(binary.BigEndian.Uint16(b[5:7])),
		Extension: int64(binary.BigEndian.Uint64(b[7:15])),
	}
	length := int32(binary.BigEndian.Uint32(b[15:19]))
	switch {
	case !p.Cmd.Known():
		return 0, &FrameError{Err: ErrUnknownCommand, Cmd: p.Cmd, Opaque: p.Opaque, Length: int64(length)}
	case length < 0:
		return 0, &FrameError{Err: ErrNegativeLength, Cmd: p.Cmd, Opaque: p.Opaque, Length: int64(length)}
	case int(length) > maxBody:
		return 0, &FrameError{Err: ErrBodyTooLarge, Cmd: p.Cmd, Opaque: p.Opaque, Length: int64(length)}
	}
	return int(length), nil
}

// AppendPacket appends the encoded packet to dst and returns the result.
func AppendPacket(dst []byte, p *Packet) []byte {
	dst = binary.BigEndian.AppendUint32(dst, p.Opaque)
	dst = append(dst, byte(p.Cmd))
	dst = binary.BigEndian.AppendUint16(dst, uint16(p.Version))
	dst = binary.BigEndian.AppendUint64(dst, uint64(p.Extension))
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(p.Body)))
	return append(dst, p.Body...)
}

// Encode returns the packet as bytes on the wire.
func (p *Packet) Encode() []byte {
	return AppendPacket(make([]byte, 0, HeaderLen+len(p.Body)), p)
}
