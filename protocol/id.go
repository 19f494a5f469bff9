package protocol

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"sync/atomic"
	"time"
)

// MessageIdLen is the length of a message id: 32 lowercase hex characters.
const MessageIdLen = 32

// Message ids are 16 bytes, printed as hex: 4 bytes of unix seconds, so ids
// of one process roughly sort by time (which keeps database indexes
// append-mostly); 8 random bytes drawn once per process, so two processes
// never share a prefix in practice; 4 bytes of a per-process counter that
// starts at a random value, so one process never repeats an id within a
// second (it would take 2^32 ids in that second).
var (
	idProcess [8]byte
	idCounter atomic.Uint32
)

func init() {
	var seed [12]byte
	if _, err := rand.Read(seed[:]); err != nil {
		panic("protocol: no randomness for message ids: " + err.Error())
	}
	copy(idProcess[:], seed[:8])
	idCounter.Store(binary.BigEndian.Uint32(seed[8:]))
}

// MessageId returns a new message id, unique across processes.
func MessageId() string {
	var raw [16]byte
	binary.BigEndian.PutUint32(raw[0:4], uint32(time.Now().Unix()))
	copy(raw[4:12], idProcess[:])
	binary.BigEndian.PutUint32(raw[12:16], idCounter.Add(1))
	var out [MessageIdLen]byte
	hex.Encode(out[:], raw[:])
	return string(out[:])
}

// ValidMessageId reports whether id has the form of a message id.
func ValidMessageId(id string) bool {
	if len(id) != MessageIdLen {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}
