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
	Rounds     int           // throughput and latency runs of each cell; the report takes their median
	Warmup     time.Duration // an unmeasured run on each server before its runs
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
	if cfg.Progress == nil {
		cfg.Progress = io.Discard
	}
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
	// a noisy spell of the machine touches every system alike; each round
	// starts with another system. Then, in as many rounds, the latency
	// runs, at rates from the throughput medians; the first of them also
	// runs the drain and KiteQ's transactions.
	inRounds := func(run func(d Driver, info ServerInfo, tier Tier, round int) ([]*Result, error)) error {
		for round := 1; round <= max(cfg.Rounds, 1); round++ {
			for _, tier := range cfg.Tiers {
				for _, d := range rotate(cfg.Drivers, round-1) {
					got, err := onServer(ctx, d, tier, cfg, func(info ServerInfo) ([]*Result, error) {
						return run(d, info, tier, round)
					})
					rs = append(rs, got...)
					if err != nil {
						return err
					}
				}
			}
		}
		return nil
	}
	if err := inRounds(func(d Driver, info ServerInfo, tier Tier, round int) ([]*Result, error) {
		return runThroughput(ctx, d, info, tier, cfg, round)
	}); err != nil {
		return rs, err
	}
	half := halfRates(Medians(rs))
	if err := inRounds(func(d Driver, info ServerInfo, tier Tier, round int) ([]*Result, error) {
		return runOthers(ctx, d, info, tier, cfg, round, half)
	}); err != nil {
		return rs, err
	}
	if err := os.MkdirAll(cfg.Dir, 0o755); err != nil {
		return rs, err
	}
	if err := clearOutputs(cfg.Dir); err != nil {
		return rs, err
	}
	profiles, perr := profileBehind(ctx, cfg, Medians(rs))
	if err := writeReport(cfg, rs, check, profiles); err != nil {
		return rs, err
	}
	if perr != nil { // the report has the runs and the profiles taken
		return rs, fmt.Errorf("profile KiteQ where it is behind: %w", perr)
	}
	return rs, nil
}

// rotate returns ds starting at its n-th (modulo its length).
func rotate(ds []Driver, n int) []Driver {
	n %= len(ds)
	return append(slices.Clone(ds[n:]), ds[:n]...)
}

// outputs are the files a suite writes beside its report.
var outputs = []string{"results.json", "natscheck.json", "throughput-*.png", "latency*.png", "kiteq-*.pprof"}

// clearOutputs removes what an earlier suite wrote to dir: a profile or a
// chart it no longer makes would stay beside a report that does not name
// it.
func clearOutputs(dir string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		for _, pattern := range outputs {
			if ok, _ := filepath.Match(pattern, e.Name()); ok && e.Type().IsRegular() {
				if err := os.Remove(filepath.Join(dir, e.Name())); err != nil {
					return err
				}
				break
			}
		}
	}
	return nil
}

// onServer starts d's server of tier, warms it up, runs fn, and stops it.
// A system without the tier runs nothing.
func onServer(ctx context.Context, d Driver, tier Tier, cfg SuiteConfig, fn func(ServerInfo) ([]*Result, error)) ([]*Result, error) {
	info, err := d.Start(ctx, tier)
	if errors.Is(err, ErrTierUnsupported) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", d.Name(), tier, err)
	}
	if cfg.Warmup > 0 {
		// The first run on a fresh server pays for what its first
		// messages start (connections, buffers, goroutines, caches).
		warm := RunConfig{Workload: Throughput, Tier: tier, Publishers: slices.Max(cfg.Cs), Duration: cfg.Warmup}
		warm.Size, warm.DrainWait = cfg.Size, cfg.DrainWait
		if _, err := Run(ctx, d, info, fmt.Sprintf("%swarmup%d", tier, time.Now().UnixNano()%1e9), warm); err != nil {
			d.Stop()
			return nil, fmt.Errorf("%s %s: warm-up: %w", d.Name(), tier, err)
		}
	}
	got, err := fn(info)
	d.Stop()
	if err != nil {
		return got, fmt.Errorf("%s %s: %w", d.Name(), tier, err)
	}
	return got, nil
}

// halfRates is, for each tier and system, half of the system's best
// median confirmed rate in the tier: its latency runs' offered rate.
func halfRates(medians []*Result) map[Tier]map[string]float64 {
	half := map[Tier]map[string]float64{}
	for _, r := range medians {
		if r.Workload != Throughput {
			continue
		}
		if half[r.Tier] == nil {
			half[r.Tier] = map[string]float64{}
		}
		half[r.Tier][r.System] = max(half[r.Tier][r.System], r.PublishedRate/2)
	}
	return half
}

// Medians keeps, of the rounds of each throughput and latency run, the
// one with the median confirmed rate or e2e p99 (the lower middle one of
// an even number), where the first of them ran, and every run of the
// other workloads.
func Medians(rs []*Result) []*Result {
	runs := map[runKey][]*Result{}
	for _, r := range rs {
		if r.Workload == Throughput || r.Workload == Latency {
			runs[keyOf(r)] = append(runs[keyOf(r)], r)
		}
	}
	var out []*Result
	for _, r := range rs {
		if r.Workload != Throughput && r.Workload != Latency {
			out = append(out, r)
			continue
		}
		if k := keyOf(r); runs[k][0] == r {
			out = append(out, medianRun(runs[k]))
		}
	}
	return out
}

// runKey is what the rounds of a run have in common.
type runKey struct {
	system     string
	tier       Tier
	workload   Workload
	c          int
	commonRate bool
}

func keyOf(r *Result) runKey {
	return runKey{r.System, r.Tier, r.Workload, r.Publishers, r.CommonRate}
}

// medianRun is the run with the median confirmed rate (throughput) or the
// median e2e p99 (latency).
func medianRun(rs []*Result) *Result {
	sorted := slices.Clone(rs)
	slices.SortStableFunc(sorted, func(a, b *Result) int {
		if a.Workload == Latency {
			return cmp.Compare(a.EndToEnd.P99, b.EndToEnd.P99)
		}
		return cmp.Compare(a.PublishedRate, b.PublishedRate)
	})
	return sorted[(len(sorted)-1)/2]
}

// roundsOf are the rounds of r: the runs of rs like it, r too.
func roundsOf(rs []*Result, r *Result) []*Result {
	var out []*Result
	for _, o := range rs {
		if keyOf(o) == keyOf(r) {
			out = append(out, o)
		}
	}
	return out
}

// spread is the lowest and highest of value over the rounds of r, and
// their number.
func spread(rs []*Result, r *Result, value func(*Result) float64) (lo, hi float64, n int) {
	for i, o := range roundsOf(rs, r) {
		if v := value(o); i == 0 || v < lo {
			lo = v
		}
		hi = max(hi, value(o))
		n++
	}
	return lo, hi, n
}

func publishedRate(r *Result) float64 { return r.PublishedRate }
func p99(r *Result) float64           { return r.EndToEnd.P99 }

// natsCheck is the nats bench check for the report.
type natsCheck struct {
	Results []NATSCheckResult `json:"results"`
	Server  ServerInfo        `json:"server"`
	Msgs    int               `json:"messages"`
	Rounds  int               `json:"rounds"`
}

// runThroughput runs one round of the throughput at each C on d's
// server of tier.
func runThroughput(ctx context.Context, d Driver, info ServerInfo, tier Tier, cfg SuiteConfig, round int) ([]*Result, error) {
	var rs []*Result
	for _, c := range cfg.Cs {
		r, err := runOne(ctx, d, info, cfg, RunConfig{Workload: Throughput, Tier: tier, Publishers: c, Duration: cfg.Duration, Round: round})
		if r != nil {
			rs = append(rs, r)
		}
		if err != nil {
			return rs, err
		}
	}
	return rs, nil
}

// runOthers runs one round of latency on d's server of tier: at half its
// own best rate, and at the rate of the tier's slowest system when that is
// lower (by more than 5%). Each system's p99 at half its own best rate
// says how it does at its own moderate load; the other compares them at
// the same load. The first round also runs the drain and KiteQ's
// transactions.
func runOthers(ctx context.Context, d Driver, info ServerInfo, tier Tier, cfg SuiteConfig, round int, half map[Tier]map[string]float64) ([]*Result, error) {
	own, common := half[tier][d.Name()], 0.0
	for _, h := range half[tier] {
		if common == 0 || h < common {
			common = h
		}
	}
	runs := []RunConfig{{Workload: Latency, Rate: own, Duration: cfg.Duration}}
	if own > common*1.05 {
		runs = append(runs, RunConfig{Workload: Latency, Rate: common, CommonRate: true, Duration: cfg.Duration})
	}
	if round == 1 {
		runs = append(runs, RunConfig{Workload: Drain, Backlog: cfg.Backlog})
		if d.Name() == "kiteq" {
			runs = append(runs, RunConfig{Workload: Tx, Duration: cfg.Duration})
		}
	}
	var rs []*Result
	for _, rc := range runs {
		// Enough publishers that a slow confirm does not hold the next
		// send back.
		rc.Tier, rc.Publishers, rc.Round = tier, slices.Max(cfg.Cs), round
		r, err := runOne(ctx, d, info, cfg, rc)
		if r != nil {
			rs = append(rs, r)
		}
		if err != nil {
			return rs, err
		}
	}
	return rs, nil
}

// runOne runs rc with the suite's message size, drain wait and progress
// line.
func runOne(ctx context.Context, d Driver, info ServerInfo, cfg SuiteConfig, rc RunConfig) (*Result, error) {
	rc.Size, rc.DrainWait, rc.Progress = cfg.Size, cfg.DrainWait, cfg.Progress
	rc.ProgressTag = fmt.Sprintf("%-8s %-7s %-10s c=%-3d", d.Name(), rc.Tier, rc.Workload, rc.Publishers)
	if cfg.Rounds > 1 && (rc.Workload == Throughput || rc.Workload == Latency) {
		rc.ProgressTag = fmt.Sprintf("%s round %d/%d", rc.ProgressTag, rc.Round, cfg.Rounds)
	}
	r, err := Run(ctx, d, info, fmt.Sprintf("%s%s%d", rc.Tier, rc.Workload, time.Now().UnixNano()%1e9), rc)
	if first := err; err != nil && ctx.Err() == nil {
		// A server that fails one run (JetStream has refused to create a
		// stream, now and then, on this machine) gets one more try; the
		// report says so.
		fmt.Fprintf(cfg.Progress, "%s: %v; running it again\n", rc.ProgressTag, err)
		time.Sleep(time.Second)
		if r, err = Run(ctx, d, info, fmt.Sprintf("%s%s%d", rc.Tier, rc.Workload, time.Now().UnixNano()%1e9), rc); r != nil {
			r.Retried = first.Error()
		}
	}
	return r, err
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

	warmup := ""
	if cfg.Warmup > 0 {
		warmup = fmt.Sprintf("; each server first ran an unmeasured %v warm-up at C=%d", cfg.Warmup, slices.Max(cfg.Cs))
	}
	p("## Throughput\n\n")
	p("Each system ran each tier and C %d times (%v windows), round after round, each round starting with another system, "+
		"so that a noisy spell of the machine touches every system alike%s. Each row is the run with the median confirmed rate; *range* is the lowest and highest "+
		"of the %d, and *lost* and *dup* add up every run. KiteQ's transactional run (tx) ran once.\n\n", rounds, cfg.Duration, warmup, rounds)
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
			lo, hi, _ := spread(all, r, publishedRate)
			span = fmt.Sprintf("%.0f–%.0f", lo, hi)
			lost, dup = 0, 0
			for _, o := range roundsOf(all, r) {
				lost, dup = lost+o.Lost, dup+o.Duplicates
			}
		}
		p("| %s | %s | %d | %.0f | %s | %.0f | %d | %d | %d | %s | %s | %.1f | %s |\n", r.Tier, label, r.Publishers, r.PublishedRate,
			span, r.DeliveredRate, r.BacklogAtEnd, lost, dup, ms(r.EndToEnd.P50), ms(r.EndToEnd.P99),
			r.Usage.CPUSeconds, mib(r.Usage.PeakRSSBytes))
	}
	p("\n## End-to-end latency (open loop)\n\n")
	p("Each message is timed from when it was due to be sent, so a stall shows in the messages behind it. Each system "+
		"first runs at half of its own best median confirmed rate in the tier, a moderate load for it. A system that "+
		"confirms more is offered more there, so each system that was offered more than the slowest one of its tier also "+
		"runs at that slowest one's rate: the same load for all (*same rate*). Each ran %d times (%v windows); each row "+
		"is the run with the median p99, *p99 range* the lowest and highest p99 of the %d, and *lost* adds up every run.\n\n",
		rounds, cfg.Duration, rounds)
	p("| tier | system | load | offered/s | delivered/s | p50 | p99 | p99 range | p99.9 | max | lost |\n")
	p("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, r := range rs {
		if r.Workload == Latency {
			load := "50% of its best"
			if r.CommonRate {
				load = "same rate"
			}
			lo, hi, _ := spread(all, r, p99)
			lost := int64(0)
			for _, o := range roundsOf(all, r) {
				lost += o.Lost
			}
			p("| %s | %s | %s | %.0f | %.0f | %s | %s | %s–%s | %s | %s | %d |\n", r.Tier, r.System, load, r.Rate, r.DeliveredRate,
				ms(r.EndToEnd.P50), ms(r.EndToEnd.P99), strings.TrimSuffix(ms(lo), " ms"), ms(hi), ms(r.EndToEnd.P999),
				ms(r.EndToEnd.Max), lost)
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
		"Drain ratio: KiteQ's drained msgs/s ÷ the best peer's (one run each). Above 1.0, KiteQ is ahead.\n\n" +
		"| tier | measure | KiteQ | best peer | ratio |\n|---|---|---:|---:|---:|\n")
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
		if k, peer := find(rs, "kiteq", tier, Drain, 0), bestDrain(rs, tier); k != nil && peer != nil {
			p("| %s | drained msgs/s, backlog of %d | %.0f | %.0f (%s) | %.2f |\n", tier, k.Published, k.DeliveredRate,
				peer.DeliveredRate, peer.System, k.DeliveredRate/peer.DeliveredRate)
		}
	}
	if len(profiles) > 0 {
		p("\n## Where KiteQ's time goes where it is behind\n\n")
		p("For each tier where KiteQ's throughput is below the best peer's, the suite runs KiteQ again at the C where it is "+
			"furthest behind and records the broker's CPU profile (its admin port's /debug/pprof/profile) for the run's "+
			"window less a second; where its drain is behind, it drains a backlog %d times larger and records the profile "+
			"from the consumer's start for as long as that drain should take at the rate measured before (in whole seconds, "+
			"at least one). The machine's two cores also run the load generator.\n\n", drainProfileBacklog)
		for _, pr := range profiles {
			what := fmt.Sprintf("C=%d", pr.C)
			if pr.Workload == Drain {
				what = fmt.Sprintf("drain of %d", pr.Backlog)
			}
			p("### %s tier, %s: %.2f of the best peer ([%s](%s/%s))\n\n```\n%s```\n\n", pr.Tier, what, pr.Ratio, pr.File, rel, pr.File, pr.Top)
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
	var retried []string
	for _, r := range all {
		if r.Retried != "" {
			retried = append(retried, fmt.Sprintf("%s %s %s C=%d (first try: %s)", r.System, r.Tier, r.Workload, r.Publishers, r.Retried))
		}
	}
	if len(retried) > 0 {
		p("\n## Runs that failed once\n\nThese runs failed and ran again on the same server; the tables show the second try.\n\n")
		for _, r := range retried {
			p("- %s\n", r)
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

// bestPeer is the peer's throughput run of tier at C=c with the highest
// confirmed rate; bestDrain, its drain of tier with the highest delivered
// rate.
func bestPeer(rs []*Result, tier Tier, c int) *Result {
	return bestOf(rs, tier, Throughput, c, publishedRate)
}

func bestDrain(rs []*Result, tier Tier) *Result {
	return bestOf(rs, tier, Drain, 0, func(r *Result) float64 { return r.DeliveredRate })
}

// bestOf is the peer's run of tier and wl (at C=c, unless 0) with the
// highest value.
func bestOf(rs []*Result, tier Tier, wl Workload, c int, value func(*Result) float64) *Result {
	var best *Result
	for _, r := range rs {
		if r.System != "kiteq" && r.Tier == tier && r.Workload == wl && (c == 0 || r.Publishers == c) &&
			(best == nil || value(r) > value(best)) {
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
