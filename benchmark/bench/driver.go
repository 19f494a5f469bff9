// Package bench measures message queues side by side: KiteQ, NATS
// JetStream and RabbitMQ behind one Driver interface, so that the
// measuring code is the same for all of them and only the driver differs.
package bench

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"time"
)

// Tier is a durability level, compared like with like across systems.
type Tier string

const (
	// TierMemory: kept in memory only (KiteQ memory store, JetStream
	// memory storage, RabbitMQ transient messages on a non-durable queue).
	TierMemory Tier = "memory"
	// TierWritten: written to the file system, not synced before the ack
	// (KiteQ file fsync=never, JetStream file storage as by default).
	TierWritten Tier = "written"
	// TierSynced: synced to disk before the ack (KiteQ file fsync=always,
	// JetStream sync_interval always, RabbitMQ durable queue, persistent
	// messages, publisher confirms).
	TierSynced Tier = "synced"
)

// Tiers lists the tiers in report order.
var Tiers = []Tier{TierMemory, TierWritten, TierSynced}

// ParseTier returns the tier called s.
func ParseTier(s string) (Tier, error) {
	for _, t := range Tiers {
		if string(t) == s {
			return t, nil
		}
	}
	return "", fmt.Errorf("unknown tier %q (want memory, written or synced)", s)
}

// ErrTierUnsupported: the system has no such durability level.
var ErrTierUnsupported = errors.New("tier not supported by this system")

// Driver is one messaging system.
type Driver interface {
	// Name is the system's name in reports: kiteq, nats, rabbitmq.
	Name() string
	// Start makes the server ready for runs at tier (starting it when the
	// driver owns it) and returns what the report says of it.
	Start(ctx context.Context, tier Tier) (ServerInfo, error)
	// Target returns a fresh, empty destination for one run.
	Target(ctx context.Context, name string) (Target, error)
	// Stop stops what Start started.
	Stop() error
}

// ServerInfo describes the server a run measured.
type ServerInfo struct {
	System  string `json:"system"`
	Version string `json:"version"`
	// Config is how the server was set up for the tier, in its terms.
	Config string `json:"config"`
	// PID is the server's process, whose CPU and memory the report reads
	// from /proc; 0 when it cannot be found.
	PID int `json:"pid"`
}

// Target is one run's destination: a topic, a stream or a queue.
type Target interface {
	// Publisher returns a publisher for one sending goroutine.
	Publisher(ctx context.Context) (Publisher, error)
	// Consume subscribes, and returns once the subscription is in place:
	// from then on every message published goes to fn, possibly from
	// several goroutines, and is acknowledged after fn returns, until
	// ctx ends or the target is closed.
	Consume(ctx context.Context, fn func(body []byte)) error
	// Close removes the destination and closes its connections.
	Close() error
}

// Publisher sends messages, one at a time.
type Publisher interface {
	// Publish returns once the server confirmed body at the run's tier.
	Publish(ctx context.Context, body []byte) error
	Close() error
}

// headerLen is the part of every body the benchmark reads back: the
// message's sequence number and when it was meant to be sent.
const headerLen = 16

// Body returns a body of size bytes (at least headerLen) carrying seq and
// the intended send time.
func Body(buf []byte, size int, seq uint64, intended time.Time) []byte {
	size = max(size, headerLen)
	if cap(buf) < size {
		buf = make([]byte, size)
	}
	buf = buf[:size]
	binary.BigEndian.PutUint64(buf[0:8], seq)
	binary.BigEndian.PutUint64(buf[8:16], uint64(intended.UnixNano()))
	return buf
}

// ParseBody returns what Body put in b.
func ParseBody(b []byte) (seq uint64, intended time.Time, ok bool) {
	if len(b) < headerLen {
		return 0, time.Time{}, false
	}
	return binary.BigEndian.Uint64(b[0:8]), time.Unix(0, int64(binary.BigEndian.Uint64(b[8:16]))), true
}
