package tests

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"sync"
	"testing"
	"time"

	"go.uber.org/fx"
	"go.uber.org/fx/fxtest"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/protobuf/proto"

	"github.com/kiteq/kiteq/broker"
	client "github.com/kiteq/kiteq/client-go"
	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/registry/binding"
	"github.com/kiteq/kiteq/storage"
)

// testBroker is a broker wired by fx exactly as cmd/kiteq wires it, on a
// free loopback port.
type testBroker struct {
	*broker.Server
	logs  *observer.ObservedLogs
	store storage.Store
}

func startBroker(t testing.TB, mutate func(*broker.Options)) *testBroker {
	t.Helper()
	o := broker.DefaultOptions()
	o.Auth = broker.AuthOpen // loopback tests
	o.Bind = "127.0.0.1:0"
	o.PPort = 0
	o.DB = "memory://"
	o.RetrySchedule = []time.Duration{100 * time.Millisecond, 200 * time.Millisecond, 400 * time.Millisecond, time.Second}
	if mutate != nil {
		mutate(&o)
	}
	core, logs := observer.New(zapcore.InfoLevel)
	log := zap.New(zapcore.NewTee(core, zaptest.NewLogger(t, zaptest.Level(zapcore.WarnLevel)).Core()))
	opts, err := broker.AppOptions(o, log)
	if err != nil {
		t.Fatal(err)
	}
	var srv *broker.Server
	var store storage.Store
	app := fxtest.New(t, opts, fx.Populate(&srv, &store))
	app.RequireStart()
	t.Cleanup(app.RequireStop)
	return &testBroker{Server: srv, logs: logs, store: store}
}

func (b *testBroker) uri() string { return "static://" + b.Addr() }

// recorder is a listener that counts what each message id received.
type recorder struct {
	name string
	mu   sync.Mutex
	got  map[string]int
	// reject, when set, decides whether a delivery is refused.
	reject func(m *protocol.StringMessage, seen int) bool
	notify chan string
}

func newRecorder(name string) *recorder {
	return &recorder{name: name, got: make(map[string]int), notify: make(chan string, 1<<16)}
}

func (r *recorder) OnMessage(m *protocol.StringMessage) bool {
	id := m.GetHeader().GetMessageId()
	r.mu.Lock()
	r.got[id]++
	seen := r.got[id]
	r.mu.Unlock()
	if r.reject != nil && r.reject(m, seen) {
		return false
	}
	select {
	case r.notify <- id:
	default:
	}
	return true
}

func (r *recorder) OnMessageCheck(tx *protocol.TxResponse) error {
	return fmt.Errorf("%s: no transactions here", r.name)
}

func (r *recorder) count(id string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.got[id]
}

func (r *recorder) snapshot() map[string]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make(map[string]int, len(r.got))
	for k, v := range r.got {
		out[k] = v
	}
	return out
}

// startClient starts a client-go client and destroys it at cleanup.
func startClient(t testing.TB, uri, group string, l client.IListener, topics []string, bs ...*binding.Binding) *client.KiteQClient {
	t.Helper()
	c := client.NewKiteQClient(uri, group, "secret", l)
	if len(topics) > 0 {
		c.SetTopics(topics)
	}
	if len(bs) > 0 {
		c.SetBindings(bs)
	}
	if err := c.Start(); err != nil {
		t.Fatalf("start %s: %v", group, err)
	}
	t.Cleanup(c.Destroy)
	return c
}

func newMessage(topic, messageType, body string) *protocol.StringMessage {
	return &protocol.StringMessage{
		Header: &protocol.Header{
			MessageId:     proto.String(protocol.MessageId()),
			Topic:         proto.String(topic),
			MessageType:   proto.String(messageType),
			ExpiredTime:   proto.Int64(time.Now().Add(time.Hour).Unix()),
			DeliveryLimit: proto.Int32(-1),
			GroupId:       proto.String("producer"),
			Commit:        proto.Bool(true),
			Fly:           proto.Bool(false),
		},
		Body: proto.String(body),
	}
}

// eventually polls cond until it holds or the timeout passes.
func eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// startChild runs this test binary as the child process that env selects
// in TestMain, given addr, and returns it with its standard output. The
// child is killed when the test ends.
func startChild(t *testing.T, env, addr string) (*exec.Cmd, *bufio.Reader) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), env+"="+addr)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	return cmd, bufio.NewReader(out)
}
