package broker

import (
	"strconv"
	"sync"
	"time"
	"unicode/utf8"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// logClipBytes is how much of a client's string a log line keeps: enough to
// recognise a group, id or topic, while a client that sends megabytes of
// them cannot make the log megabytes a line.
const logClipBytes = 128

// feedbackClipBytes bounds the feedback a refusal sends back to the client:
// the reasons quote client strings (clipped) but are worth reading whole.
const feedbackClipBytes = 1024

// clipForLog returns s when it is at most logClipBytes long, else its first
// logClipBytes (cut at a character boundary) and how long s was.
func clipForLog(s string) string {
	return clipTo(s, logClipBytes)
}

// clipTo returns s, or its first n bytes, cut at a character boundary,
// followed by how long s was.
func clipTo(s string, n int) string {
	if len(s) <= n {
		return s
	}
	cut := n
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "…(" + strconv.Itoa(len(s)) + " bytes)"
}

// Refusal lines of one connection: the first refusalBurst are logged, then
// at most one each refusalEvery, which counts the ones left out since the
// line before. A client that sends refused publishes as fast as it can thus
// writes a few lines a second, whatever it sends.
const (
	refusalBurst = 10
	refusalEvery = time.Second
)

// logLimiter decides which of a connection's repeated log lines are
// written. Its zero value is ready.
type logLimiter struct {
	mu         sync.Mutex
	logged     int       // lines written, up to refusalBurst
	last       time.Time // when the last line was written
	suppressed int64     // lines left out since the last one written
	lastReason string    // the reason of the last line left out
}

// allow reports whether a line should be written at now, and how many were
// left out since the last one written; it counts reason as left out when
// not.
func (l *logLimiter) allow(now time.Time, reason string) (ok bool, suppressed int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	switch {
	case l.logged < refusalBurst:
		l.logged++
	case now.Sub(l.last) < refusalEvery:
		l.suppressed++
		l.lastReason = reason
		return false, 0
	}
	l.last = now
	suppressed, l.suppressed, l.lastReason = l.suppressed, 0, ""
	return true, suppressed
}

// pending returns the lines left out since the last one written and the
// last of their reasons, and forgets them: the session's last words.
func (l *logLimiter) pending() (int64, string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	n, reason := l.suppressed, l.lastReason
	l.suppressed, l.lastReason = 0, ""
	return n, reason
}

// logRepeated writes a line that a client can make the broker repeat, such
// as a refusal, through the connection's limiter; reason is clipped to
// feedbackClipBytes. A line past the burst says how many were left out
// before it.
func (s *session) logRepeated(level zapcore.Level, msg, reason string, fields ...zap.Field) {
	if !s.log.Core().Enabled(level) {
		return
	}
	reason = clipTo(reason, feedbackClipBytes)
	ok, suppressed := s.refusals.allow(time.Now(), reason)
	if !ok {
		return
	}
	fields = append(fields, zap.String("reason", reason))
	if suppressed > 0 {
		fields = append(fields, zap.Int64("notLoggedBefore", suppressed))
	}
	s.log.Log(level, msg, fields...)
}
