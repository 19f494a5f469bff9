package client_test

import (
	"fmt"
	"time"

	client "github.com/kiteq/kiteq/client-go"
	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/registry/binding"
)

// receiver is a consumer's listener: it hands each message to the example.
type receiver struct{ got chan *protocol.StringMessage }

func (r *receiver) OnMessage(msg *protocol.StringMessage) bool {
	r.got <- msg
	return true // acknowledge
}

func (r *receiver) OnMessageCheck(tx *protocol.TxResponse) error {
	tx.Commit()
	return nil
}

// A consumer group subscribes to "pay-succ" messages of topic "trade"; a
// producer publishes one. brokerAddr is a standalone broker (host:port).
func Example() {
	registryURI := "static://" + brokerAddr

	listener := &receiver{got: make(chan *protocol.StringMessage, 1)}
	consumer := client.NewKiteQClient(registryURI, "s-mts-test", "123456", listener)
	consumer.SetBindings([]*binding.Binding{
		binding.Bind_Direct("s-mts-test", "trade", "pay-succ", 1000, true),
	})
	if err := consumer.Start(); err != nil {
		fmt.Println("consumer:", err)
		return
	}
	defer consumer.Destroy()

	// A producer that sends no transactional messages needs no listener.
	producer := client.NewKiteQClient(registryURI, "pb-mts-test", "123456", nil)
	producer.SetTopics([]string{"trade"})
	if err := producer.Start(); err != nil {
		fmt.Println("producer:", err)
		return
	}
	defer producer.Destroy()

	msg := &protocol.StringMessage{
		Header: &protocol.Header{
			MessageId:     new(protocol.MessageId()),
			Topic:         new("trade"),
			MessageType:   new("pay-succ"),
			ExpiredTime:   new(time.Now().Add(time.Hour).Unix()),
			DeliveryLimit: new(int32(-1)),
			GroupId:       new("pb-mts-test"),
			Commit:        new(true),
			Fly:           new(false),
		},
		Body: new("echo"),
	}
	if err := producer.SendStringMessage(msg); err != nil {
		fmt.Println("send:", err)
		return
	}
	fmt.Println("stored")

	select {
	case got := <-listener.got:
		fmt.Printf("consumer got %s/%s: %s\n", got.Header.GetTopic(), got.Header.GetMessageType(), got.GetBody())
	case <-time.After(5 * time.Second):
		fmt.Println("no delivery")
	}
	// Output:
	// stored
	// consumer got trade/pay-succ: echo
}
