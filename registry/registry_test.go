package registry

import (
	"reflect"
	"strings"
	"testing"
)

func TestParseURI(t *testing.T) {
	tests := []struct {
		in   string
		want URI
	}{
		{"zk://a:1,b:2", URI{Scheme: "zk", Hosts: []string{"a:1", "b:2"}}},
		{"a:1,b:2", URI{Scheme: "zk", Hosts: []string{"a:1", "b:2"}}},
		{"127.0.0.1:2181", URI{Scheme: "zk", Hosts: []string{"127.0.0.1:2181"}}},
		{"static://127.0.0.1:13800", URI{Scheme: "static", Hosts: []string{"127.0.0.1:13800"}}},
		{"static://10.0.0.1:13800, 10.0.0.2:13800,", URI{Scheme: "static", Hosts: []string{"10.0.0.1:13800", "10.0.0.2:13800"}}},
		{"zk://[::1]:2181", URI{Scheme: "zk", Hosts: []string{"[::1]:2181"}}},
	}
	for _, tc := range tests {
		got, err := ParseURI(tc.in)
		if err != nil {
			t.Errorf("ParseURI(%q): %v", tc.in, err)
			continue
		}
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("ParseURI(%q) = %+v, want %+v", tc.in, got, tc.want)
		}
		// String gives back an address that parses to the same URI.
		again, err := ParseURI(got.String())
		if err != nil || !reflect.DeepEqual(again, got) {
			t.Errorf("ParseURI(%q.String() = %q) = %+v, %v", tc.in, got.String(), again, err)
		}
	}
}

func TestParseURIErrors(t *testing.T) {
	tests := []struct {
		in       string
		contains []string
	}{
		{"etcd://a:1", []string{`unknown scheme "etcd"`, "zk://", "static://"}},
		{"http://a:1", []string{`unknown scheme "http"`}},
		{"zk://", []string{"no hosts"}},
		{"static://", []string{"no hosts"}},
		{"", []string{"no hosts"}},
		{" , ", []string{"no hosts"}},
		{"zk://a", []string{`"a"`, "no port"}},
		{"static://a:1,b", []string{`"b"`, "no port"}},
		{"localhost", []string{"no port"}},
		{"zk://a:", []string{"no port"}},
		{"zk://::1", []string{"no port"}},
	}
	for _, tc := range tests {
		got, err := ParseURI(tc.in)
		if err == nil {
			t.Errorf("ParseURI(%q) = %+v, want an error", tc.in, got)
			continue
		}
		for _, c := range tc.contains {
			if !strings.Contains(err.Error(), c) {
				t.Errorf("ParseURI(%q) error %q does not contain %q", tc.in, err, c)
			}
		}
	}
}
