package tests

import (
	"encoding/binary"
	"net"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/kiteq/kiteq/broker"
	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/registry/binding"
)

// rawConn is a bare TCP connection that speaks the protocol by hand.
type rawConn struct {
	t    *testing.T
	conn net.Conn
}

func dialRaw(t *testing.T, addr string) *rawConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &rawConn{t: t, conn: c}
}

func (c *rawConn) write(b []byte) {
	c.t.Helper()
	if _, err := c.conn.Write(b); err != nil {
		c.t.Fatal(err)
	}
}

// handshake sends CONN_META and checks the CONN_AUTH.
func (c *rawConn) handshake(group string) {
	c.t.Helper()
	b, err := protocol.AppendMessage(nil, 1, protocol.CmdConnMeta,
		&protocol.ConnMeta{GroupId: proto.String(group), SecretKey: proto.String("s")})
	if err != nil {
		c.t.Fatal(err)
	}
	c.write(b)
	c.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	p, err := protocol.NewReader(c.conn, 0).ReadPacket()
	if err != nil || p.Cmd != protocol.CmdConnAuth {
		c.t.Fatalf("handshake: %v %v", p, err)
	}
}

// expectClosed checks that the broker closes the connection.
func (c *rawConn) expectClosed() {
	c.t.Helper()
	c.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 4096)
	for {
		_, err := c.conn.Read(buf)
		if err == nil {
			continue
		}
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			c.t.Fatal("connection still open 5 s after bad input")
		}
		return
	}
}

func header(opaque uint32, cmd byte, length int32) []byte {
	h := make([]byte, protocol.HeaderLen)
	binary.BigEndian.PutUint32(h[0:4], opaque)
	h[4] = cmd
	binary.BigEndian.PutUint32(h[15:19], uint32(length))
	return h
}

// TestRawSocketBadInput: garbage, a truncated header, an oversized or
// negative length and an unknown command each close their connection with
// a logged reason, before and after the handshake, while real clients on
// the same broker keep publishing and consuming.
func TestRawSocketBadInput(t *testing.T) {
	b := startBroker(t, func(o *broker.Options) { o.HandshakeTimeout = 2 * time.Second })
	rec := newRecorder("c")
	startClient(t, b.uri(), "g", rec, nil, binding.Bind_Fanout("g", "trade", 1000, true))
	producer := startClient(t, b.uri(), "p", newRecorder("p"), []string{"trade"})
	sendAndReceive := func(step string) {
		t.Helper()
		m := newMessage("trade", "t", step)
		if err := producer.SendStringMessage(m); err != nil {
			t.Fatalf("after %s: send: %v", step, err)
		}
		id := m.GetHeader().GetMessageId()
		eventually(t, 5*time.Second, "delivery after "+step, func() bool { return rec.count(id) == 1 })
	}
	sendAndReceive("start")

	cases := []struct {
		name      string
		input     func() []byte
		halfClose bool
		reason    string
	}{
		{"garbage", func() []byte { return []byte("GET / HTTP/1.1\r\nHost: kiteq\r\n\r\n") }, false, "unknown command"},
		{"truncated header", func() []byte { return header(7, byte(protocol.CmdHeartbeat), 8)[:10] }, true, "truncated packet header"},
		{"oversized length", func() []byte { return header(7, byte(protocol.CmdStringMessage), 64<<20) }, false, "exceeds limit"},
		{"negative length", func() []byte { return header(7, byte(protocol.CmdStringMessage), -5) }, false, "negative body length"},
		{"unknown command", func() []byte { return append(header(7, 0x7f, 2), 0, 0) }, false, "unknown command 0x7f"},
		{"truncated body", func() []byte { return append(header(7, byte(protocol.CmdHeartbeat), 100), 1, 2, 3) }, true, "truncated packet body"},
	}
	for _, handshake := range []bool{false, true} {
		for _, tc := range cases {
			name := tc.name + " before handshake"
			if handshake {
				name = tc.name + " after handshake"
			}
			t.Run(name, func(t *testing.T) {
				before := len(b.logs.FilterMessage("closing connection").All())
				c := dialRaw(t, b.Addr())
				if handshake {
					c.handshake("raw")
				}
				c.write(tc.input())
				if tc.halfClose {
					c.conn.(*net.TCPConn).CloseWrite()
				}
				c.expectClosed()
				eventually(t, 2*time.Second, "a logged reason", func() bool {
					for _, e := range b.logs.FilterMessage("closing connection").All()[before:] {
						if strings.Contains(e.ContextMap()["reason"].(string), tc.reason) {
							return true
						}
					}
					return false
				})
				sendAndReceive(name)
			})
		}
	}
}
