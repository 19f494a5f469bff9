module github.com/kiteq/kiteq/client-go

go 1.26.0

require (
	github.com/kiteq/kiteq/protocol v0.0.0-00010101000000-000000000000
	github.com/kiteq/kiteq/registry v0.0.0-00010101000000-000000000000
	go.uber.org/goleak v1.3.0
)

require google.golang.org/protobuf v1.36.12 // indirect

replace github.com/kiteq/kiteq/protocol => ../protocol

replace github.com/kiteq/kiteq/registry => ../registry
