package client

import (
	"fmt"

	"github.com/kiteq/kiteq/registry"
	"github.com/kiteq/kiteq/registry/static"
)

// newDiscovery returns the registry client that uri names. Each registry is
// one case here.
func newDiscovery(uri registry.URI) (registry.Discovery, error) {
	switch uri.Scheme {
	case "static":
		return static.NewDiscovery(uri.Hosts), nil
	case "zk":
		return nil, fmt.Errorf("kiteq: registry %s: the ZooKeeper registry is not available in this build yet; "+
			"list the brokers with static://host:port[,host:port]: %w", uri, ErrRegistryUnavailable)
	}
	return nil, fmt.Errorf("kiteq: registry %s: unknown scheme %q: %w", uri, uri.Scheme, ErrRegistryUnavailable)
}
