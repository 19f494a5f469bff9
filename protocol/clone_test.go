package protocol

import (
	"fmt"
	"reflect"
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// fullHeader sets every field of a Header, found through its descriptor,
// so that a field added to kiteq.proto and not to CloneHeader fails the
// test below. It also carries an unknown field.
func fullHeader() *Header {
	h := &Header{}
	m := h.ProtoReflect()
	fields := m.Descriptor().Fields()
	for i := range fields.Len() {
		f := fields.Get(i)
		if f.IsList() {
			list := m.Mutable(f).List()
			for j := range 2 {
				e := &Entry{Key: proto.String(fmt.Sprint("k", j)), Value: proto.String(fmt.Sprint("v", j))}
				e.ProtoReflect().SetUnknown(protoreflect.RawFields{0x98, 0x06, 0x01}) // field 99, varint 1
				list.Append(protoreflect.ValueOfMessage(e.ProtoReflect()))
			}
			continue
		}
		var v protoreflect.Value
		switch f.Kind() {
		case protoreflect.StringKind:
			v = protoreflect.ValueOfString(fmt.Sprint("value of ", f.Name()))
		case protoreflect.Int64Kind:
			v = protoreflect.ValueOfInt64(int64(1000 + i))
		case protoreflect.Int32Kind:
			v = protoreflect.ValueOfInt32(int32(100 + i))
		case protoreflect.BoolKind:
			v = protoreflect.ValueOfBool(true)
		default:
			panic(fmt.Sprintf("fullHeader: field %s of kind %s: set it here", f.Name(), f.Kind()))
		}
		m.Set(f, v)
	}
	m.SetUnknown(protoreflect.RawFields{0x98, 0x06, 0x02})
	return h
}

func TestCloneHeaderCopiesEveryField(t *testing.T) {
	h := fullHeader()
	c := CloneHeader(h)
	if !proto.Equal(c, h) {
		t.Fatalf("CloneHeader lost a field:\n got %v\nwant %v", c, h)
	}
	if string(c.ProtoReflect().GetUnknown()) != string(h.ProtoReflect().GetUnknown()) {
		t.Fatal("CloneHeader lost the unknown fields")
	}
	// Nothing is shared: every pointer of the copy differs.
	hv, cv := reflect.ValueOf(h).Elem(), reflect.ValueOf(c).Elem()
	for i := range hv.NumField() {
		f := hv.Type().Field(i)
		if f.IsExported() && f.Type.Kind() == reflect.Pointer && hv.Field(i).Pointer() == cv.Field(i).Pointer() {
			t.Errorf("field %s is shared", f.Name)
		}
	}
	*c.Properties[0].Key = "changed"
	*c.MessageId = "changed"
	c.Properties[1] = nil
	if h.Properties[0].GetKey() != "k0" || h.GetMessageId() == "changed" || h.Properties[1] == nil {
		t.Fatal("changing the copy changed the original")
	}
	if CloneHeader(nil) != nil {
		t.Fatal("CloneHeader(nil) != nil")
	}
	empty := CloneHeader(&Header{})
	if !proto.Equal(empty, &Header{}) || empty.MessageId != nil || empty.Properties != nil {
		t.Fatalf("an empty header cloned as %v", empty)
	}
}

func BenchmarkCloneHeader(b *testing.B) {
	h := sampleHeader()
	b.Run("proto.Clone", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			_ = proto.Clone(h)
		}
	})
	b.Run("CloneHeader", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			_ = CloneHeader(h)
		}
	})
}
