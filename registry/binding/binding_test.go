package binding

import (
	"encoding/json"
	"strings"
	"sync"
	"testing"

	"github.com/kiteq/kiteq/protocol"
)

func TestConstructors(t *testing.T) {
	tests := []struct {
		name string
		got  *Binding
		want *Binding
	}{
		{"direct", Bind_Direct("g", "trade", "pay-succ", 1000, true),
			&Binding{GroupId: "g", Topic: "trade", MessageType: "pay-succ", BindType: BindDirect, Version: "1.0.0", Watermark: 1000, Persistent: true}},
		{"regx", Bind_Regx("g", "trade", "pay-.*", 10, false),
			&Binding{GroupId: "g", Topic: "trade", MessageType: "pay-.*", BindType: BindRegx, Version: "1.0.0", Watermark: 10}},
		{"fanout", Bind_Fanout("g", "trade", 0, true),
			&Binding{GroupId: "g", Topic: "trade", MessageType: "*", BindType: BindFanout, Version: "1.0.0", Persistent: true}},
	}
	for _, tc := range tests {
		if !tc.got.Equal(tc.want) {
			t.Errorf("%s: got %s, want %s", tc.name, tc.got, tc.want)
		}
		if err := tc.got.Validate(); err != nil {
			t.Errorf("%s: Validate: %v", tc.name, err)
		}
	}
	if BindDirect != 0 || BindRegx != 1 || BindFanout != 2 {
		t.Fatal("bind type codes changed: they are in the ZooKeeper JSON")
	}
}

func TestMatches(t *testing.T) {
	type probe struct {
		topic, messageType string
		want               bool
	}
	tests := []struct {
		name   string
		b      *Binding
		probes []probe
	}{
		{"direct", Bind_Direct("g", "trade", "pay-succ", 0, false), []probe{
			{"trade", "pay-succ", true},
			{"trade", "pay-succ2", false},
			{"trade", "pay", false},
			{"trade", "PAY-SUCC", false},
			{"trade", "", false},
			{"feed", "pay-succ", false},
		}},
		{"direct is not a pattern", Bind_Direct("g", "trade", "pay-.*", 0, false), []probe{
			{"trade", "pay-.*", true},
			{"trade", "pay-succ", false},
		}},
		{"regx", Bind_Regx("g", "trade", "pay-.*", 0, false), []probe{
			{"trade", "pay-succ", true},
			{"trade", "pay-", true},
			{"trade", "xpay-succ", false},
			{"trade", "pay", false},
			{"feed", "pay-succ", false},
		}},
		{"regx anchored at the end", Bind_Regx("g", "trade", "pay", 0, false), []probe{
			{"trade", "pay", true},
			{"trade", "pay-succ", false},
			{"trade", "xpay", false},
		}},
		{"regx alternation", Bind_Regx("g", "trade", "a|b", 0, false), []probe{
			{"trade", "a", true},
			{"trade", "b", true},
			{"trade", "ab", false},
			{"trade", "xa", false},
			{"trade", "bx", false},
		}},
		{"regx with its own anchors and flags", Bind_Regx("g", "trade", "(?i)^pay-(succ|fail)$", 0, false), []probe{
			{"trade", "PAY-SUCC", true},
			{"trade", "pay-fail", true},
			{"trade", "pay-failed", false},
		}},
		{"regx that breaks out of the anchor group", &Binding{GroupId: "g", Topic: "trade", MessageType: "a)|(b", BindType: BindRegx}, []probe{
			{"trade", "a", false},
			{"trade", "axyz", false},
			{"trade", "xyzb", false},
		}},
		{"bad regx matches nothing", Bind_Regx("g", "trade", "pay-(", 0, false), []probe{
			{"trade", "pay-(", false},
			{"trade", "pay-succ", false},
		}},
		{"fanout", Bind_Fanout("g", "trade", 0, false), []probe{
			{"trade", "pay-succ", true},
			{"trade", "anything", true},
			{"trade", "", true},
			{"feed", "pay-succ", false},
			{"", "pay-succ", false},
		}},
		{"unknown bind type", &Binding{GroupId: "g", Topic: "trade", MessageType: "x", BindType: 7}, []probe{
			{"trade", "x", false},
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			for _, p := range tc.probes {
				if got := tc.b.Matches(p.topic, p.messageType); got != p.want {
					t.Errorf("%s.Matches(%q, %q) = %t, want %t", tc.b, p.topic, p.messageType, got, p.want)
				}
			}
		})
	}
}

func TestValidate(t *testing.T) {
	tests := []struct {
		name     string
		b        *Binding
		contains string
	}{
		{"empty group", Bind_Direct("", "trade", "pay-succ", 0, false), "empty groupId"},
		{"empty topic", Bind_Direct("g", "", "pay-succ", 0, false), "empty topic"},
		{"empty direct messageType", Bind_Direct("g", "trade", "", 0, false), "empty messageType"},
		{"bad regex", Bind_Regx("g", "trade", "pay-(", 0, false), "bad regular expression"},
		{"regex that escapes the anchors", Bind_Regx("g", "trade", "a)|(b", 0, false), "bad regular expression"},
		{"unknown bind type", &Binding{GroupId: "g", Topic: "trade", MessageType: "x", BindType: 3}, "unknown bindType 3"},
		{"negative bind type", &Binding{GroupId: "g", Topic: "trade", MessageType: "x", BindType: -1}, "unknown bindType -1"},
	}
	for _, tc := range tests {
		err := tc.b.Validate()
		if err == nil {
			t.Errorf("%s: Validate() = nil", tc.name)
			continue
		}
		if !strings.Contains(err.Error(), tc.contains) {
			t.Errorf("%s: error %q does not contain %q", tc.name, err, tc.contains)
		}
		if tc.b.GroupId != "" && !strings.Contains(err.Error(), tc.b.GroupId) {
			t.Errorf("%s: error %q does not name the group", tc.name, err)
		}
	}
}

func TestJSONForm(t *testing.T) {
	got, err := json.Marshal(Bind_Direct("g", "trade", "pay-succ", 1000, true))
	if err != nil {
		t.Fatal(err)
	}
	const want = `{"groupId":"g","topic":"trade","messageType":"pay-succ","bindType":0,"version":"1.0.0","watermark":1000,"persistent":true}`
	if string(got) != want {
		t.Fatalf("JSON = %s\nwant   %s", got, want)
	}

	arr, err := MarshalBindings([]*Binding{Bind_Direct("g", "trade", "pay-succ", 1000, true)})
	if err != nil || string(arr) != "["+want+"]" {
		t.Fatalf("MarshalBindings = %s, %v", arr, err)
	}
	empty, err := MarshalBindings(nil)
	if err != nil || string(empty) != "[]" {
		t.Fatalf("MarshalBindings(nil) = %s, %v; ZooKeeper keeps an array", empty, err)
	}
}

func TestUnmarshalBindings(t *testing.T) {
	in := []*Binding{
		Bind_Direct("g", "trade", "pay-succ", 1000, true),
		Bind_Regx("g", "trade", "pay-.*", 5, false),
		Bind_Fanout("g", "feed", 0, true),
	}
	data, err := MarshalBindings(in)
	if err != nil {
		t.Fatal(err)
	}
	out, err := UnmarshalBindings(data)
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != len(in) {
		t.Fatalf("%d bindings, want %d", len(out), len(in))
	}
	for i := range in {
		if !out[i].Equal(in[i]) {
			t.Errorf("binding %d = %s, want %s", i, out[i], in[i])
		}
	}
	// A decoded regx binding matches like the original.
	if !out[1].Matches("trade", "pay-succ") || out[1].Matches("trade", "xpay-succ") {
		t.Error("decoded regx binding matches differently")
	}

	// A v1 peer's JSON, with the fields in another order.
	v1 := `[{"persistent":false,"watermark":100,"version":"1.0.0","bindType":2,"messageType":"*","topic":"t","groupId":"g"}]`
	out, err = UnmarshalBindings([]byte(v1))
	if err != nil || len(out) != 1 || !out[0].Equal(Bind_Fanout("g", "t", 100, false)) {
		t.Fatalf("UnmarshalBindings(v1) = %v, %v", out, err)
	}
}

func TestUnmarshalBindingsErrors(t *testing.T) {
	tests := []struct{ name, data, contains string }{
		{"not json", `{oops`, "binding: decode"},
		{"object, not array", `{"groupId":"g"}`, "binding: decode"},
		{"wrong field type", `[{"groupId":"g","topic":"t","messageType":"m","bindType":"direct"}]`, "binding: decode"},
		{"null element", `[null]`, "null"},
		{"invalid binding", `[{"groupId":"","topic":"t","messageType":"m","bindType":0}]`, "empty groupId"},
		{"bad regex", `[{"groupId":"g","topic":"t","messageType":"(","bindType":1}]`, "bad regular expression"},
		{"unknown bind type", `[{"groupId":"g","topic":"t","messageType":"m","bindType":9}]`, "unknown bindType"},
	}
	for _, tc := range tests {
		bs, err := UnmarshalBindings([]byte(tc.data))
		if err == nil {
			t.Errorf("%s: UnmarshalBindings = %v, want an error", tc.name, bs)
			continue
		}
		if !strings.Contains(err.Error(), tc.contains) {
			t.Errorf("%s: error %q does not contain %q", tc.name, err, tc.contains)
		}
	}
	// An empty array and JSON null are no bindings, not errors.
	for _, data := range []string{`[]`, `null`} {
		if bs, err := UnmarshalBindings([]byte(data)); err != nil || len(bs) != 0 {
			t.Errorf("UnmarshalBindings(%s) = %v, %v", data, bs, err)
		}
	}
}

func TestProtoRoundTrip(t *testing.T) {
	in := []*Binding{
		Bind_Direct("g", "trade", "pay-succ", 1000, true),
		Bind_Regx("g", "trade", "pay-.*", 5, false),
		Bind_Fanout("g", "feed", 0, true),
	}
	ps := ToProto(in)
	// Over the wire, in a BINDINGS packet: every required field is set.
	p, err := protocol.NewPacket(1, protocol.CmdBindings, &protocol.BindingsPacket{GroupId: &in[0].GroupId, Bindings: ps})
	if err != nil {
		t.Fatalf("NewPacket(BINDINGS): %v", err)
	}
	msg, err := p.Decode()
	if err != nil {
		t.Fatal(err)
	}
	out, err := FromProto(msg.(*protocol.BindingsPacket).GetBindings())
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != len(in) {
		t.Fatalf("%d bindings, want %d", len(out), len(in))
	}
	for i := range in {
		if !out[i].Equal(in[i]) {
			t.Errorf("binding %d = %s, want %s", i, out[i], in[i])
		}
	}

	// The proto messages are copies: changing the binding later does not
	// change a packet built from it.
	in[0].Topic = "changed"
	in[1].BindType = BindFanout
	if ps[0].GetTopic() != "trade" || ps[1].GetBindType() != protocol.BindRegx {
		t.Error("ToProto shares memory with the bindings")
	}

	if len(ToProto(nil)) != 0 {
		t.Error("ToProto(nil) not empty")
	}
}

func TestFromProtoValidates(t *testing.T) {
	bad := ToProto([]*Binding{Bind_Direct("g", "trade", "pay-succ", 0, false), Bind_Regx("g", "trade", "(", 0, false)})
	if bs, err := FromProto(bad); err == nil || !strings.Contains(err.Error(), "bad regular expression") {
		t.Fatalf("FromProto(bad regex) = %v, %v", bs, err)
	}
	if bs, err := FromProto([]*protocol.Binding{nil}); err == nil {
		t.Fatalf("FromProto([nil]) = %v, want an error", bs)
	}
	// Optional fields may be absent: a v1-style binding without version.
	g, topic, mt, bt := "g", "t", "*", protocol.BindFanout
	bs, err := FromProto([]*protocol.Binding{{GroupId: &g, Topic: &topic, MessageType: &mt, BindType: &bt}})
	if err != nil || len(bs) != 1 || bs[0].EffectiveWatermark() != DefaultWatermark || !bs[0].Matches("t", "x") {
		t.Fatalf("FromProto(minimal) = %v, %v", bs, err)
	}
}

func TestConcurrentMatches(t *testing.T) {
	// The regular expression is compiled lazily, once, by whichever
	// goroutine gets there first; run with -race.
	b := Bind_Regx("g", "trade", "pay-(succ|fail)", 0, false)
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 1000; i++ {
				if !b.Matches("trade", "pay-succ") || b.Matches("trade", "pay-other") {
					t.Error("wrong match")
					return
				}
				if i%100 == 0 {
					if err := b.Validate(); err != nil {
						t.Error(err)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
}

func TestEffectiveWatermark(t *testing.T) {
	for wm, want := range map[int32]int{0: DefaultWatermark, -5: DefaultWatermark, 1: 1, 250: 250} {
		if got := Bind_Fanout("g", "t", wm, false).EffectiveWatermark(); got != want {
			t.Errorf("EffectiveWatermark(%d) = %d, want %d", wm, got, want)
		}
	}
}

func TestEqualAndString(t *testing.T) {
	a := Bind_Direct("g", "trade", "pay-succ", 1000, true)
	variants := []*Binding{
		Bind_Direct("h", "trade", "pay-succ", 1000, true),
		Bind_Direct("g", "feed", "pay-succ", 1000, true),
		Bind_Direct("g", "trade", "pay-fail", 1000, true),
		Bind_Regx("g", "trade", "pay-succ", 1000, true),
		Bind_Direct("g", "trade", "pay-succ", 999, true),
		Bind_Direct("g", "trade", "pay-succ", 1000, false),
		{GroupId: "g", Topic: "trade", MessageType: "pay-succ", Version: "2.0.0", Watermark: 1000, Persistent: true},
	}
	if !a.Equal(Bind_Direct("g", "trade", "pay-succ", 1000, true)) {
		t.Error("identical bindings not Equal")
	}
	for _, v := range variants {
		if a.Equal(v) || v.Equal(a) {
			t.Errorf("%s Equal %s", a, v)
		}
	}
	if got, want := a.String(), "g->trade/pay-succ(direct,wm=1000,persistent=true)"; got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
	for bt, want := range map[BindType]string{BindDirect: "direct", BindRegx: "regx", BindFanout: "fanout", 5: "BindType(5)"} {
		if got := bt.String(); got != want {
			t.Errorf("BindType(%d).String() = %q, want %q", int32(bt), got, want)
		}
	}
}
