package static

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"

	"github.com/kiteq/kiteq/registry"
	"github.com/kiteq/kiteq/registry/binding"
)

// BindingsFile is the name of the file, in the broker's data directory,
// that keeps persistent bindings across restarts.
const BindingsFile = "bindings.json"

// Server keeps the bindings that consumers send over their connections.
// Persistent bindings are written to a file, when it has one, so they
// outlive the consumer's connection and the broker's restart.
type Server struct {
	path string // empty: kept in memory only

	// publishMu serializes PublishBindings, watchers included, so that
	// watchers see the changes in the order they were made. Lock order:
	// publishMu, then mu.
	publishMu sync.Mutex

	mu       sync.Mutex
	byTopic  map[string]map[string][]*binding.Binding // topic -> group -> bindings
	watchers []func(topic string, bs []*binding.Binding)
	closed   bool
}

var _ registry.Server = (*Server)(nil)

// NewServer returns a Server that keeps its persistent bindings in
// dir/bindings.json, loading what an earlier run left there. An empty dir
// keeps bindings in memory only.
func NewServer(dir string) (*Server, error) {
	s := &Server{byTopic: make(map[string]map[string][]*binding.Binding)}
	if dir == "" {
		return s, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("static registry: %w", err)
	}
	s.path = filepath.Join(dir, BindingsFile)
	data, err := os.ReadFile(s.path)
	switch {
	case os.IsNotExist(err):
		return s, nil
	case err != nil:
		return nil, fmt.Errorf("static registry: %w", err)
	}
	bs, err := binding.UnmarshalBindings(data)
	if err != nil {
		return nil, fmt.Errorf("static registry: %s: %w", s.path, err)
	}
	for _, b := range bs {
		s.put(b.GroupId, b.Topic, append(s.byTopic[b.Topic][b.GroupId], b))
	}
	return s, nil
}

// PublishServer has no one to tell: clients of a standalone broker are
// given its address.
func (s *Server) PublishServer(ctx context.Context, addr string, topics []string) error {
	return s.check()
}

func (s *Server) UnpublishServer(ctx context.Context, addr string, topics []string) error {
	return s.check()
}

// PublishBindings replaces the bindings of groupId for each topic that bs
// names. Bindings of other topics stay.
func (s *Server) PublishBindings(ctx context.Context, groupId string, bs []*binding.Binding) error {
	byTopic := make(map[string][]*binding.Binding)
	for _, b := range bs {
		if b.GroupId != groupId {
			return fmt.Errorf("static registry: binding %s does not belong to group %s", b, groupId)
		}
		if err := b.Validate(); err != nil {
			return err
		}
		byTopic[b.Topic] = append(byTopic[b.Topic], b)
	}
	s.publishMu.Lock()
	defer s.publishMu.Unlock()
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return registry.ErrClosed
	}
	var changed []string
	persistChanged := false
	for topic, nbs := range byTopic {
		old := s.byTopic[topic][groupId]
		if sameBindings(old, nbs) {
			continue
		}
		persistChanged = persistChanged || anyPersistent(old) || anyPersistent(nbs)
		s.put(groupId, topic, nbs)
		changed = append(changed, topic)
	}
	var err error
	if persistChanged {
		err = s.saveLocked()
	}
	notify := make(map[string][]*binding.Binding, len(changed))
	for _, topic := range changed {
		notify[topic] = s.bindingsLocked(topic)
	}
	watchers := s.watchers
	s.mu.Unlock()
	for topic, tbs := range notify {
		for _, fn := range watchers {
			fn(topic, tbs)
		}
	}
	return err
}

// Bindings returns the bindings of topic, ordered by group.
func (s *Server) Bindings(topic string) []*binding.Binding {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.bindingsLocked(topic)
}

// WatchBindings calls fn with the bindings of every known topic now, then
// with all the bindings of a topic each time they change, in the order of
// the changes. fn runs on the publisher's goroutine and must not call
// PublishBindings.
func (s *Server) WatchBindings(fn func(topic string, bs []*binding.Binding)) {
	s.publishMu.Lock()
	defer s.publishMu.Unlock()
	s.mu.Lock()
	s.watchers = append(s.watchers, fn)
	now := make(map[string][]*binding.Binding, len(s.byTopic))
	for topic := range s.byTopic {
		now[topic] = s.bindingsLocked(topic)
	}
	s.mu.Unlock()
	for topic, bs := range now {
		fn(topic, bs)
	}
}

func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	return nil
}

func (s *Server) check() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return registry.ErrClosed
	}
	return nil
}

func (s *Server) put(groupId, topic string, bs []*binding.Binding) {
	groups := s.byTopic[topic]
	if groups == nil {
		groups = make(map[string][]*binding.Binding)
		s.byTopic[topic] = groups
	}
	groups[groupId] = bs
}

func (s *Server) bindingsLocked(topic string) []*binding.Binding {
	groups := make([]string, 0, len(s.byTopic[topic]))
	for g := range s.byTopic[topic] {
		groups = append(groups, g)
	}
	sort.Strings(groups)
	var out []*binding.Binding
	for _, g := range groups {
		out = append(out, s.byTopic[topic][g]...)
	}
	return out
}

// saveLocked writes the persistent bindings to a new file and renames it
// over the old one, so a crash leaves either the old or the new set.
func (s *Server) saveLocked() error {
	if s.path == "" {
		return nil
	}
	var keep []*binding.Binding
	topics := make([]string, 0, len(s.byTopic))
	for t := range s.byTopic {
		topics = append(topics, t)
	}
	sort.Strings(topics)
	for _, t := range topics {
		for _, b := range s.bindingsLocked(t) {
			if b.Persistent {
				keep = append(keep, b)
			}
		}
	}
	data, err := json.MarshalIndent(nonNil(keep), "", "  ")
	if err != nil {
		return fmt.Errorf("static registry: encode bindings: %w", err)
	}
	tmp := s.path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return fmt.Errorf("static registry: save bindings: %w", err)
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, s.path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("static registry: save bindings: %w", err)
	}
	// The rename is durable only once the directory is synced.
	if err := syncDir(filepath.Dir(s.path)); err != nil {
		return fmt.Errorf("static registry: save bindings: %w", err)
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

func nonNil(bs []*binding.Binding) []*binding.Binding {
	if bs == nil {
		return []*binding.Binding{}
	}
	return bs
}

func sameBindings(a, b []*binding.Binding) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !a[i].Equal(b[i]) {
			return false
		}
	}
	return true
}

func anyPersistent(bs []*binding.Binding) bool {
	for _, b := range bs {
		if b.Persistent {
			return true
		}
	}
	return false
}
