package tests

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestReadmeExample runs the client example of README.md, as written,
// against a broker: the docs cannot drift from the code.
func TestReadmeExample(t *testing.T) {
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	block := regexp.MustCompile("(?s)```go\n(.*?)```").FindSubmatch(readme)
	if block == nil {
		t.Fatal("README.md has no ```go block")
	}
	src := string(block[1])
	const readmeAddr = "127.0.0.1:13800"
	if !strings.Contains(src, readmeAddr) {
		t.Fatalf("the README example no longer connects to %s", readmeAddr)
	}
	b := startBroker(t, nil)
	src = strings.ReplaceAll(src, readmeAddr, b.Addr())
	file := filepath.Join(t.TempDir(), "main.go")
	if err := os.WriteFile(file, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	// Built inside this module, so it resolves client-go from the workspace.
	out, err := exec.Command("go", "run", file).CombinedOutput()
	if err != nil {
		t.Fatalf("go run README example: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "got pay-succ echo") {
		t.Fatalf("README example printed %q, want it to show the delivered message", out)
	}
}
