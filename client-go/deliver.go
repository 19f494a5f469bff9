package client

import (
	"fmt"

	"github.com/kiteq/kiteq/protocol"
)

// deliver hands a delivered message to the listener and answers the broker
// with DELIVER_ACK on the same connection and opaque. It runs in its own
// goroutine, so a slow listener never blocks the reader; the broker bounds
// how many deliveries are in flight by the binding's watermark.
func (c *KiteQClient) deliver(cn *conn, p *protocol.Packet) {
	defer c.wg.Done()
	var (
		h        *protocol.Header
		status   bool
		feedback string
	)
	switch p.Cmd {
	case protocol.CmdStringMessage:
		m := &protocol.StringMessage{}
		if err := p.DecodeInto(m); err != nil {
			h, feedback = m.GetHeader(), err.Error()
			break
		}
		h = m.Header
		status, feedback = c.onMessage(func(l IListener) bool { return l.OnMessage(m) })
	case protocol.CmdBytesMessage:
		m := &protocol.BytesMessage{}
		if err := p.DecodeInto(m); err != nil {
			h, feedback = m.GetHeader(), err.Error()
			break
		}
		h = m.Header
		status, feedback = c.onMessage(func(l IListener) bool {
			if bl, ok := l.(IBytesListener); ok {
				return bl.OnBytesMessage(m)
			}
			return l.OnMessage(&protocol.StringMessage{Header: m.Header, Body: new(string(m.Body))})
		})
	}
	if h.GetMessageId() == "" {
		c.logf("undecodable %s from %s dropped: %s", p.Cmd, cn.addr, feedback)
		return
	}
	ack := &protocol.DeliverAck{
		MessageId:   new(h.GetMessageId()),
		Topic:       new(h.GetTopic()),
		MessageType: new(h.GetMessageType()),
		GroupId:     new(c.groupId),
		Status:      new(status),
	}
	if feedback != "" {
		ack.Feedback = new(feedback)
	}
	// A lost ack is harmless: the broker delivers the message again.
	cn.writeMsg(p.Opaque, protocol.CmdDeliverAck, ack)
}

// onMessage calls the listener; a panic counts as a refusal.
func (c *KiteQClient) onMessage(call func(IListener) bool) (ok bool, feedback string) {
	if c.listener == nil {
		return false, "no listener"
	}
	defer func() {
		if r := recover(); r != nil {
			ok, feedback = false, fmt.Sprintf("listener panic: %v", r)
		}
	}()
	return call(c.listener), ""
}

// checkBack answers a broker's question about an uncommitted message of
// this producer group: the listener decides, and the decision goes back as
// TX_ACK with the same opaque.
func (c *KiteQClient) checkBack(cn *conn, p *protocol.Packet) {
	defer c.wg.Done()
	req := &protocol.TxACKPacket{}
	if err := p.DecodeInto(req); err != nil || req.Header == nil {
		c.logf("undecodable %s from %s dropped: %v", p.Cmd, cn.addr, err)
		return
	}
	status, feedback := c.decide(req.Header)
	reply := &protocol.TxACKPacket{Header: req.Header, Status: new(int32(status)), Feedback: new(feedback)}
	cn.writeMsg(p.Opaque, protocol.CmdTxAck, reply)
}

// decide asks the listener about an uncommitted message. An error, a panic
// or no decision is unknown, and the broker asks again later.
func (c *KiteQClient) decide(h *protocol.Header) (status protocol.TxStatus, feedback string) {
	if c.listener == nil {
		return protocol.TxUnknown, "no listener"
	}
	defer func() {
		if r := recover(); r != nil {
			status, feedback = protocol.TxUnknown, fmt.Sprintf("OnMessageCheck panic: %v", r)
		}
	}()
	tx := protocol.NewTxResponse(h)
	if err := c.listener.OnMessageCheck(tx); err != nil {
		return protocol.TxUnknown, err.Error()
	}
	return tx.Status(), tx.Feedback
}
