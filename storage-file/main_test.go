package filestore

import (
	"flag"
	"os"
	"testing"
)

// Some tests re-run this test binary as a child process that does the
// dangerous part (is killed, hits a file-size limit, holds a lock), with
// -test.run naming the child's entry point and an environment variable
// carrying its orders. In a plain run the entry points are left out.
func TestMain(m *testing.M) {
	flag.Parse()
	if os.Getenv(crashEnv) == "" && os.Getenv(diskFullEnv) == "" && os.Getenv(lockEnv) == "" {
		skip := "^(TestCrashChild|TestDiskFullChild|TestLockChild)$"
		if f := flag.Lookup("test.skip"); f != nil && f.Value.String() != "" {
			skip = f.Value.String() + "|" + skip
		}
		flag.Set("test.skip", skip)
	}
	os.Exit(m.Run())
}
