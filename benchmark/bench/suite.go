package bench

import (
	"cmp"
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
	Rounds     int           // throughput runs of each system, tier and C; the report takes their median
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
	// Round after round, each system in each tier runs every C, so that
	// a noisy spell of the machine touches every system alike; the last
	// round also runs the other workloads, at rates from the medians.
	rounds := max(cfg.Rounds, 1)
	for round := 1; round <= rounds; round++ {
		for _, tier := range cfg.Tiers {
			for _, d := range cfg.Drivers {
				got, err := onServer(ctx, d, tier, func(info ServerInfo) ([]*Result, error) {
					return runSystem(ctx, d, info, tier, cfg, round, rs)
				})
				rs = append(rs, got...)
				if err != nil {
					return rs, err
				}
			}
			if round == rounds {
				got, err := commonRate(ctx, cfg, tier, rs)
				rs = append(rs, got...)
				if err != nil {
					return rs, err
				}
			}
		}
	}
	if err := os.MkdirAll(cfg.Dir, 0o755); err != nil {
		return rs, err
	}
	profiles, err := profileBehind(ctx, cfg, Medians(rs))
	if err != nil {
		return rs, fmt.Errorf("profile KiteQ where it is behind: %w", err)
	}
	return rs, writeReport(cfg, rs, check, profiles)
}

// onServer starts d's server of tier, runs fn, and stops it. A system
// without the tier runs nothing.
func onServer(ctx context.Context, d Driver, tier Tier, fn func(ServerInfo) ([]*Result, error)) ([]*Result, error) {
	info, err := d.Start(ctx, tier)
	if errors.Is(err, ErrTierUnsupported) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", d.Name(), tier, err)
	}
	got, err := fn(info)
	d.Stop()
	if err != nil {
		return got, fmt.Errorf("%s %s: %w", d.Name(), tier, err)
	}
	return got, nil
}

// commonRate runs, for each system of tier whose latency run offered more
// than the lowest rate offered in the tier, a latency run at that lowest
// rate: each system's p99 at half its own best rate says how it does at
// its own moderate load, this one compares them at the same load.
func commonRate(ctx context.Context, cfg SuiteConfig, tier Tier, rs []*Result) ([]*Result, error) {
	common := 0.0
	for _, r := range rs {
		if r.Workload == Latency && r.Tier == tier && !r.CommonRate && (common == 0 || r.Rate < common) {
			common = r.Rate
		}
	}
	var out []*Result
	for _, d := range cfg.Drivers {
		own := find(rs, d.Name(), tier, Latency, 0)
		if own == nil || own.Rate <= common*1.05 {
			continue
		}
		got, err := onServer(ctx, d, tier, func(info ServerInfo) ([]*Result, error) {
			r, err := Run(ctx, d, info, fmt.Sprintf("%scommon%d", tier, time.Now().UnixNano()%1e6), RunConfig{
				Workload: Latency, Tier: tier, Size: cfg.Size, Publishers: own.Publishers, Duration: cfg.Duration,
				Rate: common, CommonRate: true, DrainWait: cfg.DrainWait, Progress: cfg.Progress,
				ProgressTag: fmt.Sprintf("%-8s %-7s %-10s c=%-3d", d.Name(), tier, "latency", own.Publishers),
			})
			if r == nil {
				return nil, err
			}
			return []*Result{r}, err
		})
		out = append(out, got...)
		if err != nil {
			return out, err
		}
	}
	return out, nil
}

// Medians keeps, of the throughput runs of each system, tier and C, the
// one with the median confirmed rate (the lower middle one of an even
// number), where the first of them ran, and every run of the other
// workloads.
func Medians(rs []*Result) []*Result {
	type key struct {
		system string
		tier   Tier
		c      int
	}
	runs := map[key][]*Result{}
	for _, r := range rs {
		if r.Workload == Throughput {
			k := key{r.System, r.Tier, r.Publishers}
			runs[k] = append(runs[k], r)
		}
	}
	var out []*Result
	for _, r := range rs {
		if r.Workload != Throughput {
			out = append(out, r)
			continue
		}
		k := key{r.System, r.Tier, r.Publishers}
		if runs[k][0] == r {
			out = append(out, medianRun(runs[k]))
		}
	}
	return out
}

func medianRun(rs []*Result) *Result {
	sorted := slices.Clone(rs)
	slices.SortStableFunc(sorted, func(a, b *Result) int { return cmp.Compare(a.PublishedRate, b.PublishedRate) })
	return sorted[(len(sorted)-1)/2]
}

// rateRange is the lowest and highest confirmed rate of the throughput
// runs like r.
func rateRange(rs []*Result, r *Result) (lo, hi float64, n int) {
	for _, o := range rs {
		if o.Workload == Throughput && o.System == r.System && o.Tier == r.Tier && o.Publishers == r.Publishers {
			if n == 0 || o.PublishedRate < lo {
				lo = o.PublishedRate
			}
			hi = max(hi, o.PublishedRate)
			n++
		}
	}
	return lo, hi, n
}

// natsCheck is the nats bench check for the report.
type natsCheck struct {
	Results []NATSCheckResult `json:"results"`
	Server  ServerInfo        `json:"server"`
	Msgs    int               `json:"messages"`
	Rounds  int               `json:"rounds"`
}

// runSystem runs the throughput of one round on d's server of tier; in
// the last round also the latency, at half the best of the median rates
// (earlier rounds' runs are in before), the drain and KiteQ's transactions.
func runSystem(ctx context.Context, d Driver, info ServerInfo, tier Tier, cfg SuiteConfig, round int, before []*Result) ([]*Result, error) {
	var rs []*Result
	n := 0
	run := func(c RunConfig) (*Result, error) {
		n++
		c.Tier, c.Size, c.DrainWait, c.Progress, c.Round = tier, cfg.Size, cfg.DrainWait, cfg.Progress, round
		c.ProgressTag = fmt.Sprintf("%-8s %-7s %-10s c=%-3d", d.Name(), tier, c.Workload, c.Publishers)
		if cfg.Rounds > 1 && c.Workload == Throughput {
			c.ProgressTag = fmt.Sprintf("%s round %d/%d", c.ProgressTag, round, cfg.Rounds)
		}
		r, err := Run(ctx, d, info, fmt.Sprintf("%s%d%d", tier, n, time.Now().UnixNano()%1e6), c)
		if r != nil {
			rs = append(rs, r)
		}
		return r, err
	}
	for _, c := range cfg.Cs {
		if _, err := run(RunConfig{Workload: Throughput, Publishers: c, Duration: cfg.Duration}); err != nil {
			return rs, err
		}
	}
	if round < max(cfg.Rounds, 1) {
		return rs, nil
	}
	best := 0.0
	for _, r := range Medians(append(slices.Clone(before), rs...)) {
		if r.System == d.Name() && r.Tier == tier && r.Workload == Throughput {
			best = max(best, r.PublishedRate)
		}
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
	all := rs
	rs = Medians(rs)
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
	for _, tier := range cfg.Tiers {
		if name, err := LatencyChart(cfg.Dir, tier, rs); err != nil {
			return err
		} else if name != "" {
			charts = append(charts, name)
		}
	}
	if cfg.Markdown == "" {
		return nil
	}
	rel, err := filepath.Rel(filepath.Dir(cfg.Markdown), cfg.Dir)
	if err != nil {
		rel = cfg.Dir
	}
	return os.WriteFile(cfg.Markdown, []byte(markdown(cfg, all, check, profiles, charts, rel)), 0o644)
}

// markdown is the report of all the runs (every round).
func markdown(cfg SuiteConfig, all []*Result, check *natsCheck, profiles []behindProfile, charts []string, rel string) string {
	rs := Medians(all)
	rounds := max(cfg.Rounds, 1)
	var w strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&w, format, args...) }
	p("# Benchmarks: KiteQ, NATS JetStream and RabbitMQ\n\n")
	p("Written by `make bench` (`%s`) on %s. Every figure below is from that one run of the suite, on this machine:\n\n",
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
	p("Each system ran each tier and C %d times (%v windows), round after round, so that a noisy spell of the machine "+
		"touches every system alike. Each row is the run with the median confirmed rate; *range* is the lowest and highest "+
		"of the %d, and *lost* and *dup* add up every run. KiteQ's transactional run (tx) ran once.\n\n", rounds, cfg.Duration, rounds)
	p("| tier | system | C | published/s | range | delivered/s | backlog | lost | dup | e2e p50 | e2e p99 | broker CPU s | peak RSS |\n")
	p("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	var rows []*Result // by tier, then as they ran (the first round's order)
	for _, tier := range cfg.Tiers {
		for _, r := range rs {
			if r.Tier == tier && (r.Workload == Throughput || r.Workload == Tx) {
				rows = append(rows, r)
			}
		}
	}
	for _, r := range rows {
		label, span, lost, dup := r.System, "", r.Lost, r.Duplicates
		if r.Workload == Tx {
			label += " (tx)"
		} else {
			lo, hi, _ := rateRange(all, r)
			span = fmt.Sprintf("%.0f–%.0f", lo, hi)
			lost, dup = 0, 0
			for _, o := range all {
				if o.Workload == Throughput && o.System == r.System && o.Tier == r.Tier && o.Publishers == r.Publishers {
					lost, dup = lost+o.Lost, dup+o.Duplicates
				}
			}
		}
		p("| %s | %s | %d | %.0f | %s | %.0f | %d | %d | %d | %s | %s | %.1f | %s |\n", r.Tier, label, r.Publishers, r.PublishedRate,
			span, r.DeliveredRate, r.BacklogAtEnd, lost, dup, ms(r.EndToEnd.P50), ms(r.EndToEnd.P99),
			r.Usage.CPUSeconds, mib(r.Usage.PeakRSSBytes))
	}
	p("\n## End-to-end latency (open loop)\n\n")
	p("Each message is timed from when it was due to be sent, so a stall shows in the messages behind it. Each system " +
		"first runs at half of its own best median confirmed rate in the tier, a moderate load for it. A system that " +
		"confirms more is offered more there, so each system that was offered more than the slowest one of its tier also " +
		"runs at that slowest one's rate: the same load for all (*same rate*).\n\n")
	p("| tier | system | load | offered/s | delivered/s | p50 | p99 | p99.9 | max | lost |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, r := range rs {
		if r.Workload == Latency {
			load := "50% of its best"
			if r.CommonRate {
				load = "same rate"
			}
			p("| %s | %s | %s | %.0f | %.0f | %s | %s | %s | %s | %d |\n", r.Tier, r.System, load, r.Rate, r.DeliveredRate,
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
		for _, common := range []bool{false, true} {
			runs := latencyRuns(rs, tier, common)
			var k, peer *Result
			for _, r := range runs {
				switch {
				case r.System == "kiteq":
					k = r
				case peer == nil || r.EndToEnd.P99 < peer.EndToEnd.P99:
					peer = r
				}
			}
			if k == nil || peer == nil || k.EndToEnd.P99 <= 0 {
				continue
			}
			what := "e2e p99 at 50% of its best"
			if common {
				what = fmt.Sprintf("e2e p99, same rate (%.0f/s)", k.Rate)
			}
			p("| %s | %s | %s | %s (%s) | %.2f |\n", tier, what, ms(k.EndToEnd.P99), ms(peer.EndToEnd.P99), peer.System,
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

// latencyRuns are the latency runs of tier at half each system's best
// rate, or (common) at the rate of the tier's slowest system: its own run
// and the others' runs at its rate.
func latencyRuns(rs []*Result, tier Tier, common bool) []*Result {
	var out []*Result
	sameRate := map[string]bool{}
	for _, r := range rs {
		if r.Workload == Latency && r.Tier == tier && r.CommonRate {
			sameRate[r.System] = true
		}
	}
	for _, r := range rs {
		if r.Workload != Latency || r.Tier != tier {
			continue
		}
		switch {
		case !common && !r.CommonRate, common && r.CommonRate:
			out = append(out, r)
		case common && !sameRate[r.System] && len(sameRate) > 0:
			out = append(out, r) // the slowest system: its own rate is the common one
		}
	}
	return out
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
