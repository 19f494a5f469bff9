package tests

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"hash/crc32"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	client "github.com/kiteq/kiteq/client-go"
	"github.com/kiteq/kiteq/registry/binding"
)

// A record in a segment file of the file store, read by the framing the
// store documents (u32 length, u32 CRC-32C of the payload, payload: kind,
// 16-byte message id, …), independently of its code.
type segRecord struct {
	off, size int64
	kind      byte
	id        string
}

const recKindSave = 1

// readSegment returns the whole, checksummed records of a segment file,
// from its start up to anything else.
func readSegment(t *testing.T, path string) ([]byte, []segRecord) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	table := crc32.MakeTable(crc32.Castagnoli)
	var recs []segRecord
	for off := int64(0); off+8 <= int64(len(data)); {
		n := int64(binary.LittleEndian.Uint32(data[off:]))
		if n < 17 || off+8+n > int64(len(data)) || crc32.Checksum(data[off+8:off+8+n], table) != binary.LittleEndian.Uint32(data[off+4:]) {
			break
		}
		recs = append(recs, segRecord{off: off, size: 8 + n, kind: data[off+8], id: hex.EncodeToString(data[off+9 : off+25])})
		off += 8 + n
	}
	return data, recs
}

// segmentPaths lists the segment files of dir in log order.
func segmentPaths(t *testing.T, dir string) []string {
	t.Helper()
	paths, err := filepath.Glob(filepath.Join(dir, "*.seg"))
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(paths) // zero-padded numbers
	return paths
}

// bindOffline binds group g persistently to trade/pay-succ and leaves, so
// that what is published waits in the store.
func bindOffline(t *testing.T, uri string) *binding.Binding {
	t.Helper()
	bind := binding.Bind_Direct("g", "trade", "pay-succ", 1000, true)
	c := client.NewKiteQClient(uri, "g", "secret", newRecorder("binder"))
	c.SetBindings([]*binding.Binding{bind})
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	c.Destroy()
	return bind
}

// publishUntil has 8 goroutines publish 1 KiB messages through one
// producer until stop is closed, and returns the ids whose store-ack
// succeeded (set once the goroutines are done).
func publishUntil(t *testing.T, uri string, stop <-chan struct{}, acked func(n int)) func() map[string]bool {
	t.Helper()
	producer := client.NewKiteQClient(uri, "p", "secret", newRecorder("p"))
	producer.SetTopics([]string{"trade"})
	if err := producer.Start(); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	ids := make(map[string]bool)
	var wg sync.WaitGroup
	body := strings.Repeat("k", 1<<10)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				m := newMessage("trade", "pay-succ", body)
				if err := producer.SendStringMessage(m); err != nil {
					continue // not acknowledged: the broker may be going
				}
				mu.Lock()
				ids[m.GetHeader().GetMessageId()] = true
				n := len(ids)
				mu.Unlock()
				acked(n)
			}
		}()
	}
	return func() map[string]bool {
		wg.Wait()
		producer.Destroy()
		return ids
	}
}

// missing returns how many of ids rec has not received, and one of them.
func missing(rec *recorder, ids map[string]bool) (int, string) {
	n, one := 0, ""
	for id := range ids {
		if rec.count(id) == 0 {
			n, one = n+1, id
		}
	}
	return n, one
}

// TestProcessFileStoreCorruptRecordCostsOnlyIt: the broker on the file
// store with 1 MiB segments is killed with SIGKILL under load; then one
// byte of the save of an acknowledged message, in the middle of a closed
// segment, is flipped. After a restart the consumer receives every other
// acknowledged message, and the broker's log names the lost one by id.
// (Before, the store cut that segment at the damaged record: every message
// after it in the segment was lost, and none was named.)
func TestProcessFileStoreCorruptRecordCostsOnlyIt(t *testing.T) {
	bin := buildKiteq(t)
	addr := freePort(t)
	dir := t.TempDir()
	args := []string{"-db=file://" + dir + "?segment=1MiB", "-topics=trade"}
	cmd, _, exited := startKiteq(t, bin, addr, args...)
	uri := "static://" + addr
	bind := bindOffline(t, uri)

	stop := make(chan struct{})
	enough := make(chan struct{})
	var once sync.Once
	wait := publishUntil(t, uri, stop, func(n int) {
		if n >= 4000 { // about 4 segments
			once.Do(func() { close(enough) })
		}
	})
	select {
	case <-enough:
	case <-time.After(60 * time.Second):
		t.Fatal("4000 messages were not acknowledged within 60 s")
	}
	cmd.Process.Signal(syscall.SIGKILL) // the producers are still sending
	<-exited
	close(stop)
	acked := wait()

	segs := segmentPaths(t, dir)
	if len(segs) < 3 {
		t.Fatalf("%d segments: want a closed one between others", len(segs))
	}
	path := segs[len(segs)/2-1+len(segs)%2] // a closed segment, neither the first nor the last when there are 3 or more
	data, recs := readSegment(t, path)
	victim := segRecord{}
	for _, r := range recs[len(recs)/2:] {
		if r.kind == recKindSave && acked[r.id] {
			victim = r
			break
		}
	}
	if victim.size == 0 {
		t.Fatalf("no save of an acknowledged message in the second half of %s (%d records)", path, len(recs))
	}
	data[victim.off+victim.size-1] ^= 0x01
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}

	_, stderr, _ := startKiteq(t, bin, addr, args...)
	defer func() {
		if t.Failed() {
			t.Logf("the broker's log (the last 8 KiB):\n%s", lastBytes(stderr.String(), 8<<10))
		}
	}()
	rec := newRecorder("g")
	startClient(t, uri, "g", rec, nil, bind)
	delete(acked, victim.id)
	deadline := time.Now().Add(30 * time.Second)
	for n, one := missing(rec, acked); n > 0; n, one = missing(rec, acked) {
		if time.Now().After(deadline) {
			t.Fatalf("after the restart %d of %d acknowledged messages were not delivered in 30 s (%s, for one)", n, len(acked), one)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if n := rec.count(victim.id); n != 0 {
		t.Fatalf("the message whose record was damaged was delivered %d times", n)
	}
	var line string
	for _, l := range strings.Split(stderr.String(), "\n") {
		if strings.Contains(l, "skipped a damaged region of the log") && strings.Contains(l, `"probableId":"`+victim.id+`"`) {
			line = l
		}
	}
	if line == "" || !strings.Contains(line, `"level":"warn"`) || !strings.Contains(line, fmt.Sprintf(`"offset":%d`, victim.off)) ||
		!strings.Contains(line, filepath.Base(path)) {
		t.Fatalf("the broker's log has no warning naming %s at offset %d of %s", victim.id, victim.off, filepath.Base(path))
	}
	t.Logf("%d acknowledged messages in %d segments; the save of %s at offset %d of %s damaged; every other one delivered; logged: %s",
		len(acked)+1, len(segs), victim.id, victim.off, filepath.Base(path), line)
}

// TestProcessFileStoreMissingSegment: a segment file deleted from the
// middle of the log stops the broker at start, with an error that names
// the file and the way out (before, it started without a word and its
// messages were gone). Started with accept-missing-segments=true it runs,
// says so, and delivers every acknowledged message of the other segments.
func TestProcessFileStoreMissingSegment(t *testing.T) {
	bin := buildKiteq(t)
	addr := freePort(t)
	dir := t.TempDir()
	db := "-db=file://" + dir + "?segment=1MiB"
	cmd, _, exited := startKiteq(t, bin, addr, db, "-topics=trade")
	uri := "static://" + addr
	bind := bindOffline(t, uri)
	stop := make(chan struct{})
	enough := make(chan struct{})
	var once sync.Once
	wait := publishUntil(t, uri, stop, func(n int) {
		if n >= 3000 {
			once.Do(func() { close(enough) })
		}
	})
	select {
	case <-enough:
	case <-time.After(60 * time.Second):
		t.Fatal("3000 messages were not acknowledged within 60 s")
	}
	close(stop)
	acked := wait()
	cmd.Process.Signal(syscall.SIGTERM)
	<-exited

	segs := segmentPaths(t, dir)
	if len(segs) < 3 {
		t.Fatalf("%d segments: want one between others", len(segs))
	}
	gone := segs[1]
	_, recs := readSegment(t, gone)
	saves := 0
	for _, r := range recs {
		if r.kind == recKindSave {
			delete(acked, r.id) // lost with the file
			saves++
		}
	}
	if err := os.Remove(gone); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, "-bind="+addr, "-pport=0", "-auth=open", db, "-topics=trade").CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("the broker with %s missing was still running after 20 s: it started without it\n%s", filepath.Base(gone), lastBytes(string(out), 4<<10))
	}
	ee, ok := err.(*exec.ExitError)
	if !ok || ee.ExitCode() <= 0 {
		t.Fatalf("the broker with %s missing: %v, want a start that fails\n%s", filepath.Base(gone), err, lastBytes(string(out), 4<<10))
	}
	if !strings.Contains(string(out), filepath.Base(gone)) || !strings.Contains(string(out), "accept-missing-segments=true") {
		t.Fatalf("the error does not name %s and the way to start without it:\n%s", filepath.Base(gone), lastBytes(string(out), 4<<10))
	}

	_, stderr, _ := startKiteq(t, bin, addr, db+"&accept-missing-segments=true", "-topics=trade")
	defer func() {
		if t.Failed() {
			t.Logf("the broker's log (the last 8 KiB):\n%s", lastBytes(stderr.String(), 8<<10))
		}
	}()
	rec := newRecorder("g")
	startClient(t, uri, "g", rec, nil, bind)
	deadline := time.Now().Add(30 * time.Second)
	for n, one := missing(rec, acked); n > 0; n, one = missing(rec, acked) {
		if time.Now().After(deadline) {
			t.Fatalf("%d of the %d acknowledged messages of the other segments were not delivered in 30 s (%s, for one)", n, len(acked), one)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !strings.Contains(stderr.String(), "started without missing segments") || !strings.Contains(stderr.String(), filepath.Base(gone)) {
		t.Fatal("the broker's log does not say it started without the missing segment")
	}
	t.Logf("%d segments, %s removed with %d saves: refused at start (%s); with accept-missing-segments=true the %d acknowledged messages of the others were delivered",
		len(segs), filepath.Base(gone), saves, firstLineWith(string(out), "cannot start"), len(acked))
}

// firstLineWith returns the first line of s that holds sub, cut to 600
// bytes.
func firstLineWith(s, sub string) string {
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			if len(l) > 600 {
				l = l[:600] + "…"
			}
			return l
		}
	}
	return ""
}
