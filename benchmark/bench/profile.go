package bench

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// behindProfile is a CPU profile of the KiteQ broker, taken in a tier
// where KiteQ is behind the best peer: in throughput, at the C where it is
// furthest behind, or in draining a backlog.
type behindProfile struct {
	Tier     Tier     `json:"tier"`
	Workload Workload `json:"workload"`
	C        int      `json:"publishers,omitempty"` // Throughput
	Backlog  int      `json:"backlog,omitempty"`    // Drain
	Ratio    float64  `json:"ratio"`
	File     string   `json:"file"` // the pprof file, beside the report
	Top      string   `json:"top"`  // go tool pprof -top
}

// drainProfileBacklog is how many times the suite's backlog a profiled
// drain takes, so that its drain lasts long enough to profile.
const drainProfileBacklog = 5

// profileBehind re-runs, for each tier where KiteQ is behind, its
// throughput at the worst C, and its drain of a larger backlog, while
// recording the broker's CPU profile: over the run's window less a
// second, and over the drain.
func profileBehind(ctx context.Context, cfg SuiteConfig, rs []*Result) ([]behindProfile, error) {
	var k *KiteQ
	for _, d := range cfg.Drivers {
		if kd, ok := d.(*KiteQ); ok {
			k = kd
		}
	}
	if k == nil {
		return nil, nil
	}
	var out []behindProfile
	for _, tier := range cfg.Tiers {
		worst := behindProfile{Tier: tier, Workload: Throughput, Ratio: 1}
		for _, c := range cfg.Cs {
			kr, peer := find(rs, "kiteq", tier, Throughput, c), bestPeer(rs, tier, c)
			if kr != nil && peer != nil && kr.PublishedRate/peer.PublishedRate < worst.Ratio {
				worst.C, worst.Ratio = c, kr.PublishedRate/peer.PublishedRate
			}
		}
		if worst.C != 0 {
			rc := RunConfig{Workload: Throughput, Publishers: worst.C, Duration: cfg.Duration}
			prof, err := profileRun(ctx, k, cfg, tier, rc, worst, 500*time.Millisecond, cfg.Duration-time.Second)
			if err != nil {
				return out, err
			}
			out = append(out, prof)
		}
		if kr, peer := find(rs, "kiteq", tier, Drain, 0), bestDrain(rs, tier); kr != nil && peer != nil && kr.DeliveredRate < peer.DeliveredRate {
			backlog := drainProfileBacklog * cfg.Backlog
			rc := RunConfig{Workload: Drain, Publishers: kr.Publishers, Backlog: backlog}
			want := behindProfile{Tier: tier, Workload: Drain, Backlog: backlog, Ratio: kr.DeliveredRate / peer.DeliveredRate}
			// The drain lasts about backlog ÷ the rate measured.
			prof, err := profileRun(ctx, k, cfg, tier, rc, want, -1, time.Duration(float64(backlog)/kr.DeliveredRate*float64(time.Second)))
			if err != nil {
				return out, err
			}
			out = append(out, prof)
		}
	}
	return out, nil
}

// profileRun runs rc on a KiteQ broker of tier while recording the
// broker's CPU profile for d, from after into the run (after < 0: from the
// start of a drain's consumer), and completes prof with it.
func profileRun(ctx context.Context, k *KiteQ, cfg SuiteConfig, tier Tier, rc RunConfig, prof behindProfile,
	after, d time.Duration) (behindProfile, error) {
	info, err := k.Start(ctx, tier)
	if err != nil {
		return prof, err
	}
	type profiled struct {
		b   []byte
		err error
	}
	done := make(chan profiled, 1)
	record := func() {
		go func() {
			b, err := k.CPUProfile(ctx, d)
			done <- profiled{b, err}
		}()
	}
	if after >= 0 {
		go func() {
			time.Sleep(after) // past the run's start
			record()
		}()
	} else {
		rc.OnDrain = record
	}
	rc.Tier, rc.Size, rc.DrainWait, rc.Progress = tier, cfg.Size, cfg.DrainWait, cfg.Progress
	rc.ProgressTag = fmt.Sprintf("%-8s %-7s %-10s c=%-3d", "kiteq", tier, "profile", rc.Publishers)
	_, err = Run(ctx, k, info, fmt.Sprintf("prof%s%s%d", tier, rc.Workload, time.Now().UnixNano()%1e6), rc)
	var p profiled
	if err == nil {
		p = <-done // recording started: the run went past it
	}
	k.Stop()
	if err != nil {
		return prof, err
	}
	if p.err != nil {
		return prof, fmt.Errorf("profile the broker: %w", p.err)
	}
	if prof.Workload == Drain {
		prof.File = fmt.Sprintf("kiteq-%s-drain.pprof", tier)
	} else {
		prof.File = fmt.Sprintf("kiteq-%s-c%d.pprof", tier, prof.C)
	}
	path := filepath.Join(cfg.Dir, prof.File)
	if err := os.WriteFile(path, p.b, 0o644); err != nil {
		return prof, err
	}
	top, err := exec.CommandContext(ctx, "go", "tool", "pprof", "-top", "-nodecount=15", k.Bin, path).Output()
	if err != nil {
		return prof, fmt.Errorf("go tool pprof: %w", err)
	}
	prof.Top = trimPprofHeader(string(top))
	return prof, nil
}

// trimPprofHeader drops the lines of go tool pprof -top before the
// sample totals: the binary's path, build id and time.
func trimPprofHeader(s string) string {
	if i := strings.Index(s, "Duration:"); i >= 0 {
		return s[i:]
	}
	return s
}
