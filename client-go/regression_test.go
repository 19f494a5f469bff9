package client_test

// Regression tests for bugs found in review. They are in package
// client_test (not client) because the fake broker helpers they reuse
// (fakebroker_test.go) are in that package.

import (
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	client "github.com/kiteq/kiteq/client-go"
	"github.com/kiteq/kiteq/protocol"
)

// Bug: Start and Destroy race on the client's WaitGroup. start() releases
// c.mu (client.go:235) and only then, in watch, calls c.wg.Add(1) for each
// topic (client.go:335) without re-checking the state. A Destroy that runs
// in between (state=closed, cancel, c.wg.Wait with the counter at 0) returns
// at once, and watch then Adds from zero concurrently with (or after) Wait:
// a WaitGroup misuse the race detector reports, and a goroutine that
// outlives Destroy. "All its methods are safe for concurrent use."
// Also, such a Start fails with "watch brokers of …: registry: closed"
// (the registry's own ErrClosed) instead of wrapping client.ErrClosed
// ("the client was destroyed, before or while the call waited").
// Fix: do the Add under c.mu after checking for stateClosed (as setBrokers
// does), so an Add either happens before Destroy's Wait or not at all; and
// report ErrClosed when a watch fails because the client's ctx ended.
func TestStartConcurrentWithDestroyIsRaceFreeAndReturnsErrClosed(t *testing.T) {
	fb := startFakeBroker(t, "127.0.0.1:0")
	reported := false
	for i := range 300 {
		c := client.NewKiteQClient("static://"+fb.addr, producerGroup, "secret", nil)
		c.SetLogger(nil)
		c.SetTopics([]string{"trade", "feed", "audit"})
		done := make(chan error, 1)
		go func() { done <- c.Start() }()
		time.Sleep(time.Duration(i%20) * 10 * time.Microsecond)
		c.Destroy()
		if err := <-done; err != nil && !errors.Is(err, client.ErrClosed) && !reported {
			reported = true
			t.Errorf("Start concurrent with Destroy = %v, want nil or ErrClosed", err)
		}
		c.Destroy()
	}
}

// Bug: SendTx* sends its decision to whatever broker of the topic is
// ready when the connection that got the store ack has closed
// (send.go:133-145, waitConn on the whole route). With more than one
// broker, the decision goes to a broker that never stored the message:
// that broker cannot commit or roll back an id it does not have, the
// broker that holds the uncommitted message never hears the decision, and
// SendTxStringMessage still returns nil, so the caller believes the
// message is committed.
// Fix: when cn has closed, wait (within the send timeout) for a new
// connection to the same broker (cn.addr), not for any broker of the route.
func TestTxDecisionGoesToTheBrokerThatStoredTheMessage(t *testing.T) {
	fb1 := startFakeBroker(t, "127.0.0.1:0")
	fb2 := startFakeBroker(t, "127.0.0.1:0")
	c := startClient(t, fb1.addr+","+fb2.addr, producerGroup, &listener{}, []string{"trade"}, nil)
	waitFor(t, "both connections", func() bool {
		return fb1.connCount() == 1 && fb2.connCount() == 1
	})

	msg := newMsg("tx")
	id := msg.Header.GetMessageId()
	var owner, other *fakeBroker
	var restarted *fakeBroker
	restartedCh := make(chan *fakeBroker, 1)
	err := c.SendTxStringMessage(msg, func(*protocol.StringMessage) (bool, error) {
		owner, other = fb1, fb2
		if fb2.storedHeader(id) != nil {
			owner, other = fb2, fb1
		}
		// The broker that stored the message goes away during the local
		// transaction and comes back on the same address a little later.
		owner.Close()
		time.Sleep(100 * time.Millisecond) // the client sees the connection close
		go func() {
			time.Sleep(400 * time.Millisecond)
			fb, err := newFakeBroker(owner.addr, true)
			if err != nil {
				t.Error(err)
			}
			restartedCh <- fb
		}()
		return true, nil
	})
	restarted = <-restartedCh
	if restarted != nil {
		t.Cleanup(restarted.Close)
	}
	other.mu.Lock()
	var misrouted []*protocol.TxACKPacket
	for _, a := range other.txAcks {
		if a.GetHeader().GetMessageId() == id {
			misrouted = append(misrouted, a)
		}
	}
	other.mu.Unlock()
	if len(misrouted) > 0 {
		t.Fatalf("SendTx = %v; its commit went to %s, a broker that never stored %s (stored on %s)",
			err, other.addr, id, owner.addr)
	}
	if err != nil {
		t.Fatalf("SendTx = %v, want the decision delivered once the broker is back", err)
	}
	if ack := txAck(t, restarted, id); protocol.TxStatus(ack.GetStatus()) != protocol.TxCommit {
		t.Errorf("TX_ACK = %v, want commit", ack)
	}
}

// Bug: a MESSAGE_STORE_ACK whose body cannot be decoded fails the send with
// an error that wraps none of the documented sentinels (send.go:243-245).
// The message was written and the broker may well have stored it: the doc
// of SendBytesMessage promises ErrTimeout ("written, outcome unknown";
// sending again with the same id is safe) for that case, so a caller that
// branches on errors.Is(err, ErrTimeout) to retry drops the message.
// Fix: wrap ErrTimeout (outcome unknown) in the bad-ack error.
func TestMalformedStoreAckIsOutcomeUnknown(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Go(func() {
		var conns []net.Conn
		defer func() {
			for _, nc := range conns {
				nc.Close()
			}
		}()
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			conns = append(conns, nc)
			wg.Go(func() {
				rd := protocol.NewReader(nc, 0)
				for {
					p, err := rd.ReadPacket()
					if err != nil {
						return
					}
					var out []byte
					switch p.Cmd {
					case protocol.CmdConnMeta:
						out, _ = protocol.AppendMessage(nil, p.Opaque, protocol.CmdConnAuth,
							&protocol.ConnAuthAck{Status: new(true), Feedback: new("ok")})
					case protocol.CmdStringMessage:
						// A store ack whose body misses its required fields.
						out = protocol.AppendPacket(nil, &protocol.Packet{Opaque: p.Opaque, Cmd: protocol.CmdMessageStoreAck, Body: []byte{0x0a, 0x01, 'x'}})
					case protocol.CmdHeartbeat:
						out = p.Encode()
					}
					if _, err := nc.Write(out); err != nil {
						return
					}
				}
			})
		}
	})

	c := startClient(t, ln.Addr().String(), producerGroup, &listener{}, []string{"trade"}, nil)
	err = c.SendStringMessage(newMsg("x"))
	if err == nil {
		t.Fatal("send with a malformed store ack succeeded")
	}
	var se *client.StoreError
	for _, sentinel := range []error{client.ErrTimeout, client.ErrNoBroker, client.ErrClosed, client.ErrInvalidMessage, client.ErrUnknownTopic} {
		if errors.Is(err, sentinel) {
			if sentinel != client.ErrTimeout {
				t.Fatalf("send = %v, want ErrTimeout (written, outcome unknown), not %v", err, sentinel)
			}
			return
		}
	}
	if errors.As(err, &se) {
		t.Fatalf("send = %v, want ErrTimeout: the broker did not refuse the message", err)
	}
	t.Fatalf("send = %v: wraps no documented error; want ErrTimeout (written, outcome unknown)", err)
}

// Bug: only the first of a run of consecutive failed connection attempts is
// logged (conn.go:62-65, failures == 1). When a broker is unreachable at
// first and then comes up refusing the group's secret (or its bindings),
// the refusal is never logged: the client retries every 5 s forever and
// sends fail with ErrNoBroker, with nothing anywhere saying why.
// Fix: also log when the kind of failure changes to a refusal (ErrAuth or
// ErrBindingsRefused), e.g. log every refusal, or whenever err's text
// differs from the last logged one.
func TestAuthRefusalAfterUnreachableBrokerIsLogged(t *testing.T) {
	addr := freeAddr(t)
	var mu sync.Mutex
	var logs []string
	c := client.NewKiteQClient("static://"+addr, producerGroup, "bad", nil)
	c.SetLogger(func(format string, args ...any) {
		mu.Lock()
		logs = append(logs, fmt.Sprintf(format, args...))
		mu.Unlock()
	})
	c.SetTopics([]string{"trade"})
	t.Cleanup(c.Destroy)
	if err := c.Start(); err != nil {
		t.Fatalf("Start with an unreachable broker = %v, want nil", err)
	}
	fb := startFakeBroker(t, addr) // refuses the secret "bad"
	waitFor(t, "a refused handshake", func() bool {
		fb.mu.Lock()
		defer fb.mu.Unlock()
		return len(fb.metas) > 0
	})
	time.Sleep(100 * time.Millisecond)
	mu.Lock()
	defer mu.Unlock()
	for _, l := range logs {
		if strings.Contains(l, "bad secret key") || strings.Contains(l, client.ErrAuth.Error()) {
			return
		}
	}
	t.Fatalf("the broker refused the credentials but nothing was logged about it; logs: %q", logs)
}
