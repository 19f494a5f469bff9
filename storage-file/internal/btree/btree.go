// Package btree is an in-memory B-tree set of ordered keys, compact enough
// to index millions of pending messages: keys sit in arrays, about 1.3
// times their size per key, with no allocation per key.
package btree

// degree is the most children of an inner node; a node holds at most
// degree-1 keys and, but for the root, at least degree/2-1.
const degree = 64

const (
	maxKeys = degree - 1
	minKeys = degree/2 - 1
)

// Set is a set of keys ordered by less. The zero Set is not usable: use New.
type Set[K any] struct {
	less func(a, b K) bool
	root *node[K]
	n    int
}

type node[K any] struct {
	keys     []K
	children []*node[K] // nil in a leaf
}

// New returns an empty set ordered by less.
func New[K any](less func(a, b K) bool) *Set[K] {
	return &Set[K]{less: less}
}

// Len returns the number of keys.
func (t *Set[K]) Len() int { return t.n }

// find returns the index of the first key >= k in n, and whether it is k.
func (t *Set[K]) find(n *node[K], k K) (int, bool) {
	lo, hi := 0, len(n.keys)
	for lo < hi {
		mid := int(uint(lo+hi) >> 1)
		if t.less(n.keys[mid], k) {
			lo = mid + 1
		} else {
			hi = mid
		}
	}
	return lo, lo < len(n.keys) && !t.less(k, n.keys[lo])
}

// Insert adds k and reports whether it was absent.
func (t *Set[K]) Insert(k K) bool {
	if t.root == nil {
		t.root = &node[K]{keys: make([]K, 0, 4)}
	}
	if len(t.root.keys) == maxKeys {
		old := t.root
		t.root = &node[K]{children: []*node[K]{old}}
		t.split(t.root, 0)
	}
	if t.insert(t.root, k) {
		t.n++
		return true
	}
	return false
}

func (t *Set[K]) insert(n *node[K], k K) bool {
	for {
		i, found := t.find(n, k)
		if found {
			return false
		}
		if n.children == nil {
			n.keys = append(n.keys, k)
			copy(n.keys[i+1:], n.keys[i:])
			n.keys[i] = k
			return true
		}
		if len(n.children[i].keys) == maxKeys {
			t.split(n, i)
			if !t.less(k, n.keys[i]) {
				if !t.less(n.keys[i], k) {
					return false
				}
				i++
			}
		}
		n = n.children[i]
	}
}

// split splits the full child i of n around its middle key.
func (t *Set[K]) split(n *node[K], i int) {
	child := n.children[i]
	mid := len(child.keys) / 2
	right := &node[K]{keys: append(make([]K, 0, maxKeys), child.keys[mid+1:]...)}
	if child.children != nil {
		right.children = append(make([]*node[K], 0, degree), child.children[mid+1:]...)
		clear(child.children[mid+1:])
		child.children = child.children[:mid+1]
	}
	midKey := child.keys[mid]
	var zero K
	for j := mid; j < len(child.keys); j++ {
		child.keys[j] = zero
	}
	child.keys = child.keys[:mid]

	n.keys = append(n.keys, zero)
	copy(n.keys[i+1:], n.keys[i:])
	n.keys[i] = midKey
	n.children = append(n.children, nil)
	copy(n.children[i+2:], n.children[i+1:])
	n.children[i+1] = right
}

// Delete removes k and reports whether it was present.
func (t *Set[K]) Delete(k K) bool {
	if t.root == nil {
		return false
	}
	ok := t.delete(t.root, k)
	if len(t.root.keys) == 0 && t.root.children != nil {
		t.root = t.root.children[0]
	}
	if ok {
		t.n--
	}
	return ok
}

func (t *Set[K]) delete(n *node[K], k K) bool {
	i, found := t.find(n, k)
	if n.children == nil {
		if !found {
			return false
		}
		n.keys = remove(n.keys, i)
		return true
	}
	if found {
		// Replace k by its predecessor, the largest key of the left subtree.
		if len(n.children[i].keys) > minKeys {
			pred := t.max(n.children[i])
			n.keys[i] = pred
			return t.delete(n.children[i], pred)
		}
		if len(n.children[i+1].keys) > minKeys {
			succ := t.min(n.children[i+1])
			n.keys[i] = succ
			return t.delete(n.children[i+1], succ)
		}
		t.merge(n, i)
		return t.delete(n.children[i], k)
	}
	if len(n.children[i].keys) <= minKeys {
		i = t.grow(n, i)
	}
	return t.delete(n.children[i], k)
}

// grow gives child i of n at least minKeys+1 keys, borrowing from a
// sibling or merging with one, and returns the child's new index.
func (t *Set[K]) grow(n *node[K], i int) int {
	child := n.children[i]
	switch {
	case i > 0 && len(n.children[i-1].keys) > minKeys:
		left := n.children[i-1]
		child.keys = append(child.keys, n.keys[i-1])
		copy(child.keys[1:], child.keys)
		child.keys[0] = n.keys[i-1]
		n.keys[i-1] = left.keys[len(left.keys)-1]
		left.keys = remove(left.keys, len(left.keys)-1)
		if left.children != nil {
			last := left.children[len(left.children)-1]
			left.children = removeChild(left.children, len(left.children)-1)
			child.children = append(child.children, nil)
			copy(child.children[1:], child.children)
			child.children[0] = last
		}
		return i
	case i < len(n.children)-1 && len(n.children[i+1].keys) > minKeys:
		right := n.children[i+1]
		child.keys = append(child.keys, n.keys[i])
		n.keys[i] = right.keys[0]
		right.keys = remove(right.keys, 0)
		if right.children != nil {
			child.children = append(child.children, right.children[0])
			right.children = removeChild(right.children, 0)
		}
		return i
	case i > 0:
		t.merge(n, i-1)
		return i - 1
	default:
		t.merge(n, i)
		return i
	}
}

// merge joins children i and i+1 of n around key i.
func (t *Set[K]) merge(n *node[K], i int) {
	left, right := n.children[i], n.children[i+1]
	left.keys = append(left.keys, n.keys[i])
	left.keys = append(left.keys, right.keys...)
	if left.children != nil {
		left.children = append(left.children, right.children...)
	}
	n.keys = remove(n.keys, i)
	n.children = removeChild(n.children, i+1)
}

func (t *Set[K]) min(n *node[K]) K {
	for n.children != nil {
		n = n.children[0]
	}
	return n.keys[0]
}

func (t *Set[K]) max(n *node[K]) K {
	for n.children != nil {
		n = n.children[len(n.children)-1]
	}
	return n.keys[len(n.keys)-1]
}

// Min returns the smallest key, and false when the set is empty.
func (t *Set[K]) Min() (K, bool) {
	if t.n == 0 {
		var zero K
		return zero, false
	}
	return t.min(t.root), true
}

// AscendAfter calls fn with each key greater than after, in order, until
// fn returns false. With inclusive, a key equal to after is visited too.
func (t *Set[K]) AscendAfter(after K, inclusive bool, fn func(K) bool) {
	if t.root != nil {
		t.ascend(t.root, after, inclusive, fn)
	}
}

// Ascend calls fn with every key in order until fn returns false.
func (t *Set[K]) Ascend(fn func(K) bool) {
	if t.root != nil {
		t.all(t.root, fn)
	}
}

func (t *Set[K]) ascend(n *node[K], after K, inclusive bool, fn func(K) bool) bool {
	i, found := t.find(n, after)
	if found && !inclusive {
		// Skip the equal key itself; its right subtree holds greater keys.
		if n.children != nil && !t.ascendFrom(n, i+1, fn) {
			return false
		}
		if n.children == nil {
			return t.ascendFrom(n, i+1, fn)
		}
		return true
	}
	if n.children != nil && !found {
		if !t.ascend(n.children[i], after, inclusive, fn) {
			return false
		}
	}
	for j := i; j < len(n.keys); j++ {
		if !fn(n.keys[j]) {
			return false
		}
		if n.children != nil && !t.all(n.children[j+1], fn) {
			return false
		}
	}
	return true
}

// ascendFrom visits keys j >= i of n and their right subtrees.
func (t *Set[K]) ascendFrom(n *node[K], i int, fn func(K) bool) bool {
	if n.children != nil {
		if !t.all(n.children[i], fn) {
			return false
		}
	}
	for j := i; j < len(n.keys); j++ {
		if !fn(n.keys[j]) {
			return false
		}
		if n.children != nil && !t.all(n.children[j+1], fn) {
			return false
		}
	}
	return true
}

func (t *Set[K]) all(n *node[K], fn func(K) bool) bool {
	for j, k := range n.keys {
		if n.children != nil && !t.all(n.children[j], fn) {
			return false
		}
		if !fn(k) {
			return false
		}
	}
	if n.children != nil {
		return t.all(n.children[len(n.children)-1], fn)
	}
	return true
}

func remove[K any](s []K, i int) []K {
	copy(s[i:], s[i+1:])
	var zero K
	s[len(s)-1] = zero
	return s[:len(s)-1]
}

func removeChild[K any](s []*node[K], i int) []*node[K] {
	copy(s[i:], s[i+1:])
	s[len(s)-1] = nil
	return s[:len(s)-1]
}
