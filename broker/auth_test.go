package broker

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func writeAuth(t *testing.T, text string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "auth")
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestAuthFilePermissions(t *testing.T) {
	path := writeAuth(t, `# a v1 line: every topic
v1:old-secret
shop:s3cret:with:colons pub=trade,order sub=
billing:b sub=trade
ops:o pub=* sub=*
`)
	a, err := newAuthorizer(Options{AuthFile: path})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		group, secret string
		ok            bool
	}{
		{"v1", "old-secret", true}, {"shop", "s3cret:with:colons", true}, {"shop", "s3cret", false},
		{"billing", "b", true}, {"billing", "", false}, {"nobody", "", false}, {"", "", false},
	} {
		perms, forClient, forLog := a.authenticate(c.group, c.secret)
		if (perms != nil) != c.ok {
			t.Errorf("%q/%q: accepted %t, want %t (%s; %s)", c.group, c.secret, perms != nil, c.ok, forClient, forLog)
		}
		if c.group != "" && !c.ok && forClient != "unknown group or wrong secretKey" {
			t.Errorf("%q/%q: the client is told %q, which tells an unknown group from a wrong secret", c.group, c.secret, forClient)
		}
	}
	perm := func(group string) *groupAuth { return a.groups[group] }
	for _, c := range []struct {
		group, topic string
		pub, sub     bool
	}{
		{"v1", "anything", true, true},
		{"shop", "trade", true, false}, {"shop", "order", true, false}, {"shop", "feed", false, false},
		{"billing", "trade", true, true}, {"billing", "feed", true, false},
		{"ops", "x", true, true},
	} {
		g := perm(c.group)
		if g.pub.allows(c.topic) != c.pub || g.sub.allows(c.topic) != c.sub || a.canSubscribe(c.group, c.topic) != c.sub {
			t.Errorf("%s on %s: pub %t sub %t, want %t %t", c.group, c.topic, g.pub.allows(c.topic), g.sub.allows(c.topic), c.pub, c.sub)
		}
	}
	if a.canSubscribe("nobody", "trade") {
		t.Error("a group that is not in the file may subscribe")
	}
}

func TestAuthFileErrors(t *testing.T) {
	for text, want := range map[string]string{
		"nocolon\n":                     ":1: want groupId:secretKey",
		":secret\n":                     ":1: want groupId:secretKey",
		"a:1\n\na:2\n":                  `:3: group "a" is listed twice`,
		"a:1 publish=trade\n":           `"publish=trade": want pub=`,
		"a:1 pub=trade pub=feed\n":      "each at most once",
		"# only comments\n\n a:1 sub\n": `:3: "sub": want pub=`,
	} {
		_, err := loadAuth(writeAuth(t, text))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: %v, want %q", text, err, want)
		}
	}
	if _, err := loadAuth(filepath.Join(t.TempDir(), "missing")); err == nil || !strings.Contains(err.Error(), "auth file") {
		t.Errorf("missing file: %v", err)
	}
}
