package broker

import (
	"context"
	"fmt"
	"os"
	"runtime/debug"
	"strings"
	"time"

	"go.uber.org/fx"
	"go.uber.org/fx/fxevent"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/kiteq/kiteq/registry"
	"github.com/kiteq/kiteq/registry/registryfx"
	"github.com/kiteq/kiteq/storage"
	filestore "github.com/kiteq/kiteq/storage-file"
	"github.com/kiteq/kiteq/storage-file/filefx"
	"github.com/kiteq/kiteq/storage/memory"
)

// acceptedStores lists the -db schemes this build knows.
const acceptedStores = "memory://[?cap=N], file:///path[?fsync=always|interval|never&every=10ms&segment=64MiB]"

// Module runs a Server over the storage.Store and registry.Server that the
// application provides: it listens on start and stops gracefully.
var Module = fx.Module("broker",
	fx.Provide(newFromFx),
	fx.Invoke(func(*Server) {}),
)

type serverParams struct {
	fx.In
	Lifecycle fx.Lifecycle
	Options   Options
	Store     storage.Store
	Registry  registry.Server
	Log       *zap.Logger
}

func newFromFx(p serverParams) (*Server, error) {
	s, err := New(p.Options, p.Store, p.Registry, p.Log)
	if err != nil {
		return nil, err
	}
	p.Lifecycle.Append(fx.Hook{OnStart: s.Start, OnStop: s.Stop})
	return s, nil
}

// StorageOption returns the fx option that provides the store that db
// names. The store is closed when the application stops, after the broker.
func StorageOption(db string) (fx.Option, error) {
	scheme, _, ok := strings.Cut(db, "://")
	if !ok {
		return nil, fmt.Errorf("-db %q: want scheme://… (accepted: %s)", db, acceptedStores)
	}
	switch scheme {
	case "memory":
		return fx.Module("storage",
			fx.Provide(func(lc fx.Lifecycle) (storage.Store, error) {
				s, err := memory.Open(db)
				if err != nil {
					return nil, err
				}
				lc.Append(fx.StopHook(s.Close))
				return s, nil
			}),
		), nil
	case "file":
		return filefx.Module(db)
	}
	return nil, fmt.Errorf("-db %q: unknown store %q (accepted: %s)", db, scheme, acceptedStores)
}

// dataDir is where a standalone broker keeps its bindings: beside the
// data of a file store, nowhere for the memory store.
func dataDir(db string) string {
	o, err := filestore.ParseURI(db)
	if err != nil {
		return ""
	}
	return o.Dir
}

// NewLogger returns the broker's production logger at level.
func NewLogger(level string) (*zap.Logger, error) {
	lvl, err := zapcore.ParseLevel(level)
	if err != nil {
		return nil, fmt.Errorf("-log-level: %w", err)
	}
	cfg := zap.NewProductionConfig()
	cfg.Level = zap.NewAtomicLevelAt(lvl)
	cfg.Sampling = nil
	cfg.EncoderConfig.EncodeTime = zapcore.ISO8601TimeEncoder
	return cfg.Build()
}

// AppOptions builds the options of a broker application from its
// command-line options: logger, store, registry and the broker itself.
func AppOptions(o Options, log *zap.Logger) (fx.Option, error) {
	store, err := StorageOption(o.DB)
	if err != nil {
		return nil, err
	}
	reg, err := registryfx.Server(o.ZkHost, dataDir(o.DB))
	if err != nil {
		return nil, err
	}
	return fx.Options(
		fx.Supply(o, log),
		fx.WithLogger(func() fxevent.Logger {
			l := &fxevent.ZapLogger{Logger: log}
			l.UseLogLevel(zapcore.DebugLevel)
			return l
		}),
		fx.StartTimeout(30*time.Second),
		fx.StopTimeout(o.ShutdownTimeout+5*time.Second),
		store,
		reg,
		Module,
	), nil
}

// Main runs a broker from command-line arguments until SIGINT or SIGTERM,
// and returns the process exit code.
func Main(args []string) int {
	o, err := ParseFlags(args, os.Stderr)
	if err != nil {
		if err.Error() == "flag: help requested" {
			return 0
		}
		fmt.Fprintln(os.Stderr, "kiteq:", err)
		return 2
	}
	log, err := NewLogger(o.LogLevel)
	if err != nil {
		fmt.Fprintln(os.Stderr, "kiteq:", err)
		return 2
	}
	defer log.Sync()
	if env := os.Getenv("GOGC"); env != "" {
		log.Info("GOGC is set: -gc-percent is not used", zap.String("GOGC", env))
	} else if o.GCPercent > 0 {
		debug.SetGCPercent(o.GCPercent)
	}
	opts, err := AppOptions(o, log)
	if err != nil {
		log.Error("cannot start", zap.Error(err))
		return 2
	}
	app := fx.New(opts)
	if err := app.Err(); err != nil {
		log.Error("cannot start", zap.Error(err))
		return 1
	}
	startCtx, cancel := context.WithTimeout(context.Background(), app.StartTimeout())
	defer cancel()
	if err := app.Start(startCtx); err != nil {
		log.Error("cannot start", zap.Error(err))
		return 1
	}
	sig := <-app.Wait()
	log.Info("stopping", zap.String("signal", sig.Signal.String()))
	stopCtx, cancel2 := context.WithTimeout(context.Background(), app.StopTimeout())
	defer cancel2()
	if err := app.Stop(stopCtx); err != nil {
		log.Error("stop", zap.Error(err))
		return 1
	}
	return 0
}
