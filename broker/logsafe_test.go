package broker

import (
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

func TestClipForLog(t *testing.T) {
	if got := clipForLog("shop"); got != "shop" {
		t.Fatalf("short string changed: %q", got)
	}
	exact := strings.Repeat("a", logClipBytes)
	if got := clipForLog(exact); got != exact {
		t.Fatalf("a string of exactly %d bytes changed: %q", logClipBytes, got)
	}
	long := strings.Repeat("g", 1<<20)
	got := clipForLog(long)
	if len(got) > logClipBytes+32 || !strings.HasPrefix(got, long[:logClipBytes]) || !strings.Contains(got, "(1048576 bytes)") {
		t.Fatalf("1 MiB clipped to %d bytes: %q", len(got), got)
	}
	// A cut inside a character backs up to its start.
	multi := strings.Repeat("é", logClipBytes) // 2 bytes each
	got = clipForLog("x" + multi)
	if !utf8.ValidString(got) || !strings.HasPrefix(got, "x"+multi[:logClipBytes-2]) {
		t.Fatalf("clip split a character: %q", got)
	}
}

func TestLogLimiter(t *testing.T) {
	var l logLimiter
	now := time.Now()
	for i := range refusalBurst {
		if ok, n := l.allow(now, "r"); !ok || n != 0 {
			t.Fatalf("line %d of the burst: ok %t suppressed %d", i, ok, n)
		}
	}
	for i := range 1000 {
		if ok, _ := l.allow(now.Add(time.Duration(i)*time.Microsecond), "reason "+string(rune('a'+i%26))); ok {
			t.Fatalf("line %d past the burst, within a second, was let through", i)
		}
	}
	now = now.Add(refusalEvery)
	if ok, n := l.allow(now, "next"); !ok || n != 1000 {
		t.Fatalf("a second later: ok %t suppressed %d, want true 1000", ok, n)
	}
	if ok, _ := l.allow(now.Add(refusalEvery/2), "left out"); ok {
		t.Fatal("a second line within the second was let through")
	}
	if n, last := l.pending(); n != 1 || last != "left out" {
		t.Fatalf("pending %d %q, want 1 \"left out\"", n, last)
	}
	if n, _ := l.pending(); n != 0 {
		t.Fatalf("pending %d after it was taken", n)
	}
}
