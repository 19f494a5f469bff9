package client

import (
	"errors"
	"fmt"
	"time"

	"github.com/kiteq/kiteq/protocol"
)

// SendStringMessage publishes msg and returns once a broker has stored it.
// See SendBytesMessage.
func (c *KiteQClient) SendStringMessage(msg *protocol.StringMessage) error {
	if msg == nil {
		return fmt.Errorf("kiteq: send: %w: nil message", ErrInvalidMessage)
	}
	_, err := c.store(protocol.CmdStringMessage, msg)
	return err
}

// SendBytesMessage publishes msg and returns once a broker has stored it.
//
// The message needs a header with a valid id (protocol.MessageId), a topic
// of SetTopics and every required field set. The send picks a ready
// connection of a broker of the topic, round robin, waiting for one if
// none is ready, and waits for the broker's store ack; the send timeout
// bounds all of it. A lost connection before the ack makes it send the
// same message (same id; the broker stores an id once) on another ready
// connection. It returns nil once stored, a *StoreError when the broker
// refuses the message, or an error wrapping ErrNoBroker (never written),
// ErrTimeout (written, outcome unknown), ErrClosed, ErrInvalidMessage or
// ErrUnknownTopic.
func (c *KiteQClient) SendBytesMessage(msg *protocol.BytesMessage) error {
	if msg == nil {
		return fmt.Errorf("kiteq: send: %w: nil message", ErrInvalidMessage)
	}
	_, err := c.store(protocol.CmdBytesMessage, msg)
	return err
}

// SendTxStringMessage publishes msg as part of a local transaction. See
// SendTxBytesMessage.
func (c *KiteQClient) SendTxStringMessage(msg *protocol.StringMessage, doTx func(*protocol.StringMessage) (bool, error)) error {
	if msg == nil || doTx == nil {
		return fmt.Errorf("kiteq: send tx: %w: nil message or doTx", ErrInvalidMessage)
	}
	h, err := uncommitted(msg.GetHeader())
	if err != nil {
		return err
	}
	stored := &protocol.StringMessage{Header: h, Body: msg.Body}
	return c.sendTx(protocol.CmdStringMessage, stored, func() (bool, error) { return doTx(msg) })
}

// SendTxBytesMessage publishes msg as part of a local transaction, in two
// phases. First the message is stored uncommitted: it is sent with
// commit=false (on a copy of its header; msg itself is not changed) as by
// SendBytesMessage, and the broker holds it back. Then doTx(msg) runs the
// local transaction: (true, nil) commits the message, (false, nil) or an
// error rolls it back, and a panic leaves it undecided (the broker will ask
// the group's listener through OnMessageCheck). The decision goes to the
// broker without waiting for an answer; a lost decision is recovered the
// same way.
//
// It returns the store error if the first phase failed (doTx does not run
// then), doTx's error wrapped as "transaction rolled back", an error
// describing a panic of doTx, or the error of sending the decision.
func (c *KiteQClient) SendTxBytesMessage(msg *protocol.BytesMessage, doTx func(*protocol.BytesMessage) (bool, error)) error {
	if msg == nil || doTx == nil {
		return fmt.Errorf("kiteq: send tx: %w: nil message or doTx", ErrInvalidMessage)
	}
	h, err := uncommitted(msg.GetHeader())
	if err != nil {
		return err
	}
	stored := &protocol.BytesMessage{Header: h, Body: msg.Body}
	return c.sendTx(protocol.CmdBytesMessage, stored, func() (bool, error) { return doTx(msg) })
}

// uncommitted returns a copy of h with commit=false.
func uncommitted(h *protocol.Header) (*protocol.Header, error) {
	if h == nil {
		return nil, fmt.Errorf("kiteq: send tx: %w: no header", ErrInvalidMessage)
	}
	h = protocol.CloneHeader(h)
	h.Commit = new(false)
	return h, nil
}

func (c *KiteQClient) sendTx(cmd protocol.CmdType, stored protocol.Message, doTx func() (bool, error)) error {
	h := stored.GetHeader()
	if h.GetGroupId() != c.groupId {
		// The broker asks the header's group for a decision it did not get.
		return fmt.Errorf("kiteq: send tx: %w: header groupId %q is not this client's group %q, which decides the transaction",
			ErrInvalidMessage, h.GetGroupId(), c.groupId)
	}
	cn, err := c.store(cmd, stored)
	if err != nil {
		return err
	}
	status, feedback, txErr := runTx(h.GetMessageId(), doTx)
	ack := &protocol.TxACKPacket{Header: h, Status: new(int32(status)), Feedback: new(feedback)}
	werr := c.sendDecision(cn, c.routes[h.GetTopic()], ack)
	if txErr != nil {
		return txErr
	}
	return werr
}

// runTx runs doTx and turns its outcome into a decision.
func runTx(id string, doTx func() (bool, error)) (status protocol.TxStatus, feedback string, err error) {
	defer func() {
		if p := recover(); p != nil {
			status, feedback = protocol.TxUnknown, fmt.Sprintf("doTx panic: %v", p)
			err = fmt.Errorf("kiteq: message %s: transaction undecided: doTx panicked: %v", id, p)
		}
	}()
	commit, txErr := doTx()
	switch {
	case txErr != nil:
		return protocol.TxRollback, txErr.Error(), fmt.Errorf("kiteq: message %s: transaction rolled back: %w", id, txErr)
	case commit:
		return protocol.TxCommit, "", nil
	}
	return protocol.TxRollback, "rolled back by doTx", nil
}

// sendDecision writes a producer's TX_ACK on cn, the connection that got
// the store ack, or, if it has closed, on another ready connection of r.
// The broker does not answer it.
func (c *KiteQClient) sendDecision(cn *conn, r *route, ack *protocol.TxACKPacket) error {
	id := ack.GetHeader().GetMessageId()
	status := protocol.TxStatus(ack.GetStatus())
	err := cn.writeMsg(cn.nextOpaque(), protocol.CmdTxAck, ack)
	if !errors.Is(err, errConnClosed) {
		return wrapDecisionErr(id, status, err)
	}
	// Only the broker that stored the message can decide it: wait for its
	// next connection, not for any broker of the topic.
	c.mu.Lock()
	b := c.brokers[cn.addr]
	c.mu.Unlock()
	if b == nil {
		return wrapDecisionErr(id, status, fmt.Errorf("broker %s no longer serves topic %q: %w", cn.addr, r.topic, ErrNoBroker))
	}
	same := &route{topic: r.topic}
	same.brokers.Store(&[]*broker{b})
	timer := time.NewTimer(c.timeout())
	defer timer.Stop()
	for {
		cn, err := c.waitConn(same, timer.C)
		switch {
		case errors.Is(err, ErrClosed):
			return wrapDecisionErr(id, status, ErrClosed)
		case err != nil:
			return wrapDecisionErr(id, status, fmt.Errorf("broker %s not back within %v: %w", b.addr, c.timeout(), ErrNoBroker))
		}
		if err := cn.writeMsg(cn.nextOpaque(), protocol.CmdTxAck, ack); !errors.Is(err, errConnClosed) {
			return wrapDecisionErr(id, status, err)
		}
	}
}

func wrapDecisionErr(id string, status protocol.TxStatus, err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("kiteq: send %s decision for message %s (the broker will ask again): %w", status, id, err)
}

// publishRoute checks h and returns the route of its topic.
func (c *KiteQClient) publishRoute(h *protocol.Header) (*route, error) {
	if !c.started.Load() {
		c.mu.Lock()
		closed := c.state == stateClosed
		c.mu.Unlock()
		if closed {
			return nil, fmt.Errorf("kiteq: send: %w", ErrClosed)
		}
		return nil, fmt.Errorf("kiteq: send: %w", ErrNotStarted)
	}
	if h == nil {
		return nil, fmt.Errorf("kiteq: send: %w: no header", ErrInvalidMessage)
	}
	id := h.GetMessageId()
	if !protocol.ValidMessageId(id) {
		return nil, fmt.Errorf("kiteq: send: %w: message id %q is not %d lowercase hex characters (use protocol.MessageId)",
			ErrInvalidMessage, id, protocol.MessageIdLen)
	}
	topic := h.GetTopic()
	if topic == "" {
		return nil, fmt.Errorf("kiteq: send %s: %w: empty topic", id, ErrInvalidMessage)
	}
	r := c.routes[topic]
	if r == nil || !c.pubTopics[topic] {
		return nil, fmt.Errorf("kiteq: send %s: %w: %q", id, ErrUnknownTopic, topic)
	}
	return r, nil
}

// store sends msg until a broker acknowledges it, within the send timeout,
// and returns the connection that got the ack.
func (c *KiteQClient) store(cmd protocol.CmdType, msg protocol.Message) (*conn, error) {
	h := msg.GetHeader()
	r, err := c.publishRoute(h)
	if err != nil {
		return nil, err
	}
	id := h.GetMessageId()
	if f := missingField(msg); f != "" {
		return nil, fmt.Errorf("kiteq: send %s: %w: required field %s not set", id, ErrInvalidMessage, f)
	}
	timeout := c.timeout()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	written := false
	for {
		cn, err := c.waitConn(r, timer.C)
		switch {
		case errors.Is(err, ErrClosed):
			return nil, fmt.Errorf("kiteq: send %s: %w", id, ErrClosed)
		case err != nil && written:
			return nil, fmt.Errorf("kiteq: send %s to topic %q: connection lost and no store ack within %v: %w", id, r.topic, timeout, ErrTimeout)
		case err != nil:
			return nil, fmt.Errorf("kiteq: send %s: no broker of topic %q ready within %v: %w", id, r.topic, timeout, ErrNoBroker)
		}

		op := cn.nextOpaque()
		ch := cn.register(op)
		if err := cn.writeMsg(op, cmd, msg); err != nil {
			cn.cancel(op, ch)
			if errors.Is(err, errConnClosed) {
				continue
			}
			return nil, fmt.Errorf("kiteq: send %s: %w", id, err)
		}
		written = true

		var p *protocol.Packet
		select {
		case p = <-ch:
			received(ch)
		case <-cn.closed:
			p = cn.cancel(op, ch)
		case <-timer.C:
			if p = cn.cancel(op, ch); p == nil {
				return nil, fmt.Errorf("kiteq: send %s to topic %q via %s: no store ack within %v: %w", id, r.topic, cn.addr, timeout, ErrTimeout)
			}
		case <-c.ctx.Done():
			if p = cn.cancel(op, ch); p == nil {
				return nil, fmt.Errorf("kiteq: send %s: %w", id, ErrClosed)
			}
		}
		if p == nil {
			continue // the connection was lost: send it again elsewhere
		}
		ack := &protocol.MessageStoreAck{}
		if err := decodeResponse(p, ack); err != nil {
			return nil, fmt.Errorf("kiteq: send %s: bad store ack from %s, outcome unknown: %w: %w", id, cn.addr, ErrTimeout, err)
		}
		if !ack.GetStatus() {
			return nil, &StoreError{MessageId: id, Feedback: ack.GetFeedback()}
		}
		return cn, nil
	}
}

// missingField names a required field of msg that is not set, so that such
// a message fails at once rather than when a connection encodes it.
func missingField(msg protocol.Message) string {
	h := msg.GetHeader()
	switch {
	case h.MessageType == nil:
		return "header.messageType"
	case h.ExpiredTime == nil:
		return "header.expiredTime"
	case h.DeliveryLimit == nil:
		return "header.deliveryLimit"
	case h.GroupId == nil:
		return "header.groupId"
	case h.Commit == nil:
		return "header.commit"
	case h.Fly == nil:
		return "header.fly"
	}
	for _, e := range h.Properties {
		if e == nil || e.Key == nil || e.Value == nil {
			return "header.properties"
		}
	}
	switch m := msg.(type) {
	case *protocol.StringMessage:
		if m.Body == nil {
			return "body"
		}
	case *protocol.BytesMessage:
		if m.Body == nil {
			return "body"
		}
	}
	return ""
}
