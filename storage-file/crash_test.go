package filestore

import (
	"bufio"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/storage"
)

// The crash test: a child process (this test binary, running
// TestCrashChild) works on the store with 8 goroutines and prints every
// call before it makes it ("B …") and once it returned nil ("A …"). The
// parent kills it with SIGKILL at a random moment, opens the store itself,
// and checks it against a model of the acknowledged calls; a call that had
// begun but was not acknowledged may or may not have happened. The store
// accumulates over all the runs.

const (
	crashEnv      = "KITEQ_FILESTORE_CRASH_CHILD"
	crashSeedEnv  = "KITEQ_FILESTORE_CRASH_SEED"
	crashKills    = 24
	crashWorkers  = 8
	crashSegment  = 1 << 20
	crashMaxOwned = 40 // live messages a worker keeps before it mostly finishes them
)

var crashGroups = []string{"g1", "g2", "g3", "g4"}

func crashOptions(o *Options) {
	o.Sync = SyncAlways
	o.SegmentSize = crashSegment
}

func TestCrashRecovery(t *testing.T) {
	dir := t.TempDir()
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv(crashSeedEnv); s != "" {
		seed, _ = strconv.ParseUint(s, 10, 64)
	}
	t.Logf("seed %d (set %s to repeat)", seed, crashSeedEnv)
	rng := rand.New(rand.NewPCG(seed, 0))

	model := make(map[string]mstate) // the last acknowledged state of every live or dead-lettered id
	gone := make(map[string]bool)    // ids deleted or rolled back: Get must not find them
	kills, repairs, acks, inflightTotal, maxSeg := 0, 0, 0, 0, 0
	start := time.Now()
	for run := range crashKills {
		// Most runs are killed 50–400 ms after the child said it is ready;
		// every sixth as early as 0–60 ms after it started, which may be
		// during Open and its repair of the previous crash.
		early := run%6 == 5
		res := runCrashChild(t, dir, seed+uint64(run)+1, early, rng, model, gone)
		kills++
		acks += res.acks
		inflightTotal += len(res.inflight)

		// What the model allows: the acknowledged state, and for a call in
		// flight at the kill either the state before it or the state after.
		check := single(model)
		for id := range gone {
			if _, ok := check[id]; !ok {
				check[id] = []mstate{{}}
			}
		}
		for _, o := range res.inflight {
			before := model[o.id]
			check[o.id] = []mstate{before, applyOp(before, o)}
		}

		s, logs, err := openObserved(dir, crashOptions)
		if err != nil {
			t.Fatalf("run %d: reopen after SIGKILL: %v\nchild stderr: %s", run, err, res.stderr)
		}
		line := checkOpenLog(t, logs)
		if line.Level == zapcore.WarnLevel {
			repairs++
			t.Logf("run %d: %s %v", run, line.Message, line.ContextMap())
		}
		diffs, narrowed := checkStore(context.Background(), s, check)
		if err := s.Close(); err != nil {
			t.Fatalf("run %d: close: %v", run, err)
		}
		if len(diffs) > 0 {
			if len(diffs) > 20 {
				diffs = append(diffs[:20], fmt.Sprintf("… and %d more", len(diffs)-20))
			}
			t.Fatalf("run %d (seed %d): after SIGKILL the store differs from the acknowledged calls (in flight: %v):\n%s",
				run, seed, res.inflight, strings.Join(diffs, "\n"))
		}
		// The model narrows to what the store holds; the next child starts
		// from there.
		clear(model)
		for id, st := range narrowed {
			if st.present {
				model[id] = st
				delete(gone, id)
			} else {
				gone[id] = true
			}
		}
		checkSegmentsClean(t, dir)
		segs := segmentFiles(t, dir)
		last, _ := strconv.Atoi(strings.TrimSuffix(filepath.Base(segs[len(segs)-1]), ".seg"))
		maxSeg = max(maxSeg, last)
		live, dead, uncommitted := 0, 0, 0
		for _, st := range model {
			switch {
			case st.dead:
				dead++
			case !st.committed:
				uncommitted++
				live++
			default:
				live++
			}
		}
		files, bytes := diskUse(t, dir)
		t.Logf("run %d: killed after %d acknowledged calls (%d in flight, early=%v); live %d (uncommitted %d), dead letters %d, finished %d; segments %d (newest %d), %d KiB",
			run, res.acks, len(res.inflight), early, live, uncommitted, dead, len(gone), files, last, bytes>>10)
	}
	t.Logf("%d kills, %d acknowledged calls, %d calls in flight at a kill, %d opens repaired a torn tail, newest segment %d, in %v",
		kills, acks, inflightTotal, repairs, maxSeg, time.Since(start).Round(time.Millisecond))
	if kills < 20 {
		t.Errorf("only %d kills", kills)
	}
	if acks < 1000 {
		t.Errorf("only %d acknowledged calls in %d runs: the children did too little to test recovery", acks, kills)
	}
	if maxSeg < 2 {
		t.Errorf("the log never went past segment %d: no segment rolls or compaction were exercised", maxSeg)
	}
}

// crashRun is what the parent learned from one child.
type crashRun struct {
	acks     int
	inflight []fop // calls begun and not acknowledged
	stderr   string
}

// runCrashChild runs one child on dir, kills it, and applies its
// acknowledged calls to model (and to gone, the ids they finished).
func runCrashChild(t *testing.T, dir string, seed uint64, early bool, rng *rand.Rand, model map[string]mstate, gone map[string]bool) crashRun {
	t.Helper()
	cmd, stderr := childCommand("TestCrashChild", crashEnv+"="+dir, crashSeedEnv+"="+strconv.FormatUint(seed, 10))
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 4096)
	go func() {
		defer close(lines)
		br := bufio.NewReader(stdout)
		for {
			line, err := br.ReadString('\n')
			if err != nil {
				// A line without its newline was cut by the kill; one Write
				// per line to a pipe makes that impossible, so drop it.
				return
			}
			lines <- strings.TrimSuffix(line, "\n")
		}
	}()

	var inflight [crashWorkers]*fop
	var res crashRun
	var kill <-chan time.Time
	if early {
		kill = time.After(time.Duration(rng.IntN(60)) * time.Millisecond)
	}
	watchdog := time.After(30 * time.Second)
	killed := false
	fail := func(format string, args ...any) {
		cmd.Process.Kill()
		for range lines {
		}
		cmd.Wait()
		t.Fatalf(format+"\nchild stderr: %s", append(args, tail(stderr.Bytes(), 4000))...)
	}
	for open := true; open; {
		select {
		case line, ok := <-lines:
			if !ok {
				open = false
				break
			}
			if line == "ready" {
				if !early {
					kill = time.After(time.Duration(50+rng.IntN(351)) * time.Millisecond)
				}
				continue
			}
			f := strings.Fields(line)
			if len(f) < 4 || (f[0] != "B" && f[0] != "A") {
				continue // the testing package's own output
			}
			g, err := strconv.Atoi(f[1])
			if err != nil || g < 0 || g >= crashWorkers {
				fail("bad line %q", line)
			}
			if f[0] == "B" {
				o, err := parseBegin(f[2:])
				if err != nil {
					fail("bad line %q: %v", line, err)
				}
				if inflight[g] != nil {
					fail("worker %d began %v while %v was in flight", g, o, *inflight[g])
				}
				inflight[g] = &o
				continue
			}
			o := inflight[g]
			if o == nil || o.kind != f[2] || o.id != f[3] {
				fail("worker %d acknowledged %q, but began %v", g, line, o)
			}
			if o.kind == "commit" {
				if len(f) != 5 {
					fail("bad line %q", line)
				}
				o.next, _ = strconv.ParseInt(f[4], 10, 64)
			}
			st := applyOp(model[o.id], *o)
			if st.present {
				model[o.id] = st
			} else {
				delete(model, o.id)
				gone[o.id] = true
			}
			inflight[g] = nil
			res.acks++
		case <-kill:
			kill = nil
			killed = true
			if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
				fail("kill: %v", err)
			}
		case <-watchdog:
			fail("the child neither said it is ready nor was killed in 30 s")
		}
	}
	cmd.Wait()
	res.stderr = tail(stderr.Bytes(), 4000)
	ws, _ := cmd.ProcessState.Sys().(syscall.WaitStatus)
	if !killed || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("the child ended by itself (%v) before the kill\nchild stderr: %s", cmd.ProcessState, res.stderr)
	}
	for _, l := range strings.Split(stderr.String(), "\n") {
		if strings.Contains(l, "DATA RACE") || strings.Contains(l, `"level":"error"`) || strings.HasPrefix(l, "panic") {
			t.Fatalf("the child reported: %s\nchild stderr: %s", l, res.stderr)
		}
	}
	for _, o := range inflight {
		if o != nil {
			if o.kind == "commit" {
				o.next = -1 // the commit time, known only from the acknowledgement
			}
			res.inflight = append(res.inflight, *o)
		}
	}
	return res
}

// parseBegin parses the fields of a "B <worker>" line after the worker.
func parseBegin(f []string) (fop, error) {
	o := fop{kind: f[0], id: f[1]}
	num := func(i int) int64 {
		if i >= len(f) {
			return 0
		}
		n, _ := strconv.ParseInt(f[i], 10, 64)
		return n
	}
	list := func(i int) []string {
		if i >= len(f) || f[i] == "-" {
			return nil
		}
		return strings.Split(f[i], ",")
	}
	want := map[string]int{"save": 5, "resave": 2, "commit": 3, "rollback": 2, "delivery": 6, "delete": 2, "dead": 4}
	if n, ok := want[o.kind]; !ok || len(f) != n || !protocol.ValidMessageId(o.id) {
		return o, fmt.Errorf("unexpected fields %q", f)
	}
	switch o.kind {
	case "save":
		o.committed, o.next, o.bodyLen = f[2] == "1", num(3), int(num(4))
	case "commit":
		o.nextMin = num(2)
	case "delivery":
		o.count, o.next, o.succ, o.fail = int32(num(2)), num(3), list(4), list(5)
	case "dead":
		o.reason, o.atMin = f[2], num(3)
	}
	return o, nil
}

// TestCrashChild is the child of TestCrashRecovery; TestMain leaves it out
// of a plain run.
func TestCrashChild(t *testing.T) {
	dir := os.Getenv(crashEnv) // TestMain runs this only as a child
	seed, _ := strconv.ParseUint(os.Getenv(crashSeedEnv), 10, 64)
	log := zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()), zapcore.Lock(os.Stderr), zapcore.InfoLevel))
	o := DefaultOptions(dir)
	crashOptions(&o)
	s, err := Open(o, log)
	if err != nil {
		crashDie("open: %v", err)
	}
	ctx := context.Background()

	// The messages that earlier children left: each worker takes a share,
	// so that no two workers ever touch one id.
	type cstate struct {
		committed bool
		count     int32
	}
	owned := make([]map[string]*cstate, crashWorkers)
	for g := range owned {
		owned[g] = make(map[string]*cstate)
	}
	i := 0
	for _, kind := range []storage.DueKind{storage.DueDelivery, storage.DueTxCheck} {
		var after storage.Cursor
		for {
			page, err := s.Due(ctx, storage.DueQuery{Kind: kind, Before: farFuture, After: after, Limit: 500})
			if err != nil {
				crashDie("due: %v", err)
			}
			for _, m := range page {
				owned[i%crashWorkers][m.ID()] = &cstate{m.Committed, m.DeliverCount}
				i++
				after = m.Cursor()
			}
			if len(page) < 500 {
				break
			}
		}
	}
	emit("ready")

	for g := range crashWorkers {
		go func() {
			r := rand.New(rand.NewPCG(seed, uint64(g)))
			mine := owned[g]
			ids := make([]string, 0, len(mine))
			for id := range mine {
				ids = append(ids, id)
			}
			drop := func(k int) {
				delete(mine, ids[k])
				ids[k] = ids[len(ids)-1]
				ids = ids[:len(ids)-1]
			}
			for {
				if len(ids) == 0 || (len(ids) < crashMaxOwned && r.IntN(100) < 35) {
					id := protocol.MessageId()
					committed := r.IntN(100) < 70
					next := time.Now().UnixMilli() - int64(r.IntN(1000))
					n := r.IntN(8<<10 + 1)
					emit(fmt.Sprintf("B %d save %s %d %d %d", g, id, b2i(committed), next, n))
					stored, err := s.Save(ctx, faultMessage(id, committed, next, n))
					if err != nil || !stored {
						crashDie("save %s: stored=%v err=%v", id, stored, err)
					}
					emit(fmt.Sprintf("A %d save %s", g, id))
					mine[id] = &cstate{committed: committed}
					ids = append(ids, id)
					continue
				}
				k := r.IntN(len(ids))
				id := ids[k]
				st := mine[id]
				p := r.IntN(100)
				var op string
				switch {
				case !st.committed && p < 45:
					op = "commit"
				case !st.committed && p < 70:
					op = "rollback"
				case !st.committed && p < 92, st.committed && p < 50:
					op = "delivery"
				case st.committed && p < 88:
					op = "delete"
				case st.committed && p < 92:
					op = "dead"
				default:
					op = "resave"
				}
				switch op {
				case "commit":
					emit(fmt.Sprintf("B %d commit %s %d", g, id, time.Now().UnixMilli()))
					if err := s.Commit(ctx, id); err != nil {
						crashDie("commit %s: %v", id, err)
					}
					m, err := s.Get(ctx, id)
					if err != nil || !m.Committed {
						crashDie("get %s after commit: %v %v", id, m, err)
					}
					emit(fmt.Sprintf("A %d commit %s %d", g, id, m.NextDeliverTime.UnixMilli()))
					st.committed = true
				case "rollback":
					emit(fmt.Sprintf("B %d rollback %s", g, id))
					if err := s.Rollback(ctx, id); err != nil {
						crashDie("rollback %s: %v", id, err)
					}
					emit(fmt.Sprintf("A %d rollback %s", g, id))
					drop(k)
				case "delivery":
					var succ, fail []string
					for _, grp := range crashGroups {
						switch r.IntN(3) {
						case 1:
							succ = append(succ, grp)
						case 2:
							fail = append(fail, grp)
						}
					}
					d := storage.DeliveryResult{MessageID: id, DeliverCount: st.count + 1,
						NextDeliverTime: time.UnixMilli(time.Now().UnixMilli() + int64(r.IntN(3_600_000))),
						SuccGroups:      succ, FailGroups: fail}
					emit(fmt.Sprintf("B %d delivery %s %d %d %s %s", g, id, d.DeliverCount, d.NextDeliverTime.UnixMilli(),
						csv(succ), csv(fail)))
					if err := s.RecordDelivery(ctx, d); err != nil {
						crashDie("record delivery %s: %v", id, err)
					}
					emit(fmt.Sprintf("A %d delivery %s", g, id))
					st.count++
				case "delete":
					emit(fmt.Sprintf("B %d delete %s", g, id))
					if err := s.Delete(ctx, id); err != nil {
						crashDie("delete %s: %v", id, err)
					}
					emit(fmt.Sprintf("A %d delete %s", g, id))
					drop(k)
				case "dead":
					reason := fmt.Sprintf("limit-%d", r.IntN(1000))
					emit(fmt.Sprintf("B %d dead %s %s %d", g, id, reason, time.Now().UnixMilli()))
					if err := s.DeadLetter(ctx, id, reason); err != nil {
						crashDie("dead-letter %s: %v", id, err)
					}
					emit(fmt.Sprintf("A %d dead %s", g, id))
					drop(k)
				case "resave":
					emit(fmt.Sprintf("B %d resave %s", g, id))
					stored, err := s.Save(ctx, faultMessage(id, st.committed, 0, 10))
					if err != nil || stored {
						crashDie("save of the existing %s: stored=%v err=%v", id, stored, err)
					}
					emit(fmt.Sprintf("A %d resave %s", g, id))
				}
			}
		}()
	}
	time.Sleep(30 * time.Second)
	crashDie("not killed within 30 s")
}

// emit writes one line to stdout with one Write, so that a kill never cuts
// a line and lines of different workers never mix.
func emit(line string) {
	os.Stdout.Write([]byte(line + "\n"))
}

func crashDie(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "crash child: "+format+"\n", args...)
	os.Exit(2)
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

func csv(ss []string) string {
	if len(ss) == 0 {
		return "-"
	}
	return strings.Join(ss, ",")
}
