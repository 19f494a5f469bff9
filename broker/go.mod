module github.com/kiteq/kiteq/broker

go 1.26.0

require (
	github.com/kiteq/kiteq/protocol v0.0.0-00010101000000-000000000000
	github.com/kiteq/kiteq/registry v0.0.0-00010101000000-000000000000
	github.com/kiteq/kiteq/storage v0.0.0-00010101000000-000000000000
	github.com/kiteq/kiteq/storage-file v0.0.0-00010101000000-000000000000
	go.uber.org/fx v1.24.0
	go.uber.org/goleak v1.3.0
	go.uber.org/zap v1.28.0
	google.golang.org/protobuf v1.36.12
)

require (
	go.uber.org/dig v1.19.0 // indirect
	go.uber.org/multierr v1.10.0 // indirect
	golang.org/x/sys v0.49.0 // indirect
)

replace (
	github.com/kiteq/kiteq/protocol => ../protocol
	github.com/kiteq/kiteq/registry => ../registry
	github.com/kiteq/kiteq/storage => ../storage
	github.com/kiteq/kiteq/storage-file => ../storage-file
)
