// Command kiteq-bench measures KiteQ beside NATS JetStream and RabbitMQ:
// confirmed publish throughput, open-loop end-to-end latency, backlog
// drain and KiteQ transactions, in each durability tier.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/kiteq/kiteq/benchmark/bench"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "kiteq-bench:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) > 0 && args[0] == "suite" {
		return suite(args[1:])
	}
	fs := flag.NewFlagSet("kiteq-bench", flag.ContinueOnError)
	systems := fs.String("systems", "kiteq", "comma-separated systems: kiteq, nats, rabbitmq")
	tiers := fs.String("tiers", "memory", "comma-separated tiers: memory, written, synced")
	workload := fs.String("workload", "throughput", "throughput, latency, drain or tx")
	f := addCommon(fs, 5*time.Second, 100000, 30*time.Second)
	rate := fs.Float64("rate", 1000, "messages per second offered (latency)")
	connPer := fs.Bool("conn-per-publisher", false, "a connection per publisher (as nats bench does), not one shared by all")
	kiteqFlags := fs.String("kiteq-flags", "", "more flags for the kiteq broker, space-separated (e.g. -pport=13801 to profile it, or a -db= other than the tier's)")
	out := fs.String("json", "", "write the results to this JSON file")
	cpuProfile := fs.String("cpuprofile", "", "write kiteq-bench's own CPU profile (the clients' side) to this file")
	ctx, cancel, cs, err := f.parse(fs, args)
	if err != nil {
		return err
	}
	defer cancel()
	if *cpuProfile != "" {
		pf, err := os.Create(*cpuProfile)
		if err != nil {
			return err
		}
		defer pf.Close()
		if err := pprof.StartCPUProfile(pf); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}
	var results []*bench.Result
	for _, sys := range strings.Split(*systems, ",") {
		for _, ts := range strings.Split(*tiers, ",") {
			tier, err := bench.ParseTier(strings.TrimSpace(ts))
			if err != nil {
				return err
			}
			d, err := f.driver(strings.TrimSpace(sys))
			if err != nil {
				return err
			}
			switch d := d.(type) {
			case *bench.KiteQ:
				d.Args, d.ConnPerPublisher = strings.Fields(*kiteqFlags), *connPer
			case *bench.NATS:
				d.ConnPerPublisher = *connPer
			}
			info, err := d.Start(ctx, tier)
			if errors.Is(err, bench.ErrTierUnsupported) {
				fmt.Fprintf(os.Stderr, "%s has no %s tier: skipped\n", sys, tier)
				continue
			}
			if err != nil {
				return fmt.Errorf("%s %s: %w", sys, tier, err)
			}
			for i, c := range cs {
				cfg := bench.RunConfig{Workload: bench.Workload(*workload), Tier: tier, Size: *f.size, Publishers: c,
					Duration: *f.duration, Rate: *rate, Backlog: *f.backlog, DrainWait: *f.drainWait, Progress: os.Stderr,
					ProgressTag: fmt.Sprintf("%-8s %-7s %-10s c=%-3d", sys, tier, *workload, c)}
				r, err := bench.Run(ctx, d, info, fmt.Sprintf("r%d%d", time.Now().UnixNano()%1e9, i), cfg)
				if err != nil {
					d.Stop()
					return fmt.Errorf("%s %s c=%d: %w", sys, tier, c, err)
				}
				results = append(results, r)
			}
			if err := d.Stop(); err != nil {
				return err
			}
		}
	}
	printTable(results)
	if *out != "" {
		b, err := json.MarshalIndent(results, "", "  ")
		if err != nil {
			return err
		}
		return os.WriteFile(*out, append(b, '\n'), 0o644)
	}
	return nil
}

// common is what both commands take: the runs' shape and the servers.
type common struct {
	conc, kiteqBin, natsBin, rabbitURL *string
	size, backlog                      *int
	duration, drainWait                *time.Duration
}

func addCommon(fs *flag.FlagSet, duration time.Duration, backlog int, drainWait time.Duration) *common {
	return &common{
		conc:      fs.String("c", "1,16,64", "comma-separated numbers of concurrent publishers"),
		size:      fs.Int("size", 512, "message bytes"),
		duration:  fs.Duration("duration", duration, "each run's publishing window"),
		backlog:   fs.Int("backlog", backlog, "messages of a drain run"),
		drainWait: fs.Duration("drain-wait", drainWait, "how long deliveries may go on after a window"),
		kiteqBin:  fs.String("kiteq-bin", "", "kiteq broker binary (empty: go build broker/cmd/kiteq)"),
		natsBin:   fs.String("nats-server", "nats-server", "nats-server binary (make bench builds v2.15.2 into ./bin)"),
		rabbitURL: fs.String("rabbitmq", "amqp://guest:guest@127.0.0.1:5672/", "the RabbitMQ server to measure (not started by the tool)"),
	}
}

// parse parses args, and returns the numbers of publishers and a context
// that SIGINT and SIGTERM cancel.
func (c *common) parse(fs *flag.FlagSet, args []string) (context.Context, context.CancelFunc, []int, error) {
	if err := fs.Parse(args); err != nil {
		return nil, nil, nil, err
	}
	cs, err := c.publishers()
	if err != nil {
		return nil, nil, nil, err
	}
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	return ctx, cancel, cs, nil
}

func (c *common) publishers() ([]int, error) {
	var cs []int
	for _, f := range strings.Split(*c.conc, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			return nil, fmt.Errorf("-c %q: want positive numbers", *c.conc)
		}
		cs = append(cs, n)
	}
	return cs, nil
}

// driver returns a new driver of the system called name. Without
// -kiteq-bin, the broker of this checkout is built, once.
func (c *common) driver(name string) (bench.Driver, error) {
	switch name {
	case "kiteq":
		if *c.kiteqBin == "" {
			bin, err := buildKiteq()
			if err != nil {
				return nil, err
			}
			*c.kiteqBin = bin
		}
		return &bench.KiteQ{Bin: *c.kiteqBin}, nil
	case "nats":
		return &bench.NATS{Bin: *c.natsBin}, nil
	case "rabbitmq":
		return &bench.RabbitMQ{URL: *c.rabbitURL}, nil
	}
	return nil, fmt.Errorf("unknown system %q (want kiteq, nats or rabbitmq)", name)
}

// buildKiteq builds the broker of this checkout.
func buildKiteq() (string, error) {
	dir, err := os.MkdirTemp("", "kiteq-bench-bin-")
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "kiteq")
	cmd := exec.Command("go", "build", "-o", bin, "github.com/kiteq/kiteq/broker/cmd/kiteq")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build the kiteq broker: %v\n%s", err, out)
	}
	return bin, nil
}

func printTable(rs []*bench.Result) {
	fmt.Printf("%-8s %-8s %-10s %4s %6s %12s %12s %9s %6s %10s %10s %10s %8s %9s\n",
		"system", "tier", "workload", "c", "size", "published/s", "delivered/s", "backlog", "lost",
		"e2e p50", "e2e p99", "e2e p99.9", "cpu s", "peak RSS")
	for _, r := range rs {
		fmt.Printf("%-8s %-8s %-10s %4d %6d %12.0f %12.0f %9d %6d %9.2fms %9.2fms %9.2fms %8.2f %8.0fM\n",
			r.System, r.Tier, r.Workload, r.Publishers, r.Size, r.PublishedRate, r.DeliveredRate, r.BacklogAtEnd, r.Lost,
			r.EndToEnd.P50/1000, r.EndToEnd.P99/1000, r.EndToEnd.P999/1000, r.Usage.CPUSeconds, float64(r.Usage.PeakRSSBytes)/(1<<20))
	}
}

// suite runs the standard suite and writes its report (make bench).
func suite(args []string) error {
	fs := flag.NewFlagSet("kiteq-bench suite", flag.ContinueOnError)
	f := addCommon(fs, 3*time.Second, 20000, 20*time.Second)
	rounds := fs.Int("rounds", 3, "throughput and latency runs of each system, tier and C; the report shows the median")
	warmup := fs.Duration("warmup", 500*time.Millisecond, "an unmeasured run on each server before its measured ones")
	natsCLI := fs.String("nats-cli", "", "the nats CLI (natscli v0.5.0) for the nats bench check; empty skips it")
	checkMsgs := fs.Int("check-msgs", 60000, "messages per round of the nats bench check")
	checkRounds := fs.Int("check-rounds", 3, "alternating rounds of the nats bench check")
	out := fs.String("out", "docs/benchmarks.md", "the report")
	dir := fs.String("dir", "docs/benchmarks", "where the JSON and the charts go")
	ctx, cancel, cs, err := f.parse(fs, args)
	if err != nil {
		return err
	}
	defer cancel()
	var ds []bench.Driver
	for _, name := range []string{"kiteq", "nats", "rabbitmq"} {
		d, err := f.driver(name)
		if err != nil {
			return err
		}
		ds = append(ds, d)
	}
	start := time.Now()
	rs, err := bench.RunSuite(ctx, bench.SuiteConfig{
		Drivers: ds, Tiers: bench.Tiers, Cs: cs, Size: *f.size, Duration: *f.duration, Rounds: *rounds, Warmup: *warmup, Backlog: *f.backlog,
		DrainWait: *f.drainWait, Dir: *dir, Markdown: *out, Progress: os.Stderr, FsyncProbe: os.TempDir(),
		NATSServer: *f.natsBin, NATSCLI: *natsCLI, CheckMsgs: *checkMsgs, CheckRounds: *checkRounds,
		Command: "kiteq-bench suite " + strings.Join(args, " "),
	})
	printTable(rs)
	if err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "suite done in %v: %s, %s\n", time.Since(start).Round(time.Second), *out, *dir)
	return nil
}
