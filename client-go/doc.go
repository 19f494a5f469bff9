// Package client is the Go client of KiteQ: a producer publishes messages
// to topics, a consumer group subscribes to them with bindings, and a
// producer can tie a message to a local transaction.
//
//	c := client.NewKiteQClient("static://127.0.0.1:13800", "s-mts-test", "secret", listener)
//	c.SetBindings([]*binding.Binding{binding.Bind_Direct("s-mts-test", "trade", "pay-succ", 1000, true)})
//	c.SetTopics([]string{"trade"}) // to publish as well
//	if err := c.Start(); err != nil { … }
//	defer c.Destroy()
//	err := c.SendStringMessage(msg) // returns once a broker stored msg
//
// # Registry
//
// The registry URI says how the client finds its brokers:
// "static://host:port[,host:port]" lists them (a standalone broker, no
// ZooKeeper), and "zk://host:port[,host:port]" (or a bare host list) names a
// ZooKeeper ensemble. This build has only the static registry; Start
// returns an error wrapping ErrRegistryUnavailable for zk.
//
// # Connections
//
// The client keeps one TCP connection to each broker that serves one of its
// topics (SetTopics and the topics of SetBindings), shared by all of them.
// Each connection authenticates with the group id and secret key, sends the
// client's bindings if it has any (BINDINGS, which a standalone broker
// keeps as its registry), and then sends a heartbeat every 10 s. A
// connection that has read nothing for 30 s is closed. A lost or
// unreachable broker is dialled again in the background, with a backoff of
// 100 ms doubling to 5 s (with jitter), until Destroy; a broker that
// refuses the credentials is retried every 5 s. SetHeartbeat changes the
// two intervals.
//
// # Sending
//
// A send validates the message, picks a ready connection of a broker of
// the topic (round robin), and waits for the broker's store ack. The send
// timeout (SetSendTimeout, default 5 s) bounds the whole call, including
// the wait for a connection when none is ready. If the connection is lost
// before the ack, the same message (same id) is sent again on another
// connection: the broker stores an id once. A refusal by the broker is a
// *StoreError and is not retried. Errors wrap ErrNoBroker (the message was
// never written), ErrTimeout (written, outcome unknown: sending it again
// with the same id is safe), ErrClosed, ErrInvalidMessage or
// ErrUnknownTopic.
//
// # Delivery
//
// Delivery is at-least-once: OnMessage may see a message more than once
// (after a lost ack, a timeout, a reconnect or a broker restart), so a
// consumer should be idempotent by message id. Each delivery runs in its own
// goroutine; returning true acknowledges the message, and false or a panic
// asks the broker to deliver it again later. The broker bounds the
// deliveries in flight to a group by its binding's watermark. A listener
// that implements IBytesListener gets bytes messages as they are; any other
// listener gets them through OnMessage with the body as a string.
//
// # Transactions
//
// SendTxStringMessage and SendTxBytesMessage store the message uncommitted,
// run the local transaction, and send the decision (commit or rollback).
// When the decision is lost or undecided, the broker asks a producer of the
// group through the listener's OnMessageCheck.
//
// # Logging
//
// Calls return their errors. What the client handles by itself (a lost
// connection, a failed reconnect) goes to the logger set with SetLogger:
// the standard library's log to standard error by default; nil silences it.
package client
