module github.com/kiteq/kiteq/registry

go 1.26.0

require (
	github.com/kiteq/kiteq/protocol v0.0.0-00010101000000-000000000000
	go.uber.org/fx v1.24.0
)

require (
	go.uber.org/dig v1.19.0 // indirect
	go.uber.org/multierr v1.10.0 // indirect
	go.uber.org/zap v1.28.0 // indirect
	golang.org/x/sys v0.49.0 // indirect
	google.golang.org/protobuf v1.36.12 // indirect
)

replace github.com/kiteq/kiteq/protocol => ../protocol
