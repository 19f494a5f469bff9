package client

import (
	"errors"
	"fmt"
)

// Errors a caller can branch on with errors.Is. The client always wraps them
// with context (the message id, the topic, the broker address).
var (
	// ErrClosed: the client was destroyed, before or while the call waited.
	ErrClosed = errors.New("client closed")
	// ErrNotStarted: a send before Start.
	ErrNotStarted = errors.New("client not started")
	// ErrNoBroker: no connection to a broker of the topic became ready
	// before the send timeout. The message was never written, so it was
	// certainly not stored.
	ErrNoBroker = errors.New("no broker ready")
	// ErrTimeout: the message was written but its store ack did not come
	// before the send timeout. The broker may or may not have stored it;
	// sending it again with the same id is safe (the store is idempotent).
	ErrTimeout = errors.New("timeout")
	// ErrAuth: a broker refused the group id and secret key.
	ErrAuth = errors.New("authentication refused")
	// ErrBindingsRefused: a broker refused the client's bindings.
	ErrBindingsRefused = errors.New("bindings refused")
	// ErrInvalidMessage: the message cannot be sent as it is (no header, a
	// malformed id, an empty topic, a missing required field, too large).
	ErrInvalidMessage = errors.New("invalid message")
	// ErrUnknownTopic: the message's topic is not one of SetTopics.
	ErrUnknownTopic = errors.New("topic not in SetTopics")
	// ErrRegistryUnavailable: the registry URI names a registry this build
	// cannot use.
	ErrRegistryUnavailable = errors.New("registry not available")
)

// StoreError is a broker's refusal to store a message: a MESSAGE_STORE_ACK
// with status false. The send is not retried; the feedback says why.
type StoreError struct {
	MessageId string
	Feedback  string
}

func (e *StoreError) Error() string {
	return fmt.Sprintf("kiteq: broker refused to store message %s: %s", e.MessageId, e.Feedback)
}
