// Package static is the registry of a standalone broker: clients are given
// the brokers' addresses, and the broker keeps the bindings its consumers
// send over their connections.
package static

import (
	"context"
	"sync"

	"github.com/kiteq/kiteq/registry"
	"github.com/kiteq/kiteq/registry/binding"
)

// Discovery serves a fixed list of brokers for every topic.
type Discovery struct {
	addrs []string

	mu     sync.Mutex
	closed bool
}

var _ registry.Discovery = (*Discovery)(nil)

// NewDiscovery returns a Discovery of the brokers at addrs.
func NewDiscovery(addrs []string) *Discovery {
	return &Discovery{addrs: append([]string(nil), addrs...)}
}

func (d *Discovery) Brokers(ctx context.Context, topic string) ([]string, error) {
	if err := d.check(); err != nil {
		return nil, err
	}
	return append([]string(nil), d.addrs...), nil
}

// WatchBrokers calls fn once: a static list never changes.
func (d *Discovery) WatchBrokers(ctx context.Context, topic string, fn func([]string)) error {
	addrs, err := d.Brokers(ctx, topic)
	if err != nil {
		return err
	}
	fn(addrs)
	return nil
}

// PublishProducer has nothing to announce: a standalone broker learns its
// producers from their connections.
func (d *Discovery) PublishProducer(ctx context.Context, topic, groupId, addr string) error {
	return d.check()
}

// PublishBindings has nothing to store: the client sends its bindings to
// each broker over the connection.
func (d *Discovery) PublishBindings(ctx context.Context, groupId string, bs []*binding.Binding) error {
	return d.check()
}

func (d *Discovery) Close() error {
	d.mu.Lock()
	d.closed = true
	d.mu.Unlock()
	return nil
}

func (d *Discovery) check() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return registry.ErrClosed
	}
	return nil
}
