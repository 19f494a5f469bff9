module github.com/kiteq/kiteq/storage

go 1.26.0

require github.com/kiteq/kiteq/protocol v0.0.0-00010101000000-000000000000

require google.golang.org/protobuf v1.36.12 // indirect

replace github.com/kiteq/kiteq/protocol => ../protocol
