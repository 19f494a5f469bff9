package broker

import "sync/atomic"

// Stats are the broker's counters since it started.
type Stats struct {
	Connections     atomic.Int64 // live connections
	Published       atomic.Int64 // messages received from producers
	Stored          atomic.Int64 // messages newly saved (store-ack true)
	Duplicates      atomic.Int64 // publishes of an id already stored for the same message
	Conflicts       atomic.Int64 // publishes refused: their id is stored for another message
	Denied          atomic.Int64 // refused by a permission: CONN_META, publish, bindings, TX_ACK
	Rejected        atomic.Int64 // store-acks with status false
	Overloaded      atomic.Int64 // publishes refused while -max-pending-bytes were waiting for the store
	Delivered       atomic.Int64 // deliveries sent to consumers
	DeliverAcked    atomic.Int64 // DELIVER_ACK with status true
	DeliverFailed   atomic.Int64 // DELIVER_ACK with status false
	DeliverTimeouts atomic.Int64 // deliveries with no DELIVER_ACK in time
	Redirected      atomic.Int64 // deliveries given to another consumer after a connection closed
	Finished        atomic.Int64 // messages every group acknowledged (or skipped)
	Unrouted        atomic.Int64 // messages no binding matched
	DeadLettered    atomic.Int64 // messages moved to the dead-letter queue
	Committed       atomic.Int64 // transaction commits
	RolledBack      atomic.Int64 // transaction rollbacks
	Redelivered     atomic.Int64 // dead letters put back for delivery
	TxChecks        atomic.Int64 // transaction checks sent to producers
	TxChecksUnsent  atomic.Int64 // checks due with no live connection of the producer group
	TxDeadLettered  atomic.Int64 // undecided transactions dead-lettered after their last check
	StoreErrors     atomic.Int64 // store calls after a publish that failed
	Parked          atomic.Int64 // flights whose groups all waited, stored and dropped from memory
	FlyDropped      atomic.Int64 // fly messages dropped: delivery memory full (-max-delivery-bytes)
}

// StatsSnapshot is a copy of Stats at one moment, for JSON and tests.
type StatsSnapshot struct {
	Connections     int64 `json:"connections"`
	Published       int64 `json:"published"`
	Stored          int64 `json:"stored"`
	Duplicates      int64 `json:"duplicates"`
	Conflicts       int64 `json:"conflicts"`
	Denied          int64 `json:"denied"`
	Rejected        int64 `json:"rejected"`
	Overloaded      int64 `json:"overloaded"`
	Delivered       int64 `json:"delivered"`
	DeliverAcked    int64 `json:"deliverAcked"`
	DeliverFailed   int64 `json:"deliverFailed"`
	DeliverTimeouts int64 `json:"deliverTimeouts"`
	Redirected      int64 `json:"redirected"`
	Finished        int64 `json:"finished"`
	Unrouted        int64 `json:"unrouted"`
	DeadLettered    int64 `json:"deadLettered"`
	Committed       int64 `json:"committed"`
	RolledBack      int64 `json:"rolledBack"`
	Redelivered     int64 `json:"redelivered"`
	TxChecks        int64 `json:"txChecks"`
	TxChecksUnsent  int64 `json:"txChecksUnsent"`
	TxDeadLettered  int64 `json:"txDeadLettered"`
	StoreErrors     int64 `json:"storeErrors"`
	Parked          int64 `json:"parked"`
	FlyDropped      int64 `json:"flyDropped"`
	InFlight        int64 `json:"inFlight"`      // messages held in memory for delivery now
	DeliveryBytes   int64 `json:"deliveryBytes"` // their bytes, as counted against -max-delivery-bytes
}

func (s *Stats) snapshot() StatsSnapshot {
	return StatsSnapshot{
		Connections: s.Connections.Load(), Published: s.Published.Load(), Stored: s.Stored.Load(),
		Duplicates: s.Duplicates.Load(), Conflicts: s.Conflicts.Load(), Denied: s.Denied.Load(), Rejected: s.Rejected.Load(), Overloaded: s.Overloaded.Load(), Delivered: s.Delivered.Load(),
		DeliverAcked: s.DeliverAcked.Load(), DeliverFailed: s.DeliverFailed.Load(),
		DeliverTimeouts: s.DeliverTimeouts.Load(), Redirected: s.Redirected.Load(),
		Finished: s.Finished.Load(), Unrouted: s.Unrouted.Load(), DeadLettered: s.DeadLettered.Load(),
		Committed: s.Committed.Load(), RolledBack: s.RolledBack.Load(), StoreErrors: s.StoreErrors.Load(),
		Redelivered: s.Redelivered.Load(), TxChecks: s.TxChecks.Load(), TxChecksUnsent: s.TxChecksUnsent.Load(), TxDeadLettered: s.TxDeadLettered.Load(),
		Parked: s.Parked.Load(), FlyDropped: s.FlyDropped.Load(),
	}
}
