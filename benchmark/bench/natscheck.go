package bench

import (
	"context"
	"fmt"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

// NATSCheckResult compares, at one C, the publish rate kiteq-bench
// measures for NATS with the one nats bench measures.
type NATSCheckResult struct {
	Publishers int       `json:"publishers"`
	Tool       []float64 `json:"toolPerSec"`
	NATSBench  []float64 `json:"natsBenchPerSec"`
	Ratio      float64   `json:"ratio"` // median tool ÷ median nats bench
}

// NATSCheck shows that the tool is not what limits the numbers it
// reports: on one nats-server (JetStream memory storage), for each C, it
// alternates rounds of nats bench (natsCLI bench js pub sync: C clients,
// a connection each, msgs messages of size bytes, a limits stream) and of
// its own publish phase in the same setup, and compares the medians.
func NATSCheck(ctx context.Context, natsServer, natsCLI string, cs []int, size, msgs, rounds int) ([]NATSCheckResult, ServerInfo, error) {
	n := &NATS{Bin: natsServer, ConnPerPublisher: true, Limits: true}
	info, err := n.Start(ctx, TierMemory)
	if err != nil {
		return nil, info, err
	}
	defer n.Stop()
	info.Version += ", nats bench (natscli)"
	if out, err := exec.Command(natsCLI, "--version").CombinedOutput(); err == nil {
		info.Version += " " + strings.TrimSpace(string(out))
	}
	var out []NATSCheckResult
	for _, c := range cs {
		r := NATSCheckResult{Publishers: c}
		for i := range rounds {
			rate, err := natsBench(ctx, natsCLI, n.URL(), c, size, msgs)
			if err != nil {
				return out, info, err
			}
			r.NATSBench = append(r.NATSBench, rate)
			res, err := Run(ctx, n, info, fmt.Sprintf("check%d%d%d", c, i, time.Now().UnixNano()%1e6), RunConfig{
				Workload: Drain, Tier: TierMemory, Size: size, Publishers: c, Backlog: msgs, DrainWait: time.Minute,
			})
			if err != nil {
				return out, info, err
			}
			r.Tool = append(r.Tool, res.PublishedRate)
		}
		r.Ratio = median(r.Tool) / median(r.NATSBench)
		out = append(out, r)
	}
	return out, info, nil
}

var natsBenchRate = regexp.MustCompile(`publisher (?:aggregated )?stats: ([\d,]+) msgs/sec`)

func natsBench(ctx context.Context, cli, url string, c, size, msgs int) (float64, error) {
	cmd := exec.CommandContext(ctx, cli, "bench", "js", "pub", "sync", "--clients="+strconv.Itoa(c), "--msgs="+strconv.Itoa(msgs),
		fmt.Sprintf("--size=%dB", size), "--storage=memory", "--create", "--purge", "--no-progress", "-s", url, "bench.check")
	b, err := cmd.CombinedOutput()
	if err != nil {
		return 0, fmt.Errorf("nats bench: %v\n%s", err, b)
	}
	m := natsBenchRate.FindSubmatch(b)
	if m == nil {
		return 0, fmt.Errorf("nats bench printed no rate:\n%s", b)
	}
	return strconv.ParseFloat(strings.ReplaceAll(string(m[1]), ",", ""), 64)
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	return s[len(s)/2]
}
