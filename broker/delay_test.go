package broker

import (
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/kiteq/kiteq/protocol"
)

// A message with deliverAt is delivered no earlier than asked and soon
// after, whether committed at once or by a later TX_ACK; a message
// without it goes at once.
func TestDelayedDelivery(t *testing.T) {
	b := startBroker(t, nil)
	cons := connect(t, b.Addr(), "c")
	cons.bind("c", bindDirect("c", "trade", "t", 10, true))
	prod := connect(t, b.Addr(), "p")

	at := time.UnixMilli(time.Now().Add(600 * time.Millisecond).UnixMilli()) // what the header can say
	delayed := newMessage("trade", "t", "delayed")
	delayed.Header.DeliverAt = proto.Int64(at.UnixMilli())
	tx := newMessage("trade", "t", "delayed tx")
	tx.Header.DeliverAt = proto.Int64(at.UnixMilli())
	tx.Header.Commit = proto.Bool(false)
	prod.publish(delayed)
	prod.publish(tx)
	prod.send(protocol.CmdTxAck, &protocol.TxACKPacket{Header: tx.Header, Status: proto.Int32(int32(protocol.TxCommit)), Feedback: proto.String("")})
	prod.publish(newMessage("trade", "t", "now"))
	op, m := cons.receive()
	if m.GetBody() != "now" || time.Now().After(at) {
		t.Fatalf("first delivery %q at %v, want the undelayed message before %v", m.GetBody(), time.Now(), at)
	}
	cons.ack(op, m, "c", true)
	got := map[string]bool{}
	for range 2 {
		op, m := cons.receive()
		if now := time.Now(); now.Before(at) || now.After(at.Add(time.Second)) {
			t.Fatalf("%q delivered at %v, want from %v to a second later", m.GetBody(), now, at)
		}
		got[m.GetBody()] = true
		cons.ack(op, m, "c", true)
	}
	if !got["delayed"] || !got["delayed tx"] {
		t.Fatalf("delivered %v", got)
	}
}

func TestDelayedDeliveryValidation(t *testing.T) {
	b := startBroker(t, nil)
	prod := connect(t, b.Addr(), "p")
	for want, mutate := range map[string]func(*protocol.StringMessage){
		"a fly message cannot be delayed": func(m *protocol.StringMessage) {
			m.Header.Fly = proto.Bool(true)
			m.Header.DeliverAt = proto.Int64(time.Now().Add(time.Minute).UnixMilli())
		},
		"is after the message expires": func(m *protocol.StringMessage) {
			m.Header.ExpiredTime = proto.Int64(time.Now().Add(time.Minute).Unix())
			m.Header.DeliverAt = proto.Int64(time.Now().Add(time.Hour).UnixMilli())
		},
		"further away than the longest a message is kept": func(m *protocol.StringMessage) {
			m.Header.ExpiredTime = proto.Int64(-1)
			m.Header.DeliverAt = proto.Int64(time.Now().Add(30 * 24 * time.Hour).UnixMilli())
		},
	} {
		m := newMessage("trade", "t", "x")
		mutate(m)
		if ack := prod.publish(m); ack.GetStatus() || !strings.Contains(ack.GetFeedback(), want) {
			t.Errorf("store-ack %v %q, want a refusal saying %q", ack.GetStatus(), ack.GetFeedback(), want)
		}
	}
}
