package btree

import (
	"math/rand/v2"
	"slices"
	"testing"
)

func less(a, b int) bool { return a < b }

// TestAgainstSortedSlice runs random inserts, deletes and range scans on a
// Set and on a sorted slice, and compares them after every step.
func TestAgainstSortedSlice(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for _, keyRange := range []int{10, 300, 100000} {
		s := New(less)
		var ref []int
		for step := range 60000 {
			k := r.IntN(keyRange)
			i, found := slices.BinarySearch(ref, k)
			if r.IntN(3) == 0 {
				if got := s.Delete(k); got != found {
					t.Fatalf("range %d step %d: Delete(%d) = %t, want %t", keyRange, step, k, got, found)
				}
				if found {
					ref = slices.Delete(ref, i, i+1)
				}
			} else {
				if got := s.Insert(k); got == found {
					t.Fatalf("range %d step %d: Insert(%d) = %t, want %t", keyRange, step, k, got, !found)
				}
				if !found {
					ref = slices.Insert(ref, i, k)
				}
			}
			if s.Len() != len(ref) {
				t.Fatalf("Len %d, want %d", s.Len(), len(ref))
			}
			if step%997 == 0 {
				check(t, s, ref, r.IntN(keyRange+2)-1)
			}
		}
		check(t, s, ref, -1)
		for _, k := range slices.Clone(ref) {
			if !s.Delete(k) {
				t.Fatalf("Delete(%d) of a present key failed", k)
			}
		}
		if s.Len() != 0 {
			t.Fatalf("Len %d after deleting everything", s.Len())
		}
		if _, ok := s.Min(); ok {
			t.Fatal("Min of an empty set")
		}
	}
}

func check(t *testing.T, s *Set[int], ref []int, after int) {
	t.Helper()
	var all []int
	s.Ascend(func(k int) bool { all = append(all, k); return true })
	if !slices.Equal(all, ref) {
		t.Fatalf("Ascend = %d keys, differs from reference %d keys", len(all), len(ref))
	}
	for _, inclusive := range []bool{false, true} {
		var got, want []int
		s.AscendAfter(after, inclusive, func(k int) bool { got = append(got, k); return len(got) < 50 })
		for _, k := range ref {
			if (k > after || (inclusive && k == after)) && len(want) < 50 {
				want = append(want, k)
			}
		}
		if !slices.Equal(got, want) {
			t.Fatalf("AscendAfter(%d, %t) = %v, want %v", after, inclusive, got, want)
		}
	}
	if len(ref) > 0 {
		if m, ok := s.Min(); !ok || m != ref[0] {
			t.Fatalf("Min = %d, want %d", m, ref[0])
		}
	}
}

func BenchmarkInsertDelete(b *testing.B) {
	s := New(less)
	for i := range 1 << 20 {
		s.Insert(i * 2)
	}
	b.ResetTimer()
	for i := range b.N {
		k := (i*7919)%(1<<21) | 1
		s.Insert(k)
		s.Delete(k)
	}
}
