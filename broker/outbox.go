package broker

import (
	"net"
	"sync"
	"time"

	"github.com/kiteq/kiteq/protocol"
)

// outbox is the write side of a connection. Packets are appended to a
// buffer under a short lock and a single writer goroutine sends whatever
// has gathered in one write, so many small acks and deliveries share a
// system call under load and nobody ever waits for the socket but the
// writer itself.
type outbox struct {
	conn    net.Conn
	timeout time.Duration

	mu      sync.Mutex
	buf     []byte
	spare   []byte
	closing bool // no more packets; flush what is buffered and stop
	wake    chan struct{}
	done    chan struct{}
	err     error // first write error
}

func newOutbox(conn net.Conn, timeout time.Duration) *outbox {
	return &outbox{conn: conn, timeout: timeout, wake: make(chan struct{}, 1), done: make(chan struct{})}
}

// append adds encoded packets to the buffer. It reports false when the
// outbox is closing and the bytes were dropped.
func (o *outbox) append(b []byte) bool {
	o.mu.Lock()
	if o.closing {
		o.mu.Unlock()
		return false
	}
	o.buf = append(o.buf, b...)
	o.mu.Unlock()
	select {
	case o.wake <- struct{}{}:
	default:
	}
	return true
}

// run is the writer goroutine. It returns after close once the buffer is
// flushed, or at the first write error.
func (o *outbox) run() {
	defer close(o.done)
	for {
		<-o.wake
		for {
			protocol.Gather(o.queued) // under load, one write for many packets
			o.mu.Lock()
			out := o.buf
			closing := o.closing
			o.buf = o.spare[:0]
			o.mu.Unlock()
			if len(out) == 0 {
				o.spare = out
				if closing {
					return
				}
				break
			}
			o.conn.SetWriteDeadline(time.Now().Add(o.timeout))
			_, err := o.conn.Write(out)
			if cap(out) <= 1<<20 { // keep a buffer of reasonable size for reuse
				o.spare = out[:0]
			} else {
				o.spare = nil
			}
			if err != nil {
				o.mu.Lock()
				o.err = err
				o.closing = true
				o.buf = nil
				o.mu.Unlock()
				o.conn.Close() // wake the reader: this connection is done
				return
			}
		}
	}
}

// queued is the number of bytes waiting for the writer.
func (o *outbox) queued() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return len(o.buf)
}

// close stops accepting packets; the writer flushes what is buffered and
// ends. It does not wait: see wait.
func (o *outbox) close() {
	o.mu.Lock()
	o.closing = true
	o.mu.Unlock()
	select {
	case o.wake <- struct{}{}:
	default:
	}
}

// wait blocks until the writer has ended or the deadline passes.
func (o *outbox) wait(deadline <-chan time.Time) bool {
	select {
	case <-o.done:
		return true
	case <-deadline:
		return false
	}
}
