package tests

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	client "github.com/kiteq/kiteq/client-go"
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
			cmd := exec.Command(bin, "-bind="+addr, "-pport=0", "-db=memory://", "-topics=trade", "-auth=open")
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
	out, err := exec.Command(bin, "-bind=127.0.0.1:0", "-pport=0", "-db=cassandra://x", "-auth=open").CombinedOutput()
	ee, ok := err.(*exec.ExitError)
	if !ok || ee.ExitCode() != 2 {
		t.Fatalf("exit %v, want code 2\n%s", err, out)
	}
	if !strings.Contains(string(out), "unknown store") || !strings.Contains(string(out), "memory://") {
		t.Fatalf("error does not name the accepted stores:\n%s", out)
	}
}

// startKiteq runs the kiteq binary with args and waits until it listens.
// The returned channel is closed when the process has exited.
func startKiteq(t *testing.T, bin, addr string, args ...string) (*exec.Cmd, *syncBuffer, chan struct{}) {
	t.Helper()
	stderr := &syncBuffer{}
	cmd, exited := startKiteqTo(t, stderr, bin, addr, args...)
	return cmd, stderr, exited
}

// startKiteqTo is startKiteq with the process's stderr going to stderr.
func startKiteqTo(t *testing.T, stderr io.Writer, bin, addr string, args ...string) (*exec.Cmd, chan struct{}) {
	t.Helper()
	base := []string{"-bind=" + addr, "-pport=0"}
	if !slices.ContainsFunc(args, func(a string) bool { return strings.HasPrefix(a, "-auth") }) {
		base = append(base, "-auth=open") // the tests' brokers are on loopback
	}
	cmd := exec.Command(bin, append(base, args...)...)
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() {
		cmd.Wait()
		close(exited)
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
	})
	eventually(t, 10*time.Second, "broker listening", func() bool {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	return cmd, exited
}

// syncBuffer is a bytes.Buffer that a process writes while the test reads.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// TestProcessFileStoreSurvivesSIGKILL: on the file store, messages that
// were acknowledged before the broker was killed with SIGKILL, and the
// persistent binding of a group that was offline, are there after a
// restart: the group receives every message once it connects.
func TestProcessFileStoreSurvivesSIGKILL(t *testing.T) {
	bin := buildKiteq(t)
	addr := freePort(t)
	db := "-db=file://" + t.TempDir()
	cmd, stderr, exited := startKiteq(t, bin, addr, db)

	// The consumer binds persistently, then goes away.
	binder := newRecorder("binder")
	c := client.NewKiteQClient("static://"+addr, "g", "secret", binder)
	c.SetBindings([]*binding.Binding{binding.Bind_Direct("g", "trade", "pay-succ", 100, true)})
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	c.Destroy()

	producer := client.NewKiteQClient("static://"+addr, "p", "secret", newRecorder("p"))
	producer.SetTopics([]string{"trade"})
	if err := producer.Start(); err != nil {
		t.Fatal(err)
	}
	var ids []string
	for i := range 50 {
		m := newMessage("trade", "pay-succ", fmt.Sprintf("kept #%d", i))
		if err := producer.SendStringMessage(m); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, m.GetHeader().GetMessageId())
	}
	producer.Destroy()

	cmd.Process.Signal(syscall.SIGKILL)
	<-exited
	_, stderr, _ = startKiteq(t, bin, addr, db)

	rec := newRecorder("c")
	startClient(t, "static://"+addr, "g", rec, nil, binding.Bind_Direct("g", "trade", "pay-succ", 100, true))
	defer func() {
		if t.Failed() {
			t.Log(stderr.String())
		}
	}()
	eventually(t, 15*time.Second, "every message after the restart", func() bool {
		for _, id := range ids {
			if rec.count(id) == 0 {
				return false
			}
		}
		return true
	})
	if len(binder.snapshot()) != 0 {
		t.Fatalf("the offline consumer got %d messages before the kill", len(binder.snapshot()))
	}
	if !strings.Contains(stderr.String(), `"live":50`) {
		t.Fatalf("the restarted store did not report 50 live messages:\n%s", stderr.String())
	}
}
