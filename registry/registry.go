// Package registry is how brokers, producers and consumers find each other:
// ZooKeeper in a cluster (registry/zk), or a static list of brokers for a
// standalone broker (registry/static).
package registry

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"

	"github.com/kiteq/kiteq/registry/binding"
)

// ErrClosed is returned by a registry after Close.
var ErrClosed = errors.New("registry: closed")

// Discovery is the clients' view of the registry.
type Discovery interface {
	// Brokers returns the addresses (host:port) of the brokers serving topic.
	Brokers(ctx context.Context, topic string) ([]string, error)
	// WatchBrokers calls fn with the addresses of the brokers of topic now
	// and each time they change, until ctx ends or the registry closes.
	WatchBrokers(ctx context.Context, topic string, fn func(addrs []string)) error
	// PublishProducer announces that groupId publishes topic from addr.
	PublishProducer(ctx context.Context, topic, groupId, addr string) error
	// PublishBindings stores the bindings of groupId.
	PublishBindings(ctx context.Context, groupId string, bs []*binding.Binding) error
	Close() error
}

// Server is the brokers' view of the registry.
type Server interface {
	// PublishServer announces addr as a broker of topics.
	PublishServer(ctx context.Context, addr string, topics []string) error
	// UnpublishServer withdraws what PublishServer announced.
	UnpublishServer(ctx context.Context, addr string, topics []string) error
	// PublishBindings replaces the bindings of groupId with bs, for the
	// topics that bs names. A consumer sends its bindings over its
	// connection too, so a standalone broker learns them this way.
	PublishBindings(ctx context.Context, groupId string, bs []*binding.Binding) error
	// Bindings returns the bindings of topic.
	Bindings(topic string) []*binding.Binding
	// WatchBindings calls fn with the bindings of every topic it knows now,
	// then each time the bindings of a topic change.
	WatchBindings(fn func(topic string, bs []*binding.Binding))
	Close() error
}

// URI is a parsed registry address: zk://host:port[,host:port] (a bare
// host:port list means ZooKeeper too) or static://host:port[,host:port].
type URI struct {
	Scheme string // "zk" or "static"
	Hosts  []string
}

// ParseURI parses a registry address.
func ParseURI(s string) (URI, error) {
	scheme, rest, ok := strings.Cut(s, "://")
	if !ok {
		scheme, rest = "zk", s
	}
	if scheme != "zk" && scheme != "static" {
		return URI{}, fmt.Errorf("registry: unknown scheme %q in %q (accepted: zk://, static://)", scheme, s)
	}
	var hosts []string
	for _, h := range strings.Split(rest, ",") {
		if h = strings.TrimSpace(h); h != "" {
			// SplitHostPort, not a search for ':', so that "host:" and a
			// bare IPv6 address ("::1") are rejected too.
			if _, port, err := net.SplitHostPort(h); err != nil || port == "" {
				return URI{}, fmt.Errorf("registry: address %q in %q has no port", h, s)
			}
			hosts = append(hosts, h)
		}
	}
	if len(hosts) == 0 {
		return URI{}, fmt.Errorf("registry: no hosts in %q", s)
	}
	return URI{Scheme: scheme, Hosts: hosts}, nil
}

func (u URI) String() string { return u.Scheme + "://" + strings.Join(u.Hosts, ",") }
