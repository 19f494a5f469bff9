package protocol

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestMessageIdForm(t *testing.T) {
	if MessageIdLen != 32 {
		t.Fatalf("MessageIdLen = %d, want 32", MessageIdLen)
	}
	for i := 0; i < 1000; i++ {
		id := MessageId()
		if len(id) != MessageIdLen {
			t.Fatalf("id %q has %d characters", id, len(id))
		}
		if strings.Trim(id, "0123456789abcdef") != "" {
			t.Fatalf("id %q is not lowercase hex", id)
		}
		if !ValidMessageId(id) {
			t.Fatalf("ValidMessageId(%q) = false", id)
		}
	}
}

func TestMessageIdSortsByTime(t *testing.T) {
	// The first 8 hex characters are the unix seconds, so ids of one process
	// roughly sort by time.
	before := time.Now().Unix()
	id := MessageId()
	after := time.Now().Unix()
	var sec int64
	if _, err := fmt.Sscanf(id[:8], "%08x", &sec); err != nil {
		t.Fatal(err)
	}
	if sec < before || sec > after {
		t.Fatalf("id %q carries second %d, want within [%d, %d]", id, sec, before, after)
	}
}

func TestValidMessageId(t *testing.T) {
	good := []string{
		"0123456789abcdef0123456789abcdef",
		"00000000000000000000000000000000",
		"ffffffffffffffffffffffffffffffff",
	}
	bad := []string{
		"",
		"0123456789abcdef0123456789abcde",   // 31
		"0123456789abcdef0123456789abcdef0", // 33
		"0123456789ABCDEF0123456789ABCDEF",  // uppercase
		"0123456789abcdef0123456789abcdeF",
		"0123456789abcdef0123456789abcdeg", // not hex
		"0123456789abcdef-123456789abcdef",
		"0123456789abcdef0123456789abcd\x00f",
		"0123456789abcdef0123456789abcdé", // 32 bytes, not ASCII
		" 123456789abcdef0123456789abcdef",
	}
	for _, id := range good {
		if !ValidMessageId(id) {
			t.Errorf("ValidMessageId(%q) = false", id)
		}
	}
	for _, id := range bad {
		if ValidMessageId(id) {
			t.Errorf("ValidMessageId(%q) = true", id)
		}
	}
}

func TestMessageIdUniqueInProcess(t *testing.T) {
	const goroutines, total = 8, 1_000_000
	per := total / goroutines
	ids := make([][]string, goroutines)
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out := make([]string, per)
			for i := range out {
				out[i] = MessageId()
			}
			ids[g] = out
		}()
	}
	wg.Wait()
	seen := make(map[string]struct{}, total)
	for _, out := range ids {
		for _, id := range out {
			if _, dup := seen[id]; dup {
				t.Fatalf("duplicate id %s", id)
			}
			seen[id] = struct{}{}
		}
	}
	if len(seen) != total {
		t.Fatalf("%d distinct ids, want %d", len(seen), total)
	}
}

// childIdsEnv marks a child process of TestMessageIdUniqueAcrossProcesses.
const childIdsEnv = "KITEQ_PROTOCOL_ID_CHILD"

const childIds = 50_000

func TestMessageIdUniqueAcrossProcesses(t *testing.T) {
	if os.Getenv(childIdsEnv) == "1" {
		w := bufio.NewWriter(os.Stdout)
		for i := 0; i < childIds; i++ {
			w.WriteString(MessageId())
			w.WriteByte('\n')
		}
		if err := w.Flush(); err != nil {
			t.Fatal(err)
		}
		return
	}

	const children = 4
	outs := make([][]byte, children)
	errs := make([]error, children)
	var wg sync.WaitGroup
	for c := range children {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cmd := exec.Command(os.Args[0], "-test.run=^TestMessageIdUniqueAcrossProcesses$", "-test.count=1")
			cmd.Env = append(os.Environ(), childIdsEnv+"=1")
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			outs[c], errs[c] = cmd.Output()
			if errs[c] != nil {
				errs[c] = fmt.Errorf("child %d: %w\n%s", c, errs[c], stderr.Bytes())
			}
		}()
	}
	seen := make(map[string]int, (children+1)*childIds)
	for i := 0; i < childIds; i++ {
		seen[MessageId()] = -1
	}
	wg.Wait()
	for c, out := range outs {
		if errs[c] != nil {
			t.Fatal(errs[c])
		}
		n := 0
		for _, line := range strings.Split(string(out), "\n") {
			if !ValidMessageId(line) {
				continue // the test framework's own output, such as PASS
			}
			n++
			if prev, dup := seen[line]; dup {
				t.Fatalf("id %s from child %d already came from %d (-1 is the parent)", line, c, prev)
			}
			seen[line] = c
		}
		if n != childIds {
			t.Fatalf("child %d printed %d ids, want %d:\n%.500s", c, n, childIds, out)
		}
	}
	if len(seen) != (children+1)*childIds {
		t.Fatalf("%d distinct ids, want %d", len(seen), (children+1)*childIds)
	}
}

// TestMessageIdUnguessable checks that an id says nothing of the next one:
// after the seconds, consecutive ids share no more than chance would have
// them share (no per-process prefix, no counter).
func TestMessageIdUnguessable(t *testing.T) {
	const n = 2000
	prev := MessageId()
	sameBytes, counterSteps := 0, 0
	for i := 0; i < n; i++ {
		id := MessageId()
		a, b := prev[8:], id[8:]
		for j := 0; j+2 <= len(a); j += 2 {
			if a[j:j+2] == b[j:j+2] {
				sameBytes++
			}
		}
		if a[:16] == b[:16] {
			counterSteps++ // the same 8 bytes in a row: a fixed part
		}
		prev = id
	}
	// 12 random bytes a pair: one byte in 256 is equal by chance, so about
	// 94 in 2000 pairs; a fixed 8-byte part would make it 16,000 or more.
	if sameBytes > 300 {
		t.Fatalf("consecutive ids share %d of %d random bytes: ids have a predictable part", sameBytes, 12*n)
	}
	if counterSteps > 0 {
		t.Fatalf("%d of %d consecutive ids share 8 bytes after the seconds", counterSteps, n)
	}
}
