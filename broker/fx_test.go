package broker

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/fx"
	"go.uber.org/fx/fxtest"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"google.golang.org/protobuf/proto"

	"github.com/kiteq/kiteq/storage"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func freeAdminPort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

func httpGet(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestAppOptionsValidate(t *testing.T) {
	for _, db := range []string{"memory://", "file://" + t.TempDir()} {
		o := DefaultOptions()
		o.Auth = AuthOpen // loopback tests
		o.Bind, o.PPort, o.DB = "127.0.0.1:0", 0, db
		opts, err := AppOptions(o, zap.NewNop())
		if err != nil {
			t.Fatal(err)
		}
		if err := fx.ValidateApp(opts); err != nil {
			t.Fatalf("%s: broken fx graph: %v", db, err)
		}
	}
}

// TestAppStartStopFileStore runs the application on the file store:
// what was published before a restart is there after it.
func TestAppStartStopFileStore(t *testing.T) {
	dir := t.TempDir()
	o := DefaultOptions()
	o.Auth = AuthOpen // loopback tests
	o.Bind, o.PPort, o.DB = "127.0.0.1:0", 0, "file://"+dir
	m := newMessage("trade", "t", "durable")
	m.Header.Commit = proto.Bool(false) // stays stored until decided
	for round := range 2 {
		opts, err := AppOptions(o, zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)))
		if err != nil {
			t.Fatal(err)
		}
		var s *Server
		var store storage.Store
		app := fxtest.New(t, opts, fx.Populate(&s, &store))
		app.RequireStart()
		if round == 0 {
			c := connect(t, s.Addr(), "p")
			if ack := c.publish(m); !ack.GetStatus() {
				t.Fatal(ack.GetFeedback())
			}
		} else if _, err := store.Get(context.Background(), m.GetHeader().GetMessageId()); err != nil {
			t.Fatalf("after restart: %v", err)
		}
		app.RequireStop()
	}
	if _, err := os.Stat(filepath.Join(dir, "0000000001.seg")); err != nil {
		t.Fatalf("no segment in %s: %v", dir, err)
	}
}

// TestAppStartStop starts the whole application as cmd/kiteq does, with
// the admin port, publishes through it, and stops it.
func TestAppStartStop(t *testing.T) {
	o := DefaultOptions()
	o.Auth = AuthOpen // loopback tests
	o.Bind, o.PPort, o.DB = "127.0.0.1:0", freeAdminPort(t), "memory://"
	opts, err := AppOptions(o, zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)))
	if err != nil {
		t.Fatal(err)
	}
	var s *Server
	app := fxtest.New(t, opts, fx.Populate(&s))
	app.RequireStart()
	c := connect(t, s.Addr(), "p")
	if ack := c.publish(newMessage("trade", "t", "x")); !ack.GetStatus() {
		t.Fatal(ack.GetFeedback())
	}
	body := httpGet(t, fmt.Sprintf("http://127.0.0.1:%d/stats", o.PPort))
	if !strings.Contains(body, `"stored":1`) {
		t.Fatalf("/stats = %s", body)
	}
	if got := httpGet(t, fmt.Sprintf("http://127.0.0.1:%d/healthz", o.PPort)); strings.TrimSpace(got) != "ok" {
		t.Fatalf("/healthz = %q", got)
	}
	app.RequireStop()
}

func TestStorageOptionSchemes(t *testing.T) {
	for _, db := range []string{"memory://", "memory://?cap=10"} {
		if _, err := StorageOption(db); err != nil {
			t.Errorf("%s: %v", db, err)
		}
	}
	for db, want := range map[string]string{
		"cassandra://x": `unknown store "cassandra"`,
		"./data":        "want scheme://",
	} {
		_, err := StorageOption(db)
		if err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), "memory://") {
			t.Errorf("%s: error %v, want one containing %q and naming the accepted stores", db, err, want)
		}
	}
	// A bad capacity is reported when the application is built.
	opt, err := StorageOption("memory://?cap=-1")
	if err != nil {
		t.Fatal(err)
	}
	app := fx.New(fx.NopLogger, opt, fx.Invoke(func(storage.Store) {}))
	if err := app.Err(); err == nil || !strings.Contains(err.Error(), "cap") {
		t.Fatalf("memory://?cap=-1: %v, want an error about cap", err)
	}
}

func TestParseFlags(t *testing.T) {
	var out bytes.Buffer
	o, err := ParseFlags([]string{"-bind=127.0.0.1:1", "-pport=0", "-db=memory://?cap=5", "-topics=trade, feed,,",
		"-deliver-timeout=2s", "-auth=open"}, &out)
	if err != nil {
		t.Fatal(err)
	}
	if o.Bind != "127.0.0.1:1" || o.PPort != 0 || o.DB != "memory://?cap=5" || strings.Join(o.Topics, "|") != "trade|feed" ||
		o.DeliverTimeout != 2*time.Second {
		t.Fatalf("parsed %+v", o)
	}
	for args, want := range map[string]string{
		"-zkhost=127.0.0.1:2181": "-topics is required with -zkhost",
		"-pport=70000":           "is not a port",
		"-db=":                   "-db is empty",
		"-retry-schedule=1s,0s":  "whose last one, which repeats, is positive",
		"-retry-schedule=1s,x":   `"x" is not a wait`,
		"-deliver-timeout=1ns":   "at least 1ms",
		"stray":                  "unexpected arguments",
	} {
		if _, err := ParseFlags(append(strings.Fields(args), "-auth=open"), &out); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: error %v, want %q", args, err, want)
		}
	}
	for args, want := range map[string]string{
		"":                                 "-auth=required (the default) needs -auth-file",
		"-auth=none":                       "-auth=none: want required or open",
		"-auth=open -auth-file=x":          "pass one of them",
		"-auth=open -bind=0.0.0.0:13800":   "only on a loopback -bind (not 0.0.0.0:13800)",
		"-auth=open -bind=10.1.2.3:13800":  "only on a loopback -bind",
		"-auth=open -bind=[::]:13800":      "only on a loopback -bind",
		"-auth=open -bind=localhost:13800": "",
		"-auth=open -bind=[::1]:13800":     "",
		"-auth-file=/etc/kiteq/auth":       "",
	} {
		_, err := ParseFlags(strings.Fields(args), &out)
		if (want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), want)) {
			t.Errorf("%q: error %v, want %q", args, err, want)
		}
	}
}

func TestStartFailsOnTakenAddress(t *testing.T) {
	b := startBroker(t, nil)
	o := DefaultOptions()
	o.Auth = AuthOpen // loopback tests
	o.Bind, o.PPort, o.DB = b.Addr(), 0, "memory://"
	opts, err := AppOptions(o, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	app := fx.New(opts, fx.NopLogger)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err = app.Start(ctx)
	if err == nil || !strings.Contains(err.Error(), "listen") {
		app.Stop(ctx)
		t.Fatalf("start on a taken address: %v", err)
	}
}
