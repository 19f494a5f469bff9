package protocol

import (
	"fmt"

	"google.golang.org/protobuf/proto"
)

// NewPacket marshals msg as the body of a packet with the given command and
// opaque. Marshalling fails when a required field is missing, so nothing
// that a v1 peer could not parse is ever sent.
func NewPacket(opaque uint32, cmd CmdType, msg proto.Message) (*Packet, error) {
	body, err := proto.Marshal(msg)
	if err != nil {
		return nil, fmt.Errorf("protocol: marshal %s: %w", cmd, err)
	}
	return &Packet{Opaque: opaque, Cmd: cmd, Body: body}, nil
}

// AppendMessage marshals msg as a packet straight into dst, without an
// intermediate body buffer.
func AppendMessage(dst []byte, opaque uint32, cmd CmdType, msg proto.Message) ([]byte, error) {
	start := len(dst)
	dst = AppendPacket(dst, &Packet{Opaque: opaque, Cmd: cmd})
	out, err := proto.MarshalOptions{}.MarshalAppend(dst, msg)
	if err != nil {
		return dst[:start], fmt.Errorf("protocol: marshal %s: %w", cmd, err)
	}
	bodyLen := len(out) - start - HeaderLen
	out[start+15] = byte(bodyLen >> 24)
	out[start+16] = byte(bodyLen >> 16)
	out[start+17] = byte(bodyLen >> 8)
	out[start+18] = byte(bodyLen)
	return out, nil
}

// NewMessage returns an empty message of the type that cmd carries.
func NewMessage(cmd CmdType) (proto.Message, error) {
	switch cmd {
	case CmdHeartbeat:
		return &HeartBeat{}, nil
	case CmdConnMeta:
		return &ConnMeta{}, nil
	case CmdConnAuth:
		return &ConnAuthAck{}, nil
	case CmdMessageStoreAck:
		return &MessageStoreAck{}, nil
	case CmdDeliverAck:
		return &DeliverAck{}, nil
	case CmdTxAck:
		return &TxACKPacket{}, nil
	case CmdBytesMessage:
		return &BytesMessage{}, nil
	case CmdStringMessage:
		return &StringMessage{}, nil
	case CmdBindings:
		return &BindingsPacket{}, nil
	case CmdBindingsAck:
		return &BindingsAck{}, nil
	}
	return nil, fmt.Errorf("%w 0x%02x", ErrUnknownCommand, uint8(cmd))
}

// Decode unmarshals the body of p into the message type of its command. A
// body that is not valid protobuf or misses a required field is an error.
func (p *Packet) Decode() (proto.Message, error) {
	msg, err := NewMessage(p.Cmd)
	if err != nil {
		return nil, err
	}
	if err := proto.Unmarshal(p.Body, msg); err != nil {
		return nil, fmt.Errorf("protocol: decode %s (opaque %d): %w", p.Cmd, p.Opaque, err)
	}
	return msg, nil
}

// DecodeInto unmarshals the body of p into msg.
func (p *Packet) DecodeInto(msg proto.Message) error {
	if err := proto.Unmarshal(p.Body, msg); err != nil {
		return fmt.Errorf("protocol: decode %s (opaque %d): %w", p.Cmd, p.Opaque, err)
	}
	return nil
}

// Message is what STRING_MESSAGE and BYTES_MESSAGE have in common.
type Message interface {
	proto.Message
	GetHeader() *Header
}

// MessageCmd returns the command that carries m.
func MessageCmd(m Message) CmdType {
	if _, ok := m.(*BytesMessage); ok {
		return CmdBytesMessage
	}
	return CmdStringMessage
}

// Marshal and Unmarshal expose protobuf encoding to packages that import
// only this one.
func Marshal(m proto.Message) ([]byte, error) { return proto.Marshal(m) }

func Unmarshal(b []byte, m proto.Message) error { return proto.Unmarshal(b, m) }

// Clone returns a deep copy of m.
func Clone[M proto.Message](m M) M { return proto.Clone(m).(M) }
