package broker

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
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
	s *Server

	cursor storage.Cursor // where the next pass starts; only run's goroutine uses it

	mu      sync.Mutex
	buckets map[string]*tokenBucket // by producer group
	origins map[string]*session     // uncommitted message id → the connection that sent it
}

// maxOrigins bounds the connections remembered for undecided messages;
// past it a check goes to any connection of the group.
const maxOrigins = 100_000

func newTxChecker(s *Server) *txChecker {
	return &txChecker{s: s, buckets: make(map[string]*tokenBucket), origins: make(map[string]*session)}
}

// sent remembers that sess published the uncommitted message id.
func (c *txChecker) sent(id string, sess *session) {
	c.mu.Lock()
	if len(c.origins) < maxOrigins {
		c.origins[id] = sess
	}
	c.mu.Unlock()
}

// origin returns the connection that published the uncommitted message
// id, when it is remembered.
func (c *txChecker) origin(id string) *session {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.origins[id]
}

// decided forgets id: its transaction has an outcome.
func (c *txChecker) decided(id string) {
	c.mu.Lock()
	delete(c.origins, id)
	c.mu.Unlock()
}

// run checks what is due every interval until stop is closed; a pass in
// progress stops at the next message once it is.
func (c *txChecker) run(stop <-chan struct{}, every time.Duration) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		<-stop
		cancel()
	}()
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		if ctx.Err() != nil {
			return
		}
		if _, err := c.pass(ctx); err != nil && ctx.Err() == nil {
			c.s.log.Error("transaction check-back", zap.Error(err))
		}
	}
}

// maxChecksPerPass bounds the due messages one pass looks at. A pass
// starts where the last one stopped, so a group whose checks wait for
// its rate does not hold back the groups behind it.
const maxChecksPerPass = 5000

// pass sends the checks that are due now and returns how many it sent.
func (c *txChecker) pass(ctx context.Context) (int, error) {
	now := c.s.engine.now()
	q := storage.DueQuery{Kind: storage.DueTxCheck, Before: now, After: c.cursor, Limit: 500}
	sent, seen := 0, 0
	full := make(map[string]bool) // groups out of tokens in this pass
	for seen < maxChecksPerPass {
		page, err := c.s.store.Due(ctx, q)
		if err != nil {
			return sent, fmt.Errorf("due transaction checks: %w", err)
		}
		for _, m := range page {
			if err := ctx.Err(); err != nil {
				return sent, err
			}
			seen++
			c.cursor = m.Cursor()
			ok, err := c.check(ctx, m, now, full)
			if err != nil {
				// One message's store call failed: log it, go on with
				// the others; it is still due and is checked again.
				c.s.log.Error("transaction check", zap.String("id", m.ID()), zap.Error(err))
			}
			if ok {
				sent++
			}
		}
		if len(page) < q.Limit {
			c.cursor = storage.Cursor{} // the end: the next pass starts over
			break
		}
		q.After = page[len(page)-1].Cursor()
	}
	return sent, nil
}

// check sends one check of m, or dead-letters m when it had all its
// checks or expired. It reports whether a check went out. It holds the
// lock of m's decisions, and acts on the message as it is then: a
// decision that came after the page was read wins.
func (c *txChecker) check(ctx context.Context, m *storage.Message, now time.Time, full map[string]bool) (bool, error) {
	o := c.s.opts
	id, group := m.ID(), m.Header.GetGroupId()
	if full[group] {
		return false, nil // stays due: a later pass checks it
	}
	unlock := c.s.lockDecision(id)
	defer unlock()
	m, err := c.s.store.Get(ctx, id)
	if errors.Is(err, storage.ErrNotFound) {
		c.decided(id)
		return false, nil // rolled back, or dead-lettered
	}
	if err != nil {
		return false, err
	}
	if m.Committed {
		c.decided(id)
		return false, nil
	}
	reason := ""
	switch {
	case now.After(c.s.engine.expiry(m)):
		reason = fmt.Sprintf("expired at %s without a transaction decision after %d checks",
			c.s.engine.expiry(m).UTC().Format(time.RFC3339), m.DeliverCount)
	case m.DeliverCount >= int32(o.TxCheckLimit):
		reason = fmt.Sprintf("no transaction decision after %d checks", m.DeliverCount)
	}
	if reason != "" {
		if err := c.s.store.DeadLetter(ctx, id, reason); err != nil {
			return false, fmt.Errorf("dead-letter %s: %w", id, err)
		}
		c.decided(id)
		c.s.stats.DeadLettered.Add(1)
		c.s.stats.TxDeadLettered.Add(1)
		c.s.log.Warn("message dead-lettered", zap.String("id", id), zap.String("group", clipForLog(group)), zap.String("reason", reason))
		return false, nil
	}
	if !c.bucket(group).take(now) {
		full[group] = true
		return false, nil
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
			zap.String("id", id), zap.String("group", clipForLog(group)), zap.Int32("check", count))
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
		b = newTokenBucket(float64(c.s.opts.TxCheckRate), c.s.engine.now())
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

// decisionLocks serialize what happens to one uncommitted message: the
// producer's commit or rollback, and the checker's check or dead letter.
type decisionLocks [64]sync.Mutex

// lockDecision locks the decisions of id and returns the unlock.
func (s *Server) lockDecision(id string) func() {
	h := fnv.New32a()
	h.Write([]byte(id))
	mu := &s.decisions[h.Sum32()%uint32(len(s.decisions))]
	mu.Lock()
	return mu.Unlock
}
