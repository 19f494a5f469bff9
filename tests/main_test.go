package tests

import (
	"os"
	"testing"

	"go.uber.org/goleak"
)

// Every broker and client a test starts is stopped by its cleanup, with
// every goroutine it started. The test binary also plays the producer and
// the consumer processes that tests kill (txProducerChild,
// stuckConsumerChild).
func TestMain(m *testing.M) {
	if addr := os.Getenv(txChildEnv); addr != "" {
		txProducerChild(addr)
		return
	}
	if addr := os.Getenv(consumerChildEnv); addr != "" {
		stuckConsumerChild(addr)
		return
	}
	goleak.VerifyTestMain(m)
}
