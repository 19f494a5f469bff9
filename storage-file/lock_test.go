package filestore

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kiteq/kiteq/protocol"
)

// Two brokers must never open one directory: the store holds a lock on it
// from Open to Close.

const lockEnv = "KITEQ_FILESTORE_LOCK_CHILD" // <mode>:<dir>

func checkInUse(t *testing.T, err error, dir string) {
	t.Helper()
	if err == nil {
		t.Fatal("a second Open of the directory succeeded")
	}
	if msg := err.Error(); !strings.Contains(msg, "in use") || !strings.Contains(msg, dir) {
		t.Fatalf("a second Open failed with %q: want it to say that %s is in use", msg, dir)
	}
}

func saveOne(t *testing.T, s *Store) string {
	t.Helper()
	id := protocol.MessageId()
	if stored, err := s.Save(context.Background(), faultMessage(id, true, time.Now().UnixMilli(), 5)); err != nil || !stored {
		t.Fatalf("save: stored=%v err=%v", stored, err)
	}
	return id
}

func TestLockSameProcess(t *testing.T) {
	dir := t.TempDir()
	s1 := openTest(t, dir, nil)
	id := saveOne(t, s1)
	_, err := Open(DefaultOptions(dir), nil)
	checkInUse(t, err, dir)
	// The failed Open left the first store alone.
	saveOne(t, s1)
	if _, err := s1.Get(context.Background(), id); err != nil {
		t.Fatal(err)
	}
	if err := s1.Close(); err != nil {
		t.Fatal(err)
	}
	s2 := openTest(t, dir, nil)
	if _, err := s2.Get(context.Background(), id); err != nil {
		t.Fatalf("after Close, a new Open: %v", err)
	}
	if err := s2.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestLockOtherProcess: a child process cannot open a directory this one
// holds; this one cannot open a directory a child holds, until the child
// dies — killed, without Close: the kernel drops the lock with the process,
// so a crashed broker never blocks its restart.
func TestLockOtherProcess(t *testing.T) {
	dir := t.TempDir()

	// This process holds the directory; a child tries it.
	s := openTest(t, dir, nil)
	id := saveOne(t, s)
	cmd, stderr := childCommand("TestLockChild", lockEnv+"=try:"+dir)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("child: %v\n%s\nstderr: %s", err, out, tail(stderr.Bytes(), 2000))
	}
	msg, ok := strings.CutPrefix(firstLine(string(out), "open: "), "open: ")
	if !ok {
		t.Fatalf("the child did not report its Open: %s", out)
	}
	if !strings.Contains(msg, "in use") || !strings.Contains(msg, dir) {
		t.Fatalf("the child's Open of a held directory reported %q, want an error saying %s is in use", msg, dir)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	// A child holds the directory; this process tries it.
	cmd, stderr = childCommand("TestLockChild", lockEnv+"=hold:"+dir)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cmd.StdinPipe(); err != nil { // the child holds until its stdin closes
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(stdout)
	line, err := br.ReadString('\n')
	if err != nil || strings.TrimSpace(line) != "open: ok" {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("the holding child said %q (%v)\nstderr: %s", line, err, tail(stderr.Bytes(), 2000))
	}
	_, err = Open(DefaultOptions(dir), nil)
	checkInUse(t, err, dir)
	cmd.Process.Signal(syscall.SIGKILL)
	io.Copy(io.Discard, br)
	cmd.Wait()
	s = openTest(t, dir, nil)
	defer s.Close()
	if _, err := s.Get(context.Background(), id); err != nil {
		t.Fatalf("open after the holder was killed: %v", err)
	}
}

func firstLine(out, prefix string) string {
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, prefix) {
			return l
		}
	}
	return ""
}

// TestLockChild is the child of TestLockOtherProcess; TestMain leaves it out
// of a plain run. "try" opens the directory and reports the outcome;
// "hold" opens it and keeps it until stdin closes.
func TestLockChild(t *testing.T) {
	mode, dir, ok := strings.Cut(os.Getenv(lockEnv), ":") // TestMain runs this only as a child
	if !ok {
		t.Fatalf("%s=%q: want mode:dir", lockEnv, os.Getenv(lockEnv))
	}
	s, err := Open(DefaultOptions(dir), nil)
	if err != nil {
		fmt.Printf("open: %v\n", err)
		return
	}
	fmt.Println("open: ok")
	if mode == "hold" {
		io.Copy(io.Discard, os.Stdin)
	}
	s.Close()
}
