package filestore

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"
	"time"

	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/storage"
)

// A record on disk:
//
//	u32 length of kind+payload | u32 CRC-32C of kind+payload | u8 kind | payload
//
// little-endian. The checksum covers everything but the first eight bytes,
// so a torn or flipped record is found and never applied.
const recordHeaderLen = 8

// maxRecordLen bounds a record: a message body is at most a few MiB, so a
// larger length is corruption, not data.
const maxRecordLen = 64 << 20

var crcTable = crc32.MakeTable(crc32.Castagnoli)

type recordKind uint8

const (
	// recSave carries a message and its whole state. A later recSave of a
	// live id replaces its state (compaction rewrites messages this way).
	recSave recordKind = 1
	// recCommit marks an uncommitted message committed.
	recCommit recordKind = 2
	// recRollback deletes an uncommitted message.
	recRollback recordKind = 3
	// recDelivery records a delivery round: count, next time, groups.
	recDelivery recordKind = 4
	// recDelete finishes a message.
	recDelete recordKind = 5
	// recDead moves a message to the dead-letter queue.
	recDead recordKind = 6
	// recRedeliver puts a dead letter back, committed, with a new delivery
	// state (encoded as recDelivery's).
	recRedeliver recordKind = 7
)

func (k recordKind) String() string {
	switch k {
	case recSave:
		return "save"
	case recCommit:
		return "commit"
	case recRollback:
		return "rollback"
	case recDelivery:
		return "delivery"
	case recDelete:
		return "delete"
	case recDead:
		return "dead"
	case recRedeliver:
		return "redeliver"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// msgID is a message id in its 16-byte binary form.
type msgID [16]byte

func parseID(s string) (msgID, bool) {
	var id msgID
	if !protocol.ValidMessageId(s) {
		return id, false
	}
	hex.Decode(id[:], []byte(s))
	return id, true
}

func (id msgID) String() string { return hex.EncodeToString(id[:]) }

// state of a message in the store: flags.
type state uint8

const (
	flagCommitted state = 1 << 0
	flagDead      state = 1 << 1
)

func (st state) committed() bool { return st&flagCommitted != 0 }
func (st state) dead() bool      { return st&flagDead != 0 }

// record is a decoded record. Only the fields of its kind are set.
type record struct {
	kind  recordKind
	id    msgID
	state state // recSave
	cmd   uint8 // recSave
	count int32 // recSave, recDelivery
	next  int64 // unix ms: recSave, recCommit, recDelivery
	succ  []string
	fail  []string
	// failCounts and failDue (unix ms) (recSave, recDelivery,
	// recRedeliver) are the last fields of their record, in that order,
	// each written only when it or a field after it has values: a record
	// written before they existed ends where they begin. digest (recSave:
	// storage.Message.Digest) follows them by the same rule.
	failCounts []int32
	failDue    []int64
	digest     []byte
	reason     string // recSave (dead), recDead
	at         int64  // unix ms: recSave (dead), recDead
	header     []byte // recSave: protobuf Header
	body       []byte // recSave
}

// appendRecord appends r, framed and checksummed, to dst.
func appendRecord(dst []byte, r *record) []byte {
	start := len(dst)
	dst = append(dst, 0, 0, 0, 0, 0, 0, 0, 0, byte(r.kind))
	dst = append(dst, r.id[:]...)
	switch r.kind {
	case recSave:
		dst = append(dst, byte(r.state), r.cmd)
		dst = binary.AppendVarint(dst, int64(r.count))
		dst = binary.AppendVarint(dst, r.next)
		dst = appendStrings(dst, r.succ)
		dst = appendStrings(dst, r.fail)
		dst = appendString(dst, r.reason)
		dst = binary.AppendVarint(dst, r.at)
		dst = appendBytes(dst, r.header)
		dst = appendBytes(dst, r.body)
		dst = appendFailState(dst, r.failCounts, r.failDue, len(r.digest) > 0)
		if len(r.digest) > 0 {
			dst = appendBytes(dst, r.digest)
		}
	case recCommit:
		dst = binary.AppendVarint(dst, r.next)
	case recDelivery, recRedeliver:
		dst = binary.AppendVarint(dst, int64(r.count))
		dst = binary.AppendVarint(dst, r.next)
		dst = appendStrings(dst, r.succ)
		dst = appendStrings(dst, r.fail)
		dst = appendFailState(dst, r.failCounts, r.failDue, false)
	case recDead:
		dst = appendString(dst, r.reason)
		dst = binary.AppendVarint(dst, r.at)
	}
	payload := dst[start+recordHeaderLen:]
	binary.LittleEndian.PutUint32(dst[start:], uint32(len(payload)))
	binary.LittleEndian.PutUint32(dst[start+4:], crc32.Checksum(payload, crcTable))
	return dst
}

func appendBytes(dst, b []byte) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(b)))
	return append(dst, b...)
}

func appendString(dst []byte, s string) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(s)))
	return append(dst, s...)
}

// appendFailState appends the optional last fields: counts, then due;
// nothing when both are empty and no field follows (more), counts alone
// when due is empty and none follows.
func appendFailState(dst []byte, counts []int32, due []int64, more bool) []byte {
	if len(counts) == 0 && len(due) == 0 && !more {
		return dst
	}
	dst = binary.AppendUvarint(dst, uint64(len(counts)))
	for _, c := range counts {
		dst = binary.AppendVarint(dst, int64(c))
	}
	if len(due) == 0 && !more {
		return dst
	}
	dst = binary.AppendUvarint(dst, uint64(len(due)))
	for _, t := range due {
		dst = binary.AppendVarint(dst, t)
	}
	return dst
}

func appendStrings(dst []byte, ss []string) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(ss)))
	for _, s := range ss {
		dst = appendString(dst, s)
	}
	return dst
}

var errCorrupt = errors.New("corrupt record")

// parseRecordHeader returns the payload length of the record whose first
// eight bytes are b, or an error when the length cannot be a record's.
func parseRecordHeader(b []byte) (length int, crc uint32, err error) {
	n := binary.LittleEndian.Uint32(b[0:4])
	if n < 1+16 || n > maxRecordLen {
		return 0, 0, fmt.Errorf("%w: length %d", errCorrupt, n)
	}
	return int(n), binary.LittleEndian.Uint32(b[4:8]), nil
}

// decodeRecord checks payload against crc and decodes it. Byte slices in
// the result alias payload.
func decodeRecord(payload []byte, crc uint32) (*record, error) {
	if crc32.Checksum(payload, crcTable) != crc {
		return nil, fmt.Errorf("%w: checksum mismatch", errCorrupt)
	}
	return decodePayload(payload)
}

// decodePayload decodes a payload without checking its checksum: recovery
// asks first whether a candidate frame has a record's structure, which is
// cheaper than its checksum when its length is large.
func decodePayload(payload []byte) (*record, error) {
	d := decoder{b: payload}
	r := &record{kind: recordKind(d.byte())}
	copy(r.id[:], d.take(16))
	switch r.kind {
	case recSave:
		r.state = state(d.byte())
		r.cmd = d.byte()
		r.count = int32(d.varint())
		r.next = d.varint()
		r.succ = d.strings()
		r.fail = d.strings()
		r.reason = d.string()
		r.at = d.varint()
		r.header = d.bytes()
		r.body = d.bytes()
		r.failCounts, r.failDue = d.failState()
		if d.err == nil && len(d.b) > 0 { // absent in a record written before digests
			r.digest = d.bytes()
		}
	case recCommit:
		r.next = d.varint()
	case recRollback, recDelete:
	case recDelivery, recRedeliver:
		r.count = int32(d.varint())
		r.next = d.varint()
		r.succ = d.strings()
		r.fail = d.strings()
		r.failCounts, r.failDue = d.failState()
	case recDead:
		r.reason = d.string()
		r.at = d.varint()
	default:
		return nil, fmt.Errorf("%w: unknown kind %d", errCorrupt, uint8(r.kind))
	}
	if d.err != nil || len(d.b) != 0 || (len(r.failCounts) != 0 && len(r.failCounts) != len(r.fail)) ||
		(len(r.failDue) != 0 && len(r.failDue) != len(r.fail)) {
		return nil, fmt.Errorf("%w: bad %s payload", errCorrupt, r.kind)
	}
	return r, nil
}

// decoder reads a payload; the first error sticks.
type decoder struct {
	b   []byte
	err error
}

func (d *decoder) fail() { d.err, d.b = errCorrupt, nil }

func (d *decoder) take(n int) []byte {
	if d.err != nil || n < 0 || n > len(d.b) {
		d.fail()
		return make([]byte, max(n, 0))
	}
	out := d.b[:n:n]
	d.b = d.b[n:]
	return out
}

func (d *decoder) byte() byte { return d.take(1)[0] }

func (d *decoder) varint() int64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Varint(d.b)
	if n <= 0 {
		d.fail()
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) uvarint() uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.fail()
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) bytes() []byte {
	n := d.uvarint()
	if n > uint64(len(d.b)) {
		d.fail()
		return nil
	}
	return d.take(int(n))
}

func (d *decoder) string() string { return string(d.bytes()) }

// failState reads appendFailState's fields, each absent when the payload
// has ended.
func (d *decoder) failState() (counts []int32, due []int64) {
	for _, field := range []func(int64){
		func(v int64) { counts = append(counts, int32(v)) },
		func(v int64) { due = append(due, v) },
	} {
		if d.err != nil || len(d.b) == 0 {
			return counts, due
		}
		n := d.uvarint()
		if n > uint64(len(d.b)) {
			d.fail()
			return nil, nil
		}
		for range n {
			field(d.varint())
		}
	}
	return counts, due
}

func (d *decoder) strings() []string {
	n := d.uvarint()
	if n > uint64(len(d.b)) {
		d.fail()
		return nil
	}
	var out []string
	for range n {
		out = append(out, d.string())
	}
	return out
}

// saveRecord builds the record that stores m with its whole state.
func saveRecord(id msgID, m *storage.Message, st state, reason string, at int64) (*record, error) {
	header, err := protocol.Marshal(m.Header)
	if err != nil {
		return nil, fmt.Errorf("%w: header: %v", storage.ErrInvalid, err)
	}
	return &record{
		kind: recSave, id: id, state: st, cmd: uint8(m.Cmd), count: m.DeliverCount,
		next: toMillis(m.NextDeliverTime), succ: m.SuccGroups, fail: m.FailGroups, failCounts: m.FailCounts, failDue: toMillisAll(m.FailDue),
		reason: reason, at: at, header: header, body: m.Body, digest: m.Digest,
	}, nil
}

// message rebuilds the stored message of a recSave record.
func (r *record) message() (*storage.Message, error) {
	h := &protocol.Header{}
	if err := protocol.Unmarshal(r.header, h); err != nil {
		return nil, fmt.Errorf("%w: header of %s: %v", errCorrupt, r.id, err)
	}
	var digest []byte
	if len(r.digest) > 0 {
		digest = bytes.Clone(r.digest)
	}
	return &storage.Message{
		Cmd: protocol.CmdType(r.cmd), Header: h, Body: append([]byte(nil), r.body...), Digest: digest,
		Committed: r.state.committed(), DeliverCount: r.count,
		NextDeliverTime: fromMillis(r.next),
		SuccGroups:      r.succ, FailGroups: r.fail, FailCounts: r.failCounts, FailDue: fromMillisAll(r.failDue),
	}, nil
}

func toMillisAll(ts []time.Time) []int64 {
	var out []int64
	for _, t := range ts {
		out = append(out, toMillis(t))
	}
	return out
}

func fromMillisAll(ms []int64) []time.Time {
	var out []time.Time
	for _, m := range ms {
		out = append(out, fromMillis(m))
	}
	return out
}

func toMillis(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixMilli()
}

func fromMillis(ms int64) time.Time {
	if ms == 0 {
		return time.Time{}
	}
	return time.UnixMilli(ms)
}
