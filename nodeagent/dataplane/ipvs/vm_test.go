package ipvs

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/signalbox/signalbox/tools/vmtest"
)

// TestIPVSInVM is the real-kernel test. On the host (which has no IPVS) it
// builds this package's test binary, boots the vmtest VM and runs the same
// test there inside a fresh network namespace, passing only if every
// in-VM subtest passed. In the VM it runs the subtests of kernel_test.go.
// It needs root, as CI has.
func TestIPVSInVM(t *testing.T) {
	if os.Getenv(vmtest.InVMEnv) == "1" {
		inVM(t)
		return
	}
	ctx := context.Background()
	bin, err := vmtest.BuildTestBinary(ctx, "./nodeagent/dataplane/ipvs")
	if err != nil {
		t.Fatal(err)
	}
	opts := vmtest.Options{Timeout: 8 * time.Minute, Logf: t.Logf}
	if testing.Verbose() {
		opts.Stdout = lineLogger{t}
	}
	// unshare: the VM's own namespace stays untouched as well.
	res, err := vmtest.Run(ctx, opts, []string{"unshare", "--net", "--", bin,
		"-test.run", "^TestIPVSInVM$", "-test.v", "-test.count=1", "-test.timeout=7m"})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("VM boot %s, total %s", res.BootTime.Round(time.Millisecond), res.Duration.Round(time.Millisecond))
	if !testing.Verbose() {
		t.Logf("in-VM output:\n%s", res.Output)
	}
	if res.ExitCode != 0 {
		t.Fatalf("in-VM test exit code %d, want 0", res.ExitCode)
	}
	// An exit code of 0 with nothing run would prove nothing.
	for _, sub := range inVMSubtests {
		if !strings.Contains(res.Output, "--- PASS: TestIPVSInVM/"+sub.name+" ") {
			t.Errorf("in-VM subtest %s did not report PASS", sub.name)
		}
	}
	if strings.Contains(res.Output, "--- SKIP") {
		t.Errorf("an in-VM subtest was skipped")
	}
}

// lineLogger sends the VM console to the test log.
type lineLogger struct{ t *testing.T }

func (l lineLogger) Write(p []byte) (int, error) {
	l.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// inVM refuses to program any namespace but a private one, then runs the
// subtests in order: each builds on the kernel state the previous left.
func inVM(t *testing.T) {
	self, err1 := os.Readlink("/proc/self/ns/net")
	initNS, err2 := os.Readlink("/proc/1/ns/net")
	if err1 != nil || err2 != nil || self == initNS {
		t.Fatalf("not in a private network namespace (self %q, init %q, %v %v): run through vmtest with unshare --net",
			self, initNS, err1, err2)
	}
	for _, sub := range inVMSubtests {
		if !t.Run(sub.name, sub.f) {
			t.FailNow()
		}
	}
}
