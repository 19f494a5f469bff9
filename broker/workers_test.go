package broker

import (
	"testing"
	"time"
)

func (p *workers) idleCount() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.idle)
}

// waitIdle waits until n workers are idle.
func waitIdle(t *testing.T, p *workers, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for p.idleCount() != n {
		if time.Now().After(deadline) {
			t.Fatalf("%d idle workers, want %d", p.idleCount(), n)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestWorkersReuseAnIdleWorker(t *testing.T) {
	p := newWorkers(time.Minute)
	defer p.stop()
	ran := make(chan int, 2)
	p.Go(func() { ran <- 1 })
	<-ran
	waitIdle(t, p, 1)
	first := p.idle[0]
	p.Go(func() { ran <- 2 })
	if got := <-ran; got != 2 {
		t.Fatalf("ran %d", got)
	}
	waitIdle(t, p, 1)
	if p.idle[0] != first {
		t.Fatal("the second task started a new worker while one was idle")
	}
}

// A task that waits does not hold up the next: it gets a worker of its own.
func TestWorkersWaitingTaskDoesNotBlockOthers(t *testing.T) {
	p := newWorkers(time.Minute)
	defer p.stop()
	release := make(chan struct{})
	done := make(chan struct{})
	p.Go(func() { <-release })
	p.Go(func() { close(done) })
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the second task waited for the first")
	}
	close(release)
	waitIdle(t, p, 2)
}

func TestWorkersTrimEndsLongIdleWorkers(t *testing.T) {
	p := newWorkers(time.Second)
	defer p.stop()
	done := make(chan struct{}, 2)
	release := make(chan struct{})
	p.Go(func() { <-release; done <- struct{}{} })
	p.Go(func() { done <- struct{}{} })
	<-done
	waitIdle(t, p, 1)
	p.mu.Lock()
	p.idle[0].since = time.Now().Add(-2 * time.Second)
	p.mu.Unlock()
	close(release)
	<-done
	waitIdle(t, p, 2)
	p.trim(time.Now())
	if n := p.idleCount(); n != 1 {
		t.Fatalf("%d idle workers after trim, want 1 (the recent one)", n)
	}
}

func TestWorkersRunTasksAfterStop(t *testing.T) {
	p := newWorkers(time.Minute)
	ran := make(chan struct{})
	p.Go(func() { ran <- struct{}{} })
	<-ran
	waitIdle(t, p, 1)
	p.stop()
	if n := p.idleCount(); n != 0 {
		t.Fatalf("%d idle workers after stop", n)
	}
	p.Go(func() { close(ran) })
	select {
	case <-ran:
	case <-time.After(5 * time.Second):
		t.Fatal("a task given after stop did not run")
	}
	if n := p.idleCount(); n != 0 {
		t.Fatalf("a worker went idle after stop: %d", n)
	}
}
