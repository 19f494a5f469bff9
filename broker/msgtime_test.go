package broker

import (
	"math"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/storage"
)

func TestValidateTimes(t *testing.T) {
	now := time.Date(2030, 6, 1, 12, 0, 0, 0, time.UTC)
	const skew, life = 5 * time.Minute, 7 * 24 * time.Hour
	sec := func(d time.Duration) int64 { return now.Add(d).Unix() }
	ms := func(d time.Duration) int64 { return now.Add(d).UnixMilli() }
	type hdr struct{ create, expire, deliverAt *int64 }
	cases := []struct {
		name string
		h    hdr
		want string // "" accepted; else words the refusal has
	}{
		{"v1: no times", hdr{}, ""},
		{"v1: expiredTime -1", hdr{expire: proto.Int64(-1)}, ""},
		{"expiredTime 0", hdr{expire: proto.Int64(0)}, ""},
		{"createTime 0 is none", hdr{create: proto.Int64(0)}, ""},
		{"createTime now", hdr{create: proto.Int64(sec(0))}, ""},
		{"createTime within the skew", hdr{create: proto.Int64(sec(skew))}, ""},
		{"createTime past the skew", hdr{create: proto.Int64(sec(skew + time.Second))}, "createTime " + strconv.FormatInt(sec(skew+time.Second), 10)},
		{"createTime in 2100", hdr{create: proto.Int64(time.Date(2100, 1, 1, 0, 0, 0, 0, time.UTC).Unix())}, "-max-clock-skew"},
		{"createTime MaxInt64", hdr{create: proto.Int64(math.MaxInt64)}, "createTime 9223372036854775807 (not a date)"},
		{"createTime 6 days old", hdr{create: proto.Int64(sec(-6 * 24 * time.Hour))}, ""},
		{"createTime 8 days old", hdr{create: proto.Int64(sec(-8 * 24 * time.Hour))}, "older than 168h0m0s"},
		{"createTime MinInt64 is none", hdr{create: proto.Int64(math.MinInt64)}, ""},
		{"expiredTime in a year", hdr{expire: proto.Int64(sec(365 * 24 * time.Hour))}, ""},
		{"expiredTime MaxInt64", hdr{expire: proto.Int64(math.MaxInt64)}, "expiredTime 9223372036854775807 (not a date) is past 253402300799"},
		{"expiredTime in milliseconds", hdr{expire: proto.Int64(ms(time.Hour))}, "expiredTime"},
		{"expiredTime passed", hdr{expire: proto.Int64(sec(-time.Minute))}, "message expired: expiredTime"},
		{"deliverAt in a day", hdr{deliverAt: proto.Int64(ms(24 * time.Hour))}, ""},
		{"deliverAt MaxInt64", hdr{deliverAt: proto.Int64(math.MaxInt64)}, "deliverAt 9223372036854775807 (not a date) is further away"},
		{"deliverAt after expiredTime", hdr{expire: proto.Int64(sec(time.Hour)), deliverAt: proto.Int64(ms(2 * time.Hour))}, "is after the message expires"},
		{"deliverAt within a lifetime of a createTime ahead", hdr{create: proto.Int64(sec(skew)), deliverAt: proto.Int64(ms(skew + life))}, ""},
		{"deliverAt past a lifetime of createTime", hdr{create: proto.Int64(sec(-time.Hour)), deliverAt: proto.Int64(ms(life))}, "further away than the longest"},
	}
	for _, tc := range cases {
		h := &protocol.Header{CreateTime: tc.h.create, ExpiredTime: tc.h.expire, DeliverAt: tc.h.deliverAt}
		got := validateTimes(h, now, skew, life)
		switch {
		case tc.want == "" && got != "":
			t.Errorf("%s: refused: %s", tc.name, got)
		case tc.want != "" && !strings.Contains(got, tc.want):
			t.Errorf("%s: got %q, want a refusal with %q", tc.name, got, tc.want)
		}
	}
}

// TestExpiryOfAbsurdStoredTimes: a message stored with times that
// validateTimes now refuses (an older broker took them) does not expire
// at once, nor overflow into a far past: it lives MaxLifetime at most.
func TestExpiryOfAbsurdStoredTimes(t *testing.T) {
	e := &engine{opts: DefaultOptions()}
	now := time.Now()
	for name, h := range map[string]*protocol.Header{
		"expiredTime MaxInt64":           {CreateTime: proto.Int64(now.Unix()), ExpiredTime: proto.Int64(math.MaxInt64)},
		"createTime MaxInt64":            {CreateTime: proto.Int64(math.MaxInt64), ExpiredTime: proto.Int64(-1)},
		"both MaxInt64":                  {CreateTime: proto.Int64(math.MaxInt64), ExpiredTime: proto.Int64(math.MaxInt64)},
		"no createTime, expiredTime max": {ExpiredTime: proto.Int64(math.MaxInt64)},
	} {
		m := &storage.Message{Header: h}
		at := e.expiry(m)
		if !at.After(now.Add(time.Hour)) {
			t.Errorf("%s: expires at %v, before an hour from now", name, at)
		}
		if h.GetCreateTime() == now.Unix() && at.After(now.Add(e.opts.MaxLifetime+time.Second)) {
			t.Errorf("%s: expires at %v, past MaxLifetime", name, at)
		}
		if ms := at.UnixMilli(); ms <= 0 {
			t.Errorf("%s: expiry %v is %d in milliseconds", name, at, ms)
		}
	}
	if at := deliverAt(&protocol.Header{DeliverAt: proto.Int64(math.MaxInt64)}); at.Year() > 9999 || at.UnixMilli() <= 0 {
		t.Errorf("deliverAt MaxInt64 is %v", at)
	}
}
