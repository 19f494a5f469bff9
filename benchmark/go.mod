module github.com/kiteq/kiteq/benchmark

go 1.26

require (
	github.com/kiteq/kiteq/client-go v0.0.0
	github.com/kiteq/kiteq/protocol v0.0.0
	github.com/kiteq/kiteq/registry v0.0.0
)

require google.golang.org/protobuf v1.36.12 // indirect

replace (
	github.com/kiteq/kiteq/client-go => ../client-go
	github.com/kiteq/kiteq/protocol => ../protocol
	github.com/kiteq/kiteq/registry => ../registry
)
