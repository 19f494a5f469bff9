package broker

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"google.golang.org/protobuf/proto"

	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/registry/binding"
	"github.com/kiteq/kiteq/registry/static"
	"github.com/kiteq/kiteq/storage"
	"github.com/kiteq/kiteq/storage/memory"
)

// Bug, fixed: a producer group with more than maxChecksPerPass due checks that is
// out of tokens starves every other group: each pass re-reads the same 5000
// rate-limited messages and never reaches the rest.
func TestTxCheckBacklogOfOneGroupDoesNotStarveOthers(t *testing.T) {
	ctx := context.Background()
	clk := newFakeClock()
	mem := memory.New(20000)
	mem.Now = clk.Now
	t.Cleanup(func() { mem.Close() })
	reg, _ := static.NewServer("")
	o := DefaultOptions()
	o.Auth = AuthOpen // loopback tests
	o.Bind, o.PPort, o.Clock, o.TxCheckRate = "127.0.0.1:0", 0, clk, 10
	s, err := New(o, mem, reg, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	now := clk.Now()
	save := func(group string, next time.Time) string {
		msg := newMessage("trade", "t", group)
		msg.Header.Commit, msg.Header.GroupId = proto.Bool(false), proto.String(group)
		m := storage.NewMessage(msg, next)
		if _, err := mem.Save(ctx, m); err != nil {
			t.Fatal(err)
		}
		return m.ID()
	}
	for i := range 6000 {
		save("a", now.Add(-time.Hour+time.Duration(i)*time.Millisecond))
	}
	bID := save("b", now.Add(-time.Second))
	for range 60 { // one minute of passes, one a second
		clk.Advance(time.Second)
		if _, err := s.txcheck.pass(ctx); err != nil {
			t.Fatal(err)
		}
	}
	got, _ := mem.Get(ctx, bID)
	if got.DeliverCount == 0 {
		t.Fatalf("group b's check, due for 61s, was never sent (DeliverCount %d); group a had %d checks sent/recorded",
			got.DeliverCount, 10+60*10)
	}
}

// commitDuringCheckStore commits (through the broker, over the producer's
// connection) a message after the checker read it and before it acts on it.
type commitDuringCheckStore struct {
	*memory.Store
	armed  atomic.Bool
	commit func(id string)
}

func (s *commitDuringCheckStore) Due(ctx context.Context, q storage.DueQuery) ([]*storage.Message, error) {
	page, err := s.Store.Due(ctx, q)
	if q.Kind == storage.DueTxCheck && len(page) > 0 && s.armed.CompareAndSwap(true, false) {
		id := page[0].ID()
		s.commit(id)
		for { // the producer's commit reached the store
			if m, err := s.Store.Get(ctx, id); err == nil && m.Committed {
				break
			}
			time.Sleep(time.Millisecond)
		}
	}
	return page, err
}

// Bug, fixed: the checker acts on a page read before the producer's commit: it
// dead-letters (or RecordDelivery-s) a committed message.
func TestCommitRacingTheLastCheckIsNotDeadLettered(t *testing.T) {
	ctx := context.Background()
	mem := memory.New(100)
	t.Cleanup(func() { mem.Close() })
	reg, _ := static.NewServer("")
	reg.PublishBindings(ctx, "c", []*binding.Binding{binding.Bind_Direct("c", "trade", "t", 10, true)})
	st := &commitDuringCheckStore{Store: mem}
	s := startOn(t, st, reg, func(o *Options) {
		o.TxCheckDelay, o.TxCheckMaxDelay, o.TxCheckLimit = 100*time.Millisecond, 100*time.Millisecond, 1
	})
	cons := connect(t, s.Addr(), "c")
	prod := connect(t, s.Addr(), "p")
	m := undecided(t, prod, "decided late")
	var mu sync.Mutex
	st.commit = func(string) {
		mu.Lock()
		defer mu.Unlock()
		prod.send(protocol.CmdTxAck, &protocol.TxACKPacket{Header: m.Header,
			Status: proto.Int32(int32(protocol.TxCommit)), Feedback: proto.String("")})
	}
	expectCheck(t, prod, m) // check 1 of 1, not answered
	st.armed.Store(true)    // the next pass dead-letters it: the commit arrives meanwhile
	eventually(t, "commit and dead-letter pass", func() bool { return !st.armed.Load() })
	time.Sleep(500 * time.Millisecond)
	dl, _ := mem.DeadLetters(ctx, "", 10)
	delivered := false
	if p, err := cons.read(time.Second); err == nil && p.Cmd == protocol.CmdStringMessage {
		delivered = true
	}
	if len(dl) != 0 {
		t.Fatalf("committed message dead-lettered (committed=%v, reason %q); delivered to the consumer: %v",
			dl[0].Message.Committed, dl[0].Reason, delivered)
	}
}

// failGetStore fails Get while failing is set.
type failGetStore struct {
	*memory.Store
	failing atomic.Bool
}

func (s *failGetStore) Get(ctx context.Context, id string) (*storage.Message, error) {
	if s.failing.Load() {
		return nil, errors.New("transient read error")
	}
	return s.Store.Get(ctx, id)
}

// Bug, fixed: POST /deadletters/redeliver puts the message back, then fails to read
// it: it is live in the store, never dispatched, and a retry of the POST is
// 404.
func TestRedeliverAfterAFailedReadStillDelivers(t *testing.T) {
	ctx := context.Background()
	mem := memory.New(100)
	t.Cleanup(func() { mem.Close() })
	reg, _ := static.NewServer("")
	st := &failGetStore{Store: mem}
	s := startOn(t, st, reg, nil)
	b := &testBroker{Server: s, store: mem}
	cons := connect(t, s.Addr(), "c")
	cons.bind("c", bindDirect("c", "trade", "t", 10, true))
	m := newMessage("trade", "t", "dead once")
	m.Header.DeliveryLimit = proto.Int32(1)
	connect(t, s.Addr(), "p").publish(m)
	op, got := cons.receive()
	cons.ack(op, got, "c", false)
	eventually(t, "dead-lettered", func() bool { dl, _ := mem.DeadLetters(ctx, "", 10); return len(dl) == 1 })
	id := m.Header.GetMessageId()

	st.failing.Store(true)
	w1 := adminDo(t, b, http.MethodPost, "/deadletters/redeliver?id="+id)
	st.failing.Store(false)
	w2 := adminDo(t, b, http.MethodPost, "/deadletters/redeliver?id="+id)
	_, err := cons.read(3 * time.Second) // the read is tried again a second after it failed
	live, gerr := mem.Get(ctx, id)
	if err != nil {
		t.Fatalf("first POST %d %q, retry %d %q; consumer got nothing (%v); message live in the store: %v (next %v)",
			w1.Code, strings.TrimSpace(w1.Body.String()), w2.Code, strings.TrimSpace(w2.Body.String()), err, gerr == nil, live.NextDeliverTime)
	}
}

// Bug, fixed: a commit that answers a check after the message expired delivers it.
func TestCommitAfterExpiryIsNotDelivered(t *testing.T) {
	b := startBroker(t, nil)
	cons := connect(t, b.Addr(), "c")
	cons.bind("c", bindDirect("c", "trade", "t", 10, true))
	prod := connect(t, b.Addr(), "p")
	m := newMessage("trade", "t", "expired before its commit")
	m.Header.Commit = proto.Bool(false)
	m.Header.ExpiredTime = proto.Int64(time.Now().Add(time.Second).Unix())
	if ack := prod.publish(m); !ack.GetStatus() {
		t.Fatal(ack.GetFeedback())
	}
	time.Sleep(2100 * time.Millisecond)
	prod.send(protocol.CmdTxAck, &protocol.TxACKPacket{Header: m.Header, Status: proto.Int32(int32(protocol.TxCommit)), Feedback: proto.String("")})
	if p, err := cons.read(time.Second); err == nil && p.Cmd == protocol.CmdStringMessage {
		t.Fatalf("message delivered %s after its expiredTime", time.Since(time.Unix(m.Header.GetExpiredTime(), 0)).Round(time.Millisecond))
	}
}

type slowRecordStore struct {
	*memory.Store
	delay time.Duration
}

func (s *slowRecordStore) RecordDelivery(ctx context.Context, r storage.DeliveryResult) error {
	time.Sleep(s.delay)
	return s.Store.RecordDelivery(ctx, r)
}

// Bug, fixed: Stop waits for a whole check pass, which does not look at stop.
func TestStopDoesNotWaitForACheckPass(t *testing.T) {
	ctx := context.Background()
	mem := memory.New(10000)
	t.Cleanup(func() { mem.Close() })
	for range 2000 {
		msg := newMessage("trade", "t", "x")
		msg.Header.Commit = proto.Bool(false)
		mem.Save(ctx, storage.NewMessage(msg, time.Now().Add(-time.Minute)))
	}
	reg, _ := static.NewServer("")
	s := startOn(t, &slowRecordStore{Store: mem, delay: 5 * time.Millisecond}, reg, func(o *Options) {
		o.TxCheckDelay, o.TxCheckRate, o.ShutdownTimeout = 10*time.Millisecond, 100000, time.Second
	})
	time.Sleep(100 * time.Millisecond)
	start := time.Now()
	s.Stop(ctx)
	if took := time.Since(start); took > 3*time.Second {
		t.Fatalf("Stop took %s with ShutdownTimeout 1s", took.Round(100*time.Millisecond))
	}
}
