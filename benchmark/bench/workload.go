package bench

import (
	"context"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"
)

// Workload is what a run does.
type Workload string

const (
	// Throughput: C publishers, each sending synchronously (the next
	// message once the last was confirmed), for the run's duration, while
	// one consumer takes everything.
	Throughput Workload = "throughput"
	// Latency: messages offered at a fixed rate by an open loop, each
	// timed from when it was meant to be sent (a stall delays the
	// messages behind it, and their latency shows it) to its delivery.
	Latency Workload = "latency"
	// Drain: a backlog published with no consumer, then consumed.
	Drain Workload = "drain"
	// Tx: KiteQ transactional messages (store-ack, then commit), as
	// Throughput.
	Tx Workload = "tx"
)

// RunConfig is one run.
type RunConfig struct {
	Workload    Workload
	Tier        Tier
	Size        int           // message bytes
	Publishers  int           // C
	Duration    time.Duration // publishing window (Throughput, Latency, Tx)
	Rate        float64       // messages per second offered (Latency)
	Backlog     int           // messages (Drain)
	DrainWait   time.Duration // how long deliveries may go on after the window
	Progress    io.Writer     // the live line; nil for none
	ProgressTag string        // what the line starts with
	Round       int           // which round of a suite (reported only)
	CommonRate  bool          // a latency run at a rate shared by the tier's systems (reported only)
	OnDrain     func()        // called as a drain's consumer starts (Drain)
}

// Result is what a run measured.
type Result struct {
	System     string     `json:"system"`
	Server     ServerInfo `json:"server"`
	Workload   Workload   `json:"workload"`
	Tier       Tier       `json:"tier"`
	Size       int        `json:"size"`
	Publishers int        `json:"publishers"`
	Rate       float64    `json:"offeredRate,omitempty"`
	CommonRate bool       `json:"commonRate,omitempty"` // Rate is the lowest of the tier's half rates, not this system's
	Round      int        `json:"round,omitempty"`
	Retried    string     `json:"retried,omitempty"` // why the run's first try failed (a suite tries twice)
	Seconds    float64    `json:"seconds"`           // the publishing window

	Published      int64     `json:"published"` // confirmed
	PublishErrors  int64     `json:"publishErrors"`
	PublishedRate  float64   `json:"publishedPerSec"`
	Delivered      int64     `json:"delivered"` // unique, within the window
	DeliveredRate  float64   `json:"deliveredPerSec"`
	BacklogAtEnd   int64     `json:"backlogAtEnd"` // confirmed, not yet delivered, when the window closed
	Lost           int64     `json:"lost"`         // confirmed and never delivered, after DrainWait
	Duplicates     int64     `json:"duplicates"`
	DrainSeconds   float64   `json:"drainSeconds,omitempty"`
	PublishLatency Quantiles `json:"publishLatency"` // intended send to confirm
	EndToEnd       Quantiles `json:"endToEnd"`       // intended send to delivery
	Usage          Usage     `json:"serverUsage"`
}

// Quantiles of a latency distribution, in microseconds.
type Quantiles struct {
	P50  float64 `json:"p50us"`
	P99  float64 `json:"p99us"`
	P999 float64 `json:"p999us"`
	Max  float64 `json:"maxus"`
}

func quantiles(h *Histogram) Quantiles {
	us := func(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
	return Quantiles{P50: us(h.Quantile(0.5)), P99: us(h.Quantile(0.99)), P999: us(h.Quantile(0.999)), Max: us(h.Quantile(1))}
}

// seen counts the sequence numbers delivered, once each.
type seen struct {
	mu   sync.Mutex
	bits []uint64
	n    int64
	dups int64
}

func (s *seen) add(seq uint64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	w := int(seq / 64)
	for w >= len(s.bits) {
		s.bits = append(s.bits, make([]uint64, max(len(s.bits), 1024))...)
	}
	if s.bits[w]&(1<<(seq%64)) != 0 {
		s.dups++
		return false
	}
	s.bits[w] |= 1 << (seq % 64)
	s.n++
	return true
}

func (s *seen) count() (n, dups int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.n, s.dups
}

// Run runs one workload against d, which Start has readied for cfg.Tier.
func Run(ctx context.Context, d Driver, info ServerInfo, name string, cfg RunConfig) (*Result, error) {
	target, err := d.Target(ctx, name)
	if err != nil {
		return nil, err
	}
	defer target.Close()
	r := &Result{System: d.Name(), Server: info, Workload: cfg.Workload, Tier: cfg.Tier, Size: cfg.Size,
		Publishers: cfg.Publishers, Rate: cfg.Rate, CommonRate: cfg.CommonRate, Round: cfg.Round}
	var (
		delivered seen
		e2e       Histogram
		pubLat    Histogram
		published atomic.Int64
		errs      atomic.Int64
		lastErr   atomic.Value
	)
	consume := func(ctx context.Context) error {
		return target.Consume(ctx, func(body []byte) {
			seq, intended, ok := ParseBody(body)
			if ok && delivered.add(seq) {
				e2e.Record(time.Since(intended))
			}
		})
	}
	watch := watchProc(info.PID)
	defer watch.end() // a run that fails stops sampling too
	consCtx, stopCons := context.WithCancel(ctx)
	defer stopCons()
	// Publishers stop with runCtx: a run that fails part way leaves none
	// publishing (the suite may run it again on the same server).
	runCtx, stopRun := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer stopRun()

	if cfg.Workload != Drain {
		if err := consume(consCtx); err != nil {
			return nil, err
		}
	}
	var tx func([]byte) error
	if cfg.Workload == Tx {
		txer, ok := target.(interface{ SendTx([]byte) error })
		if !ok {
			return nil, fmt.Errorf("%s has no transactional messages", d.Name())
		}
		tx = txer.SendTx
	}

	// Publishing.
	var seq atomic.Uint64
	window := cfg.Duration
	if cfg.Workload == Drain {
		window = 0
	}
	start := time.Now()
	deadline := start.Add(window)
	progress := startProgress(cfg, start, &published, &errs, &delivered, &e2e)
	defer progress.stop()
	var ticket atomic.Int64 // Latency: the next send slot
	for range max(cfg.Publishers, 1) {
		pub, err := target.Publisher(runCtx)
		if err != nil {
			return nil, err
		}
		wg.Go(func() {
			defer pub.Close()
			var buf []byte
			for runCtx.Err() == nil {
				intended := time.Now()
				switch cfg.Workload {
				case Latency:
					intended = start.Add(time.Duration(float64(ticket.Add(1)-1) / cfg.Rate * float64(time.Second)))
					if !intended.Before(deadline) {
						return
					}
					time.Sleep(time.Until(intended))
				case Drain:
					if int(seq.Load()) >= cfg.Backlog {
						return
					}
				default:
					if !intended.Before(deadline) {
						return
					}
				}
				n := seq.Add(1) - 1
				if cfg.Workload == Drain && int(n) >= cfg.Backlog {
					return
				}
				buf = Body(buf, cfg.Size, n, intended)
				var err error
				if tx != nil {
					err = tx(buf)
				} else {
					err = pub.Publish(runCtx, buf)
				}
				if err != nil {
					errs.Add(1)
					lastErr.Store(err)
					continue
				}
				pubLat.Record(time.Since(intended))
				published.Add(1)
			}
		})
	}
	wg.Wait()
	pubEnd := time.Now()
	r.Seconds = pubEnd.Sub(start).Seconds()
	r.Published, r.PublishErrors = published.Load(), errs.Load()
	r.PublishedRate = float64(r.Published) / r.Seconds
	if cfg.Workload == Drain {
		// The backlog is in; now consume it, timed.
		if cfg.OnDrain != nil {
			cfg.OnDrain()
		}
		drainStart := time.Now()
		if err := consume(consCtx); err != nil {
			return nil, err
		}
		for ctx.Err() == nil {
			if n, _ := delivered.count(); n >= r.Published || time.Since(drainStart) > cfg.DrainWait {
				break
			}
			time.Sleep(time.Millisecond)
		}
		r.DrainSeconds = time.Since(drainStart).Seconds()
		n, _ := delivered.count()
		r.Delivered, r.DeliveredRate = n, float64(n)/r.DrainSeconds
	} else {
		n, _ := delivered.count()
		r.Delivered, r.DeliveredRate = n, float64(n)/r.Seconds
		r.BacklogAtEnd = max(r.Published-n, 0)
		// Deliveries may catch up after the window; whatever has not come
		// by DrainWait is lost.
		for wait := time.Now().Add(cfg.DrainWait); time.Now().Before(wait) && ctx.Err() == nil; time.Sleep(5 * time.Millisecond) {
			if n, _ := delivered.count(); n >= r.Published {
				break
			}
		}
	}
	progress.stop()
	r.Usage = watch.end()
	n, dups := delivered.count()
	r.Lost, r.Duplicates = max(r.Published-n, 0), dups
	r.PublishLatency, r.EndToEnd = quantiles(&pubLat), quantiles(&e2e)
	stopCons()
	if r.Published == 0 {
		err, _ := lastErr.Load().(error)
		return r, fmt.Errorf("nothing was published: %v", err)
	}
	return r, nil
}

// progressLine rewrites one line a second: rates, p99 so far, errors.
type progressLine struct {
	stopc chan struct{}
	done  chan struct{}
}

func startProgress(cfg RunConfig, start time.Time, published, errs *atomic.Int64, delivered *seen, e2e *Histogram) *progressLine {
	p := &progressLine{stopc: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(p.done)
		if cfg.Progress == nil {
			<-p.stopc
			return
		}
		t := time.NewTicker(time.Second)
		defer t.Stop()
		line := func(final bool) {
			el := time.Since(start).Seconds()
			n, _ := delivered.count()
			end := "\r"
			if final {
				end = "\n"
			}
			fmt.Fprintf(cfg.Progress, "%s  %5.1fs  published %9.0f/s  delivered %9.0f/s  e2e p99 %8.2fms  errors %d   %s",
				cfg.ProgressTag, el, float64(published.Load())/el, float64(n)/el,
				float64(e2e.Quantile(0.99))/float64(time.Millisecond), errs.Load(), end)
		}
		for {
			select {
			case <-p.stopc:
				line(true)
				return
			case <-t.C:
				line(false)
			}
		}
	}()
	return p
}

func (p *progressLine) stop() {
	select {
	case <-p.stopc:
	default:
		close(p.stopc)
	}
	<-p.done
}
