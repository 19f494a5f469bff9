package broker

import (
	"context"
	"fmt"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/storage"
)

// Transaction check-back. An uncommitted message is stored with its first
// check due TxCheckDelay after it arrived (its NextDeliverTime), and its
// DeliverCount counts the checks sent so far. The checker pages through
// the store's due checks, sends each a TX_ACK with status unknown to a
// live connection of the producer group (the one that sent it when it is
// still open), records the check and the time of the next one, which
// doubles up to TxCheckMaxDelay, and dead-letters a message that is still
// undecided after TxCheckLimit checks. The producer answers with a TX_ACK
// that carries its decision; txAck takes it as any decision.
//
// Checks of one producer group are sent at most TxCheckRate per second: a
// group whose transactions pile up is not flooded, and a message whose
// check must wait stays due and is checked at a later pass.

// txChecker runs the check-back of one broker.
type txChecker struct {
	s   *Server
	now func() time.Time

	mu      sync.Mutex
	buckets map[string]*tokenBucket // by producer group
	origins map[string]*session     // uncommitted message id → the connection that sent it
}

// maxOrigins bounds the connections remembered for undecided messages;
// past it a check goes to any connection of the group.
const maxOrigins = 100_000

func newTxChecker(s *Server) *txChecker {
	return &txChecker{s: s, now: s.opts.clock().Now, buckets: make(map[string]*tokenBucket), origins: make(map[string]*session)}
}

// sent remembers that sess published the uncommitted message id.
func (c *txChecker) sent(id string, sess *session) {
	c.mu.Lock()
	if len(c.origins) < maxOrigins {
		c.origins[id] = sess
	}
	c.mu.Unlock()
}

// decided forgets id: its transaction has an outcome.
func (c *txChecker) decided(id string) {
	c.mu.Lock()
	delete(c.origins, id)
	c.mu.Unlock()
}

// run checks what is due every interval until stop is closed.
func (c *txChecker) run(stop <-chan struct{}, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			if _, err := c.pass(ctx); err != nil {
				c.s.log.Error("transaction check-back", zap.Error(err))
			}
			cancel()
		}
	}
}

// maxChecksPerPass bounds the messages one pass looks at, so that a large
// backlog is worked through over several passes.
const maxChecksPerPass = 5000

// pass sends the checks that are due now and returns how many it sent.
func (c *txChecker) pass(ctx context.Context) (int, error) {
	now := c.now()
	q := storage.DueQuery{Kind: storage.DueTxCheck, Before: now, Limit: 500}
	sent, seen := 0, 0
	full := make(map[string]bool) // groups out of tokens in this pass
	for seen < maxChecksPerPass {
		page, err := c.s.store.Due(ctx, q)
		if err != nil {
			return sent, fmt.Errorf("due transaction checks: %w", err)
		}
		for _, m := range page {
			seen++
			ok, err := c.check(ctx, m, now, full)
			if err != nil {
				return sent, err
			}
			if ok {
				sent++
			}
		}
		if len(page) < q.Limit {
			break
		}
		q.After = page[len(page)-1].Cursor()
	}
	return sent, nil
}

// check sends one check of m, or dead-letters m when it had all its
// checks. It reports whether a check went out.
func (c *txChecker) check(ctx context.Context, m *storage.Message, now time.Time, full map[string]bool) (bool, error) {
	o := c.s.opts
	id, group := m.ID(), m.Header.GetGroupId()
	if m.DeliverCount >= int32(o.TxCheckLimit) {
		reason := fmt.Sprintf("no transaction decision after %d checks", m.DeliverCount)
		if err := c.s.store.DeadLetter(ctx, id, reason); err != nil {
			return false, fmt.Errorf("dead-letter %s: %w", id, err)
		}
		c.decided(id)
		c.s.stats.DeadLettered.Add(1)
		c.s.stats.TxDeadLettered.Add(1)
		c.s.log.Warn("message dead-lettered", zap.String("id", id), zap.String("group", group), zap.String("reason", reason))
		return false, nil
	}
	if full[group] || !c.bucket(group).take(now) {
		full[group] = true
		return false, nil // stays due: a later pass checks it
	}
	count := m.DeliverCount + 1
	r := storage.DeliveryResult{MessageID: id, DeliverCount: count, NextDeliverTime: now.Add(o.txCheckDelay(count))}
	if err := c.s.store.RecordDelivery(ctx, r); err != nil {
		return false, fmt.Errorf("record check %d of %s: %w", count, id, err)
	}
	sess := c.target(id, group)
	if sess == nil {
		c.s.stats.TxChecksUnsent.Add(1)
		c.s.log.Debug("transaction check: no live connection of the producer group",
			zap.String("id", id), zap.String("group", group), zap.Int32("check", count))
		return false, nil
	}
	pkt := &protocol.TxACKPacket{Header: m.Header, Status: new(int32(protocol.TxUnknown)),
		Feedback: new(fmt.Sprintf("check %d of %d", count, o.TxCheckLimit))}
	c.s.stats.TxChecks.Add(1) // before the send: the answer may come at once
	if !sess.send(sess.opaque.Add(1), protocol.CmdTxAck, pkt) {
		c.s.stats.TxChecks.Add(-1)
		c.s.stats.TxChecksUnsent.Add(1)
		return false, nil
	}
	return true, nil
}

// target is the connection a check of id goes to: the one that sent the
// message while it is open, else any open connection of the group.
func (c *txChecker) target(id, group string) *session {
	c.mu.Lock()
	origin := c.origins[id]
	if origin != nil && origin.isClosed() {
		delete(c.origins, id)
		origin = nil
	}
	c.mu.Unlock()
	if origin != nil {
		return origin
	}
	return c.s.engine.group(group).anySession()
}

func (c *txChecker) bucket(group string) *tokenBucket {
	c.mu.Lock()
	defer c.mu.Unlock()
	b := c.buckets[group]
	if b == nil {
		b = newTokenBucket(float64(c.s.opts.TxCheckRate), c.now())
		c.buckets[group] = b
	}
	return b
}

// tokenBucket allows rate events per second on average, and bursts of up
// to one second's worth.
type tokenBucket struct {
	mu     sync.Mutex
	rate   float64
	tokens float64
	last   time.Time
}

func newTokenBucket(rate float64, now time.Time) *tokenBucket {
	return &tokenBucket{rate: rate, tokens: rate, last: now}
}

// take spends a token if there is one at now.
func (b *tokenBucket) take(now time.Time) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if el := now.Sub(b.last); el > 0 {
		b.tokens = min(b.rate, b.tokens+el.Seconds()*b.rate)
		b.last = now
	}
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}
