package broker

import (
	"bufio"
	"crypto/sha256"
	"crypto/subtle"
	"fmt"
	"net"
	"os"
	"slices"
	"strings"
)

// Authentication modes (-auth).
const (
	// AuthRequired: every connection's group and secretKey must be in the
	// auth file. The default.
	AuthRequired = "required"
	// AuthOpen: any group and secretKey are accepted, with every
	// permission. Only on a loopback -bind, for development (make run).
	AuthOpen = "open"
)

// authorizer decides who may connect and what a group may do. It does
// not change after New.
type authorizer struct {
	open   bool
	path   string                // the auth file, for messages
	groups map[string]*groupAuth // nil when open
}

// groupAuth is one group's secret and permissions.
type groupAuth struct {
	secret [sha256.Size]byte // hashed: compared in constant time, whatever the lengths
	pub    topicSet
	sub    topicSet
}

// topicSet is the topics a permission covers: all of them, or a list.
type topicSet struct {
	all    bool
	topics []string
}

func (t topicSet) allows(topic string) bool { return t.all || slices.Contains(t.topics, topic) }

func (t topicSet) String() string {
	if t.all {
		return "*"
	}
	return strings.Join(t.topics, ",")
}

// everything is the permission of any group with -auth=open.
var everything = &groupAuth{pub: topicSet{all: true}, sub: topicSet{all: true}}

// newAuthorizer builds the authorizer of opts: the auth file's groups, or
// an open one.
func newAuthorizer(opts Options) (*authorizer, error) {
	if opts.authMode() == AuthOpen {
		return &authorizer{open: true}, nil
	}
	groups, err := loadAuth(opts.AuthFile)
	if err != nil {
		return nil, err
	}
	return &authorizer{path: opts.AuthFile, groups: groups}, nil
}

// authenticate returns the permissions of group when secret is its secret,
// or why not. The reason for the client does not tell an unknown group
// from a wrong secret; the one for the log does.
func (a *authorizer) authenticate(group, secret string) (perms *groupAuth, forClient, forLog string) {
	if group == "" {
		return nil, "empty groupId", "empty groupId"
	}
	if a.open {
		return everything, "", ""
	}
	given := sha256.Sum256([]byte(secret))
	g, known := a.groups[group]
	want := dummySecret
	if known {
		want = g.secret
	}
	// Compared even for an unknown group, so the time taken does not say
	// which groups exist.
	match := subtle.ConstantTimeCompare(given[:], want[:]) == 1
	switch {
	case !known:
		return nil, "unknown group or wrong secretKey", "group is not in the auth file " + a.path
	case !match:
		return nil, "unknown group or wrong secretKey", "wrong secretKey"
	}
	return g, "", ""
}

var dummySecret = sha256.Sum256([]byte("kiteq: no such group"))

// canSubscribe reports whether group may consume topic.
func (a *authorizer) canSubscribe(group, topic string) bool {
	if a.open {
		return true
	}
	g := a.groups[group]
	return g != nil && g.sub.allows(topic)
}

// describe is what the broker logs at start about its authentication.
func (a *authorizer) describe() string {
	if a.open {
		return "-auth=open: any group and secretKey are accepted, with every permission (loopback only, for development)"
	}
	return fmt.Sprintf("-auth=required: %d groups from %s", len(a.groups), a.path)
}

// loadAuth reads an auth file. Each line is
//
//	groupId:secretKey [pub=TOPICS] [sub=TOPICS]
//
// where TOPICS is a comma-separated list of topics, * for every topic, or
// empty for none. A line without pub= may publish to every topic, one
// without sub= may consume every topic (so a v1 file of groupId:secretKey
// lines keeps working). Blank lines and lines starting with # are skipped.
// The secretKey runs to the first space.
func loadAuth(path string) (map[string]*groupAuth, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("auth file: %w", err)
	}
	defer f.Close()
	groups := make(map[string]*groupAuth)
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		fields := strings.Fields(line)
		group, secret, ok := strings.Cut(fields[0], ":")
		if !ok || group == "" {
			return nil, fmt.Errorf("auth file %s:%d: want groupId:secretKey [pub=topics] [sub=topics]", path, n)
		}
		if _, dup := groups[group]; dup {
			return nil, fmt.Errorf("auth file %s:%d: group %q is listed twice", path, n, group)
		}
		g := &groupAuth{secret: sha256.Sum256([]byte(secret)), pub: topicSet{all: true}, sub: topicSet{all: true}}
		seen := map[string]bool{}
		for _, field := range fields[1:] {
			key, list, ok := strings.Cut(field, "=")
			if !ok || (key != "pub" && key != "sub") || seen[key] {
				return nil, fmt.Errorf("auth file %s:%d: %q: want pub=topic,topic or sub=topic,topic (* for every topic), each at most once",
					path, n, field)
			}
			seen[key] = true
			set := parseTopicSet(list)
			if key == "pub" {
				g.pub = set
			} else {
				g.sub = set
			}
		}
		groups[group] = g
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("auth file %s: %w", path, err)
	}
	return groups, nil
}

func parseTopicSet(list string) topicSet {
	var t topicSet
	for _, topic := range splitList(list) {
		if topic == "*" {
			return topicSet{all: true}
		}
		t.topics = append(t.topics, topic)
	}
	return t
}

// isLoopback reports whether the host of addr (host:port) is a loopback
// address or localhost.
func isLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
