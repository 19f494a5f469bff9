package memory

import "math/rand/v2"

// maxLevel bounds the skip list's height; with p = 1/4 it serves 4^16
// keys at full speed, far beyond any shard.
const maxLevel = 16

type node[V any] struct {
	key  string
	val  V
	next []*node[V]
}

// index is a skip list ordered by key. A shard keeps one beside its map so
// that Due and DeadLetters can seek to "the first id after X" in O(log n)
// and then walk in id order, instead of sorting the whole shard. It is not
// safe for concurrent use; the shard's mutex guards it.
type index[V any] struct {
	head  node[V]
	level int
	len   int
}

func newIndex[V any]() *index[V] {
	return &index[V]{head: node[V]{next: make([]*node[V], maxLevel)}, level: 1}
}

func randomLevel() int {
	level := 1
	for r := rand.Uint32(); level < maxLevel && r&3 == 0; r >>= 2 {
		level++
	}
	return level
}

// insert adds key, which must not be in the index, and returns its node.
func (x *index[V]) insert(key string, val V) *node[V] {
	var update [maxLevel]*node[V]
	p := &x.head
	for i := x.level - 1; i >= 0; i-- {
		for p.next[i] != nil && p.next[i].key < key {
			p = p.next[i]
		}
		update[i] = p
	}
	level := randomLevel()
	for i := x.level; i < level; i++ {
		update[i] = &x.head
	}
	if level > x.level {
		x.level = level
	}
	n := &node[V]{key: key, val: val, next: make([]*node[V], level)}
	for i := range level {
		n.next[i] = update[i].next[i]
		update[i].next[i] = n
	}
	x.len++
	return n
}

// remove deletes key and reports whether it was there.
func (x *index[V]) remove(key string) bool {
	var update [maxLevel]*node[V]
	p := &x.head
	for i := x.level - 1; i >= 0; i-- {
		for p.next[i] != nil && p.next[i].key < key {
			p = p.next[i]
		}
		update[i] = p
	}
	n := p.next[0]
	if n == nil || n.key != key {
		return false
	}
	for i := range n.next {
		update[i].next[i] = n.next[i]
	}
	for x.level > 1 && x.head.next[x.level-1] == nil {
		x.level--
	}
	x.len--
	return true
}

// after returns the first node whose key is greater than key, or nil.
func (x *index[V]) after(key string) *node[V] {
	p := &x.head
	for i := x.level - 1; i >= 0; i-- {
		for p.next[i] != nil && p.next[i].key <= key {
			p = p.next[i]
		}
	}
	return p.next[0]
}
