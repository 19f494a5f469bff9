package bench

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	amqp "github.com/rabbitmq/amqp091-go"
)

// RabbitMQ drives the RabbitMQ server at URL, which it does not start.
//
//   - memory: a non-durable queue and transient messages;
//   - synced: a durable (classic) queue and persistent messages.
//
// Both publish with publisher confirms, one channel per publisher on one
// connection, each Publish waiting for its confirm; the consumer takes
// deliveries on a channel of its own with up to 1,000 unacknowledged. The
// written tier has no RabbitMQ counterpart.
type RabbitMQ struct {
	URL string

	tier Tier
}

func (r *RabbitMQ) Name() string { return "rabbitmq" }

func (r *RabbitMQ) Start(ctx context.Context, tier Tier) (ServerInfo, error) {
	if tier == TierWritten {
		return ServerInfo{}, ErrTierUnsupported
	}
	conn, err := amqp.Dial(r.URL)
	if err != nil {
		return ServerInfo{}, fmt.Errorf("rabbitmq at %s: %w", r.URL, err)
	}
	defer conn.Close()
	r.tier = tier
	version := "rabbitmq"
	if v, ok := conn.Properties["version"].(string); ok {
		version += " " + v
	}
	cfg := "non-durable queue, transient messages, publisher confirms"
	if tier == TierSynced {
		cfg = "durable classic queue, persistent messages, publisher confirms"
	}
	return ServerInfo{System: "rabbitmq", Version: version, Config: cfg, PID: findProcess("beam.smp", "rabbit")}, nil
}

func (r *RabbitMQ) Stop() error { return nil }

func (r *RabbitMQ) Target(ctx context.Context, name string) (Target, error) {
	conn, err := amqp.Dial(r.URL)
	if err != nil {
		return nil, err
	}
	ch, err := conn.Channel()
	if err != nil {
		conn.Close()
		return nil, err
	}
	durable := r.tier == TierSynced
	q, err := ch.QueueDeclare("bench."+name, durable, false, false, false, nil)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("rabbitmq declare queue: %w", err)
	}
	ch.Close()
	mode := amqp.Transient
	if durable {
		mode = amqp.Persistent
	}
	return &rabbitTarget{url: r.URL, conn: conn, queue: q.Name, mode: mode}, nil
}

type rabbitTarget struct {
	url   string
	conn  *amqp.Connection
	queue string
	mode  uint8

	mu    sync.Mutex
	conns []*amqp.Connection
}

func (t *rabbitTarget) Publisher(context.Context) (Publisher, error) {
	ch, err := t.conn.Channel()
	if err != nil {
		return nil, err
	}
	if err := ch.Confirm(false); err != nil {
		ch.Close()
		return nil, err
	}
	return &rabbitPublisher{t: t, ch: ch}, nil
}

type rabbitPublisher struct {
	t  *rabbitTarget
	ch *amqp.Channel
}

func (p *rabbitPublisher) Publish(ctx context.Context, body []byte) error {
	dc, err := p.ch.PublishWithDeferredConfirmWithContext(ctx, "", p.t.queue, false, false,
		amqp.Publishing{DeliveryMode: p.t.mode, Body: body})
	if err != nil {
		return err
	}
	ok, err := dc.WaitContext(ctx)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("rabbitmq: publish nacked")
	}
	return nil
}

func (p *rabbitPublisher) Close() error { return p.ch.Close() }

// Consume uses a connection of its own, so that deliveries and publishes
// do not share one socket.
func (t *rabbitTarget) Consume(ctx context.Context, fn func(body []byte)) error {
	conn, err := amqp.Dial(t.url)
	if err != nil {
		return err
	}
	ch, err := conn.Channel()
	if err != nil {
		conn.Close()
		return err
	}
	if err := ch.Qos(1000, 0, false); err != nil {
		conn.Close()
		return err
	}
	deliveries, err := ch.ConsumeWithContext(ctx, t.queue, "", false, false, false, false, nil)
	if err != nil {
		conn.Close()
		return err
	}
	t.mu.Lock()
	t.conns = append(t.conns, conn)
	t.mu.Unlock()
	go func() {
		for d := range deliveries {
			fn(d.Body)
			d.Ack(false)
		}
	}()
	go func() {
		<-ctx.Done()
		conn.Close()
	}()
	return nil
}

func (t *rabbitTarget) Close() error {
	t.mu.Lock()
	for _, c := range t.conns {
		c.Close()
	}
	t.mu.Unlock()
	if ch, err := t.conn.Channel(); err == nil {
		ch.QueueDelete(t.queue, false, false, false)
		ch.Close()
	}
	return t.conn.Close()
}

// findProcess returns the pid of the process whose command is comm and
// whose command line holds marker, the largest in memory when there are
// several (a server's CLI tools run the same VM); 0 when there is none.
func findProcess(comm, marker string) int {
	best, bestRSS := 0, int64(-1)
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	for _, d := range dirs {
		c, err := os.ReadFile(filepath.Join(d, "comm"))
		if err != nil || !strings.HasPrefix(strings.TrimSpace(string(c)), comm) {
			continue
		}
		cmdline, _ := os.ReadFile(filepath.Join(d, "cmdline"))
		if !strings.Contains(string(cmdline), marker) {
			continue
		}
		var pid int
		fmt.Sscanf(filepath.Base(d), "%d", &pid)
		if rss, err := rssBytes(pid); err == nil && rss > bestRSS {
			best, bestRSS = pid, rss
		}
	}
	return best
}
