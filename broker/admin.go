package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"strconv"
	"time"

	"go.uber.org/zap"

	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/storage"
)

// startAdmin serves pprof, /healthz and /stats on the bind host at PPort.
func (s *Server) startAdmin() error {
	host, _, err := net.SplitHostPort(s.opts.Bind)
	if err != nil {
		return fmt.Errorf("broker: -bind %q: %w", s.opts.Bind, err)
	}
	ln, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(s.opts.PPort)))
	if err != nil {
		return fmt.Errorf("broker: admin listen: %w", err)
	}
	s.http = &http.Server{Handler: s.adminHandler(), ReadHeaderTimeout: 5 * time.Second}
	s.loops.Add(1)
	go func() {
		defer s.loops.Done()
		if err := s.http.Serve(ln); err != nil && err != http.ErrServerClosed {
			s.log.Error("admin server", zap.Error(err))
		}
	}()
	s.log.Info("admin listening", zap.String("addr", ln.Addr().String()))
	return nil
}

// adminHandler serves pprof, /healthz, /stats and the dead-letter queue.
func (s *Server) adminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		if s.stopping.Load() {
			http.Error(w, "stopping", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/stats", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(s.Stats())
	})
	mux.HandleFunc("GET /deadletters", s.listDeadLetters)
	mux.HandleFunc("POST /deadletters/redeliver", s.redeliverDeadLetter)
	return mux
}

// deadLetterJSON is one entry of GET /deadletters.
type deadLetterJSON struct {
	ID           string      `json:"id"`
	Topic        string      `json:"topic"`
	MessageType  string      `json:"messageType"`
	GroupID      string      `json:"groupId"`
	Committed    bool        `json:"committed"`
	Reason       string      `json:"reason"`
	At           time.Time   `json:"at"`
	DeliverCount int32       `json:"deliverCount"`
	SuccGroups   []string    `json:"succGroups"`
	FailGroups   []string    `json:"failGroups"`
	FailCounts   []int32     `json:"failCounts,omitempty"` // each failed group's failures
	FailDue      []time.Time `json:"failDue,omitempty"`    // and when it was next due
}

// listDeadLetters pages through the dead-letter queue in id order:
// GET /deadletters?after=ID&limit=N (default 100, at most 1000). The
// answer's "next" is the after of the next page, "" at the end.
func (s *Server) listDeadLetters(w http.ResponseWriter, r *http.Request) {
	limit := 100
	if v := r.URL.Query().Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 1000 {
			http.Error(w, fmt.Sprintf("limit=%q: want a number from 1 to 1000", v), http.StatusBadRequest)
			return
		}
		limit = n
	}
	page, err := s.store.DeadLetters(r.Context(), r.URL.Query().Get("after"), limit)
	if err != nil {
		http.Error(w, err.Error(), http.StatusServiceUnavailable)
		return
	}
	out := struct {
		DeadLetters []deadLetterJSON `json:"deadLetters"`
		Next        string           `json:"next"`
	}{DeadLetters: make([]deadLetterJSON, 0, len(page))}
	for _, d := range page {
		m := d.Message
		out.DeadLetters = append(out.DeadLetters, deadLetterJSON{
			ID: m.ID(), Topic: m.Header.GetTopic(), MessageType: m.Header.GetMessageType(), GroupID: m.Header.GetGroupId(),
			Committed: m.Committed, Reason: d.Reason, At: d.At, DeliverCount: m.DeliverCount,
			SuccGroups: m.SuccGroups, FailGroups: m.FailGroups, FailCounts: m.FailCounts, FailDue: m.FailDue,
		})
	}
	if len(page) == limit {
		out.Next = page[len(page)-1].Message.ID()
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(out)
}

// redeliverDeadLetter puts a dead letter back and delivers it to the
// groups that have not acknowledged it: POST /deadletters/redeliver?id=ID.
// An undecided transaction put back is committed.
func (s *Server) redeliverDeadLetter(w http.ResponseWriter, r *http.Request) {
	id := r.URL.Query().Get("id")
	if !protocol.ValidMessageId(id) {
		http.Error(w, fmt.Sprintf("id=%q: want a message id of %d lowercase hex characters", id, protocol.MessageIdLen),
			http.StatusBadRequest)
		return
	}
	// Not the request's context: a client that goes away must not leave the
	// message put back but not delivered.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := s.store.Redeliver(ctx, id)
	switch {
	case errors.Is(err, storage.ErrNotFound):
		http.Error(w, "no dead letter "+id, http.StatusNotFound)
		return
	case err != nil:
		http.Error(w, err.Error(), http.StatusServiceUnavailable)
		return
	}
	s.stats.Redelivered.Add(1)
	s.log.Info("dead letter put back for delivery", zap.String("id", id))
	s.engine.storeAsync("deliver a dead letter put back", func(ctx context.Context) error {
		return s.engine.deliverStored(ctx, id)
	})
	w.Header().Set("Content-Type", "application/json")
	fmt.Fprintf(w, "{\"id\":%q,\"redelivered\":true}\n", id)
}
