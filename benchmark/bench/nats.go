package bench

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// NATS drives a nats-server with JetStream that it starts from Bin, one
// per tier, its store in a temporary directory.
//
//   - memory: streams with memory storage;
//   - written: file storage, the server syncing as it does by default
//     (every 2 minutes);
//   - synced: file storage with sync_interval: always.
//
// Streams use work-queue retention (a message is removed once
// acknowledged, as in KiteQ and RabbitMQ); the consumer is a durable pull
// consumer with explicit acks and up to 1,000 messages outstanding.
type NATS struct {
	Bin string // nats-server
	// ConnPerPublisher gives each publisher a connection of its own, as
	// nats bench does; by default publishers share one.
	ConnPerPublisher bool
	// Limits makes streams keep messages by limits, as nats bench's do,
	// not as a work queue.
	Limits bool

	proc    *process
	dir     string
	url     string
	storage jetstream.StorageType
}

func (n *NATS) Name() string { return "nats" }

func (n *NATS) Start(ctx context.Context, tier Tier) (ServerInfo, error) {
	dir, err := os.MkdirTemp("", "nats-bench-")
	if err != nil {
		return ServerInfo{}, err
	}
	addr, err := freeAddr()
	if err != nil {
		os.RemoveAll(dir)
		return ServerInfo{}, err
	}
	host, port, _ := strings.Cut(addr, ":")
	js := fmt.Sprintf("jetstream {\n  store_dir: %q\n", filepath.Join(dir, "js"))
	n.storage = jetstream.FileStorage
	switch tier {
	case TierMemory:
		n.storage = jetstream.MemoryStorage
	case TierSynced:
		js += "  sync_interval: always\n"
	}
	js += "}\n"
	conf := fmt.Sprintf("host: %s\nport: %s\n%s", host, port, js)
	path := filepath.Join(dir, "nats.conf")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		os.RemoveAll(dir)
		return ServerInfo{}, err
	}
	p, err := startProcess(ctx, addr, n.Bin, "-c", path)
	if err != nil {
		os.RemoveAll(dir)
		return ServerInfo{}, err
	}
	n.proc, n.dir, n.url = p, dir, "nats://"+addr
	version := "nats-server"
	if out, err := exec.Command(n.Bin, "--version").Output(); err == nil {
		version = strings.TrimSpace(string(out))
	}
	cfg := map[Tier]string{
		TierMemory:  "JetStream memory storage, work-queue retention",
		TierWritten: "JetStream file storage, work-queue retention, the default sync_interval (2m)",
		TierSynced:  "JetStream file storage, work-queue retention, sync_interval: always",
	}[tier]
	if n.Limits {
		cfg = strings.Replace(cfg, "work-queue retention", "limits retention", 1)
	}
	return ServerInfo{System: "nats", Version: version, Config: cfg, PID: p.pid()}, nil
}

func (n *NATS) retention() jetstream.RetentionPolicy {
	if n.Limits {
		return jetstream.LimitsPolicy
	}
	return jetstream.WorkQueuePolicy
}

// URL is the server's address once started.
func (n *NATS) URL() string { return n.url }

func (n *NATS) Stop() error {
	if n.proc == nil {
		return nil
	}
	err := n.proc.stop()
	os.RemoveAll(n.dir)
	n.proc = nil
	return err
}

func (n *NATS) Target(ctx context.Context, name string) (Target, error) {
	nc, err := nats.Connect(n.url)
	if err != nil {
		return nil, fmt.Errorf("nats connect: %w", err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, err
	}
	stream, err := js.CreateStream(ctx, jetstream.StreamConfig{
		Name: "bench_" + name, Subjects: []string{"bench." + name},
		Storage: n.storage, Retention: n.retention(),
	})
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("nats create stream: %w", err)
	}
	return &natsTarget{nc: nc, js: js, stream: stream, subject: "bench." + name, own: n.ConnPerPublisher}, nil
}

type natsTarget struct {
	nc      *nats.Conn
	js      jetstream.JetStream
	stream  jetstream.Stream
	subject string
	own     bool // a connection per publisher

	mu   sync.Mutex
	cons []jetstream.ConsumeContext
	subs []*nats.Conn
}

// Publisher shares the target's connection, as the KiteQ driver shares
// its client, or opens its own (ConnPerPublisher): each Publish waits for
// its PubAck.
func (t *natsTarget) Publisher(context.Context) (Publisher, error) {
	if !t.own {
		return natsPublisher{js: t.js, subject: t.subject}, nil
	}
	nc, err := nats.Connect(t.nc.ConnectedUrl())
	if err != nil {
		return nil, err
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, err
	}
	return natsPublisher{js: js, subject: t.subject, nc: nc}, nil
}

type natsPublisher struct {
	js      jetstream.JetStream
	subject string
	nc      *nats.Conn // its own, or nil
}

func (p natsPublisher) Publish(ctx context.Context, body []byte) error {
	_, err := p.js.Publish(ctx, p.subject, body)
	return err
}

func (p natsPublisher) Close() error {
	if p.nc != nil {
		p.nc.Close()
	}
	return nil
}

// Consume uses a connection of its own, so that deliveries and publishes
// do not share one socket.
func (t *natsTarget) Consume(ctx context.Context, fn func(body []byte)) error {
	nc, err := nats.Connect(t.nc.ConnectedUrl())
	if err != nil {
		return err
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return err
	}
	c, err := js.CreateOrUpdateConsumer(ctx, t.stream.CachedInfo().Config.Name, jetstream.ConsumerConfig{
		Durable: "bench", AckPolicy: jetstream.AckExplicitPolicy, MaxAckPending: 1000,
	})
	if err != nil {
		nc.Close()
		return fmt.Errorf("nats create consumer: %w", err)
	}
	cc, err := c.Consume(func(m jetstream.Msg) {
		fn(m.Data())
		m.Ack()
	}, jetstream.PullMaxMessages(1000))
	if err != nil {
		nc.Close()
		return err
	}
	t.mu.Lock()
	t.cons, t.subs = append(t.cons, cc), append(t.subs, nc)
	t.mu.Unlock()
	go func() {
		<-ctx.Done()
		cc.Stop()
	}()
	return nil
}

func (t *natsTarget) Close() error {
	t.mu.Lock()
	for _, cc := range t.cons {
		cc.Stop()
	}
	for _, nc := range t.subs {
		nc.Close()
	}
	t.mu.Unlock()
	err := t.js.DeleteStream(context.Background(), t.stream.CachedInfo().Config.Name)
	t.nc.Close()
	return err
}
