package tests

import (
	"bytes"
	"net"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kiteq/kiteq/registry/binding"
)

// buildKiteq builds cmd/kiteq into a temporary directory.
func buildKiteq(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "kiteq")
	out, err := exec.Command("go", "build", "-o", bin, "github.com/kiteq/kiteq/broker/cmd/kiteq").CombinedOutput()
	if err != nil {
		t.Fatalf("build kiteq: %v\n%s", err, out)
	}
	return bin
}

func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// TestProcessGracefulShutdown runs the kiteq binary, publishes and consumes
// through it, and stops it with SIGTERM and SIGINT: it exits 0 after
// logging that it stopped.
func TestProcessGracefulShutdown(t *testing.T) {
	bin := buildKiteq(t)
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		t.Run(sig.String(), func(t *testing.T) {
			addr := freePort(t)
			var stderr bytes.Buffer
			cmd := exec.Command(bin, "-bind="+addr, "-pport=0", "-db=memory://", "-topics=trade")
			cmd.Stderr = &stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			exited := make(chan error, 1)
			go func() { exited <- cmd.Wait() }()
			t.Cleanup(func() {
				if cmd.ProcessState == nil {
					cmd.Process.Kill()
					<-exited
				}
			})
			eventually(t, 10*time.Second, "broker listening", func() bool {
				c, err := net.Dial("tcp", addr)
				if err == nil {
					c.Close()
				}
				return err == nil
			})

			rec := newRecorder("c")
			startClient(t, "static://"+addr, "g", rec, nil, binding.Bind_Direct("g", "trade", "pay-succ", 100, true))
			producer := startClient(t, "static://"+addr, "p", newRecorder("p"), []string{"trade"})
			m := newMessage("trade", "pay-succ", "through the binary")
			if err := producer.SendStringMessage(m); err != nil {
				t.Fatal(err)
			}
			eventually(t, 5*time.Second, "delivery", func() bool { return rec.count(m.GetHeader().GetMessageId()) == 1 })

			cmd.Process.Signal(sig)
			select {
			case err := <-exited:
				if err != nil {
					t.Fatalf("exit: %v\n%s", err, stderr.String())
				}
			case <-time.After(15 * time.Second):
				t.Fatalf("still running 15 s after %s\n%s", sig, stderr.String())
			}
			if !strings.Contains(stderr.String(), "broker stopped") {
				t.Fatalf("no 'broker stopped' in the log:\n%s", stderr.String())
			}
		})
	}
}

// TestProcessBadFlags: a broker with a store it does not know exits 2 with
// an error that names the accepted stores.
func TestProcessBadFlags(t *testing.T) {
	bin := buildKiteq(t)
	out, err := exec.Command(bin, "-bind=127.0.0.1:0", "-pport=0", "-db=cassandra://x").CombinedOutput()
	ee, ok := err.(*exec.ExitError)
	if !ok || ee.ExitCode() != 2 {
		t.Fatalf("exit %v, want code 2\n%s", err, out)
	}
	if !strings.Contains(string(out), "unknown store") || !strings.Contains(string(out), "memory://") {
		t.Fatalf("error does not name the accepted stores:\n%s", out)
	}
}
