package bench

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	client "github.com/kiteq/kiteq/client-go"
	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/registry/binding"
)

// KiteQ drives a KiteQ broker that it starts from Bin, one per tier, with
// the memory store or the file store in a temporary directory.
type KiteQ struct {
	Bin  string   // the kiteq binary (broker/cmd/kiteq)
	Args []string // more broker flags, e.g. -pport=13801 to profile it
	// ConnPerPublisher gives each publisher a client (a connection) of
	// its own; by default publishers share one.
	ConnPerPublisher bool

	proc  *process
	dir   string
	addr  string
	admin string // the broker's admin HTTP address: pprof
}

func (k *KiteQ) Name() string { return "kiteq" }

func (k *KiteQ) Start(ctx context.Context, tier Tier) (ServerInfo, error) {
	dir, err := os.MkdirTemp("", "kiteq-bench-")
	if err != nil {
		return ServerInfo{}, err
	}
	db := map[Tier]string{
		TierMemory:  "memory://",
		TierWritten: "file://" + filepath.Join(dir, "data") + "?fsync=never",
		TierSynced:  "file://" + filepath.Join(dir, "data") + "?fsync=always",
	}[tier]
	addr, err := freeAddr()
	if err != nil {
		os.RemoveAll(dir)
		return ServerInfo{}, err
	}
	admin, err := freeAddr()
	if err != nil {
		os.RemoveAll(dir)
		return ServerInfo{}, err
	}
	_, adminPort, _ := net.SplitHostPort(admin)
	args := []string{"-bind=" + addr, "-pport=" + adminPort, "-db=" + db, "-log-level=warn"}
	if flagValue(k.Args, "auth") == "" && flagValue(k.Args, "auth-file") == "" {
		args = append(args, "-auth=open") // a loopback broker of the benchmark's own
	}
	args = append(args, k.Args...)
	p, err := startProcess(ctx, addr, k.Bin, args...)
	if err != nil {
		os.RemoveAll(dir)
		return ServerInfo{}, err
	}
	k.proc, k.dir, k.addr, k.admin = p, dir, addr, admin
	version := "kiteq"
	if rev := gitRevision(); rev != "" {
		version += " " + rev + " (this checkout)"
	}
	if v := flagValue(k.Args, "db"); v != "" {
		db = v // a -db in Args wins: the broker takes the last
	}
	return ServerInfo{System: "kiteq", Version: version, Config: "-db=" + strings.ReplaceAll(db, dir, "<temp dir>"), PID: p.pid()}, nil
}

// CPUProfile records the broker's CPU profile for d (its admin port's
// /debug/pprof/profile).
func (k *KiteQ) CPUProfile(ctx context.Context, d time.Duration) ([]byte, error) {
	url := fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", k.admin, max(int(d.Seconds()), 1))
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return io.ReadAll(resp.Body)
}

func (k *KiteQ) Stop() error {
	if k.proc == nil {
		return nil
	}
	err := k.proc.stop()
	os.RemoveAll(k.dir)
	k.proc = nil
	return err
}

// kiteqTopic is the topic of every run; a run's messages have its own
// message type, and its consumer group binds to that type.
const kiteqTopic = "bench"

func (k *KiteQ) Target(ctx context.Context, name string) (Target, error) {
	// The consumer group binds first, persistently, as a queue or a stream
	// exists before anything is published to it: a message no binding
	// matches is finished at once.
	binder := client.NewKiteQClient("static://"+k.addr, consumerGroup(name), "bench", nopListener{})
	binder.SetBindings([]*binding.Binding{consumerBinding(name)})
	binder.SetLogger(func(string, ...any) {})
	if err := binder.Start(); err != nil {
		return nil, fmt.Errorf("kiteq binding: %w", err)
	}
	binder.Destroy()
	prod := client.NewKiteQClient("static://"+k.addr, "bench-p-"+name, "bench", nopListener{})
	prod.SetTopics([]string{kiteqTopic})
	prod.SetLogger(func(string, ...any) {})
	if err := prod.Start(); err != nil {
		return nil, fmt.Errorf("kiteq producer: %w", err)
	}
	return &kiteqTarget{k: k, name: name, prod: prod}, nil
}

type kiteqTarget struct {
	k    *KiteQ
	name string
	prod *client.KiteQClient

	mu   sync.Mutex
	cons []*client.KiteQClient
}

// Publisher shares the target's one client (client-go multiplexes its
// senders over one connection per broker), or starts its own
// (ConnPerPublisher).
func (t *kiteqTarget) Publisher(context.Context) (Publisher, error) {
	if !t.k.ConnPerPublisher {
		return kiteqPublisher{t: t, c: t.prod}, nil
	}
	c := client.NewKiteQClient("static://"+t.k.addr, "bench-p-"+t.name, "bench", nopListener{})
	c.SetTopics([]string{kiteqTopic})
	c.SetLogger(func(string, ...any) {})
	if err := c.Start(); err != nil {
		return nil, fmt.Errorf("kiteq producer: %w", err)
	}
	return kiteqPublisher{t: t, c: c, own: true}, nil
}

type kiteqPublisher struct {
	t   *kiteqTarget
	c   *client.KiteQClient
	own bool
}

func (p kiteqPublisher) Publish(_ context.Context, body []byte) error {
	return p.c.SendBytesMessage(p.t.message(body))
}

func (p kiteqPublisher) Close() error {
	if p.own {
		p.c.Destroy()
	}
	return nil
}

func (t *kiteqTarget) message(body []byte) *protocol.BytesMessage {
	return &protocol.BytesMessage{
		Header: &protocol.Header{
			MessageId: new(protocol.MessageId()), Topic: new(kiteqTopic), MessageType: new(t.name),
			ExpiredTime: new(int64(-1)), DeliveryLimit: new(int32(-1)), GroupId: new("bench-p-" + t.name),
			Commit: new(true), Fly: new(false),
		},
		Body: body,
	}
}

// Consume binds a group to the run's message type, persistently, with a
// watermark of 1000, and acknowledges every message after fn.
func (t *kiteqTarget) Consume(ctx context.Context, fn func(body []byte)) error {
	c := client.NewKiteQClient("static://"+t.k.addr, consumerGroup(t.name), "bench", bytesListener(fn))
	c.SetBindings([]*binding.Binding{consumerBinding(t.name)})
	c.SetLogger(func(string, ...any) {})
	if err := c.Start(); err != nil {
		return fmt.Errorf("kiteq consumer: %w", err)
	}
	t.mu.Lock()
	t.cons = append(t.cons, c)
	t.mu.Unlock()
	go func() {
		<-ctx.Done()
		c.Destroy()
	}()
	return nil
}

func (t *kiteqTarget) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, c := range t.cons {
		c.Destroy()
	}
	t.prod.Destroy()
	return nil
}

// SendTx publishes body as a transactional message whose local
// transaction commits at once: the store-ack, then the commit.
func (t *kiteqTarget) SendTx(body []byte) error {
	return t.prod.SendTxBytesMessage(t.message(body), func(*protocol.BytesMessage) (bool, error) { return true, nil })
}

// flagValue is the last value of flag name in args (-name=v, --name=v,
// -name v), or "".
func flagValue(args []string, name string) string {
	v := ""
	for i, a := range args {
		a = strings.TrimPrefix(strings.TrimPrefix(a, "-"), "-")
		if val, ok := strings.CutPrefix(a, name+"="); ok {
			v = val
		} else if a == name && i+1 < len(args) {
			v = args[i+1]
		}
	}
	return v
}

// gitRevision is the commit of the checkout the tool runs in, with
// "+modified" when files outside docs/ differ from it, or "".
func gitRevision() string {
	out, err := exec.Command("git", "rev-parse", "--short=12", "HEAD").Output()
	if err != nil {
		return ""
	}
	rev := strings.TrimSpace(string(out))
	// The report and its files (docs/) change with every run of the suite;
	// anything else changed makes a build that is not the commit.
	if st, err := exec.Command("git", "status", "--porcelain", "--untracked-files=no", "--", ":/", ":(exclude,top)docs").Output(); err == nil && len(st) > 0 {
		rev += "+modified"
	}
	return rev
}

func consumerGroup(run string) string { return "bench-c-" + run }

func consumerBinding(run string) *binding.Binding {
	return binding.Bind_Direct(consumerGroup(run), kiteqTopic, run, 1000, true)
}

type nopListener struct{}

func (nopListener) OnMessage(*protocol.StringMessage) bool { return true }
func (nopListener) OnMessageCheck(tx *protocol.TxResponse) error {
	tx.Commit() // the benchmark's transactions all commit
	return nil
}

// bytesListener hands every bytes message to a function.
type bytesListener func(body []byte)

func (l bytesListener) OnMessage(m *protocol.StringMessage) bool { l([]byte(m.GetBody())); return true }
func (l bytesListener) OnBytesMessage(m *protocol.BytesMessage) bool {
	l(m.GetBody())
	return true
}
func (l bytesListener) OnMessageCheck(*protocol.TxResponse) error { return nil }
