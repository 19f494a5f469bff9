package broker

import (
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/registry/static"
	"github.com/kiteq/kiteq/storage/memory"
)

// A producer that outruns the store gets failed store-acks that say
// overload, once the publishes waiting for the store hold
// MaxPendingBytes; what was acknowledged is stored, what was refused is
// not, and the broker takes publishes again once the store has caught up.
func TestOverloadRefusesPublishesPastMaxPendingBytes(t *testing.T) {
	mem := memory.New(1000)
	reg, err := static.NewServer("")
	if err != nil {
		t.Fatal(err)
	}
	const body = 1000
	b := startOn(t, &slowSaveStore{Store: mem, delay: 300 * time.Millisecond}, reg, func(o *Options) {
		o.MaxBody = 4 * body
		o.MaxPendingBytes = 4 * (body + 200) // about four messages
	})
	prod := connect(t, b.Addr(), "p")
	const n = 12
	ids := make(map[uint32]string)
	for range n {
		m := newMessage("trade", "t", strings.Repeat("x", body))
		m.Header.Commit = proto.Bool(false) // stays in the store
		ids[prod.send(protocol.CmdStringMessage, m)] = m.Header.GetMessageId()
	}
	stored, refused := map[string]bool{}, 0
	for range n {
		p := prod.expect(protocol.CmdMessageStoreAck)
		var ack protocol.MessageStoreAck
		prod.decode(p, &ack)
		switch {
		case ack.GetStatus():
			stored[ids[p.Opaque]] = true
		case strings.HasPrefix(ack.GetFeedback(), "overload: "):
			refused++
		default:
			t.Fatalf("store-ack false: %s", ack.GetFeedback())
		}
	}
	if refused == 0 || len(stored) == 0 || len(stored) > 5 {
		t.Fatalf("%d stored, %d refused as overload; want at most about four stored while the store is slow", len(stored), refused)
	}
	for _, id := range ids {
		if _, err := mem.Get(t.Context(), id); (err == nil) != stored[id] {
			t.Errorf("message %s: acknowledged %v, in the store %v", id, stored[id], err == nil)
		}
	}
	if st := b.Stats(); st.Overloaded != int64(refused) || b.pendingBytes.Load() != 0 {
		t.Fatalf("overloaded %d (want %d), pending bytes %d (want 0)", st.Overloaded, refused, b.pendingBytes.Load())
	}
	// The store caught up: publishes are taken again.
	if ack := prod.publish(newMessage("trade", "t", "again")); !ack.GetStatus() {
		t.Fatalf("after the store caught up: %s", ack.GetFeedback())
	}
}
