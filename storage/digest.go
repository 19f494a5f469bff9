package storage

import (
	"crypto/sha256"
	"encoding/binary"
	"hash"
	"io"

	"github.com/kiteq/kiteq/protocol"
)

// DigestLen is the length of a Digest.
const DigestLen = 16

// Digest returns what identifies a publish: the producer group that sent it
// (the connection's, not the header's) and everything the producer set in
// the message, as it arrived. Two publishes with the same id and the same
// Digest are one message sent twice (a retry); the same id with another
// Digest is another message, which must not pass for the first.
//
// It is the first 16 bytes of a SHA-256 over a canonical encoding of the
// fields, not of the protobuf bytes, so that it is the same whatever
// encoder the producer used and whatever protobuf version the broker has:
// stores keep it across restarts and upgrades. Call it before the broker
// fills in fields the producer left out (createTime).
func Digest(producerGroup string, msg protocol.Message) []byte {
	h := sha256.New()
	d := digester{h: h}
	d.str(producerGroup)
	d.u64(uint64(protocol.MessageCmd(msg)))
	hd := msg.GetHeader()
	d.str(hd.GetMessageId())
	d.str(hd.GetTopic())
	d.str(hd.GetMessageType())
	d.opt(hd.ExpiredTime != nil, uint64(hd.GetExpiredTime()))
	d.opt(hd.DeliveryLimit != nil, uint64(hd.GetDeliveryLimit()))
	d.str(hd.GetGroupId())
	d.opt(hd.Commit != nil, boolBit(hd.GetCommit()))
	d.opt(hd.Fly != nil, boolBit(hd.GetFly()))
	d.u64(uint64(len(hd.GetProperties())))
	for _, e := range hd.GetProperties() {
		d.str(e.GetKey())
		d.str(e.GetValue())
	}
	d.opt(hd.CreateTime != nil, uint64(hd.GetCreateTime()))
	d.opt(hd.Snappy != nil, boolBit(hd.GetSnappy()))
	d.opt(hd.DeliverAt != nil, uint64(hd.GetDeliverAt()))
	switch v := msg.(type) {
	case *protocol.StringMessage:
		d.str(v.GetBody())
	case *protocol.BytesMessage:
		d.bytes(v.GetBody())
	}
	return h.Sum(nil)[:DigestLen]
}

// digester writes length-prefixed fields, so that no two different
// messages encode alike.
type digester struct {
	h   hash.Hash
	buf [binary.MaxVarintLen64 + 1]byte
}

func (d *digester) u64(v uint64) {
	n := binary.PutUvarint(d.buf[:], v)
	d.h.Write(d.buf[:n])
}

// opt writes whether an optional field is set, then its value.
func (d *digester) opt(set bool, v uint64) {
	if !set {
		d.h.Write([]byte{0})
		return
	}
	d.h.Write([]byte{1})
	d.u64(v)
}

func (d *digester) str(s string) {
	d.u64(uint64(len(s)))
	io.WriteString(d.h, s)
}

func (d *digester) bytes(b []byte) {
	d.u64(uint64(len(b)))
	d.h.Write(b)
}

func boolBit(b bool) uint64 {
	if b {
		return 1
	}
	return 0
}
