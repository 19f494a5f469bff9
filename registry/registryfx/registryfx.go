// Package registryfx wires a registry into an fx application. It is the
// only package of the registry module that depends on fx, so clients that
// import the registry do not.
package registryfx

import (
	"fmt"

	"go.uber.org/fx"

	"github.com/kiteq/kiteq/registry"
	"github.com/kiteq/kiteq/registry/static"
)

// Static provides the registry.Server of a standalone broker, keeping
// persistent bindings in dir ("" keeps them in memory only), and closes it
// when the application stops.
func Static(dir string) fx.Option {
	return fx.Module("registry",
		fx.Provide(func(lc fx.Lifecycle) (registry.Server, error) {
			s, err := static.NewServer(dir)
			if err != nil {
				return nil, err
			}
			lc.Append(fx.StopHook(s.Close))
			return s, nil
		}),
	)
}

// Server returns the registry option for a broker: static when zkHost is
// empty. ZooKeeper is not built yet, so a non-empty zkHost is an error.
func Server(zkHost, dataDir string) (fx.Option, error) {
	if zkHost == "" {
		return Static(dataDir), nil
	}
	return nil, fmt.Errorf("registry: ZooKeeper (-zkhost=%s) is not available in this build; run standalone without -zkhost", zkHost)
}
