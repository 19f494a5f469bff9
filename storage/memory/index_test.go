package memory

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
)

// TestIndex checks the skip list against a sorted slice through random
// inserts, removes and seeks.
func TestIndex(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	x := newIndex[int]()
	var ref []string
	key := func() string { return fmt.Sprintf("%04x", r.IntN(5000)) }
	for step := range 20000 {
		k := key()
		i, found := slices.BinarySearch(ref, k)
		switch r.IntN(3) {
		case 0, 1:
			if !found {
				n := x.insert(k, step)
				if n.key != k || n.val != step {
					t.Fatalf("insert(%s) returned node %s", k, n.key)
				}
				ref = slices.Insert(ref, i, k)
			}
		case 2:
			if got := x.remove(k); got != found {
				t.Fatalf("remove(%s) = %v, want %v", k, got, found)
			}
			if found {
				ref = slices.Delete(ref, i, i+1)
			}
		}
		if x.len != len(ref) {
			t.Fatalf("len = %d, want %d", x.len, len(ref))
		}
		if step%500 == 0 {
			var all []string
			for n := x.after(""); n != nil; n = n.next[0] {
				all = append(all, n.key)
			}
			if !slices.Equal(all, ref) {
				t.Fatalf("step %d: walk differs from the reference", step)
			}
		}
		seek := key()
		j, ok := slices.BinarySearch(ref, seek)
		if ok {
			j++
		}
		n := x.after(seek)
		if j == len(ref) {
			if n != nil {
				t.Fatalf("after(%s) = %s, want nil", seek, n.key)
			}
		} else if n == nil || n.key != ref[j] {
			t.Fatalf("after(%s) = %v, want %s", seek, n, ref[j])
		}
	}
}
