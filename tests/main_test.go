package tests

import (
	"testing"

	"go.uber.org/goleak"
)

// Every broker and client a test starts is stopped by its cleanup, with
// every goroutine it started.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
