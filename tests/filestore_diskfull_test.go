package tests

import (
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	client "github.com/kiteq/kiteq/client-go"
	"github.com/kiteq/kiteq/registry/binding"
)

// TestProcessFileStoreDiskFull: a kiteq process on a file store whose disk
// (a small tmpfs) fills. Producers publish until store-acks fail, and the
// failure says the disk is full; a consumer then consumes every
// acknowledged message, which must reclaim the disk: new sends succeed
// again without a restart. After a kill -9 and a restart no consumed
// message is delivered again.
func TestProcessFileStoreDiskFull(t *testing.T) {
	const (
		tmpfsSize = 16 << 20
		bodyLen   = 2 << 10
		resends   = 2000
	)
	bin := buildKiteq(t)
	mnt := t.TempDir()
	if err := syscall.Mount("tmpfs", mnt, "tmpfs", 0, fmt.Sprintf("size=%d", tmpfsSize)); err != nil {
		t.Fatalf("cannot mount a tmpfs (the test runs as root, as make test does): %v", err)
	}
	t.Cleanup(func() { syscall.Unmount(mnt, syscall.MNT_DETACH) }) // after the broker is killed
	dir := filepath.Join(mnt, "store")
	addr := freePort(t)
	host, _, _ := net.SplitHostPort(addr)
	_, adminPort, _ := net.SplitHostPort(freePort(t))
	stats := "http://" + net.JoinHostPort(host, adminPort) + "/stats"
	args := []string{"-db=file://" + dir + "?segment=1MiB", "-pport=" + adminPort, "-topics=trade"}
	cmd, stderr, exited := startKiteq(t, bin, addr, args...)
	uri := "static://" + addr
	defer func() {
		if t.Failed() {
			t.Logf("the broker's warnings and errors (the last 8 KiB):\n%s", lastBytes(warnings(stderr.String()), 8<<10))
		}
	}()

	// The consumer group binds persistently and goes away, so that what is
	// published waits on the disk.
	bind := binding.Bind_Direct("c", "trade", "pay-succ", 1000, true)
	c := client.NewKiteQClient(uri, "c", "secret", newRecorder("binder"))
	c.SetBindings([]*binding.Binding{bind})
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	c.Destroy()

	// Fill the disk: four producers until a store-ack fails.
	producer := startClient(t, uri, "p", newRecorder("p"), []string{"trade"})
	body := strings.Repeat("x", bodyLen)
	var (
		mu      sync.Mutex
		acked   []string
		refusal *client.StoreError
		other   error
		stop    atomic.Bool
		wg      sync.WaitGroup
	)
	for range 4 {
		wg.Go(func() {
			for i := 0; i < 4*tmpfsSize/bodyLen && !stop.Load(); i++ {
				m := newMessage("trade", "pay-succ", body)
				err := producer.SendStringMessage(m)
				mu.Lock()
				var se *client.StoreError
				switch {
				case err == nil:
					acked = append(acked, m.GetHeader().GetMessageId())
				case errors.As(err, &se):
					if refusal == nil {
						refusal = se
					}
					stop.Store(true)
				default:
					if other == nil {
						other = err
					}
					stop.Store(true)
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if other != nil {
		t.Fatalf("a send failed for another reason than a refused store-ack: %v", other)
	}
	if refusal == nil {
		t.Fatalf("%d messages of %d bytes were stored on a %d MiB disk and none was refused", len(acked), bodyLen, tmpfsSize>>20)
	}
	usedFull := diskUsed(t, mnt)
	t.Logf("disk full after %d acknowledged sends (%d KiB of %d KiB used): %s", len(acked), usedFull>>10, tmpfsSize>>10, refusal.Feedback)
	// The producer is told why, in the broker's words: the disk is full,
	// and how much room the store wants.
	if !strings.HasPrefix(refusal.Feedback, "store: ") || !strings.Contains(refusal.Feedback, "disk is full") ||
		!regexp.MustCompile(`wants [0-9.]+ [KMG]iB free`).MatchString(refusal.Feedback) {
		t.Errorf("the refused store-ack says %q: want a store error that says the disk is full and how much free space the store wants", refusal.Feedback)
	}

	// Consume every acknowledged message: that must reclaim the disk.
	rec := newRecorder("c")
	consumer := client.NewKiteQClient(uri, "c", "secret", rec)
	consumer.SetBindings([]*binding.Binding{bind})
	if err := consumer.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { consumer.Destroy() }() // replaced after the restart
	eventually(t, 60*time.Second, "every acknowledged message consumed", func() bool {
		return allReceived(rec, acked)
	})

	// New sends succeed again, each within a bounded number of retries,
	// without a restart.
	// (On failure the test goes on to the restart, which shows what a
	// store that could not finish its messages delivers again.)
	var resent []string
	retried := 0
	deadline := time.Now().Add(30 * time.Second)
	var lastErr error
resend:
	for i := 0; i < resends; i++ {
		m := newMessage("trade", "pay-succ", body)
		for {
			err := producer.SendStringMessage(m)
			if err == nil {
				break
			}
			lastErr = err
			if time.Now().After(deadline) {
				t.Errorf("%d of %d sends succeeded after every acknowledged message was consumed; still failing 30 s on: %v", i, resends, lastErr)
				break resend
			}
			retried++
			time.Sleep(20 * time.Millisecond)
		}
		resent = append(resent, m.GetHeader().GetMessageId())
	}
	t.Logf("%d new sends acknowledged after the disk was reclaimed (%d retries; last refusal: %v)", len(resent), retried, lastErr)
	eventually(t, 60*time.Second, "every new message consumed", func() bool { return allReceived(rec, resent) })

	// Every finish is in the store once nothing is in flight.
	var st struct {
		InFlight int64 `json:"inFlight"`
	}
	for deadline := time.Now().Add(30 * time.Second); getJSON(stats, &st) != nil || st.InFlight > 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Errorf("%d messages still in flight 30 s after every one was consumed: their finishes do not reach the store", st.InFlight)
			break
		}
	}
	if used := diskUsed(t, mnt); used >= usedFull {
		t.Errorf("%d KiB of the disk used after everything was consumed, %d KiB when it was full: nothing was reclaimed", used>>10, usedFull>>10)
	}
	consumed := rec.snapshot()
	if len(consumed) != len(acked)+len(resent) {
		t.Errorf("the consumer got %d distinct messages, want %d", len(consumed), len(acked)+len(resent))
	}

	// kill -9 and restart: nothing that was consumed comes again.
	consumer.Destroy()
	cmd.Process.Signal(syscall.SIGKILL)
	<-exited
	_, stderr, _ = startKiteq(t, bin, addr, args...)
	if live := regexp.MustCompile(`"file store opened[^\n]*"live":([0-9]+)`).FindStringSubmatch(stderr.String()); live == nil {
		t.Errorf("the restarted broker did not log the file store's live messages:\n%s", stderr.String())
	} else if live[1] != "0" {
		t.Errorf("the restarted store holds %s live messages, want 0: every message was consumed before the kill", live[1])
	}
	after := newRecorder("c-after")
	consumer = client.NewKiteQClient(uri, "c", "secret", after)
	consumer.SetBindings([]*binding.Binding{bind})
	if err := consumer.Start(); err != nil {
		t.Fatal(err)
	}
	// A message sent after the restart is delivered; what was consumed
	// before the kill, and is due as long ago, would come no later.
	probe := newMessage("trade", "pay-succ", "after the restart")
	if err := producer.SendStringMessage(probe); err != nil {
		t.Errorf("send after the restart: %v", err)
		// Then see what comes without it, for a while.
		for deadline := time.Now().Add(10 * time.Second); len(after.snapshot()) == 0 && time.Now().Before(deadline); {
			time.Sleep(10 * time.Millisecond)
		}
	} else {
		eventually(t, 30*time.Second, "the message sent after the restart", func() bool {
			return after.count(probe.GetHeader().GetMessageId()) > 0
		})
	}
	again := 0
	for id := range after.snapshot() {
		if consumed[id] > 0 {
			again++
		}
	}
	if again > 0 {
		t.Errorf("%d messages consumed before the kill were delivered again after the restart", again)
	}
}

func allReceived(r *recorder, ids []string) bool {
	got := r.snapshot()
	for _, id := range ids {
		if got[id] == 0 {
			return false
		}
	}
	return true
}

// diskUsed is how much of the file system at dir is in use.
func diskUsed(t *testing.T, dir string) int64 {
	t.Helper()
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Blocks-st.Bfree) * st.Bsize
}

// warnings keeps the lines of a zap log above info.
func warnings(log string) string {
	var keep []string
	for _, l := range strings.Split(log, "\n") {
		if !strings.Contains(l, `"level":"info"`) && !strings.Contains(l, `"level":"debug"`) {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "\n")
}

func lastBytes(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}
