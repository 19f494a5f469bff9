package memory

import (
	"fmt"
	"net/url"
	"slices"
	"strconv"
	"strings"
)

const acceptedURIs = "memory:// or memory://?cap=N with N > 0"

// Open returns a new store for a URI of the form memory:// or
// memory://?cap=N, where N > 0 is the most live messages it holds
// (default DefaultCapacity). Anything else is an error that says what is
// accepted.
func Open(uri string) (*Store, error) {
	u, err := url.Parse(uri)
	if err != nil {
		return nil, fmt.Errorf("memory store: bad uri %q: %v; want %s", uri, err, acceptedURIs)
	}
	if !strings.HasPrefix(strings.ToLower(uri), "memory://") || u.User != nil || u.Host != "" ||
		u.Path != "" || u.Fragment != "" {
		return nil, fmt.Errorf("memory store: bad uri %q: want %s", uri, acceptedURIs)
	}
	params, err := url.ParseQuery(u.RawQuery)
	if err != nil {
		return nil, fmt.Errorf("memory store: bad query in %q: %v; want %s", uri, err, acceptedURIs)
	}
	capacity := DefaultCapacity
	names := make([]string, 0, len(params))
	for name := range params {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		values := params[name]
		switch name {
		case "cap":
			if len(values) != 1 {
				return nil, fmt.Errorf("memory store: %q gives cap %d times; want %s", uri, len(values), acceptedURIs)
			}
			n, err := strconv.Atoi(values[0])
			if err != nil || n <= 0 {
				return nil, fmt.Errorf("memory store: bad cap %q in %q: want a whole number > 0", values[0], uri)
			}
			capacity = n
		default:
			return nil, fmt.Errorf("memory store: unknown parameter %q in %q: the only parameter is cap (%s)", name, uri, acceptedURIs)
		}
	}
	return New(capacity), nil
}
