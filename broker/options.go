package broker

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/kiteq/kiteq/protocol"
)

// Options configure a broker. The zero value is not usable: start from
// DefaultOptions or ParseFlags.
type Options struct {
	// Bind is the TCP address clients connect to.
	Bind string
	// PPort is the HTTP port for pprof, metrics and admin; 0 disables it.
	PPort int
	// DB selects the store: memory://, file:///path?…, mysql://….
	DB string
	// Topics this broker serves; empty serves every topic (standalone only).
	Topics []string
	// ZkHost is the ZooKeeper ensemble; empty runs standalone.
	ZkHost string
	// Auth is AuthRequired (every group and secretKey must be in AuthFile)
	// or AuthOpen (anyone, loopback only); empty means AuthRequired.
	Auth string
	// AuthFile lists "groupId:secretKey [pub=topics] [sub=topics]" lines
	// (loadAuth); required with AuthRequired.
	AuthFile string
	// LogLevel is zap's level name: debug, info, warn, error.
	LogLevel string

	// MaxBody is the largest packet body accepted.
	MaxBody int
	// HandshakeTimeout bounds the wait for CONN_META on a new connection.
	HandshakeTimeout time.Duration
	// IdleTimeout closes a connection that sent nothing for that long
	// (clients send a heartbeat every ~10 s).
	IdleTimeout time.Duration
	// WriteTimeout closes a connection whose peer stops reading.
	WriteTimeout time.Duration
	// DeliverTimeout is how long a delivery waits for its DELIVER_ACK
	// before it counts as failed.
	DeliverTimeout time.Duration
	// RetrySchedule is the wait before each retry of a failed delivery to
	// a group: after failure n, RetrySchedule[n-1]; past its end, its
	// last entry again and again.
	RetrySchedule []time.Duration
	// MaxLifetime caps a message's expiry: a message that never expires, or
	// expires later, is dead-lettered after this long.
	MaxLifetime time.Duration
	// MaxClockSkew is how far ahead of the broker's clock a producer's
	// createTime may be: a producer's clock may run ahead of the broker's,
	// but a message from further ahead would be kept past MaxLifetime.
	MaxClockSkew time.Duration
	// TxCheckDelay is how long an uncommitted message waits for its
	// producer's decision before the broker asks the producer group; the
	// wait doubles after every check up to TxCheckMaxDelay. After
	// TxCheckLimit checks an undecided message is dead-lettered. Checks
	// of one producer group go out at most TxCheckRate per second.
	TxCheckDelay    time.Duration
	TxCheckMaxDelay time.Duration
	TxCheckLimit    int
	TxCheckRate     int
	// MaxPendingPublishes bounds the publishes of one connection that are
	// being stored at once; past it the broker stops reading that
	// connection until a store finishes.
	MaxPendingPublishes int
	// MaxPendingBytes bounds the bytes of all publishes waiting for the
	// store; a publish past it gets a failed store-ack (overload), so a
	// store slower than its producers cannot fill the broker's memory.
	MaxPendingBytes int64
	// MaxDeliveryBytes bounds the messages held in memory for delivery
	// (their bytes, and a fixed cost each). Past it, committed messages
	// wait in the store until deliveries end, so a producer that outruns
	// its consumers fills the store, not the broker's memory.
	MaxDeliveryBytes int64
	// Clock is the broker's time (clock.go); nil is the system clock.
	Clock Clock
	// ShutdownTimeout bounds a graceful stop.
	ShutdownTimeout time.Duration
	// GCPercent is the garbage collector's GOGC for the kiteq command
	// (Main), unless the GOGC environment variable is set; 0 leaves the
	// runtime's. A broker's live heap is small and its garbage is many
	// small objects a message: at Go's 100 it collects every few
	// milliseconds under load, which shows in latency (e2e p99 at 22,000
	// msgs/s on 2 cores, median of 5: 3.2 ms at 100, 2.5 ms at 400). The
	// heap may grow to (1 + GCPercent/100) times what is live: with
	// memory:// the stored messages are live too, and where memory is
	// tight a lower value, or GOMEMLIMIT, bounds it.
	GCPercent int
}

// DefaultOptions returns the options of a standalone broker on
// 127.0.0.1:13800 with the file store in ./data.
func DefaultOptions() Options {
	return Options{
		Bind:                "127.0.0.1:13800",
		PPort:               13801,
		DB:                  "file://./data",
		LogLevel:            "info",
		Auth:                AuthRequired,
		MaxBody:             protocol.DefaultMaxBody,
		HandshakeTimeout:    10 * time.Second,
		IdleTimeout:         60 * time.Second,
		WriteTimeout:        30 * time.Second,
		DeliverTimeout:      5 * time.Second,
		RetrySchedule:       DefaultRetrySchedule(),
		MaxLifetime:         7 * 24 * time.Hour,
		MaxClockSkew:        5 * time.Minute,
		TxCheckDelay:        5 * time.Second,
		TxCheckMaxDelay:     160 * time.Second,
		TxCheckLimit:        10,
		TxCheckRate:         100,
		MaxPendingPublishes: 1024,
		MaxPendingBytes:     256 << 20,
		MaxDeliveryBytes:    256 << 20,
		ShutdownTimeout:     10 * time.Second,
		GCPercent:           400,
	}
}

// ParseFlags parses the broker's command line.
func ParseFlags(args []string, output io.Writer) (Options, error) {
	o := DefaultOptions()
	fs := flag.NewFlagSet("kiteq", flag.ContinueOnError)
	fs.SetOutput(output)
	var topics string
	fs.StringVar(&o.Bind, "bind", o.Bind, "TCP address for clients (host:port)")
	fs.IntVar(&o.PPort, "pport", o.PPort, "HTTP port for pprof, metrics and admin on the bind host (0 disables)")
	fs.StringVar(&o.DB, "db", o.DB, "message store: "+acceptedStores)
	fs.StringVar(&topics, "topics", "", "comma-separated topics this broker serves (empty: every topic, standalone only)")
	fs.StringVar(&o.ZkHost, "zkhost", "", "ZooKeeper ensemble host:port[,host:port] (empty: standalone, clients use static://)")
	fs.StringVar(&o.Auth, "auth", o.Auth, "authentication: required (every group and secretKey must be in -auth-file) or open (any client, loopback -bind only, for development)")
	fs.StringVar(&o.AuthFile, "auth-file", "", `file of "groupId:secretKey [pub=topics] [sub=topics]" lines (required with -auth=required)`)
	fs.StringVar(&o.LogLevel, "log-level", o.LogLevel, "log level: debug, info, warn, error")
	fs.IntVar(&o.MaxBody, "max-body", o.MaxBody, "largest packet body in bytes")
	fs.DurationVar(&o.MaxClockSkew, "max-clock-skew", o.MaxClockSkew, "how far ahead of the broker's clock a message's createTime may be; a publish from further ahead is refused")
	fs.Int64Var(&o.MaxPendingBytes, "max-pending-bytes", o.MaxPendingBytes, "bytes of publishes waiting for the store, past which publishes are refused (overload)")
	fs.Int64Var(&o.MaxDeliveryBytes, "max-delivery-bytes", o.MaxDeliveryBytes, "bytes of messages held in memory for delivery, past which committed messages wait in the store")
	fs.DurationVar(&o.DeliverTimeout, "deliver-timeout", o.DeliverTimeout, "wait for a DELIVER_ACK before the delivery counts as failed")
	fs.Func("retry-schedule", "waits before the retries of a failed delivery to a group, comma-separated; the last repeats (default "+
		formatSchedule(o.RetrySchedule)+")", func(v string) error {
		s, err := parseSchedule(v)
		o.RetrySchedule = s
		return err
	})
	fs.DurationVar(&o.TxCheckDelay, "tx-check-delay", o.TxCheckDelay, "wait for a transaction decision before asking the producer group (doubles after every check)")
	fs.DurationVar(&o.TxCheckMaxDelay, "tx-check-max-delay", o.TxCheckMaxDelay, "longest wait between two checks of a transaction")
	fs.IntVar(&o.TxCheckLimit, "tx-check-limit", o.TxCheckLimit, "checks of an undecided transaction before its message is dead-lettered")
	fs.IntVar(&o.TxCheckRate, "tx-check-rate", o.TxCheckRate, "most transaction checks per second sent to one producer group")
	fs.DurationVar(&o.IdleTimeout, "idle-timeout", o.IdleTimeout, "close a connection silent for this long")
	fs.DurationVar(&o.ShutdownTimeout, "shutdown-timeout", o.ShutdownTimeout, "bound on a graceful stop")
	fs.IntVar(&o.GCPercent, "gc-percent", o.GCPercent, "the garbage collector's GOGC: the heap may grow to (1 + N/100) times what is live (0: Go's default; the GOGC environment variable wins)")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments: %s", strings.Join(fs.Args(), " "))
	}
	o.Topics = splitList(topics)
	return o, o.Validate()
}

// Validate reports the first option that cannot work.
func (o Options) Validate() error {
	switch {
	case o.Bind == "":
		return errors.New("-bind is empty")
	case o.PPort < 0 || o.PPort > 65535:
		return fmt.Errorf("-pport %d is not a port", o.PPort)
	case o.DB == "":
		return errors.New("-db is empty (accepted: " + acceptedStores + ")")
	case o.ZkHost != "" && len(o.Topics) == 0:
		return errors.New("-topics is required with -zkhost: a broker registers the topics it serves")
	case o.MaxBody <= 0:
		return fmt.Errorf("-max-body %d must be positive", o.MaxBody)
	case o.DeliverTimeout < time.Millisecond:
		return errors.New("-deliver-timeout must be at least 1ms")
	case len(o.RetrySchedule) == 0 || o.RetrySchedule[len(o.RetrySchedule)-1] <= 0:
		return fmt.Errorf("-retry-schedule %s: want waits such as 1s,5s,10s whose last one, which repeats, is positive",
			formatSchedule(o.RetrySchedule))
	case o.TxCheckDelay < time.Millisecond || o.TxCheckMaxDelay < o.TxCheckDelay || o.TxCheckLimit < 1 || o.TxCheckRate < 1:
		return errors.New("-tx-check-delay must be at least 1ms, -tx-check-max-delay at least -tx-check-delay, -tx-check-limit and -tx-check-rate at least 1")
	case o.IdleTimeout <= 0 || o.HandshakeTimeout <= 0 || o.WriteTimeout <= 0 || o.ShutdownTimeout <= 0:
		return errors.New("timeouts must be positive")
	case o.MaxClockSkew < 0:
		return fmt.Errorf("-max-clock-skew %s must not be negative", o.MaxClockSkew)
	case o.MaxLifetime <= 0 || o.MaxPendingPublishes <= 0:
		return errors.New("MaxLifetime and MaxPendingPublishes must be positive")
	case o.MaxPendingBytes < int64(o.MaxBody):
		return fmt.Errorf("-max-pending-bytes %d must be at least -max-body %d", o.MaxPendingBytes, o.MaxBody)
	case o.GCPercent < 0:
		return fmt.Errorf("-gc-percent %d must not be negative (0 leaves Go's default)", o.GCPercent)
	case o.MaxDeliveryBytes < int64(o.MaxBody):
		return fmt.Errorf("-max-delivery-bytes %d must be at least -max-body %d", o.MaxDeliveryBytes, o.MaxBody)
	case o.authMode() != AuthRequired && o.authMode() != AuthOpen:
		return fmt.Errorf("-auth=%s: want %s or %s", o.Auth, AuthRequired, AuthOpen)
	case o.authMode() == AuthRequired && o.AuthFile == "":
		return errors.New("-auth=required (the default) needs -auth-file, a file of groupId:secretKey lines; " +
			"-auth=open accepts any client, on a loopback -bind only, for development")
	case o.authMode() == AuthOpen && o.AuthFile != "":
		return errors.New("-auth=open accepts any client and would ignore -auth-file: pass one of them")
	case o.authMode() == AuthOpen && !isLoopback(o.Bind):
		return fmt.Errorf("-auth=open accepts any client, so only on a loopback -bind (not %s): list the groups in -auth-file", o.Bind)
	}
	return nil
}

// authMode is Auth, with empty meaning AuthRequired.
func (o Options) authMode() string {
	if o.Auth == "" {
		return AuthRequired
	}
	return o.Auth
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// txCheckDelay is the wait after check n (1, 2, ...) of a transaction
// before the next one: TxCheckDelay doubled n times, at most
// TxCheckMaxDelay.
func (o Options) txCheckDelay(n int32) time.Duration {
	d := o.TxCheckDelay
	for i := int32(0); i < n && d < o.TxCheckMaxDelay; i++ {
		d *= 2
	}
	return min(d, o.TxCheckMaxDelay)
}

// DefaultRetrySchedule is three quick retries, then 5 s doubling to 160 s,
// then every 160 s.
func DefaultRetrySchedule() []time.Duration {
	return []time.Duration{time.Second, time.Second, time.Second,
		5 * time.Second, 10 * time.Second, 20 * time.Second, 40 * time.Second, 80 * time.Second, 160 * time.Second}
}

// parseSchedule parses "1s,5s,10s".
func parseSchedule(v string) ([]time.Duration, error) {
	var out []time.Duration
	for _, f := range strings.Split(v, ",") {
		d, err := time.ParseDuration(strings.TrimSpace(f))
		if err != nil || d < 0 {
			return nil, fmt.Errorf("%q is not a wait such as 5s", f)
		}
		out = append(out, d)
	}
	return out, nil
}

func formatSchedule(s []time.Duration) string {
	fs := make([]string, len(s))
	for i, d := range s {
		fs[i] = d.String()
	}
	return strings.Join(fs, ",")
}
