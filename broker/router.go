package broker

import (
	"sync"

	"github.com/kiteq/kiteq/registry/binding"
)

// router maps a message's topic and type to the groups bound to it.
type router struct {
	mu      sync.RWMutex
	byTopic map[string][]*binding.Binding
}

// match is one group that a message goes to.
type match struct {
	group      string
	persistent bool
}

func newRouter() *router {
	return &router{byTopic: make(map[string][]*binding.Binding)}
}

// match returns each group with a binding that matches, once; the group's
// delivery is persistent when any of its matching bindings is.
func (r *router) match(topic, messageType string) []match {
	r.mu.RLock()
	defer r.mu.RUnlock()
	var out []match
	for _, b := range r.byTopic[topic] {
		if !b.Matches(topic, messageType) {
			continue
		}
		found := false
		for i := range out {
			if out[i].group == b.GroupId {
				out[i].persistent = out[i].persistent || b.Persistent
				found = true
				break
			}
		}
		if !found {
			out = append(out, match{group: b.GroupId, persistent: b.Persistent})
		}
	}
	return out
}

// has reports whether group has a binding.
func (r *router) has(group string) bool {
	r.mu.RLock()
	defer r.mu.RUnlock()
	for _, bs := range r.byTopic {
		for _, b := range bs {
			if b.GroupId == group {
				return true
			}
		}
	}
	return false
}

// set replaces the bindings of topic and returns the groups whose
// bindings changed.
func (r *router) set(topic string, bs []*binding.Binding) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	changed := make(map[string]bool)
	for _, b := range r.byTopic[topic] {
		changed[b.GroupId] = true
	}
	for _, b := range bs {
		changed[b.GroupId] = true
	}
	if len(bs) == 0 {
		delete(r.byTopic, topic)
	} else {
		r.byTopic[topic] = bs
	}
	out := make([]string, 0, len(changed))
	for g := range changed {
		out = append(out, g)
	}
	return out
}

// watermark is the in-flight bound of a group: the largest watermark of
// its bindings on any topic, or binding.DefaultWatermark.
func (r *router) watermark(group string) int {
	r.mu.RLock()
	defer r.mu.RUnlock()
	w := 0
	for _, bs := range r.byTopic {
		for _, b := range bs {
			if b.GroupId == group {
				w = max(w, b.EffectiveWatermark())
			}
		}
	}
	if w == 0 {
		return binding.DefaultWatermark
	}
	return w
}
