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
// where KiteQ's throughput is behind the best peer's, at the C where it is
// furthest behind.
type behindProfile struct {
	Tier  Tier    `json:"tier"`
	C     int     `json:"publishers"`
	Ratio float64 `json:"ratio"`
	File  string  `json:"file"` // the pprof file, beside the report
	Top   string  `json:"top"`  // go tool pprof -top
}

// profileBehind re-runs, for each tier where KiteQ is behind, its
// throughput at the worst C while recording the broker's CPU profile.
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
		worst := behindProfile{Tier: tier, Ratio: 1}
		for _, c := range cfg.Cs {
			kr, peer := find(rs, "kiteq", tier, Throughput, c), bestPeer(rs, tier, c)
			if kr != nil && peer != nil && kr.PublishedRate/peer.PublishedRate < worst.Ratio {
				worst.C, worst.Ratio = c, kr.PublishedRate/peer.PublishedRate
			}
		}
		if worst.C == 0 {
			continue
		}
		info, err := k.Start(ctx, tier)
		if err != nil {
			return out, err
		}
		prof := make(chan []byte, 1)
		perr := make(chan error, 1)
		go func() {
			time.Sleep(500 * time.Millisecond) // past the run's start
			b, err := k.CPUProfile(ctx, cfg.Duration-time.Second)
			prof <- b
			perr <- err
		}()
		_, err = Run(ctx, k, info, fmt.Sprintf("prof%s%d", tier, time.Now().UnixNano()%1e6), RunConfig{
			Workload: Throughput, Tier: tier, Size: cfg.Size, Publishers: worst.C, Duration: cfg.Duration,
			DrainWait: cfg.DrainWait, Progress: cfg.Progress,
			ProgressTag: fmt.Sprintf("%-8s %-7s %-10s c=%-3d", "kiteq", tier, "profile", worst.C),
		})
		b, perrv := <-prof, <-perr
		k.Stop()
		if err != nil {
			return out, err
		}
		if perrv != nil {
			return out, fmt.Errorf("profile the broker: %w", perrv)
		}
		worst.File = fmt.Sprintf("kiteq-%s-c%d.pprof", tier, worst.C)
		path := filepath.Join(cfg.Dir, worst.File)
		if err := os.WriteFile(path, b, 0o644); err != nil {
			return out, err
		}
		top, err := exec.CommandContext(ctx, "go", "tool", "pprof", "-top", "-nodecount=15", k.Bin, path).Output()
		if err != nil {
			return out, fmt.Errorf("go tool pprof: %w", err)
		}
		worst.Top = trimPprofHeader(string(top))
		out = append(out, worst)
	}
	return out, nil
}

// trimPprofHeader drops the lines of go tool pprof -top before the
// sample totals: the binary's path, build id and time.
func trimPprofHeader(s string) string {
	if i := strings.Index(s, "Duration:"); i >= 0 {
		return s[i:]
	}
	return s
}
