// Package memory is the in-memory message store: fast, bounded, and gone
// when the process exits. The broker uses it for -db=memory:// and tests use
// it wherever they need a Store.
//
// Messages live in shards chosen by a hash of the id, each with its own
// mutex, so concurrent publishers rarely wait for each other. Every shard
// keeps its live messages in a map (for Save, Get and the transaction and
// delivery updates) and in two skip lists ordered by due position
// (NextDeliverTime, id): one of committed messages (DueDelivery) and one
// of uncommitted ones (DueTxCheck). Every write that changes a message's
// kind or NextDeliverTime moves it between or within them, in O(log n). Due
// seeks each shard's list to the caller's cursor and walks forward over
// due messages only, as long as they can still make the page, so polling
// a store of a million messages that are not due yet costs one seek per
// shard. Dead letters have a map and a skip list ordered by id (for
// DeadLetters).
//
// NextDeliverTime is truncated to the millisecond on every write (Save,
// Commit, RecordDelivery), as a backend that keeps milliseconds would, so
// that what Due returns is exactly what it orders by and a message's
// Cursor round-trips.
//
// A stored *storage.Message is never changed in place: an update replaces
// it with a new value. So a page can be collected under the shard locks as
// plain pointers and deep-copied after the locks are released.
//
// Lock order: a call holds at most one shard mutex at a time.
package memory

import (
	"bytes"
	"context"
	"fmt"
	"hash/maphash"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/storage"
)

const (
	// DefaultCapacity is how many live messages a store holds unless told
	// otherwise (?cap=N, New(N)).
	DefaultCapacity = 1_000_000
	// DefaultLimit is the page size of Due and DeadLetters when the caller
	// passes a limit <= 0.
	DefaultLimit = 100

	numShards = 64
)

var _ storage.Store = (*Store)(nil)

// Store is the in-memory storage.Store. It is safe for concurrent use.
type Store struct {
	// Now is the clock for Commit's due time and the time of a dead letter;
	// New sets it to time.Now. Replace it, before the store is shared, to
	// test with a fake clock.
	Now func() time.Time

	capacity int64
	live     atomic.Int64 // live messages; dead letters do not count
	closed   atomic.Bool
	seed     maphash.Seed
	shards   [numShards]shard
}

type (
	liveNode = node[dueKey, *storage.Message]
	dueIndex = index[dueKey, *storage.Message]
	deadNode = node[string, *storage.DeadLetter]
)

type shard struct {
	mu sync.Mutex
	// live maps an id to its node in due[kind(m)], keyed by m.Cursor().
	live     map[string]*liveNode
	due      [2]*dueIndex // by storage.DueKind
	dead     map[string]*deadNode
	deadByID *index[string, *storage.DeadLetter]
	_        [64]byte // keep neighbouring shards' mutexes off one cache line
}

func (sh *shard) reset() {
	sh.live = make(map[string]*liveNode)
	for k := range sh.due {
		sh.due[k] = newIndex[dueKey, *storage.Message](compareDue)
	}
	sh.dead = make(map[string]*deadNode)
	sh.deadByID = newIndex[string, *storage.DeadLetter](strings.Compare)
}

// dueKey is a position in the due order: storage.Cursor in a form that
// compares faster and the same way (the instant, whatever the location or
// monotonic reading, then the id), the time as whole seconds since 1970
// and nanoseconds within the second.
type dueKey struct {
	sec  int64
	nsec int32
	id   string
}

func keyOf(c storage.Cursor) dueKey {
	return dueKey{sec: c.Time.Unix(), nsec: int32(c.Time.Nanosecond()), id: c.ID}
}

func compareDue(a, b dueKey) int {
	switch {
	case a.sec < b.sec:
		return -1
	case a.sec > b.sec:
		return +1
	case a.nsec < b.nsec:
		return -1
	case a.nsec > b.nsec:
		return +1
	}
	return strings.Compare(a.id, b.id)
}

// kind is the due kind a live message belongs to.
func kind(m *storage.Message) storage.DueKind {
	if m.Committed {
		return storage.DueDelivery
	}
	return storage.DueTxCheck
}

// msTime is t as the store keeps it: to the millisecond, without a
// monotonic clock reading.
func msTime(t time.Time) time.Time { return t.Truncate(time.Millisecond) }

// insertLive adds a live message to its due index; the caller holds sh.mu.
func (sh *shard) insertLive(m *storage.Message) {
	sh.live[m.ID()] = sh.due[kind(m)].insert(keyOf(m.Cursor()), m)
}

// replaceLive puts m in the place of the live message n; the caller holds
// sh.mu. It moves the message in the due indexes only when its kind or
// position changed.
func (sh *shard) replaceLive(n *liveNode, m *storage.Message) {
	if kind(m) == kind(n.val) && compareDue(n.key, keyOf(m.Cursor())) == 0 {
		n.val = m
		return
	}
	sh.due[kind(n.val)].remove(n.key)
	sh.insertLive(m)
}

// New returns an empty store that holds up to capacity live messages;
// capacity <= 0 means DefaultCapacity.
func New(capacity int) *Store {
	if capacity <= 0 {
		capacity = DefaultCapacity
	}
	s := &Store{Now: time.Now, capacity: int64(capacity), seed: maphash.MakeSeed()}
	for i := range s.shards {
		s.shards[i].reset()
	}
	return s
}

// Cap returns the most live messages the store holds.
func (s *Store) Cap() int { return int(s.capacity) }

// Len returns the number of live messages (dead letters not included).
func (s *Store) Len() int { return int(s.live.Load()) }

func (s *Store) shard(id string) *shard {
	return &s.shards[maphash.String(s.seed, id)%numShards]
}

func (s *Store) now() time.Time {
	if s.Now != nil {
		return s.Now()
	}
	return time.Now()
}

// begin is the check every call starts with.
func (s *Store) begin(ctx context.Context, op string) error {
	if s.closed.Load() {
		return closedError(op)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("memory store: %s: %w", op, err)
	}
	return nil
}

func closedError(op string) error { return fmt.Errorf("memory store: %s: %w", op, storage.ErrClosed) }

func notFound(op, id string) error {
	return fmt.Errorf("memory store: %s %s: %w", op, id, storage.ErrNotFound)
}

// reserve takes one unit of capacity, or reports that the store is full.
func (s *Store) reserve() bool {
	for {
		n := s.live.Load()
		if n >= s.capacity {
			return false
		}
		if s.live.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

func validate(m *storage.Message) error {
	switch {
	case m == nil:
		return fmt.Errorf("memory store: save: %w: nil message", storage.ErrInvalid)
	case m.Header == nil:
		return fmt.Errorf("memory store: save: %w: message has no header", storage.ErrInvalid)
	case !protocol.ValidMessageId(m.ID()):
		return fmt.Errorf("memory store: save %q: %w: id is not %d lowercase hex characters",
			m.ID(), storage.ErrInvalid, protocol.MessageIdLen)
	}
	if err := storage.CheckFailState(m.FailGroups, m.FailCounts, m.FailDue); err != nil {
		return fmt.Errorf("memory store: save %s: %w", m.ID(), err)
	}
	return nil
}

// Save stores a deep copy of m, its Digest with it. It returns an error
// wrapping storage.ErrFull, and evicts nothing, when the store already
// holds its capacity of live messages. An id that is live or dead-lettered
// changes nothing: Save reports (false, nil) when the Digests are equal or
// either is nil, and an error wrapping storage.ErrConflict when they differ.
func (s *Store) Save(ctx context.Context, m *storage.Message) (bool, error) {
	if err := s.begin(ctx, "save"); err != nil {
		return false, err
	}
	if err := validate(m); err != nil {
		return false, err
	}
	id := m.ID()
	own := m.Clone() // outside the lock: the copy is the costly part
	own.NextDeliverTime = msTime(own.NextDeliverTime)
	for i, t := range own.FailDue {
		own.FailDue[i] = msTime(t)
	}
	sh := s.shard(id)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if s.closed.Load() {
		return false, closedError("save")
	}
	if n, ok := sh.live[id]; ok {
		return false, duplicate(id, n.val, m)
	}
	if n, ok := sh.dead[id]; ok {
		return false, duplicate(id, n.val.Message, m)
	}
	if !s.reserve() {
		return false, fmt.Errorf("memory store: full (%d messages; raise ?cap=): %w", s.capacity, storage.ErrFull)
	}
	sh.insertLive(own)
	return true, nil
}

// duplicate is Save's answer for m, whose id the store holds as stored: nil
// for a retry of the same publish (an empty Digest is unknown, as nil is:
// Clone makes one the other), ErrConflict for another message. The error
// names no digest: it may reach the producer that reused the id.
func duplicate(id string, stored, m *storage.Message) error {
	if len(stored.Digest) == 0 || len(m.Digest) == 0 || bytes.Equal(stored.Digest, m.Digest) {
		return nil
	}
	return fmt.Errorf("memory store: save %s: %w", id, storage.ErrConflict)
}

// lookup returns the live message id under the shard lock.
func (s *Store) lookup(op, id string) (*storage.Message, error) {
	sh := s.shard(id)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if s.closed.Load() {
		return nil, closedError(op)
	}
	n, ok := sh.live[id]
	if !ok {
		return nil, notFound(op, id)
	}
	return n.val, nil
}

// Get returns a deep copy of the live message with that id.
func (s *Store) Get(ctx context.Context, id string) (*storage.Message, error) {
	if err := s.begin(ctx, "get"); err != nil {
		return nil, err
	}
	m, err := s.lookup("get", id)
	if err != nil {
		return nil, err
	}
	return m.Clone(), nil // stored values are immutable: copy outside the lock
}

// update replaces the live message id with change(old) under the shard
// lock. change must not modify old; it returns the new value, or an error
// that leaves the message as it was.
func (s *Store) update(op, id string, change func(old *storage.Message) (*storage.Message, error)) error {
	sh := s.shard(id)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if s.closed.Load() {
		return closedError(op)
	}
	n, ok := sh.live[id]
	if !ok {
		return notFound(op, id)
	}
	m, err := change(n.val)
	if err != nil {
		return err
	}
	if m != n.val {
		sh.replaceLive(n, m)
	}
	return nil
}

// Commit marks the message committed and due now (to the millisecond),
// moving it from the DueTxCheck index to the DueDelivery one. It also sets
// the header's commit flag, so that consumers receive commit=true.
// Committing a committed message changes nothing.
func (s *Store) Commit(ctx context.Context, id string) error {
	if err := s.begin(ctx, "commit"); err != nil {
		return err
	}
	return s.update("commit", id, func(old *storage.Message) (*storage.Message, error) {
		if old.Committed {
			return old, nil
		}
		m := *old
		m.Committed = true
		m.NextDeliverTime = msTime(s.now())
		m.DeliverCount = 0 // the transaction checks were not deliveries
		m.Header = protocol.CloneHeader(old.Header)
		committed := true
		m.Header.Commit = &committed
		return &m, nil
	})
}

// Rollback deletes an uncommitted message; storage.ErrDecided when it is
// committed. A missing (or dead-lettered) id succeeds.
func (s *Store) Rollback(ctx context.Context, id string) error {
	if err := s.begin(ctx, "rollback"); err != nil {
		return err
	}
	sh := s.shard(id)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if s.closed.Load() {
		return closedError("rollback")
	}
	n, ok := sh.live[id]
	if !ok {
		return nil
	}
	if n.val.Committed {
		return fmt.Errorf("memory store: rollback %s: %w (committed)", id, storage.ErrDecided)
	}
	s.removeLive(sh, n)
	return nil
}

// removeLive drops the live message n; the caller holds sh.mu.
func (s *Store) removeLive(sh *shard, n *liveNode) {
	delete(sh.live, n.val.ID())
	sh.due[kind(n.val)].remove(n.key)
	s.live.Add(-1)
}

// RecordDelivery stores the outcome of a delivery round (or of a
// transaction check: an uncommitted message's NextDeliverTime is when it is
// checked next). NextDeliverTime is kept to the millisecond.
func (s *Store) RecordDelivery(ctx context.Context, r storage.DeliveryResult) error {
	if err := s.begin(ctx, "record delivery"); err != nil {
		return err
	}
	if err := storage.CheckFailState(r.FailGroups, r.FailCounts, r.FailDue); err != nil {
		return fmt.Errorf("memory store: record delivery %s: %w", r.MessageID, err)
	}
	succ := append([]string(nil), r.SuccGroups...)
	fail := append([]string(nil), r.FailGroups...)
	counts := append([]int32(nil), r.FailCounts...)
	var due []time.Time
	for _, t := range r.FailDue {
		due = append(due, msTime(t))
	}
	next := msTime(r.NextDeliverTime)
	return s.update("record delivery", r.MessageID, func(old *storage.Message) (*storage.Message, error) {
		m := *old
		m.DeliverCount = r.DeliverCount
		m.NextDeliverTime = next
		m.SuccGroups = succ
		m.FailGroups = fail
		m.FailCounts = counts
		m.FailDue = due
		return &m, nil
	})
}

// Delete removes a live message. A missing id succeeds; a dead letter stays
// in the dead-letter queue.
func (s *Store) Delete(ctx context.Context, id string) error {
	if err := s.begin(ctx, "delete"); err != nil {
		return err
	}
	sh := s.shard(id)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if s.closed.Load() {
		return closedError("delete")
	}
	if n, ok := sh.live[id]; ok {
		s.removeLive(sh, n)
	}
	return nil
}

// DeadLetter moves a live message to the dead-letter queue, freeing its
// unit of capacity.
func (s *Store) DeadLetter(ctx context.Context, id string, reason string) error {
	if err := s.begin(ctx, "dead-letter"); err != nil {
		return err
	}
	sh := s.shard(id)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if s.closed.Load() {
		return closedError("dead-letter")
	}
	n, ok := sh.live[id]
	if !ok {
		return notFound("dead-letter", id)
	}
	s.removeLive(sh, n)
	dl := &storage.DeadLetter{Message: n.val, Reason: reason, At: s.now()}
	sh.dead[id] = sh.deadByID.insert(id, dl)
	return nil
}

// Redeliver moves a dead letter back to the live messages, committed and
// due now, taking a unit of capacity.
func (s *Store) Redeliver(ctx context.Context, id string) error {
	if err := s.begin(ctx, "redeliver"); err != nil {
		return err
	}
	sh := s.shard(id)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if s.closed.Load() {
		return closedError("redeliver")
	}
	n, ok := sh.dead[id]
	if !ok {
		return notFound("redeliver", id)
	}
	if !s.reserve() {
		return fmt.Errorf("memory store: redeliver %s: full (%d messages; raise ?cap=): %w", id, s.capacity, storage.ErrFull)
	}
	delete(sh.dead, id)
	sh.deadByID.remove(id)
	m := *n.val.Message
	m.Header = protocol.CloneHeader(m.Header)
	m.Header.Commit = new(true)
	m.Committed = true
	m.DeliverCount = 0
	m.NextDeliverTime = msTime(s.now())
	m.FailGroups = nil
	m.FailCounts = nil
	m.FailDue = nil
	sh.insertLive(&m)
	return nil
}

// Due returns up to q.Limit messages of q.Kind whose NextDeliverTime is at
// or before q.Before, strictly after q.After, in the due order
// (NextDeliverTime, id).
//
// Cost: each shard seeks its index of q.Kind to q.After in O(log n) and
// walks forward until q.Before, or until it reaches a message that cannot
// make the page (the page holds q.Limit messages before it). Messages that
// are not due, or of the other kind, are never visited: a poll that finds
// nothing due costs one seek per shard however large the backlog, and a
// page of k costs O(shards·log n + k·log k·log shards).
func (s *Store) Due(ctx context.Context, q storage.DueQuery) ([]*storage.Message, error) {
	if err := s.begin(ctx, "due"); err != nil {
		return nil, err
	}
	if q.Kind != storage.DueDelivery && q.Kind != storage.DueTxCheck {
		return nil, fmt.Errorf("memory store: due: unknown kind %d (want DueDelivery or DueTxCheck)", q.Kind)
	}
	before := keyOf(storage.Cursor{Time: q.Before}) // at Before is due
	page, err := collect(ctx, s, "due", keyOf(q.After), q.After.IsZero(), q.Limit,
		func(sh *shard) *dueIndex { return sh.due[q.Kind] },
		func(k dueKey) bool { return k.sec < before.sec || k.sec == before.sec && k.nsec <= before.nsec })
	if err != nil {
		return nil, err
	}
	out := make([]*storage.Message, len(page))
	for i, m := range page {
		out[i] = m.Clone()
	}
	return out, nil
}

// DeadLetters returns up to limit dead letters with ids above afterID, in
// ascending id order.
func (s *Store) DeadLetters(ctx context.Context, afterID string, limit int) ([]*storage.DeadLetter, error) {
	if err := s.begin(ctx, "dead letters"); err != nil {
		return nil, err
	}
	page, err := collect(ctx, s, "dead letters", afterID, false, limit,
		func(sh *shard) *index[string, *storage.DeadLetter] { return sh.deadByID },
		func(string) bool { return true })
	if err != nil {
		return nil, err
	}
	out := make([]*storage.DeadLetter, len(page))
	for i, dl := range page {
		out[i] = &storage.DeadLetter{Message: dl.Message.Clone(), Reason: dl.Reason, At: dl.At}
	}
	return out, nil
}

type hit[K, V any] struct {
	key K
	val V
}

// collect gathers, across all shards and in the order of their indexes,
// the first limit values with keys above after (from the first key when
// fromStart) while inRange holds; inRange must hold for a prefix of every
// index. It visits one shard at a time, offering that shard's keys in
// order to the page so far (the least limit keys seen); the walk of a
// shard stops at the first key the page refuses, so once the page is full
// each shard walks only what it adds. The values are the stored ones: the
// caller copies them.
func collect[K, V any](ctx context.Context, s *Store, op string, after K, fromStart bool, limit int,
	byKey func(*shard) *index[K, V], inRange func(K) bool) ([]V, error) {
	if limit <= 0 {
		limit = DefaultLimit
	}
	page := least[K, V]{limit: limit}
	for i := range s.shards {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("memory store: %s: %w", op, err)
		}
		sh := &s.shards[i]
		sh.mu.Lock()
		if s.closed.Load() {
			sh.mu.Unlock()
			return nil, closedError(op)
		}
		x := byKey(sh)
		page.cmp = x.cmp
		n := x.first()
		if !fromStart {
			n = x.after(after)
		}
		for ; n != nil && inRange(n.key) && page.offer(n.key, n.val); n = n.next[0] {
		}
		sh.mu.Unlock()
	}
	return page.sorted(), nil
}

// least keeps the limit least keys offered to it, in a max-heap.
type least[K, V any] struct {
	heap  []hit[K, V]
	limit int
	cmp   func(a, b K) int
}

// offer adds key unless the heap is full of lesser keys, and reports
// whether it did; a key it refuses is greater than every key it holds.
func (l *least[K, V]) offer(key K, val V) bool {
	h := l.heap
	if len(h) < l.limit {
		h = append(h, hit[K, V]{key, val})
		for i := len(h) - 1; i > 0; { // sift up
			p := (i - 1) / 2
			if l.cmp(h[p].key, h[i].key) >= 0 {
				break
			}
			h[p], h[i] = h[i], h[p]
			i = p
		}
		l.heap = h
		return true
	}
	if l.cmp(key, h[0].key) >= 0 {
		return false
	}
	h[0] = hit[K, V]{key, val}
	for i := 0; ; { // sift down
		c := 2*i + 1
		if c >= len(h) {
			break
		}
		if c+1 < len(h) && l.cmp(h[c+1].key, h[c].key) > 0 {
			c++
		}
		if l.cmp(h[i].key, h[c].key) >= 0 {
			break
		}
		h[i], h[c] = h[c], h[i]
		i = c
	}
	return true
}

// sorted returns the values held, by ascending key.
func (l *least[K, V]) sorted() []V {
	if len(l.heap) == 0 {
		return nil
	}
	slices.SortFunc(l.heap, func(a, b hit[K, V]) int { return l.cmp(a.key, b.key) })
	out := make([]V, len(l.heap))
	for i, h := range l.heap {
		out[i] = h.val
	}
	return out
}

// Close drops every message; later calls return storage.ErrClosed, and so
// does a second Close.
func (s *Store) Close() error {
	if !s.closed.CompareAndSwap(false, true) {
		return closedError("close")
	}
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		sh.reset()
		sh.mu.Unlock()
	}
	s.live.Store(0)
	return nil
}
