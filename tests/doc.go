// Package tests holds KiteQ's cross-module tests: the real broker and real
// client-go connections over TCP on 127.0.0.1, end to end, under load and
// under bad input.
package tests
