package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"
)

// SuiteConfig is the standard suite: every tier, every system that has
// it, throughput at each C, latency at half the best rate, a drain, and
// KiteQ transactions.
type SuiteConfig struct {
	Drivers    []Driver
	Tiers      []Tier
	Cs         []int
	Size       int
	Duration   time.Duration // each throughput, latency and tx run
	Backlog    int           // the drain's
	DrainWait  time.Duration
	Dir        string // where the JSON and the charts go
	Markdown   string // the report; "" for none
	Command    string // how the suite was run, for the report
	Progress   io.Writer
	FsyncProbe string // a directory on the servers' disk, to time fsync

	// The nats bench check (NATSCheck), when NATSCLI is set.
	NATSServer, NATSCLI    string
	CheckMsgs, CheckRounds int
}

// RunSuite runs the suite and writes its report.
func RunSuite(ctx context.Context, cfg SuiteConfig) ([]*Result, error) {
	var rs []*Result
	var check *natsCheck
	if cfg.NATSCLI != "" {
		fmt.Fprintf(cfg.Progress, "nats bench check: %d rounds of %d messages at each C\n", cfg.CheckRounds, cfg.CheckMsgs)
		got, info, err := NATSCheck(ctx, cfg.NATSServer, cfg.NATSCLI, cfg.Cs, cfg.Size, cfg.CheckMsgs, cfg.CheckRounds)
		if err != nil {
			return nil, fmt.Errorf("nats bench check: %w", err)
		}
		check = &natsCheck{Results: got, Server: info, Msgs: cfg.CheckMsgs, Rounds: cfg.CheckRounds}
	}
	for _, tier := range cfg.Tiers {
		for _, d := range cfg.Drivers {
			info, err := d.Start(ctx, tier)
			if errors.Is(err, ErrTierUnsupported) {
				continue
			}
			if err != nil {
				return rs, fmt.Errorf("%s %s: %w", d.Name(), tier, err)
			}
			got, err := runSystem(ctx, d, info, tier, cfg)
			rs = append(rs, got...)
			d.Stop()
			if err != nil {
				return rs, fmt.Errorf("%s %s: %w", d.Name(), tier, err)
			}
		}
	}
	if err := os.MkdirAll(cfg.Dir, 0o755); err != nil {
		return rs, err
	}
	profiles, err := profileBehind(ctx, cfg, rs)
	if err != nil {
		return rs, fmt.Errorf("profile KiteQ where it is behind: %w", err)
	}
	return rs, writeReport(cfg, rs, check, profiles)
}

// natsCheck is the nats bench check for the report.
type natsCheck struct {
	Results []NATSCheckResult `json:"results"`
	Server  ServerInfo        `json:"server"`
	Msgs    int               `json:"messages"`
	Rounds  int               `json:"rounds"`
}

func runSystem(ctx context.Context, d Driver, info ServerInfo, tier Tier, cfg SuiteConfig) ([]*Result, error) {
	var rs []*Result
	n := 0
	run := func(c RunConfig) (*Result, error) {
		n++
		c.Tier, c.Size, c.DrainWait, c.Progress = tier, cfg.Size, cfg.DrainWait, cfg.Progress
		c.ProgressTag = fmt.Sprintf("%-8s %-7s %-10s c=%-3d", d.Name(), tier, c.Workload, c.Publishers)
		r, err := Run(ctx, d, info, fmt.Sprintf("%s%d%d", tier, n, time.Now().UnixNano()%1e6), c)
		if r != nil {
			rs = append(rs, r)
		}
		return r, err
	}
	best := 0.0
	for _, c := range cfg.Cs {
		r, err := run(RunConfig{Workload: Throughput, Publishers: c, Duration: cfg.Duration})
		if err != nil {
			return rs, err
		}
		best = max(best, r.PublishedRate)
	}
	// Open loop at half the best confirmed rate, with enough publishers
	// that a slow confirm does not hold the next send back.
	if _, err := run(RunConfig{Workload: Latency, Publishers: slices.Max(cfg.Cs), Duration: cfg.Duration, Rate: best / 2}); err != nil {
		return rs, err
	}
	if _, err := run(RunConfig{Workload: Drain, Publishers: slices.Max(cfg.Cs), Backlog: cfg.Backlog}); err != nil {
		return rs, err
	}
	if d.Name() == "kiteq" {
		if _, err := run(RunConfig{Workload: Tx, Publishers: slices.Max(cfg.Cs), Duration: cfg.Duration}); err != nil {
			return rs, err
		}
	}
	return rs, nil
}

func writeReport(cfg SuiteConfig, rs []*Result, check *natsCheck, profiles []behindProfile) error {
	if err := os.MkdirAll(cfg.Dir, 0o755); err != nil {
		return err
	}
	b, err := json.MarshalIndent(rs, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(cfg.Dir, "results.json"), append(b, '\n'), 0o644); err != nil {
		return err
	}
	if check != nil {
		b, err := json.MarshalIndent(check, "", "  ")
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(cfg.Dir, "natscheck.json"), append(b, '\n'), 0o644); err != nil {
			return err
		}
	}
	var charts []string
	for _, tier := range cfg.Tiers {
		name, err := ThroughputChart(cfg.Dir, tier, rs)
		if err != nil {
			return err
		}
		if name != "" {
			charts = append(charts, name)
		}
	}
	if name, err := LatencyChart(cfg.Dir, rs); err != nil {
		return err
	} else if name != "" {
		charts = append(charts, name)
	}
	if cfg.Markdown == "" {
		return nil
	}
	rel, err := filepath.Rel(filepath.Dir(cfg.Markdown), cfg.Dir)
	if err != nil {
		rel = cfg.Dir
	}
	return os.WriteFile(cfg.Markdown, []byte(markdown(cfg, rs, check, profiles, charts, rel)), 0o644)
}

func markdown(cfg SuiteConfig, rs []*Result, check *natsCheck, profiles []behindProfile, charts []string, rel string) string {
	var w strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&w, format, args...) }
	p("# Benchmarks: KiteQ, NATS JetStream and RabbitMQ\n\n")
	p("Written by `make bench` (`%s`) on %s. Every figure below is from that one run, on this machine:\n\n",
		cfg.Command, time.Now().UTC().Format("2006-01-02 15:04 MST"))
	for _, line := range machine(cfg.FsyncProbe) {
		p("- %s\n", line)
	}
	p("\nServers, one at a time, each with the machine to itself, on loopback:\n\n")
	p("| system | tier | version | set up as |\n|---|---|---|---|\n")
	seenInfo := map[string]bool{}
	for _, r := range rs {
		k := r.System + string(r.Tier)
		if !seenInfo[k] {
			seenInfo[k] = true
			p("| %s | %s | %s | %s |\n", r.System, r.Tier, r.Server.Version, r.Server.Config)
		}
	}
	p("\nEvery message is %d bytes. A publisher sends the next message once the last was confirmed (stored at the tier's durability); "+
		"one consumer acknowledges each delivery. *Lost* counts confirmed messages never delivered (by unique sequence number) "+
		"within %v after the window; *backlog* is what was confirmed but not yet delivered when the window closed.\n\n", cfg.Size, cfg.DrainWait)

	p("## Throughput\n\n")
	p("| tier | system | C | published/s | delivered/s | backlog | lost | dup | e2e p50 | e2e p99 | broker CPU s | peak RSS |\n")
	p("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, r := range rs {
		if r.Workload == Throughput || r.Workload == Tx {
			label := r.System
			if r.Workload == Tx {
				label += " (tx)"
			}
			p("| %s | %s | %d | %.0f | %.0f | %d | %d | %d | %s | %s | %.1f | %s |\n", r.Tier, label, r.Publishers, r.PublishedRate,
				r.DeliveredRate, r.BacklogAtEnd, r.Lost, r.Duplicates, ms(r.EndToEnd.P50), ms(r.EndToEnd.P99),
				r.Usage.CPUSeconds, mib(r.Usage.PeakRSSBytes))
		}
	}
	p("\n## End-to-end latency at 50%% of the best confirmed rate (open loop)\n\n")
	p("Each message is timed from when it was due to be sent, so a stall shows in the messages behind it.\n\n")
	p("| tier | system | offered/s | delivered/s | p50 | p99 | p99.9 | max | lost |\n|---|---|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, r := range rs {
		if r.Workload == Latency {
			p("| %s | %s | %.0f | %.0f | %s | %s | %s | %s | %d |\n", r.Tier, r.System, r.Rate, r.DeliveredRate,
				ms(r.EndToEnd.P50), ms(r.EndToEnd.P99), ms(r.EndToEnd.P999), ms(r.EndToEnd.Max), r.Lost)
		}
	}
	p("\n## Drain of a backlog\n\n| tier | system | backlog | published/s (no consumer) | drained/s | lost |\n|---|---|---:|---:|---:|---:|\n")
	for _, r := range rs {
		if r.Workload == Drain {
			p("| %s | %s | %d | %.0f | %.0f | %d |\n", r.Tier, r.System, r.Published, r.PublishedRate, r.DeliveredRate, r.Lost)
		}
	}
	p("\n## KiteQ against the best peer\n\n")
	p("Throughput ratio: KiteQ's confirmed msgs/s ÷ the best peer's at the same C. Latency ratio: the best peer's e2e p99 ÷ KiteQ's. " +
		"Above 1.0, KiteQ is ahead.\n\n| tier | measure | KiteQ | best peer | ratio |\n|---|---|---:|---:|---:|\n")
	for _, tier := range cfg.Tiers {
		for _, c := range cfg.Cs {
			k, peer := find(rs, "kiteq", tier, Throughput, c), bestPeer(rs, tier, c)
			if k != nil && peer != nil {
				p("| %s | msgs/s at C=%d | %.0f | %.0f (%s) | %.2f |\n", tier, c, k.PublishedRate, peer.PublishedRate, peer.System,
					k.PublishedRate/peer.PublishedRate)
			}
		}
		k := find(rs, "kiteq", tier, Latency, 0)
		var peer *Result
		for _, r := range rs {
			if r.Workload == Latency && r.Tier == tier && r.System != "kiteq" && (peer == nil || r.EndToEnd.P99 < peer.EndToEnd.P99) {
				peer = r
			}
		}
		if k != nil && peer != nil && k.EndToEnd.P99 > 0 {
			p("| %s | e2e p99 at 50%% load | %s | %s (%s) | %.2f |\n", tier, ms(k.EndToEnd.P99), ms(peer.EndToEnd.P99), peer.System,
				peer.EndToEnd.P99/k.EndToEnd.P99)
		}
	}
	if len(profiles) > 0 {
		p("\n## Where KiteQ's time goes where it is behind\n\n")
		p("For each tier where KiteQ's throughput is below the best peer's, the suite runs KiteQ again at the C where it is " +
			"furthest behind and records the broker's CPU profile (its admin port's /debug/pprof/profile) for the run's " +
			"window less a second; the machine's two cores also run the load generator.\n\n")
		for _, pr := range profiles {
			p("### %s tier, C=%d: %.2f of the best peer ([%s](%s/%s))\n\n```\n%s```\n\n", pr.Tier, pr.C, pr.Ratio, pr.File, rel, pr.File, pr.Top)
		}
	}
	if check != nil {
		p("\n## Is the tool the bottleneck? The nats bench check\n\n")
		p("One nats-server and its client (%s): %s, %d-byte messages, synchronous publishes from C clients with a "+
			"connection each, no consumer. %d alternating rounds of `nats bench js pub sync` and of kiteq-bench's own "+
			"publish phase, %d messages each; medians. The tool should be within 20%% of nats bench.\n\n",
			check.Server.Version, check.Server.Config, cfg.Size, check.Rounds, check.Msgs)
		p("| C | kiteq-bench msgs/s | nats bench msgs/s | ratio | within 20%% |\n|---:|---:|---:|---:|---|\n")
		for _, r := range check.Results {
			ok := "yes"
			if r.Ratio < 0.8 || r.Ratio > 1.2 {
				ok = "**no**"
			}
			p("| %d | %.0f | %.0f | %.2f | %s |\n", r.Publishers, median(r.Tool), median(r.NATSBench), r.Ratio, ok)
		}
	}
	p("\n## Charts\n\n")
	for _, c := range charts {
		p("![%s](%s/%s)\n\n", strings.TrimSuffix(c, ".png"), rel, c)
	}
	p("The raw results are in [%s/results.json](%s/results.json).\n", rel, rel)
	return w.String()
}

func find(rs []*Result, system string, tier Tier, wl Workload, c int) *Result {
	for _, r := range rs {
		if r.System == system && r.Tier == tier && r.Workload == wl && (c == 0 || r.Publishers == c) {
			return r
		}
	}
	return nil
}

func bestPeer(rs []*Result, tier Tier, c int) *Result {
	var best *Result
	for _, r := range rs {
		if r.System != "kiteq" && r.Tier == tier && r.Workload == Throughput && r.Publishers == c &&
			(best == nil || r.PublishedRate > best.PublishedRate) {
			best = r
		}
	}
	return best
}

func ms(us float64) string { return fmt.Sprintf("%.2f ms", us/1000) }
func mib(b int64) string   { return fmt.Sprintf("%.0f MiB", float64(b)/(1<<20)) }

// machine describes this machine for the report.
func machine(probe string) []string {
	var out []string
	model := ""
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.SplitSeq(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "model name"); ok {
				model = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
				break
			}
		}
	}
	out = append(out, fmt.Sprintf("CPU: %d cores (%s)", runtime.NumCPU(), model))
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		first, _, _ := strings.Cut(string(b), "\n")
		out = append(out, "memory: "+strings.Join(strings.Fields(first)[1:], " "))
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		out = append(out, "kernel: Linux "+strings.TrimSpace(string(b)))
	}
	out = append(out, "Go: "+runtime.Version())
	if probe != "" {
		if d, err := FsyncLatency(probe, 200); err == nil {
			out = append(out, fmt.Sprintf("disk: a 4 KiB write and fdatasync take %s (median of 200, measured in this run, in %s)", d.Round(time.Microsecond), probe))
		} else {
			out = append(out, "disk: fsync latency not measured: "+err.Error())
		}
	}
	return out
}
