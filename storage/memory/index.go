package memory

import "math/rand/v2"

// maxLevel bounds the skip list's height; with p = 1/4 it serves 4^16
// keys at full speed, far beyond any shard.
const maxLevel = 16

type node[K, V any] struct {
	key  K
	val  V
	next []*node[K, V]
}

// index is a skip list ordered by its compare function. A shard keeps
// several beside its maps: its live messages ordered by due position
// (dueKey), so that Due seeks to "the first message after X" in
// O(log n) and walks only the messages it returns, and its dead letters
// ordered by id, for DeadLetters. Keys are unique. It is not safe for
// concurrent use; the shard's mutex guards it.
type index[K, V any] struct {
	head  node[K, V]
	level int
	len   int
	cmp   func(a, b K) int
}

func newIndex[K, V any](cmp func(a, b K) int) *index[K, V] {
	return &index[K, V]{head: node[K, V]{next: make([]*node[K, V], maxLevel)}, level: 1, cmp: cmp}
}

func randomLevel() int {
	level := 1
	for r := rand.Uint32(); level < maxLevel && r&3 == 0; r >>= 2 {
		level++
	}
	return level
}

// path fills update with the last node before key on every level and
// returns the last node before key on level 0.
func (x *index[K, V]) path(key K, update *[maxLevel]*node[K, V]) *node[K, V] {
	p := &x.head
	for i := x.level - 1; i >= 0; i-- {
		for p.next[i] != nil && x.cmp(p.next[i].key, key) < 0 {
			p = p.next[i]
		}
		update[i] = p
	}
	return p
}

// newNode returns a node with level links. Most nodes have one link and
// most of the rest fewer than four: those get their links in the same
// allocation as the node, so that a walk touches one cache line less.
func newNode[K, V any](level int) *node[K, V] {
	switch {
	case level == 1:
		n := &struct {
			node[K, V]
			links [1]*node[K, V]
		}{}
		n.next = n.links[:]
		return &n.node
	case level <= 3:
		n := &struct {
			node[K, V]
			links [3]*node[K, V]
		}{}
		n.next = n.links[:level]
		return &n.node
	}
	return &node[K, V]{next: make([]*node[K, V], level)}
}

// insert adds key, which must not be in the index, and returns its node.
func (x *index[K, V]) insert(key K, val V) *node[K, V] {
	var update [maxLevel]*node[K, V]
	x.path(key, &update)
	level := randomLevel()
	for i := x.level; i < level; i++ {
		update[i] = &x.head
	}
	if level > x.level {
		x.level = level
	}
	n := newNode[K, V](level)
	n.key, n.val = key, val
	for i := range level {
		n.next[i] = update[i].next[i]
		update[i].next[i] = n
	}
	x.len++
	return n
}

// remove deletes key and reports whether it was there.
func (x *index[K, V]) remove(key K) bool {
	var update [maxLevel]*node[K, V]
	n := x.path(key, &update).next[0]
	if n == nil || x.cmp(n.key, key) != 0 {
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

// first returns the node with the least key, or nil.
func (x *index[K, V]) first() *node[K, V] { return x.head.next[0] }

// after returns the first node whose key is greater than key, or nil.
func (x *index[K, V]) after(key K) *node[K, V] {
	p := &x.head
	for i := x.level - 1; i >= 0; i-- {
		for p.next[i] != nil && x.cmp(p.next[i].key, key) <= 0 {
			p = p.next[i]
		}
	}
	return p.next[0]
}
