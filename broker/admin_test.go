package broker

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/kiteq/kiteq/registry/binding"
	"github.com/kiteq/kiteq/registry/static"
	"github.com/kiteq/kiteq/storage/memory"
)

// adminDo runs one request against the broker's admin handler.
func adminDo(t *testing.T, b *testBroker, method, target string) *httptest.ResponseRecorder {
	t.Helper()
	w := httptest.NewRecorder()
	b.adminHandler().ServeHTTP(w, httptest.NewRequest(method, target, nil))
	return w
}

type deadLetterPage struct {
	DeadLetters []deadLetterJSON `json:"deadLetters"`
	Next        string           `json:"next"`
}

func listDead(t *testing.T, b *testBroker, query string) deadLetterPage {
	t.Helper()
	w := adminDo(t, b, http.MethodGet, "/deadletters"+query)
	if w.Code != http.StatusOK {
		t.Fatalf("GET /deadletters%s: %d %s", query, w.Code, w.Body)
	}
	var p deadLetterPage
	if err := json.Unmarshal(w.Body.Bytes(), &p); err != nil {
		t.Fatal(err)
	}
	return p
}

// A message dead-lettered at its delivery limit is listed with its reason
// and per-group results, and once put back it goes again to the group that
// gave up, not to the one that acknowledged it.
func TestDeadLetterListedAndPutBack(t *testing.T) {
	b := startBroker(t, nil)
	good := connect(t, b.Addr(), "good")
	good.bind("good", bindDirect("good", "trade", "t", 10, true))
	bad := connect(t, b.Addr(), "bad")
	bad.bind("bad", bindDirect("bad", "trade", "t", 10, true))
	prod := connect(t, b.Addr(), "p")
	m := newMessage("trade", "t", "doomed")
	m.Header.DeliveryLimit = proto.Int32(2)
	prod.publish(m)
	op, got := good.receive()
	good.ack(op, got, "good", true)
	for range 2 {
		op, got := bad.receive()
		bad.ack(op, got, "bad", false)
	}
	var p deadLetterPage
	eventually(t, "listed", func() bool { p = listDead(t, b, ""); return len(p.DeadLetters) == 1 })
	d := p.DeadLetters[0]
	if d.ID != m.Header.GetMessageId() || !strings.Contains(d.Reason, "bad: delivery limit 2 reached") ||
		strings.Join(d.SuccGroups, ",") != "good" || strings.Join(d.FailGroups, ",") != "bad" || p.Next != "" {
		t.Fatalf("dead letter %+v, next %q", d, p.Next)
	}

	w := adminDo(t, b, http.MethodPost, "/deadletters/redeliver?id="+d.ID)
	if w.Code != http.StatusOK {
		t.Fatalf("redeliver: %d %s", w.Code, w.Body)
	}
	op, got = bad.receive()
	if got.GetHeader().GetMessageId() != d.ID {
		t.Fatalf("redelivered %s", got.GetHeader().GetMessageId())
	}
	bad.ack(op, got, "bad", true)
	good.expectNothing(300 * time.Millisecond) // it acknowledged before
	eventually(t, "finished", func() bool { return storeCount(t, b.store) == 0 })
	if p := listDead(t, b, ""); len(p.DeadLetters) != 0 {
		t.Fatalf("still listed: %+v", p)
	}
	if st := b.Stats(); st.Redelivered != 1 {
		t.Fatalf("stats: %+v", st)
	}
}

func TestDeadLetterAdminErrors(t *testing.T) {
	b := startBroker(t, nil)
	for _, c := range []struct {
		method, target string
		code           int
		body           string
	}{
		{http.MethodPost, "/deadletters/redeliver?id=nope", http.StatusBadRequest, "lowercase hex"},
		{http.MethodPost, "/deadletters/redeliver?id=" + strings.Repeat("a", 32), http.StatusNotFound, "no dead letter"},
		{http.MethodGet, "/deadletters/redeliver?id=" + strings.Repeat("a", 32), http.StatusMethodNotAllowed, ""},
		{http.MethodGet, "/deadletters?limit=0", http.StatusBadRequest, "from 1 to 1000"},
	} {
		w := adminDo(t, b, c.method, c.target)
		if w.Code != c.code || !strings.Contains(w.Body.String(), c.body) {
			t.Errorf("%s %s: %d %q, want %d %q", c.method, c.target, w.Code, w.Body, c.code, c.body)
		}
	}
}

// Paging: next names where the following page starts.
func TestDeadLettersPaging(t *testing.T) {
	b := startBroker(t, nil)
	prod := connect(t, b.Addr(), "p")
	for range 5 {
		m := newMessage("trade", "t", "x")
		m.Header.Commit = proto.Bool(false) // stays stored
		prod.publish(m)
		if err := b.store.DeadLetter(t.Context(), m.Header.GetMessageId(), "test"); err != nil {
			t.Fatal(err)
		}
	}
	seen := map[string]bool{}
	for q := "?limit=2"; ; {
		p := listDead(t, b, q)
		for _, d := range p.DeadLetters {
			seen[d.ID] = true
		}
		if p.Next == "" {
			break
		}
		q = "?limit=2&after=" + p.Next
	}
	if len(seen) != 5 {
		t.Fatalf("%d dead letters over the pages, want 5", len(seen))
	}
}

// blockingRedeliverStore holds Redeliver until released.
type blockingRedeliverStore struct {
	*memory.Store
	entered, release chan struct{}
}

func (s *blockingRedeliverStore) Redeliver(ctx context.Context, id string) error {
	close(s.entered)
	<-s.release
	return s.Store.Redeliver(ctx, id)
}

// Stop lets an admin request in progress finish, and answer, before the
// engine stops: a put back that Stop interrupted could leave the dead
// letter live with nobody delivering it.
func TestStopWaitsForAdminRequests(t *testing.T) {
	mem := memory.New(100)
	defer mem.Close()
	st := &blockingRedeliverStore{Store: mem, entered: make(chan struct{}), release: make(chan struct{})}
	m := storedMessage(time.Now())
	if _, err := mem.Save(context.Background(), m); err != nil {
		t.Fatal(err)
	}
	if err := mem.DeadLetter(context.Background(), m.ID(), "test"); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	reg, err := static.NewServer("")
	if err != nil {
		t.Fatal(err)
	}
	// A persistent group with no consumer: the message put back waits for it.
	if err := reg.PublishBindings(context.Background(), "c", []*binding.Binding{binding.Bind_Direct("c", "trade", "t", 10, true)}); err != nil {
		t.Fatal(err)
	}
	b := startOn(t, st, reg, func(o *Options) { o.PPort = port })

	answer := make(chan int, 1)
	go func() {
		resp, err := http.Post(fmt.Sprintf("http://127.0.0.1:%d/deadletters/redeliver?id=%s", port, m.ID()), "", nil)
		if err != nil {
			t.Error(err)
			answer <- 0
			return
		}
		resp.Body.Close()
		answer <- resp.StatusCode
	}()
	<-st.entered
	stopped := make(chan error, 1)
	go func() { stopped <- b.Stop(context.Background()) }()
	select {
	case err := <-stopped:
		t.Fatalf("Stop returned (%v) while an admin request was in progress", err)
	case <-time.After(300 * time.Millisecond):
	}
	close(st.release)
	if code := <-answer; code != http.StatusOK {
		t.Fatalf("the put back in progress at Stop answered %d, want 200", code)
	}
	if err := <-stopped; err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if _, err := mem.Get(context.Background(), m.ID()); err != nil {
		t.Fatalf("the dead letter was not put back: %v", err)
	}
	if n := b.Stats().Redelivered; n != 1 {
		t.Fatalf("redelivered %d, want 1", n)
	}
}
