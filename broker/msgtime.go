package broker

import (
	"fmt"
	"time"

	"github.com/kiteq/kiteq/protocol"
)

// maxUnixSeconds is 9999-12-31T23:59:59Z, the latest time a header may
// name. Up to it, seconds turned into milliseconds, or into a time.Time
// with a lifetime added, cannot overflow (time.Unix(math.MaxInt64, 0) is
// in the year -292277022657, so a message expiring then expired at once).
const maxUnixSeconds int64 = 253402300799

// maxUnixMillis is maxUnixSeconds in milliseconds.
const maxUnixMillis = maxUnixSeconds*1000 + 999

// latestTime is maxUnixSeconds as a time: the expiry of a message that
// names no limit.
var latestTime = time.Unix(maxUnixSeconds, 0)

// unixTime is the time of unix seconds sec, clamped to 1970..9999 so that
// no value read from a header or the store overflows.
func unixTime(sec int64) time.Time { return time.Unix(min(max(sec, 0), maxUnixSeconds), 0) }

// unixMilliTime is unixTime for unix milliseconds.
func unixMilliTime(ms int64) time.Time { return time.UnixMilli(min(max(ms, 0), maxUnixMillis)) }

// fmtUnix shows unix seconds in a refusal: the number the client sent, and
// its date when it has one.
func fmtUnix(sec int64) string {
	if sec < 0 || sec > maxUnixSeconds {
		return fmt.Sprintf("%d (not a date)", sec)
	}
	return fmt.Sprintf("%d (%s)", sec, time.Unix(sec, 0).UTC().Format(time.RFC3339))
}

// fmtUnixMilli is fmtUnix for unix milliseconds.
func fmtUnixMilli(ms int64) string {
	if ms < 0 || ms > maxUnixMillis {
		return fmt.Sprintf("%d (not a date)", ms)
	}
	return fmt.Sprintf("%d (%s)", ms, time.UnixMilli(ms).UTC().Format(time.RFC3339Nano))
}

// hasCreateTime reports whether the header carries a createTime: a value
// of 0 or less is none (clients leave it 0), and the broker sets it.
func hasCreateTime(h *protocol.Header) bool { return h.GetCreateTime() > 0 }

// validateTimes returns why the header's createTime, expiredTime or
// deliverAt cannot be accepted at now, or "". Each value a client sends is
// bounded before it is multiplied or added, so none overflows. An
// expiredTime of 0 or less (v1 clients send -1) expires only by
// maxLifetime; a deliverAt of 0 or less delivers at once.
func validateTimes(h *protocol.Header, now time.Time, skew, maxLifetime time.Duration) string {
	nowMs, skewMs, lifeMs := now.UnixMilli(), skew.Milliseconds(), maxLifetime.Milliseconds()
	clock := now.UTC().Format(time.RFC3339)
	createdMs := nowMs
	if hasCreateTime(h) {
		ct := h.GetCreateTime()
		switch {
		case ct > maxUnixSeconds || ct*1000 > nowMs+skewMs:
			return fmt.Sprintf("createTime %s is more than %s (-max-clock-skew) ahead of the broker's clock (%s)",
				fmtUnix(ct), skew, clock)
		case ct*1000+lifeMs < nowMs:
			return fmt.Sprintf("createTime %s is older than %s, the longest the broker keeps a message, by its clock (%s): "+
				"the message would be dead-lettered at once", fmtUnix(ct), maxLifetime, clock)
		}
		createdMs = ct * 1000
	}
	et := h.GetExpiredTime()
	switch {
	case et > maxUnixSeconds:
		return fmt.Sprintf("expiredTime %s is past %s, the latest the broker accepts (unix seconds; -1 never expires)",
			fmtUnix(et), fmtUnix(maxUnixSeconds))
	case et > 0 && et < now.Unix():
		return fmt.Sprintf("message expired: expiredTime %s is before the broker's clock (%s)", fmtUnix(et), clock)
	}
	at := h.GetDeliverAt()
	switch {
	case at <= 0:
	case h.GetFly():
		return "a fly message cannot be delayed (deliverAt): it is never stored"
	case et > 0 && at > et*1000:
		return fmt.Sprintf("deliverAt %s is after the message expires (expiredTime %s)", fmtUnixMilli(at), fmtUnix(et))
	case at > createdMs+lifeMs:
		return fmt.Sprintf("deliverAt %s is further away than the longest a message is kept (%s after its createTime %s)",
			fmtUnixMilli(at), maxLifetime, fmtUnix(createdMs/1000))
	}
	return ""
}
