package bench

import (
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestMediansKeepsTheMedianThroughputRun(t *testing.T) {
	run := func(sys string, c int, rate float64) *Result {
		return &Result{System: sys, Tier: TierMemory, Workload: Throughput, Publishers: c, PublishedRate: rate}
	}
	a1, a2, a3 := run("a", 1, 300), run("a", 1, 100), run("a", 1, 200) // median 200
	b1, b2 := run("b", 1, 50), run("b", 1, 40)                         // even: the lower middle, 40
	c1 := run("a", 4, 900)
	lat := &Result{System: "a", Tier: TierMemory, Workload: Latency, Rate: 100}
	got := Medians([]*Result{a1, b1, a2, c1, lat, a3, b2})
	want := []*Result{a3, b2, c1, lat} // where the first of each ran
	if len(got) != len(want) {
		t.Fatalf("got %d results, want %d", len(got), len(want))
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("result %d: %s c=%d %.0f/s, want %s c=%d %.0f/s", i, got[i].System, got[i].Publishers,
				got[i].PublishedRate, want[i].System, want[i].Publishers, want[i].PublishedRate)
		}
	}
	lo, hi, n := spread([]*Result{a1, b1, a2, c1, a3}, a3, publishedRate)
	if lo != 100 || hi != 300 || n != 3 {
		t.Fatalf("range of a c=1: %.0f-%.0f of %d runs, want 100-300 of 3", lo, hi, n)
	}
}

// A small suite, KiteQ and NATS in the memory tier, two rounds: every
// throughput run is kept, the report shows the medians with their range,
// the faster system runs latency again at the slower one's rate, and the
// charts are drawn.
func TestSuiteRoundsAndReport(t *testing.T) {
	dir := t.TempDir()
	report := filepath.Join(dir, "benchmarks.md")
	cfg := SuiteConfig{
		Drivers: []Driver{&KiteQ{Bin: kiteqBin(t)}, &NATS{Bin: natsBin(t)}},
		Tiers:   []Tier{TierMemory}, Cs: []int{1, 8}, Size: 512, Duration: 700 * time.Millisecond, Rounds: 2, Warmup: 200 * time.Millisecond,
		Backlog: 1000, DrainWait: 10 * time.Second, Dir: filepath.Join(dir, "out"), Markdown: report,
		Command: "test", Progress: io.Discard,
	}
	// What an earlier suite left: removed; anything else: kept.
	if err := os.MkdirAll(cfg.Dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"kiteq-written-c9.pprof", "latency.png", "notes.txt"} {
		if err := os.WriteFile(filepath.Join(cfg.Dir, f), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	rs, err := RunSuite(t.Context(), cfg)
	if d := os.Getenv("KITEQ_BENCH_KEEP"); d != "" {
		defer os.CopyFS(d, os.DirFS(dir))
	}
	if err != nil {
		t.Fatal(err)
	}
	count := map[string]int{}
	var own, common []*Result
	latencyRuns := 0
	for _, r := range rs {
		if r.Workload == Latency {
			latencyRuns++
		}
	}
	for _, r := range Medians(rs) {
		if r.Lost != 0 || r.Duplicates != 0 || r.PublishErrors != 0 {
			t.Fatalf("%s %s c=%d: lost %d, dup %d, errors %d", r.System, r.Workload, r.Publishers, r.Lost, r.Duplicates, r.PublishErrors)
		}
		switch {
		case r.Workload == Latency && r.CommonRate:
			common = append(common, r)
		case r.Workload == Latency:
			own = append(own, r)
		}
	}
	for _, r := range rs {
		if r.Lost != 0 || r.Duplicates != 0 || r.PublishErrors != 0 {
			t.Fatalf("%s %s c=%d: lost %d, dup %d, errors %d", r.System, r.Workload, r.Publishers, r.Lost, r.Duplicates, r.PublishErrors)
		}
		if r.Workload == Throughput {
			count[r.System]++
		}
		if (r.Workload == Throughput || r.Workload == Latency) && (r.Round < 1 || r.Round > 2) {
			t.Fatalf("a %s run of round %d", r.Workload, r.Round)
		}
	}
	// Each round starts with another system.
	var firsts []string
	for _, r := range rs {
		if r.Workload == Throughput && len(firsts) < r.Round {
			firsts = append(firsts, r.System)
		}
	}
	if strings.Join(firsts, ",") != "kiteq,nats" {
		t.Fatalf("the rounds started with %v, want kiteq then nats", firsts)
	}
	if latencyRuns != 2*(len(own)+len(common)) {
		t.Fatalf("%d latency runs, want 2 rounds of the %d latency medians", latencyRuns, len(own)+len(common))
	}
	if count["kiteq"] != 4 || count["nats"] != 4 {
		t.Fatalf("throughput runs: %v, want 4 of each system (2 rounds of 2 C)", count)
	}
	if len(own) != 2 {
		t.Fatalf("%d latency medians at half the system's best rate, want 2", len(own))
	}
	slowest := min(own[0].Rate, own[1].Rate)
	for _, r := range own {
		var best float64
		for _, m := range Medians(rs) {
			if m.System == r.System && m.Workload == Throughput {
				best = max(best, m.PublishedRate)
			}
		}
		if r.Rate != best/2 {
			t.Fatalf("%s latency offered %.0f/s, want half its best median rate %.0f/s", r.System, r.Rate, best)
		}
	}
	for _, r := range common {
		if r.Rate != slowest || r.Rate == max(own[0].Rate, own[1].Rate) {
			t.Fatalf("%s at the same rate offered %.0f/s, want the slower system's %.0f/s", r.System, r.Rate, slowest)
		}
	}
	if max(own[0].Rate, own[1].Rate) > slowest*1.05 && len(common) != 1 {
		t.Fatalf("rates %.0f and %.0f: %d runs at the same rate, want 1", own[0].Rate, own[1].Rate, len(common))
	}

	b, err := os.ReadFile(report)
	if err != nil {
		t.Fatal(err)
	}
	md := string(b)
	for _, want := range []string{"| memory | kiteq | 1 |", "| memory | nats | 8 |", "ran each tier and C 2 times",
		"| memory | msgs/s at C=8 |", "| memory | e2e p99 at 50% of its best |", "50% of its best",
		"| memory | drained msgs/s, backlog of 1000 |"} {
		if !strings.Contains(md, want) {
			t.Errorf("the report has no %q", want)
		}
	}
	if len(common) == 1 && !strings.Contains(md, "e2e p99, same rate") {
		t.Error("the report has no ratio at the same rate")
	}
	for _, f := range []string{"results.json", "throughput-memory.png", "latency-memory.png", "notes.txt"} {
		if _, err := os.Stat(filepath.Join(cfg.Dir, f)); err != nil {
			t.Error(err)
		}
	}
	// Where KiteQ is behind, the report has its profile.
	med := Medians(rs)
	if k, peer := find(med, "kiteq", TierMemory, Drain, 0), bestDrain(med, TierMemory); k.DeliveredRate < peer.DeliveredRate {
		if !strings.Contains(md, "### memory tier, drain of 5000:") {
			t.Error("KiteQ drained slower than NATS, and the report has no profile of its drain")
		}
		if _, err := os.Stat(filepath.Join(cfg.Dir, "kiteq-memory-drain.pprof")); err != nil {
			t.Error(err)
		}
	}
	for _, c := range cfg.Cs {
		if k, peer := find(med, "kiteq", TierMemory, Throughput, c), bestPeer(med, TierMemory, c); k.PublishedRate < peer.PublishedRate &&
			!strings.Contains(md, "### memory tier, C=") {
			t.Errorf("KiteQ was behind at C=%d, and the report has no profile", c)
		}
	}
	for _, f := range []string{"kiteq-written-c9.pprof", "latency.png"} {
		if _, err := os.Stat(filepath.Join(cfg.Dir, f)); !os.IsNotExist(err) {
			t.Errorf("%s, from an earlier suite, is still there (%v)", f, err)
		}
	}
}
