package filestore

import (
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// SyncPolicy says when a write is on disk before the call that made it
// returns.
type SyncPolicy int

const (
	// SyncAlways: a call returns once its record is written and fsynced.
	// Calls running at the same time share one fsync (group commit).
	SyncAlways SyncPolicy = iota
	// SyncInterval: a call returns once its record is written to the
	// operating system; the store fsyncs every Options.Every. A crash of the
	// process loses nothing; a crash of the machine loses up to Every.
	SyncInterval
	// SyncNever: a call returns once its record is written to the operating
	// system, which writes it to disk when it likes. A crash of the process
	// loses nothing; a crash of the machine loses what the kernel had not
	// written yet (typically up to 30 s).
	SyncNever
)

func (p SyncPolicy) String() string {
	switch p {
	case SyncAlways:
		return "always"
	case SyncInterval:
		return "interval"
	case SyncNever:
		return "never"
	}
	return fmt.Sprintf("SyncPolicy(%d)", int(p))
}

// Options configure a file store.
type Options struct {
	// Dir holds the segments and the lock file.
	Dir string
	// Sync is the durability policy; Every its period for SyncInterval.
	Sync  SyncPolicy
	Every time.Duration
	// SegmentSize is the size at which the active segment is closed and a
	// new one started.
	SegmentSize int64
	// CompactRatio: the oldest segment is rewritten when less than this
	// fraction of its bytes belongs to live messages, or when the dead
	// bytes of the whole log exceed its live bytes.
	CompactRatio float64
	// AcceptMissingSegments lets Open start when segment files are
	// missing from the middle of the log, which is otherwise an error: the
	// operator accepts that what they held is lost. Open makes them empty
	// files, so later opens need it no more.
	AcceptMissingSegments bool
	// Reserve is the room on disk that new messages may not take: it is
	// kept for the records that finish messages (and so delete segments)
	// when the disk is full. 0 means one segment (SegmentSize).
	Reserve int64
}

// reserve is the reserve in bytes: Reserve, or one segment.
func (o Options) reserve() int64 {
	if o.Reserve > 0 {
		return o.Reserve
	}
	return o.SegmentSize
}

// DefaultOptions returns the options of a store in dir: fsync always,
// 64 MiB segments, a reserve of one segment.
func DefaultOptions(dir string) Options {
	return Options{Dir: dir, Sync: SyncAlways, Every: 10 * time.Millisecond, SegmentSize: 64 << 20, CompactRatio: 0.5}
}

const uriHelp = "file:///path[?fsync=always|interval|never][&every=10ms][&segment=64MiB][&reserve=SIZE][&accept-missing-segments=true]"

// ParseURI parses file:///abs/path or file://./rel/path with the query
// parameters fsync, every, segment, reserve and accept-missing-segments.
func ParseURI(uri string) (Options, error) {
	rest, ok := strings.CutPrefix(uri, "file://")
	if !ok {
		return Options{}, fmt.Errorf("file store: %q is not a file:// URI (want %s)", uri, uriHelp)
	}
	path, query, _ := strings.Cut(rest, "?")
	if path == "" {
		return Options{}, fmt.Errorf("file store: %q has no directory (want %s)", uri, uriHelp)
	}
	o := DefaultOptions(path)
	q, err := url.ParseQuery(query)
	if err != nil {
		return o, fmt.Errorf("file store: %q: %w", uri, err)
	}
	for key, vals := range q {
		v := vals[len(vals)-1]
		switch key {
		case "fsync":
			switch v {
			case "always":
				o.Sync = SyncAlways
			case "interval":
				o.Sync = SyncInterval
			case "never":
				o.Sync = SyncNever
			default:
				return o, fmt.Errorf("file store: fsync=%q: want always, interval or never", v)
			}
		case "every":
			d, err := time.ParseDuration(v)
			if err != nil || d <= 0 {
				return o, fmt.Errorf("file store: every=%q: want a positive duration such as 10ms", v)
			}
			o.Every = d
		case "segment":
			n, err := parseSize(v)
			if err != nil || n < 1<<20 || n > 1<<31 {
				return o, fmt.Errorf("file store: segment=%q: want a size from 1MiB to 2GiB", v)
			}
			o.SegmentSize = n
		case "reserve":
			n, err := parseSize(v)
			if err != nil || n < 1<<20 || n > 1<<40 {
				return o, fmt.Errorf("file store: reserve=%q: want a size from 1MiB to 1024GiB (the default is the segment size)", v)
			}
			o.Reserve = n
		case "accept-missing-segments":
			b, err := strconv.ParseBool(v)
			if err != nil {
				return o, fmt.Errorf("file store: accept-missing-segments=%q: want true or false", v)
			}
			o.AcceptMissingSegments = b
		default:
			return o, fmt.Errorf("file store: unknown parameter %q (want %s)", key, uriHelp)
		}
	}
	return o, nil
}

func parseSize(s string) (int64, error) {
	mult := int64(1)
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}, {"GB", 1 << 30}, {"MB", 1 << 20}, {"KB", 1 << 10}} {
		if n, ok := strings.CutSuffix(s, u.suffix); ok {
			s, mult = n, u.mult
			break
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	return n * mult, err
}
