package storagetest

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/storage"
)

func ptr[T any](v T) *T { return &v }

// NewHeader returns a header with every field set, as a producer sends it.
func NewHeader(id, topic, messageType string, committed bool) *protocol.Header {
	now := time.Now().Unix()
	return &protocol.Header{
		MessageId:     ptr(id),
		Topic:         ptr(topic),
		MessageType:   ptr(messageType),
		ExpiredTime:   ptr(now + 3600),
		DeliveryLimit: ptr(int32(100)),
		GroupId:       ptr("storagetest-producer"),
		Commit:        ptr(committed),
		Fly:           ptr(false),
		Properties: []*protocol.Entry{
			{Key: ptr("order"), Value: ptr("42")},
			{Key: ptr("trace"), Value: ptr("a=b; c=\"d\"")},
		},
		CreateTime: ptr(now),
		Snappy:     ptr(false),
	}
}

// producerGroup is the group the suite's messages come from (their Digest).
const producerGroup = "storagetest-producer"

// NewMessage returns a string message with a fresh id, every header field
// set, a body that names the id and its Digest, due now (to the whole
// second, so that backends that keep seconds compare equal).
func NewMessage(topic, messageType string, committed bool) *storage.Message {
	id := protocol.MessageId()
	body := "hello " + id
	msg := &protocol.StringMessage{Header: NewHeader(id, topic, messageType, committed), Body: &body}
	m := storage.NewMessage(msg, time.Now().Truncate(time.Second))
	m.Digest = storage.Digest(producerGroup, msg)
	return m
}

// NewBytesMessage returns a bytes message with a fresh id, every header
// field set, the given body and its Digest, due now (to the whole second).
func NewBytesMessage(topic, messageType string, body []byte, committed bool) *storage.Message {
	msg := &protocol.BytesMessage{Header: NewHeader(protocol.MessageId(), topic, messageType, committed), Body: body}
	m := storage.NewMessage(msg, time.Now().Truncate(time.Second))
	m.Digest = storage.Digest(producerGroup, msg)
	return m
}

// RandomID returns a valid message id with random bits throughout, like
// the ids of v1 clients, so that ids do not arrive in order.
func RandomID() string {
	var raw [protocol.MessageIdLen / 2]byte
	if _, err := rand.Read(raw[:]); err != nil {
		panic("storagetest: no randomness: " + err.Error())
	}
	return hex.EncodeToString(raw[:])
}

// withID returns m with another id.
func withID(m *storage.Message, id string) *storage.Message {
	m.Header.MessageId = ptr(id)
	return m
}

// DiffMessage describes how got differs from want, field by field, or
// returns "" when they are equal. A nil and an empty slice are equal;
// times are compared as instants.
func DiffMessage(got, want *storage.Message) string {
	if got == nil || want == nil {
		if got == want {
			return ""
		}
		return fmt.Sprintf("got %v, want %v", got, want)
	}
	var d []string
	add := func(field string, g, w any) {
		if g != w {
			d = append(d, fmt.Sprintf("%s: got %v, want %v", field, g, w))
		}
	}
	add("Cmd", got.Cmd, want.Cmd)
	if hd := diffHeader(got.Header, want.Header); hd != "" {
		d = append(d, hd)
	}
	if !bytes.Equal(got.Body, want.Body) {
		d = append(d, fmt.Sprintf("Body: got %q, want %q", got.Body, want.Body))
	}
	if !bytes.Equal(got.Digest, want.Digest) {
		d = append(d, fmt.Sprintf("Digest: got %x, want %x", got.Digest, want.Digest))
	}
	add("Committed", got.Committed, want.Committed)
	add("DeliverCount", got.DeliverCount, want.DeliverCount)
	if !got.NextDeliverTime.Equal(want.NextDeliverTime) {
		d = append(d, fmt.Sprintf("NextDeliverTime: got %v, want %v", got.NextDeliverTime, want.NextDeliverTime))
	}
	if !slices.Equal(got.SuccGroups, want.SuccGroups) {
		d = append(d, fmt.Sprintf("SuccGroups: got %q, want %q", got.SuccGroups, want.SuccGroups))
	}
	if !slices.Equal(got.FailGroups, want.FailGroups) {
		d = append(d, fmt.Sprintf("FailGroups: got %q, want %q", got.FailGroups, want.FailGroups))
	}
	if !slices.Equal(got.FailCounts, want.FailCounts) {
		d = append(d, fmt.Sprintf("FailCounts: got %v, want %v", got.FailCounts, want.FailCounts))
	}
	if !slices.EqualFunc(got.FailDue, want.FailDue, time.Time.Equal) {
		d = append(d, fmt.Sprintf("FailDue: got %v, want %v", got.FailDue, want.FailDue))
	}
	return strings.Join(d, "; ")
}

func diffHeader(got, want *protocol.Header) string {
	if got == nil || want == nil {
		if got == want {
			return ""
		}
		return fmt.Sprintf("Header: got %v, want %v", got, want)
	}
	var d []string
	add := func(field string, g, w any) {
		if g != w {
			d = append(d, fmt.Sprintf("Header.%s: got %v, want %v", field, g, w))
		}
	}
	add("MessageId", got.GetMessageId(), want.GetMessageId())
	add("Topic", got.GetTopic(), want.GetTopic())
	add("MessageType", got.GetMessageType(), want.GetMessageType())
	add("ExpiredTime", got.GetExpiredTime(), want.GetExpiredTime())
	add("DeliveryLimit", got.GetDeliveryLimit(), want.GetDeliveryLimit())
	add("GroupId", got.GetGroupId(), want.GetGroupId())
	add("Commit", got.GetCommit(), want.GetCommit())
	add("Fly", got.GetFly(), want.GetFly())
	add("CreateTime", got.GetCreateTime(), want.GetCreateTime())
	add("Snappy", got.GetSnappy(), want.GetSnappy())
	gp, wp := got.GetProperties(), want.GetProperties()
	if len(gp) != len(wp) {
		d = append(d, fmt.Sprintf("Header.Properties: got %d entries, want %d", len(gp), len(wp)))
	} else {
		for i := range gp {
			add(fmt.Sprintf("Properties[%d].Key", i), gp[i].GetKey(), wp[i].GetKey())
			add(fmt.Sprintf("Properties[%d].Value", i), gp[i].GetValue(), wp[i].GetValue())
		}
	}
	return strings.Join(d, "; ")
}
