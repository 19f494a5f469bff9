package tests

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	client "github.com/kiteq/kiteq/client-go"
	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/registry/binding"
)

// getJSON fetches url into v.
func getJSON(url string, v any) error {
	resp, err := http.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

// TestProcessDeliveryLimitSurvivesSIGKILL: a group's failures are stored
// with the message, so its delivery limit holds across a SIGKILL. Group a
// fails a message with deliveryLimit 4 twice, the broker is killed, and
// the restarted broker delivers it to a exactly twice more before it
// dead-letters it; group b, which acknowledged it, never gets it again.
func TestProcessDeliveryLimitSurvivesSIGKILL(t *testing.T) {
	bin := buildKiteq(t)
	addr := freePort(t)
	host, _, _ := net.SplitHostPort(addr)
	_, adminPort, _ := net.SplitHostPort(freePort(t))
	admin := "http://" + net.JoinHostPort(host, adminPort)
	args := []string{"-db=file://" + t.TempDir(), "-pport=" + adminPort, "-retry-schedule=300ms"}
	cmd, _, exited := startKiteq(t, bin, addr, args...)
	uri := "static://" + addr

	rejects := func(name string) *recorder {
		r := newRecorder(name)
		r.reject = func(*protocol.StringMessage, int) bool { return true }
		return r
	}
	bindA := binding.Bind_Direct("a", "trade", "pay-succ", 100, true)
	bindB := binding.Bind_Direct("b", "trade", "pay-succ", 100, true)
	a, b := rejects("a"), newRecorder("b")
	ca := client.NewKiteQClient(uri, "a", "secret", a)
	ca.SetBindings([]*binding.Binding{bindA})
	if err := ca.Start(); err != nil {
		t.Fatal(err)
	}
	startClient(t, uri, "b", b, nil, bindB)
	producer := startClient(t, uri, "p", newRecorder("p"), []string{"trade"})
	m := newMessage("trade", "pay-succ", "limited")
	m.Header.DeliveryLimit = new(int32(4))
	if err := producer.SendStringMessage(m); err != nil {
		t.Fatal(err)
	}
	id := m.GetHeader().GetMessageId()

	var stats struct {
		DeliverFailed int64 `json:"deliverFailed"`
	}
	eventually(t, 5*time.Second, "two failures of group a", func() bool {
		return getJSON(admin+"/stats", &stats) == nil && stats.DeliverFailed >= 2
	})
	ca.Destroy() // no third attempt before the kill
	if n := a.count(id); n != 2 || b.count(id) != 1 {
		t.Fatalf("before the kill: a got %d deliveries, b %d; want 2 and 1", n, b.count(id))
	}
	time.Sleep(500 * time.Millisecond) // the failures are stored (fsync=always)
	cmd.Process.Signal(syscall.SIGKILL)
	<-exited

	startKiteq(t, bin, addr, args...)
	after := rejects("a")
	startClient(t, uri, "a", after, nil, bindA)
	var dls struct {
		DeadLetters []struct {
			ID         string   `json:"id"`
			Reason     string   `json:"reason"`
			SuccGroups []string `json:"succGroups"`
			FailGroups []string `json:"failGroups"`
			FailCounts []int32  `json:"failCounts"`
		} `json:"deadLetters"`
	}
	eventually(t, 10*time.Second, "the message dead-lettered", func() bool {
		return getJSON(admin+"/deadletters", &dls) == nil && len(dls.DeadLetters) == 1
	})
	dl := dls.DeadLetters[0]
	if n := after.count(id); n != 2 {
		t.Fatalf("after the restart group a got %d deliveries, want 2 (4 in all)", n)
	}
	if dl.ID != id || !strings.HasPrefix(dl.Reason, "a: delivery limit 4 reached") ||
		!slices.Equal(dl.SuccGroups, []string{"b"}) || !slices.Equal(dl.FailGroups, []string{"a"}) || !slices.Equal(dl.FailCounts, []int32{4}) {
		t.Fatalf("dead letter %+v; want %s, reason \"a: delivery limit 4 reached…\", succ [b], fail [a] with count 4", dl, id)
	}
	if b.count(id) != 1 {
		t.Fatalf("group b got the message %d times, want once", b.count(id))
	}
	time.Sleep(700 * time.Millisecond)
	if n := after.count(id); n != 2 {
		t.Fatalf("group a got %d deliveries after the dead letter, want 2", n)
	}
}
