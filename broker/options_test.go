package broker

import (
	"io"
	"strings"
	"testing"
	"time"
)

// The default schedule: three quick retries, then 5 s doubling to 160 s,
// then every 160 s.
func TestRetryScheduleDefault(t *testing.T) {
	e := &engine{opts: DefaultOptions()}
	var got []string
	for n := int32(1); n <= 12; n++ {
		got = append(got, e.retryDelay(n).String())
	}
	want := "1s 1s 1s 5s 10s 20s 40s 1m20s 2m40s 2m40s 2m40s 2m40s"
	if strings.Join(got, " ") != want {
		t.Fatalf("waits after failures 1..12: %s, want %s", strings.Join(got, " "), want)
	}
}

func TestRetryScheduleFlag(t *testing.T) {
	o, err := ParseFlags([]string{"-retry-schedule=0s, 2s,30s", "-auth=open"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	e := &engine{opts: o}
	var got []time.Duration
	for n := int32(1); n <= 4; n++ {
		got = append(got, e.retryDelay(n))
	}
	if want := []time.Duration{0, 2 * time.Second, 30 * time.Second, 30 * time.Second}; !equalDurations(got, want) {
		t.Fatalf("waits %v, want %v", got, want)
	}
}

func equalDurations(a, b []time.Duration) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestGCPercentFlag(t *testing.T) {
	o, err := ParseFlags([]string{"-auth=open"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if o.GCPercent != 400 {
		t.Fatalf("default -gc-percent %d, want 400", o.GCPercent)
	}
	if o, err = ParseFlags([]string{"-gc-percent=0", "-auth=open"}, io.Discard); err != nil || o.GCPercent != 0 {
		t.Fatalf("-gc-percent=0: %d, %v", o.GCPercent, err)
	}
	if _, err := ParseFlags([]string{"-gc-percent=-1"}, io.Discard); err == nil || !strings.Contains(err.Error(), "-gc-percent -1") {
		t.Fatalf("-gc-percent=-1: %v, want an error naming it", err)
	}
}
