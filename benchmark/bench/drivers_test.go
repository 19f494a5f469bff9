package bench

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// runShort runs a one-second throughput run and a small drain against d at
// tier, and checks that every confirmed message was delivered, once.
func runShort(t *testing.T, d Driver, tier Tier) {
	t.Helper()
	ctx := t.Context()
	info, err := d.Start(ctx, tier)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Stop()
	for _, cfg := range []RunConfig{
		{Workload: Throughput, Tier: tier, Size: 512, Publishers: 8, Duration: time.Second, DrainWait: 10 * time.Second},
		{Workload: Drain, Tier: tier, Size: 512, Publishers: 8, Backlog: 2000, DrainWait: 10 * time.Second},
	} {
		r, err := Run(ctx, d, info, "t"+string(cfg.Workload)+time.Now().Format("150405.000000")[7:], cfg)
		if err != nil {
			t.Fatalf("%s: %v", cfg.Workload, err)
		}
		t.Logf("%s %s %s: published %d (%.0f/s), delivered %d, lost %d, dup %d, broker CPU %.2fs, peak RSS %d MiB",
			r.System, tier, cfg.Workload, r.Published, r.PublishedRate, r.Delivered, r.Lost, r.Duplicates,
			r.Usage.CPUSeconds, r.Usage.PeakRSSBytes>>20)
		if r.Published == 0 || r.Lost != 0 || r.Duplicates != 0 || r.PublishErrors != 0 {
			t.Fatalf("%s: published %d, lost %d, duplicates %d, errors %d", cfg.Workload, r.Published, r.Lost, r.Duplicates, r.PublishErrors)
		}
		if info.PID != 0 && r.Usage.CPUSeconds <= 0 {
			t.Fatalf("%s: no broker CPU time read for pid %d", cfg.Workload, info.PID)
		}
	}
}

// binDir holds the servers the tests build, once each.
var binDir string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "kiteq-bench-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

var builds sync.Map // package path: func() (string, error)

// build builds the main package pkg into binDir, once.
func build(t *testing.T, pkg string) string {
	t.Helper()
	once, _ := builds.LoadOrStore(pkg, sync.OnceValues(func() (string, error) {
		bin := filepath.Join(binDir, filepath.Base(strings.TrimSuffix(pkg, "/v2")))
		if out, err := exec.Command("go", "build", "-o", bin, pkg).CombinedOutput(); err != nil {
			return "", fmt.Errorf("build %s: %v\n%s", pkg, err, out)
		}
		return bin, nil
	}))
	bin, err := once.(func() (string, error))()
	if err != nil {
		t.Fatal(err)
	}
	return bin
}

// kiteqBin is the broker of this checkout; natsBin is nats-server of the
// version this module requires (the tool line of go.mod).
func kiteqBin(t *testing.T) string { return build(t, "github.com/kiteq/kiteq/broker/cmd/kiteq") }
func natsBin(t *testing.T) string  { return build(t, "github.com/nats-io/nats-server/v2") }

// The KiteQ driver against a broker built from this checkout, on the
// file store with fsync=always.
func TestKiteQDriver(t *testing.T) {
	runShort(t, &KiteQ{Bin: kiteqBin(t)}, TierSynced)
}

// The RabbitMQ driver against the server every machine runs on
// 127.0.0.1:5672, durable and confirmed.
func TestRabbitMQDriver(t *testing.T) {
	r := &RabbitMQ{URL: "amqp://guest:guest@127.0.0.1:5672/"}
	if _, err := r.Start(context.Background(), TierWritten); err != ErrTierUnsupported {
		t.Fatalf("the written tier: %v, want ErrTierUnsupported", err)
	}
	runShort(t, r, TierSynced)
}

// The NATS driver against nats-server built from the version this module
// requires (the tool line of go.mod), with sync_interval always.
func TestNATSDriver(t *testing.T) {
	runShort(t, &NATS{Bin: natsBin(t)}, TierMemory)
}
