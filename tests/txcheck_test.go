package tests

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kiteq/kiteq/broker"
	client "github.com/kiteq/kiteq/client-go"
	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/registry/binding"
)

// txChildEnv names the broker a child producer process connects to.
const txChildEnv = "KITEQ_TEST_TX_PRODUCER"

// txProducerChild is the producer process of TestTxProducerKilledBeforeDecision:
// it sends one transactional message and, once the broker has stored it,
// prints its id and hangs in its local transaction until it is killed.
func txProducerChild(addr string) {
	c := client.NewKiteQClient("static://"+addr, "tx-producer", "secret", newRecorder("child"))
	c.SetTopics([]string{"trade"})
	if err := c.Start(); err != nil {
		fmt.Println("ERROR", err)
		os.Exit(1)
	}
	m := newMessage("trade", "pay-succ", "decided by another process")
	m.Header.GroupId = new("tx-producer")
	err := c.SendTxStringMessage(m, func(m *protocol.StringMessage) (bool, error) {
		fmt.Println("STORED", m.GetHeader().GetMessageId())
		select {} // the local transaction never ends: the process is killed here
	})
	fmt.Println("ERROR", err)
	os.Exit(1)
}

// committer is a producer's listener that commits every message it is
// asked about.
type committer struct {
	*recorder
	mu      sync.Mutex
	checked map[string]int
}

func (c *committer) OnMessageCheck(tx *protocol.TxResponse) error {
	c.mu.Lock()
	c.checked[tx.Header.GetMessageId()]++
	c.mu.Unlock()
	tx.Commit()
	return nil
}

// TestTxProducerKilledBeforeDecision: a producer process is killed after
// the store-ack and before its decision; a new producer of its group
// starts, the broker asks it, it commits, and the message reaches every
// matching group once. On the memory store and on the file store.
func TestTxProducerKilledBeforeDecision(t *testing.T) {
	eachStore(t, func(t *testing.T, db string) {
		b := startBroker(t, func(o *broker.Options) {
			o.DB = db
			o.TxCheckDelay = 200 * time.Millisecond
		})
		direct, fanout := newRecorder("direct"), newRecorder("fanout")
		startClient(t, b.uri(), "g-direct", direct, nil, binding.Bind_Direct("g-direct", "trade", "pay-succ", 100, true))
		startClient(t, b.uri(), "g-fanout", fanout, nil, binding.Bind_Fanout("g-fanout", "trade", 100, true))

		cmd, out := startChild(t, txChildEnv, b.Addr())
		line, err := out.ReadString('\n')
		if err != nil || !strings.HasPrefix(line, "STORED ") {
			t.Fatalf("child producer: %q, %v", line, err)
		}
		id := strings.TrimSpace(strings.TrimPrefix(line, "STORED "))
		cmd.Process.Kill() // SIGKILL, inside its local transaction
		cmd.Wait()
		time.Sleep(500 * time.Millisecond) // checks while no producer of the group is connected
		if direct.count(id)+fanout.count(id) != 0 {
			t.Fatal("the undecided message was delivered")
		}

		c := &committer{recorder: newRecorder("tx-producer"), checked: make(map[string]int)}
		startClient(t, b.uri(), "tx-producer", c, []string{"trade"})
		eventually(t, 10*time.Second, "both groups received the message", func() bool {
			return direct.count(id) == 1 && fanout.count(id) == 1
		})
		time.Sleep(300 * time.Millisecond)
		c.mu.Lock()
		checks := c.checked[id]
		c.mu.Unlock()
		st := b.Stats()
		if direct.count(id) != 1 || fanout.count(id) != 1 || checks == 0 || st.Committed != 1 || st.TxChecksUnsent == 0 {
			t.Fatalf("direct %d fanout %d (want 1, 1), checks answered %d; stats %+v",
				direct.count(id), fanout.count(id), checks, st)
		}
	})
}

// loadProducer is the listener of the producers of TestTxLoadWithUndecided:
// it answers a check as the transaction went (commit), or not at all for
// the transactions that never answer, and times every check.
type loadProducer struct {
	*recorder
	silent func(id string) bool
	start  time.Time
	mu     sync.Mutex
	times  []time.Duration
}

func (p *loadProducer) OnMessageCheck(tx *protocol.TxResponse) error {
	p.mu.Lock()
	p.times = append(p.times, time.Since(p.start))
	p.mu.Unlock()
	if p.silent(tx.Header.GetMessageId()) {
		return fmt.Errorf("no answer for %s", tx.Header.GetMessageId())
	}
	tx.Commit()
	return nil
}

// TestTxLoadWithUndecided: 10,000 transactions, of which 10% never answer
// (the local transaction panics, and every check is answered unknown).
// The check-back traffic stays within its rate bound, and every
// transaction ends decided or dead-lettered.
func TestTxLoadWithUndecided(t *testing.T) {
	const n, workers, rate, limit = 10_000, 8, 400, 3
	b := startBroker(t, func(o *broker.Options) {
		o.DB = "file://" + t.TempDir()
		o.TxCheckDelay = 100 * time.Millisecond
		o.TxCheckMaxDelay = 200 * time.Millisecond
		o.TxCheckLimit = limit
		o.TxCheckRate = rate
	})
	cons := newRecorder("consumer")
	startClient(t, b.uri(), "g-load", cons, nil, binding.Bind_Fanout("g-load", "trade", 1000, true))
	p := &loadProducer{recorder: newRecorder("tx-load"), start: time.Now()}
	var silentIDs sync.Map // the transactions that never answer
	var nSilent atomic.Int64
	p.silent = func(id string) bool { _, ok := silentIDs.Load(id); return ok }
	prod := startClient(t, b.uri(), "tx-load", p, []string{"trade"})

	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := next.Add(1) - 1; i < n; i = next.Add(1) - 1 {
				m := newMessage("trade", "order", fmt.Sprint("tx #", i))
				m.Header.GroupId = new("tx-load")
				never := i%10 == 0 // 10%
				if never {
					silentIDs.Store(m.GetHeader().GetMessageId(), true)
					nSilent.Add(1)
				}
				err := prod.SendTxStringMessage(m, func(*protocol.StringMessage) (bool, error) {
					if never {
						panic("the local transaction hangs")
					}
					return true, nil
				})
				if err != nil && !never {
					errs <- fmt.Errorf("transaction %d: %w", i, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	sent := time.Since(p.start)

	// Every undecided transaction is checked limit times, then dead-lettered.
	eventually(t, 60*time.Second, "every transaction decided or dead-lettered", func() bool {
		st := b.Stats()
		return st.Committed == n-nSilent.Load() && st.TxDeadLettered == nSilent.Load()
	})
	eventually(t, 10*time.Second, "every committed message delivered", func() bool {
		return len(cons.snapshot()) == int(n-nSilent.Load())
	})
	for id := range cons.snapshot() {
		if _, ok := silentIDs.Load(id); ok {
			t.Fatalf("undecided transaction %s was delivered", id)
		}
	}
	dead, err := deadLetters(b)
	if err != nil {
		t.Fatal(err)
	}
	if len(dead) != int(nSilent.Load()) {
		t.Fatalf("%d dead letters, want %d", len(dead), nSilent.Load())
	}

	// The rate bound: a token bucket of rate per second with a burst of
	// one second's worth allows at most rate × (t + 1 s) checks in the first
	// t of the checking.
	p.mu.Lock()
	times := append([]time.Duration(nil), p.times...)
	p.mu.Unlock()
	if len(times) < int(nSilent.Load())*limit {
		t.Fatalf("%d checks for %d silent transactions, want at least %d", len(times), nSilent.Load(), int(nSilent.Load())*limit)
	}
	first := times[0]
	worst := 0.0
	for k, at := range times {
		allowed := rate * ((at - first).Seconds() + 1)
		if float64(k+1) > allowed+rate/10 { // a tenth of a second of slack for the clocks
			t.Fatalf("check %d at %v after the first: over the bound of %d per second (%.0f allowed)", k+1, at-first, rate, allowed)
		}
		worst = max(worst, float64(k+1)/allowed)
	}
	st := b.Stats()
	t.Logf("%d transactions sent in %v; %d checks over %v (at most %.0f%% of the bound); %d committed, %d dead-lettered",
		n, sent.Round(time.Millisecond), len(times), (times[len(times)-1] - first).Round(time.Millisecond), worst*100,
		st.Committed, st.TxDeadLettered)
}

// deadLetters lists the dead-letter queue of b's store.
func deadLetters(b *testBroker) ([]string, error) {
	var ids []string
	after := ""
	for {
		page, err := b.store.DeadLetters(context.Background(), after, 500)
		if err != nil {
			return nil, err
		}
		for _, d := range page {
			ids = append(ids, d.Message.ID())
		}
		if len(page) < 500 {
			return ids, nil
		}
		after = page[len(page)-1].Message.ID()
	}
}
