package bench

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// Usage is what a server process spent during a run.
type Usage struct {
	CPUSeconds float64 `json:"cpuSeconds"`
	// PeakRSSBytes is the most resident memory seen during the run.
	PeakRSSBytes int64 `json:"peakRSSBytes"`
}

// procWatch samples a process's CPU time and resident memory.
type procWatch struct {
	pid      int
	startCPU float64
	peak     int64
	stop     chan struct{}
	done     chan struct{}
}

// clkTck is the unit of the CPU times in /proc/<pid>/stat (USER_HZ,
// 100 on Linux).
const clkTck = 100

// cpuSeconds is the user and system CPU time of pid so far.
func cpuSeconds(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name, in parentheses, may hold spaces: fields count
	// from the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no command name", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	utime, err1 := strconv.ParseFloat(f[11], 64) // field 14
	stime, err2 := strconv.ParseFloat(f[12], 64) // field 15
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("/proc/%d/stat: bad CPU times", pid)
	}
	return (utime + stime) / clkTck, nil
}

// rssBytes is the resident memory of pid now.
func rssBytes(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("/proc/%d/status: no VmRSS", pid)
}

// watchProc starts sampling pid every 50 ms; nil when pid is 0 or gone.
func watchProc(pid int) *procWatch {
	if pid == 0 {
		return nil
	}
	cpu, err := cpuSeconds(pid)
	if err != nil {
		return nil
	}
	w := &procWatch{pid: pid, startCPU: cpu, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		t := time.NewTicker(50 * time.Millisecond)
		defer t.Stop()
		for {
			if rss, err := rssBytes(pid); err == nil {
				w.peak = max(w.peak, rss)
			}
			select {
			case <-w.stop:
				return
			case <-t.C:
			}
		}
	}()
	return w
}

// end stops sampling and returns the usage since watchProc. A second end
// only reads the CPU time again.
func (w *procWatch) end() Usage {
	if w == nil {
		return Usage{}
	}
	select {
	case <-w.stop: // ended already
	default:
		close(w.stop)
	}
	<-w.done
	u := Usage{PeakRSSBytes: w.peak}
	if cpu, err := cpuSeconds(w.pid); err == nil {
		u.CPUSeconds = cpu - w.startCPU
	}
	return u
}
