package tests

import (
	"os"
	"testing"

	"go.uber.org/goleak"
)

// Every broker and client a test starts is stopped by its cleanup, with
// every goroutine it started. The test binary also plays a producer
// process that a test kills (txProducerChild).
func TestMain(m *testing.M) {
	if addr := os.Getenv(txChildEnv); addr != "" {
		txProducerChild(addr)
		return
	}
	goleak.VerifyTestMain(m)
}
