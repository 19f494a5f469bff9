// Package binding is the subscription model of KiteQ: a consumer group
// binds to a topic and to message types within it, directly, by a regular
// expression, or to all of them.
package binding

import (
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"sync"

	"github.com/kiteq/kiteq/protocol"
)

// BindType says how a binding matches the message type.
type BindType int32

const (
	// BindDirect matches one message type exactly.
	BindDirect BindType = BindType(protocol.BindDirect)
	// BindRegx matches message types by a regular expression over the
	// whole message type.
	BindRegx BindType = BindType(protocol.BindRegx)
	// BindFanout matches every message type of the topic.
	BindFanout BindType = BindType(protocol.BindFanout)
)

func (t BindType) String() string {
	switch t {
	case BindDirect:
		return "direct"
	case BindRegx:
		return "regx"
	case BindFanout:
		return "fanout"
	}
	return fmt.Sprintf("BindType(%d)", int32(t))
}

// DefaultWatermark is the in-flight bound of a binding that sets none.
const DefaultWatermark = 1000

// Binding is one subscription of a consumer group. Its JSON is the data of
// /kiteq/sub/{topic}/{groupId}-bind in ZooKeeper (an array of bindings).
type Binding struct {
	GroupId     string   `json:"groupId"`
	Topic       string   `json:"topic"`
	MessageType string   `json:"messageType"`
	BindType    BindType `json:"bindType"`
	Version     string   `json:"version"`
	Watermark   int32    `json:"watermark"`
	Persistent  bool     `json:"persistent"`

	once sync.Once
	re   *regexp.Regexp
	err  error
}

// Version of the binding model written by this package.
const Version = "1.0.0"

// Bind_Direct binds groupId to messageType of topic.
func Bind_Direct(groupId, topic, messageType string, watermark int32, persistent bool) *Binding {
	return newBinding(groupId, topic, messageType, BindDirect, watermark, persistent)
}

// Bind_Regx binds groupId to the message types of topic that the regular
// expression messageTypeRegx matches as a whole.
func Bind_Regx(groupId, topic, messageTypeRegx string, watermark int32, persistent bool) *Binding {
	return newBinding(groupId, topic, messageTypeRegx, BindRegx, watermark, persistent)
}

// Bind_Fanout binds groupId to every message type of topic.
func Bind_Fanout(groupId, topic string, watermark int32, persistent bool) *Binding {
	return newBinding(groupId, topic, "*", BindFanout, watermark, persistent)
}

func newBinding(groupId, topic, messageType string, t BindType, watermark int32, persistent bool) *Binding {
	return &Binding{GroupId: groupId, Topic: topic, MessageType: messageType, BindType: t,
		Version: Version, Watermark: watermark, Persistent: persistent}
}

// Validate reports what makes b unusable: an empty group or topic, an
// unknown bind type, or a regular expression that does not compile.
func (b *Binding) Validate() error {
	switch {
	case b.GroupId == "":
		return errors.New("binding: empty groupId")
	case b.Topic == "":
		return fmt.Errorf("binding: group %s: empty topic", b.GroupId)
	}
	switch b.BindType {
	case BindDirect:
		if b.MessageType == "" {
			return fmt.Errorf("binding: group %s topic %s: empty messageType", b.GroupId, b.Topic)
		}
	case BindRegx:
		if _, err := b.regexp(); err != nil {
			return err
		}
	case BindFanout:
	default:
		return fmt.Errorf("binding: group %s topic %s: unknown bindType %d", b.GroupId, b.Topic, int32(b.BindType))
	}
	return nil
}

// Matches reports whether a message of topic and messageType goes to b's
// group. A Regx binding whose expression does not compile matches nothing.
func (b *Binding) Matches(topic, messageType string) bool {
	if topic != b.Topic {
		return false
	}
	switch b.BindType {
	case BindDirect:
		return messageType == b.MessageType
	case BindRegx:
		re, err := b.regexp()
		return err == nil && re.MatchString(messageType)
	case BindFanout:
		return true
	}
	return false
}

// EffectiveWatermark returns the watermark, or DefaultWatermark when unset.
func (b *Binding) EffectiveWatermark() int {
	if b.Watermark <= 0 {
		return DefaultWatermark
	}
	return int(b.Watermark)
}

func (b *Binding) regexp() (*regexp.Regexp, error) {
	b.once.Do(func() {
		// The expression must compile on its own before it is anchored:
		// otherwise "a)|(b" would become `^(?:a)|(b)$`, which compiles and
		// matches anything that starts with a or ends with b.
		if _, b.err = regexp.Compile(b.MessageType); b.err == nil {
			// Anchored: the expression must match the whole message type.
			b.re, b.err = regexp.Compile(`^(?:` + b.MessageType + `)$`)
		}
		if b.err != nil {
			b.re = nil
			b.err = fmt.Errorf("binding: group %s topic %s: bad regular expression %q: %w",
				b.GroupId, b.Topic, b.MessageType, b.err)
		}
	})
	return b.re, b.err
}

// Equal reports whether a and b subscribe the same way.
func (b *Binding) Equal(o *Binding) bool {
	return b.GroupId == o.GroupId && b.Topic == o.Topic && b.MessageType == o.MessageType &&
		b.BindType == o.BindType && b.Version == o.Version && b.Watermark == o.Watermark &&
		b.Persistent == o.Persistent
}

// String describes b for logs.
func (b *Binding) String() string {
	return fmt.Sprintf("%s->%s/%s(%s,wm=%d,persistent=%t)", b.GroupId, b.Topic, b.MessageType,
		b.BindType, b.Watermark, b.Persistent)
}

// MarshalBindings encodes bindings as the JSON array kept in ZooKeeper.
func MarshalBindings(bs []*Binding) ([]byte, error) {
	if bs == nil {
		bs = []*Binding{}
	}
	return json.Marshal(bs)
}

// UnmarshalBindings decodes and validates a JSON array of bindings.
func UnmarshalBindings(data []byte) ([]*Binding, error) {
	var bs []*Binding
	if err := json.Unmarshal(data, &bs); err != nil {
		return nil, fmt.Errorf("binding: decode: %w", err)
	}
	for i, b := range bs {
		if b == nil {
			return nil, fmt.Errorf("binding: decode: element %d is null", i)
		}
		if err := b.Validate(); err != nil {
			return nil, err
		}
	}
	return bs, nil
}

// ToProto converts bindings for the BINDINGS packet.
func ToProto(bs []*Binding) []*protocol.Binding {
	out := make([]*protocol.Binding, len(bs))
	for i, b := range bs {
		// Copies, not pointers into b: the packet must not change when the
		// caller changes its binding afterwards, nor the binding when
		// something writes to the packet.
		groupId, topic, messageType, version := b.GroupId, b.Topic, b.MessageType, b.Version
		bindType, watermark, persistent := int32(b.BindType), b.Watermark, b.Persistent
		out[i] = &protocol.Binding{
			GroupId: &groupId, Topic: &topic, MessageType: &messageType,
			BindType: &bindType, Version: &version, Watermark: &watermark,
			Persistent: &persistent,
		}
	}
	return out
}

// FromProto converts and validates the bindings of a BINDINGS packet.
func FromProto(ps []*protocol.Binding) ([]*Binding, error) {
	out := make([]*Binding, len(ps))
	for i, p := range ps {
		b := &Binding{GroupId: p.GetGroupId(), Topic: p.GetTopic(), MessageType: p.GetMessageType(),
			BindType: BindType(p.GetBindType()), Version: p.GetVersion(), Watermark: p.GetWatermark(),
			Persistent: p.GetPersistent()}
		if err := b.Validate(); err != nil {
			return nil, err
		}
		out[i] = b
	}
	return out, nil
}
