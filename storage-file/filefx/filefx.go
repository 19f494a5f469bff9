// Package filefx provides the file store to an fx application: the store
// behind the broker's -db=file://….
package filefx

import (
	"go.uber.org/fx"
	"go.uber.org/zap"

	"github.com/kiteq/kiteq/storage"
	filestore "github.com/kiteq/kiteq/storage-file"
)

// Module opens the store that uri names when the application is built and
// closes it when the application stops. The URI is checked at once.
func Module(uri string) (fx.Option, error) {
	opts, err := filestore.ParseURI(uri)
	if err != nil {
		return nil, err
	}
	return fx.Module("storage-file",
		fx.Provide(func(lc fx.Lifecycle, log *zap.Logger) (storage.Store, error) {
			s, err := filestore.Open(opts, log.Named("filestore"))
			if err != nil {
				return nil, err
			}
			lc.Append(fx.StopHook(s.Close))
			return s, nil
		}),
	), nil
}
