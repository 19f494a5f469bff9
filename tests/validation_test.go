package tests

import (
	"bytes"
	"math"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/registry/binding"
)

// storeAckConn is a raw producer connection that sends messages and reads
// their MESSAGE_STORE_ACKs.
type storeAckConn struct {
	*rawConn
	r      *protocol.Reader
	opaque uint32
}

func dialProducer(t *testing.T, addr, group string) *storeAckConn {
	t.Helper()
	c := dialRaw(t, addr)
	c.handshake(group)
	return &storeAckConn{rawConn: c, r: protocol.NewReader(c.conn, 0), opaque: 1}
}

// publish sends m and returns its store-ack.
func (c *storeAckConn) publish(m *protocol.StringMessage) *protocol.MessageStoreAck {
	c.t.Helper()
	c.opaque++
	b, err := protocol.AppendMessage(nil, c.opaque, protocol.CmdStringMessage, m)
	if err != nil {
		c.t.Fatal(err)
	}
	c.write(b)
	c.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		p, err := c.r.ReadPacket()
		if err != nil {
			c.t.Fatalf("waiting for the store-ack: %v", err)
		}
		if p.Cmd != protocol.CmdMessageStoreAck || p.Opaque != c.opaque {
			continue // a heartbeat echo, say
		}
		var ack protocol.MessageStoreAck
		if err := p.DecodeInto(&ack); err != nil {
			c.t.Fatal(err)
		}
		return &ack
	}
}

// TestPublishTimesRefusedWithReason (issue 16): a createTime older than
// the broker keeps a message, an expiredTime of MaxInt64 and a createTime
// in 2100 were acknowledged on main, the first two then dead-lettered at
// once (time.Unix(MaxInt64) is in the far past), the third parked 74 years.
// Each gets a failed store-ack naming the field and its value; what v1
// clients send (expiredTime -1 or 0, no createTime) is still stored and
// delivered.
func TestPublishTimesRefusedWithReason(t *testing.T) {
	bin := buildKiteq(t)
	addr := freePort(t)
	_, stderr, _ := startKiteq(t, bin, addr, "-db=memory://", "-topics=trade")
	defer func() {
		if t.Failed() {
			t.Log(stderr.String())
		}
	}()
	rec := newRecorder("c")
	startClient(t, "static://"+addr, "g", rec, nil, binding.Bind_Direct("g", "trade", "t", 100, true))
	prod := dialProducer(t, addr, "producer")

	now := time.Now()
	in2100 := time.Date(2100, 1, 1, 0, 0, 0, 0, time.UTC)
	refused := []struct {
		name   string
		mutate func(h *protocol.Header)
		want   []string // in the feedback
	}{
		{"createTime 8 days old", func(h *protocol.Header) {
			h.CreateTime = proto.Int64(now.Add(-8 * 24 * time.Hour).Unix())
		}, []string{"createTime " + strconv.FormatInt(now.Add(-8*24*time.Hour).Unix(), 10), "168h0m0s"}},
		{"expiredTime MaxInt64", func(h *protocol.Header) {
			h.ExpiredTime = proto.Int64(math.MaxInt64)
		}, []string{"expiredTime " + strconv.FormatInt(math.MaxInt64, 10), "the latest the broker accepts"}},
		{"createTime in 2100", func(h *protocol.Header) {
			h.CreateTime = proto.Int64(in2100.Unix())
			h.ExpiredTime = proto.Int64(-1)
			h.DeliverAt = proto.Int64(in2100.Add(time.Hour).UnixMilli())
		}, []string{"createTime " + strconv.FormatInt(in2100.Unix(), 10), "-max-clock-skew", "5m0s"}},
	}
	for _, tc := range refused {
		m := newMessage("trade", "t", tc.name)
		tc.mutate(m.Header)
		ack := prod.publish(m)
		if ack.GetStatus() {
			t.Errorf("%s: acknowledged (%q), want a refusal", tc.name, ack.GetFeedback())
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(ack.GetFeedback(), w) {
				t.Errorf("%s: feedback %q does not say %q", tc.name, ack.GetFeedback(), w)
			}
		}
	}

	// What v1 clients send keeps working, and arrives.
	var accepted []string
	for name, mutate := range map[string]func(h *protocol.Header){
		"expiredTime -1":            func(h *protocol.Header) { h.ExpiredTime = proto.Int64(-1) },
		"expiredTime 0":             func(h *protocol.Header) { h.ExpiredTime = proto.Int64(0) },
		"createTime 0":              func(h *protocol.Header) { h.CreateTime = proto.Int64(0) },
		"createTime now":            func(h *protocol.Header) { h.CreateTime = proto.Int64(now.Unix()) },
		"createTime 6 days old":     func(h *protocol.Header) { h.CreateTime = proto.Int64(now.Add(-6 * 24 * time.Hour).Unix()) },
		"createTime 1 minute ahead": func(h *protocol.Header) { h.CreateTime = proto.Int64(now.Add(time.Minute).Unix()) },
	} {
		m := newMessage("trade", "t", name)
		mutate(m.Header)
		if ack := prod.publish(m); !ack.GetStatus() {
			t.Errorf("%s: refused: %s", name, ack.GetFeedback())
			continue
		}
		accepted = append(accepted, m.GetHeader().GetMessageId())
	}
	eventually(t, 10*time.Second, "every accepted message delivered", func() bool {
		for _, id := range accepted {
			if rec.count(id) == 0 {
				return false
			}
		}
		return true
	})
	if got, want := len(rec.snapshot()), len(accepted); got != want {
		t.Fatalf("the consumer got %d messages, want the %d accepted ones", got, want)
	}
}

// countingWriter counts what a process writes and keeps its start.
type countingWriter struct {
	n    atomic.Int64
	saw  atomic.Bool // a line said how many refusals it left out
	mu   sync.Mutex
	head []byte
}

const countingHead = 64 << 10

func (w *countingWriter) Write(p []byte) (int, error) {
	w.n.Add(int64(len(p)))
	if bytes.Contains(p, []byte("notLoggedBefore")) { // zap writes a line at a time
		w.saw.Store(true)
	}
	w.mu.Lock()
	if room := countingHead - len(w.head); room > 0 {
		w.head = append(w.head, p[:min(room, len(p))]...)
	}
	w.mu.Unlock()
	return len(p), nil
}

func (w *countingWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return string(w.head)
}

// TestRefusalFloodKeepsLogBounded (issue 16): on main a client with a
// 1 MiB groupId sending small refused publishes made 3 GB of log in 3 s,
// each refusal logging the whole groupId, and got it back in the
// feedback. For 3 s such a client floods the broker; its stderr stays
// within logBound, the feedback it gets back is small, and a producer and
// a consumer beside it keep working.
func TestRefusalFloodKeepsLogBounded(t *testing.T) {
	// A connection logs its first 10 refusals, then one a second: in 3 s
	// at most ~15 lines of at most ~1.5 KiB (group and id clipped to 128
	// bytes, reason to 1 KiB), about 25 KiB. The bound leaves room for the
	// broker's other lines, and is far below what the flood makes
	// unlimited: one line a refusal, thousands of refusals.
	const logBound = 256 << 10
	const flood = 3 * time.Second

	bin := buildKiteq(t)
	addr := freePort(t)
	stderr := &countingWriter{} // counted, not kept: on main this test's broker wrote gigabytes
	startKiteqTo(t, stderr, bin, addr, "-db=memory://", "-topics=trade")
	defer func() {
		if t.Failed() {
			t.Logf("stderr: %d bytes, first %d:\n%s", stderr.n.Load(), countingHead, stderr.String())
		}
	}()
	rec := newRecorder("c")
	startClient(t, "static://"+addr, "g", rec, nil, binding.Bind_Direct("g", "trade", "t", 100, true))
	producer := startClient(t, "static://"+addr, "p", newRecorder("p"), []string{"trade"})

	bigGroup := strings.Repeat("g", 1<<20)
	bad := dialRaw(t, addr)
	bad.handshake(bigGroup)
	bad.conn.SetDeadline(time.Now().Add(flood + 10*time.Second))

	// Refusals of every kind that quotes a client string.
	kinds := []func(h *protocol.Header){
		func(h *protocol.Header) { h.MessageId = proto.String(strings.Repeat("X", 1024)) },
		func(h *protocol.Header) { h.Topic = proto.String(strings.Repeat("t", 1024)) },
		func(h *protocol.Header) {
			h.Commit = proto.Bool(false)
			h.GroupId = proto.String(strings.Repeat("h", 1024))
		},
		func(h *protocol.Header) { h.Commit = proto.Bool(false); h.GroupId = proto.String("other") }, // quotes the 1 MiB group
		func(h *protocol.Header) { h.ExpiredTime = proto.Int64(1) },
	}
	var frames [][]byte
	for i, mutate := range kinds {
		m := newMessage("trade", "t", "refused")
		mutate(m.Header)
		b, err := protocol.AppendMessage(nil, uint32(i), protocol.CmdStringMessage, m)
		if err != nil {
			t.Fatal(err)
		}
		frames = append(frames, b)
	}

	var acks, accepted atomic.Int64
	var longest atomic.Int64
	readDone := make(chan error, 1)
	go func() {
		r := protocol.NewReader(bad.conn, 0)
		for {
			p, err := r.ReadPacket()
			if err != nil {
				readDone <- err
				return
			}
			var ack protocol.MessageStoreAck
			if p.Cmd != protocol.CmdMessageStoreAck || p.DecodeInto(&ack) != nil {
				continue
			}
			acks.Add(1)
			if ack.GetStatus() {
				accepted.Add(1)
			}
			if n := int64(len(ack.GetFeedback())); n > longest.Load() {
				longest.Store(n)
			}
		}
	}()

	var sent atomic.Int64
	stopFlood := make(chan struct{})
	floodDone := make(chan struct{})
	go func() {
		defer close(floodDone)
		var batch []byte
		for i := 0; ; i++ {
			select {
			case <-stopFlood:
				return
			default:
			}
			// On main the log passes the bound at the first refusal:
			// stop there rather than write gigabytes.
			if stderr.n.Load() > logBound {
				return
			}
			batch = batch[:0]
			for j := range 20 {
				batch = append(batch, frames[(i+j)%len(frames)]...)
			}
			if _, err := bad.conn.Write(batch); err != nil {
				return
			}
			sent.Add(20)
			time.Sleep(4 * time.Millisecond) // ~5000 a second: plenty, and the machine is shared
		}
	}()

	// The well-behaved producer and consumer, beside the flood.
	var ids []string
	deadline := time.Now().Add(flood)
	for time.Now().Before(deadline) && stderr.n.Load() <= logBound {
		m := newMessage("trade", "t", "beside the flood")
		if err := producer.SendStringMessage(m); err != nil {
			t.Fatalf("send beside the flood: %v", err)
		}
		ids = append(ids, m.GetHeader().GetMessageId())
		time.Sleep(50 * time.Millisecond)
	}
	close(stopFlood)
	<-floodDone
	eventually(t, 10*time.Second, "an answer to every refused publish", func() bool { return acks.Load() >= sent.Load() })
	eventually(t, 10*time.Second, "every message of the well-behaved producer", func() bool {
		for _, id := range ids {
			if rec.count(id) == 0 {
				return false
			}
		}
		return true
	})

	t.Logf("%d refused publishes, %d messages beside them: %d bytes of log, longest feedback %d bytes",
		sent.Load(), len(ids), stderr.n.Load(), longest.Load())
	if n := stderr.n.Load(); n > logBound {
		t.Fatalf("the broker wrote %d bytes of log for %d refused publishes (%d bytes sent), more than %d",
			n, sent.Load(), len(bigGroup)+len(frames[0])*int(sent.Load()), logBound)
	}
	if n := sent.Load(); n < 2000 {
		// Fewer would not show a missing rate limit: clipped lines
		// without one stay under the bound.
		t.Fatalf("only %d refused publishes sent in %s", n, flood)
	}
	if accepted.Load() != 0 {
		t.Fatalf("%d of the flood's publishes were accepted", accepted.Load())
	}
	if n := longest.Load(); n > 2048 {
		t.Fatalf("a store-ack's feedback is %d bytes long: it echoes the client's strings", n)
	}
	if !stderr.saw.Load() {
		t.Fatalf("no log line says how many refusals were left out (notLoggedBefore)")
	}
	bad.conn.Close()
	<-readDone
}
