package protocol

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"time"
)

// MessageIdLen is the length of a message id: 32 lowercase hex characters.
const MessageIdLen = 32

// MessageId returns a new message id: 16 bytes printed as hex, 4 bytes of
// unix seconds, so ids roughly sort by time (which keeps database indexes
// append-mostly), then 12 bytes from crypto/rand, drawn for each id. Seeing
// one id tells nothing of the next: another client cannot guess an id to
// publish under it first. Two ids collide only when two of the 2^96 random
// parts drawn in the same second are equal.
func MessageId() string {
	var raw [16]byte
	binary.BigEndian.PutUint32(raw[0:4], uint32(time.Now().Unix()))
	rand.Read(raw[4:]) // never fails: crypto/rand crashes the program rather than return an error
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
