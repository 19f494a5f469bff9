// Command kiteq runs a KiteQ broker.
//
//	kiteq -bind=127.0.0.1:13800 -pport=13801 -db=memory:// -topics=trade,feed
package main

import (
	"os"

	"github.com/kiteq/kiteq/broker"
)

func main() {
	os.Exit(broker.Main(os.Args[1:]))
}
