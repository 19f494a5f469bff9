// Package storage is the contract between the broker and its message
// stores: the Store interface, the stored message, and the errors every
// backend returns. The memory store lives in storage/memory; every backend
// passes the conformance suite in storage/storagetest.
package storage

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/kiteq/kiteq/protocol"
)

// Errors a Store returns. Backends wrap them with context; callers test
// with errors.Is.
var (
	// ErrNotFound: no live message has that id (never stored, deleted,
	// rolled back or dead-lettered).
	ErrNotFound = errors.New("storage: message not found")
	// ErrFull: the store refuses new messages until some are finished.
	ErrFull = errors.New("storage: store is full")
	// ErrDecided: a transaction decision contradicts the one already made
	// (a commit after a rollback, or a rollback after a commit).
	ErrDecided = errors.New("storage: transaction already decided")
	// ErrClosed: the store has been closed.
	ErrClosed = errors.New("storage: store is closed")
	// ErrInvalid: the message cannot be stored as it is.
	ErrInvalid = errors.New("storage: invalid message")
	// ErrConflict: Save of an id that the store holds for another message
	// (another producer group or other content: their Digests differ).
	ErrConflict = errors.New("storage: message id already used by another message")
)

// Message is a stored message: the header and body as the producer sent
// them, and the delivery state the broker keeps beside them.
type Message struct {
	// Cmd is protocol.CmdStringMessage or protocol.CmdBytesMessage: how the
	// message is delivered.
	Cmd    protocol.CmdType
	Header *protocol.Header
	Body   []byte
	// Digest identifies the message's producer and content (Digest, below),
	// so that a second Save of its id is told apart from another message
	// that reuses the id. Nil when unknown: a message stored before digests
	// existed matches any.
	Digest []byte

	// Committed is false for a transactional message with no decision yet.
	Committed bool
	// DeliverCount counts delivery rounds so far; for an uncommitted
	// message, the transaction checks so far. Commit sets it to 0.
	DeliverCount int32
	// NextDeliverTime is when the message is next due: for delivery when
	// committed, for a transaction check otherwise. A backend keeps it to
	// at least the millisecond and may drop anything finer, truncating
	// (time.Truncate(time.Millisecond), as the memory store does), never
	// rounding; what Get and Due return is the time as stored.
	NextDeliverTime time.Time
	// SuccGroups lists the groups that acknowledged the message; FailGroups
	// the groups whose last delivery failed. A retry goes to FailGroups only.
	SuccGroups []string
	FailGroups []string
	// FailCounts[i] counts the failed deliveries to FailGroups[i], so that
	// each group's delivery limit holds across restarts. It is nil, or as
	// long as FailGroups; nil means unknown (a message stored without
	// counts), and then DeliverCount, the most failures of any group, is
	// the only count there is.
	FailCounts []int32
	// FailDue[i] is when FailGroups[i] is next due, kept like
	// NextDeliverTime, which is the earliest of them (or earlier). It is
	// nil, or as long as FailGroups; nil means every failed group is due
	// at NextDeliverTime.
	FailDue []time.Time
}

// ID returns the message id.
func (m *Message) ID() string { return m.Header.GetMessageId() }

// Cursor returns m's position in the due order: its NextDeliverTime and id.
func (m *Message) Cursor() Cursor { return Cursor{Time: m.NextDeliverTime, ID: m.ID()} }

// NewMessage returns the stored form of a message received from a producer.
func NewMessage(msg protocol.Message, now time.Time) *Message {
	m := &Message{Cmd: protocol.MessageCmd(msg), Header: msg.GetHeader(), NextDeliverTime: now}
	m.Committed = m.Header.GetCommit()
	switch v := msg.(type) {
	case *protocol.StringMessage:
		m.Body = []byte(v.GetBody())
	case *protocol.BytesMessage:
		m.Body = v.GetBody()
	}
	return m
}

// Protocol returns m as the packet body to deliver: a StringMessage or a
// BytesMessage according to Cmd.
func (m *Message) Protocol() protocol.Message {
	if m.Cmd == protocol.CmdBytesMessage {
		body := m.Body
		if body == nil {
			// body is a required proto2 field: nil would mean "not set",
			// and an empty body (which Clone and most stores return as
			// nil) could not be marshalled.
			body = []byte{}
		}
		return &protocol.BytesMessage{Header: m.Header, Body: body}
	}
	body := string(m.Body)
	return &protocol.StringMessage{Header: m.Header, Body: &body}
}

// Clone returns a deep copy of m, so a caller may keep it while the store
// changes its own.
func (m *Message) Clone() *Message {
	c := *m
	c.Header = protocol.CloneHeader(m.Header)
	c.Body = append([]byte(nil), m.Body...)
	c.Digest = append([]byte(nil), m.Digest...)
	c.SuccGroups = append([]string(nil), m.SuccGroups...)
	c.FailGroups = append([]string(nil), m.FailGroups...)
	c.FailCounts = append([]int32(nil), m.FailCounts...)
	c.FailDue = append([]time.Time(nil), m.FailDue...)
	return &c
}

// DeliveryResult is the outcome of one delivery round of a message.
type DeliveryResult struct {
	MessageID       string
	DeliverCount    int32
	NextDeliverTime time.Time
	// SuccGroups are the groups that acknowledged the message, in this round
	// or before; FailGroups the groups still to be retried, and FailCounts
	// and FailDue (each nil, or as long as FailGroups) how often each of
	// them failed and when it is due (see Message).
	SuccGroups []string
	FailGroups []string
	FailCounts []int32
	FailDue    []time.Time
}

// CheckFailState returns an ErrInvalid error when counts or due is
// neither nil nor as long as groups. Backends call it before storing them.
func CheckFailState(groups []string, counts []int32, due []time.Time) error {
	if len(counts) != 0 && len(counts) != len(groups) {
		return fmt.Errorf("%w: %d FailCounts for %d FailGroups", ErrInvalid, len(counts), len(groups))
	}
	if len(due) != 0 && len(due) != len(groups) {
		return fmt.Errorf("%w: %d FailDue for %d FailGroups", ErrInvalid, len(due), len(groups))
	}
	return nil
}

// DueKind selects what Due pages through.
type DueKind int

const (
	// DueDelivery: committed messages whose NextDeliverTime has come.
	DueDelivery DueKind = iota
	// DueTxCheck: uncommitted messages whose transaction check is due.
	DueTxCheck
)

// Cursor is a position in the due order, the order in which Due returns
// messages: by NextDeliverTime, then by id. Cursor a comes before cursor b
// when a.Time is before b.Time, or the times are equal (the same instant,
// whatever their locations) and a.ID < b.ID (bytewise). Compare implements
// it.
//
// Backends may keep NextDeliverTime to the millisecond only and compare
// stored times, so positions are those of the stored times. The Cursor of
// a message that Due or Get returned holds its time as stored, so it
// round-trips exactly: paging with it neither skips nor repeats a message.
type Cursor struct {
	Time time.Time
	ID   string
}

// Compare returns -1 when c comes before d in the due order, +1 when it
// comes after, and 0 when they are the same position.
func (c Cursor) Compare(d Cursor) int {
	if r := c.Time.Compare(d.Time); r != 0 {
		return r
	}
	return strings.Compare(c.ID, d.ID)
}

// IsZero reports whether c is the zero Cursor: as DueQuery.After, the
// beginning of the due order.
func (c Cursor) IsZero() bool { return c.Time.IsZero() && c.ID == "" }

// DueQuery asks for up to Limit messages of Kind whose NextDeliverTime is at
// or before Before, ordered by (NextDeliverTime, ID), strictly after After
// (the zero Cursor starts at the beginning). To page, pass the Cursor of the
// last message of one page as After of the next.
//
// Paging is by key, not by snapshot: a message that is rescheduled while a
// caller pages is found again only if its new position is after the
// caller's cursor and at or before Before. A Limit <= 0 asks for the
// backend's default page size.
type DueQuery struct {
	Kind   DueKind
	Before time.Time
	After  Cursor
	Limit  int
}

// DeadLetter is a message that ran out of retries or time, with the reason.
type DeadLetter struct {
	Message *Message
	Reason  string
	At      time.Time
}

// Store keeps messages from their publish until every group acknowledged
// them. Implementations are safe for concurrent use. A method that returns
// nil has made its change as durable as the store promises.
type Store interface {
	// Save stores a new message. Saving an id that already exists (live or
	// dead-lettered) changes nothing: it reports stored == false with a nil
	// error when the two messages' Digests are equal or either is nil (a
	// retry of the same publish), and an error wrapping ErrConflict when
	// they differ (another message under that id).
	Save(ctx context.Context, m *Message) (stored bool, err error)
	// Get returns a copy of the live message with that id, or ErrNotFound.
	Get(ctx context.Context, id string) (*Message, error)
	// Commit marks an uncommitted message committed and due now: it leaves
	// the DueTxCheck kind and joins DueDelivery with NextDeliverTime set
	// to the time of the commit. Committing a committed message succeeds
	// and changes nothing; ErrNotFound after a rollback.
	Commit(ctx context.Context, id string) error
	// Rollback deletes an uncommitted message. Rolling back a missing
	// message succeeds; ErrDecided when the message was committed.
	Rollback(ctx context.Context, id string) error
	// RecordDelivery stores the outcome of a delivery round (or of a
	// transaction check), which moves the message in the due order to its
	// new NextDeliverTime.
	RecordDelivery(ctx context.Context, r DeliveryResult) error
	// Delete removes a finished message. Deleting a missing id succeeds.
	Delete(ctx context.Context, id string) error
	// Due pages through messages that are due, in the due order (see
	// Cursor and DueQuery). It costs about as much as the messages it
	// returns, however many messages are stored that are not due yet.
	Due(ctx context.Context, q DueQuery) ([]*Message, error)
	// DeadLetter moves a live message to the dead-letter queue.
	DeadLetter(ctx context.Context, id string, reason string) error
	// DeadLetters pages through the dead-letter queue in ascending id order.
	DeadLetters(ctx context.Context, afterID string, limit int) ([]*DeadLetter, error)
	// Redeliver puts a dead letter back for delivery: it becomes a live,
	// committed message again (an undecided transaction is thereby
	// committed), due now, with DeliverCount 0 and no FailGroups,
	// FailCounts or FailDue; its
	// SuccGroups stay, so the groups that acknowledged it do not get it
	// again. ErrNotFound when id is not in the dead-letter queue; ErrFull
	// when the store has no room for another live message.
	Redeliver(ctx context.Context, id string) error
	// Close releases the store; later calls return ErrClosed.
	Close() error
}
