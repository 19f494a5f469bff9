package static

import (
	"context"
	"errors"
	"reflect"
	"testing"

	"github.com/kiteq/kiteq/registry"
	"github.com/kiteq/kiteq/registry/binding"
)

func TestDiscovery(t *testing.T) {
	ctx := context.Background()
	addrs := []string{"127.0.0.1:13800", "127.0.0.1:13801"}
	d := NewDiscovery(addrs)
	addrs[0] = "changed:1" // NewDiscovery keeps its own copy

	want := []string{"127.0.0.1:13800", "127.0.0.1:13801"}
	for _, topic := range []string{"trade", "feed", ""} {
		got, err := d.Brokers(ctx, topic)
		if err != nil || !reflect.DeepEqual(got, want) {
			t.Fatalf("Brokers(%q) = %v, %v; want %v", topic, got, err, want)
		}
		got[0] = "mutated:1" // nor can a caller change it
	}

	calls := 0
	err := d.WatchBrokers(ctx, "trade", func(got []string) {
		calls++
		if !reflect.DeepEqual(got, want) {
			t.Errorf("WatchBrokers gave %v, want %v", got, want)
		}
	})
	if err != nil || calls != 1 {
		t.Fatalf("WatchBrokers: err %v, %d calls, want 1", err, calls)
	}

	if err := d.PublishProducer(ctx, "trade", "g", "127.0.0.1:5000"); err != nil {
		t.Fatal(err)
	}
	if err := d.PublishBindings(ctx, "g", []*binding.Binding{binding.Bind_Fanout("g", "trade", 0, false)}); err != nil {
		t.Fatal(err)
	}
}

func TestDiscoveryClosed(t *testing.T) {
	ctx := context.Background()
	d := NewDiscovery([]string{"127.0.0.1:13800"})
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if got, err := d.Brokers(ctx, "trade"); !errors.Is(err, registry.ErrClosed) || got != nil {
		t.Fatalf("Brokers after Close = %v, %v", got, err)
	}
	err := d.WatchBrokers(ctx, "trade", func([]string) { t.Error("fn called after Close") })
	if !errors.Is(err, registry.ErrClosed) {
		t.Fatalf("WatchBrokers after Close: %v", err)
	}
	if err := d.PublishProducer(ctx, "trade", "g", "a:1"); !errors.Is(err, registry.ErrClosed) {
		t.Fatalf("PublishProducer after Close: %v", err)
	}
	if err := d.PublishBindings(ctx, "g", nil); !errors.Is(err, registry.ErrClosed) {
		t.Fatalf("PublishBindings after Close: %v", err)
	}
}
