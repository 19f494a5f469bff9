package broker

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"strconv"
	"time"

	"go.uber.org/zap"
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
	s.http = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
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
