package client_test

import (
	"fmt"
	"os"
	"testing"

	"go.uber.org/goleak"
)

// brokerAddr is the fake broker that the examples talk to.
var brokerAddr string

// withBroker runs the tests with the examples' broker up, so that goleak
// checks for leaks after it is closed.
type withBroker struct{ m *testing.M }

func (w withBroker) Run() int {
	fb, err := newFakeBroker("127.0.0.1:0", true)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer fb.Close()
	brokerAddr = fb.addr
	return w.m.Run()
}

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(withBroker{m})
}
