package memory

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kiteq/kiteq/storage"
)

// TestIndex checks the skip list against a sorted slice through random
// inserts, removes and seeks.
func TestIndex(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	checkIndex(t, r, strings.Compare, func() string { return fmt.Sprintf("%04x", r.IntN(5000)) })
}

// TestIndexCursor does the same with due positions, where many keys share
// a time and the order falls back on the id.
func TestIndexCursor(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	t0 := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	checkIndex(t, r, storage.Cursor.Compare, func() storage.Cursor {
		return storage.Cursor{
			Time: t0.Add(time.Duration(r.IntN(40)) * time.Millisecond),
			ID:   fmt.Sprintf("%03x", r.IntN(200)),
		}
	})
}

func checkIndex[K any](t *testing.T, r *rand.Rand, cmp func(a, b K) int, key func() K) {
	t.Helper()
	x := newIndex[K, int](cmp)
	var ref []K
	for step := range 20000 {
		k := key()
		i, found := slices.BinarySearchFunc(ref, k, cmp)
		switch r.IntN(3) {
		case 0, 1:
			if !found {
				n := x.insert(k, step)
				if cmp(n.key, k) != 0 || n.val != step {
					t.Fatalf("insert(%v) returned node %v", k, n.key)
				}
				ref = slices.Insert(ref, i, k)
			}
		case 2:
			if got := x.remove(k); got != found {
				t.Fatalf("remove(%v) = %v, want %v", k, got, found)
			}
			if found {
				ref = slices.Delete(ref, i, i+1)
			}
		}
		if x.len != len(ref) {
			t.Fatalf("len = %d, want %d", x.len, len(ref))
		}
		if step%500 == 0 {
			var all []K
			for n := x.first(); n != nil; n = n.next[0] {
				all = append(all, n.key)
			}
			if !slices.EqualFunc(all, ref, func(a, b K) bool { return cmp(a, b) == 0 }) {
				t.Fatalf("step %d: walk differs from the reference", step)
			}
		}
		seek := key()
		j, ok := slices.BinarySearchFunc(ref, seek, cmp)
		if ok {
			j++
		}
		n := x.after(seek)
		if j == len(ref) {
			if n != nil {
				t.Fatalf("after(%v) = %v, want nil", seek, n.key)
			}
		} else if n == nil || cmp(n.key, ref[j]) != 0 {
			t.Fatalf("after(%v) = %v, want %v", seek, n, ref[j])
		}
	}
}
