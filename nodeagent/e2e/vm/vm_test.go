// Package vm runs the lab end-to-end suite (nodeagent/e2e) with the agents
// in ipvs mode inside a qemu VM, whose kernel has IPVS (the host's has
// not). The apiserver and the control plane stay on the host, where Go runs
// about 48 times faster than under TCG; the VM reaches them through its one
// forwarded port and labenv's gateway. Needs root, as CI has.
package vm

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/signalbox/signalbox/nodeagent/e2e/labenv"
	"github.com/signalbox/signalbox/tools/devcluster"
	"github.com/signalbox/signalbox/tools/vmtest"
)

// liveEnv, when set, streams the VM console into the test log as it comes.
const liveEnv = "SIGNALBOX_VM_LIVE"

// vmTimeout bounds the one VM boot that runs the whole suite.
const vmTimeout = 25 * time.Minute

type lineLogger struct{ t *testing.T }

func (l lineLogger) Write(p []byte) (int, error) {
	l.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func TestE2EIPVSInVM(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root (qemu, the dev cluster); CI runs it as root")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Minute)
	defer cancel()
	root, err := devcluster.Root()
	if err != nil {
		t.Fatal(err)
	}
	want, err := suiteTests(filepath.Join(root, "nodeagent", "e2e"))
	if err != nil {
		t.Fatal(err)
	}
	if len(want) < 10 || !slices.Contains(want, "TestModeSwitch") {
		t.Fatalf("found only %v in the e2e suite", want)
	}

	start := time.Now()
	bins, err := labenv.Build(ctx, lineLogger{t})
	if err != nil {
		t.Fatal(err)
	}
	testBin, err := vmtest.BuildTestBinary(ctx, "./nodeagent/e2e", "-tags", "vm")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("built the binaries in %s", time.Since(start).Round(time.Second))

	// Logs go where the VM cannot write (its root is read-only) but the
	// host keeps them: the host side's own logs.
	logDir := t.TempDir()
	hostStart := time.Now()
	host, err := labenv.StartVMHost(ctx, bins, logDir, lineLogger{t})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := host.Close(); err != nil {
			t.Errorf("host side teardown: %v", err)
		}
	}()
	t.Logf("host side (apiserver, control plane, gateway on port %d) up in %s", host.Port(), time.Since(hostStart).Round(time.Second))

	opts := vmtest.Options{
		Memory:   "2048M",
		CPUs:     2,
		HostPort: host.Port(),
		Timeout:  vmTimeout,
		Dir:      filepath.Join(root, "nodeagent", "e2e"),
		Logf:     t.Logf,
		Env: map[string]string{
			"SIGNALBOX_E2E_MODE": "ipvs",
			labenv.BinDirEnv:     filepath.Dir(bins.NodeAgent),
			labenv.SiteEnv:       "vm",
			labenv.GatewayEnv:    vmtest.GuestServerAddr,
			labenv.KubeconfigEnv: host.Cluster.Kubeconfig,
		},
	}
	// The console (boot, and the suite's -v output) streams live only on
	// request; otherwise the verdicts are listed below, and everything on
	// a failure.
	if os.Getenv(liveEnv) != "" {
		opts.Stdout = lineLogger{t}
	}
	res, err := vmtest.Run(ctx, opts, []string{testBin, "-test.v", "-test.count=1", "-test.timeout=" + (vmTimeout - time.Minute).String()})
	if err != nil {
		t.Fatalf("%v\ncontrol plane log tail:\n%s", err, tailFile(host.ControlPlaneLog, 40))
	}
	t.Logf("VM run: boot %s, total %s (exit %d)", res.BootTime.Round(time.Millisecond), res.Duration.Round(time.Second), res.ExitCode)
	for _, l := range strings.Split(res.Output, "\n") {
		if strings.HasPrefix(l, "--- ") {
			t.Log("in the VM: " + l)
		}
	}
	defer func() {
		if t.Failed() && opts.Stdout == nil {
			t.Logf("VM output:\n%s", res.Output)
		}
	}()
	if res.ExitCode != 0 {
		t.Errorf("e2e suite in the VM exited %d, want 0; control plane log tail:\n%s", res.ExitCode, tailFile(host.ControlPlaneLog, 40))
	}
	if !strings.Contains(res.Output, "waiting for 3 agents (ipvs mode)") {
		t.Errorf("the VM run did not start its agents in ipvs mode")
	}
	passed := results(res.Output, "PASS")
	for _, name := range want {
		if !slices.Contains(passed, name) {
			t.Errorf("%s did not report PASS in the VM", name)
		}
	}
	for _, verdict := range []string{"SKIP", "FAIL"} {
		if got := results(res.Output, verdict); len(got) != 0 {
			t.Errorf("tests reported %s in the VM: %v", verdict, got)
		}
	}
}

var testFunc = regexp.MustCompile(`(?m)^func (Test[A-Z]\w*)\(t \*testing\.T\)`)

// suiteTests lists the top-level tests of the e2e package's source.
func suiteTests(dir string) ([]string, error) {
	files, err := filepath.Glob(filepath.Join(dir, "*_test.go"))
	if err != nil {
		return nil, err
	}
	var names []string
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		for _, m := range testFunc.FindAllStringSubmatch(string(b), -1) {
			names = append(names, m[1])
		}
	}
	slices.Sort(names)
	return names, nil
}

// results lists the top-level tests `go test -v` reported with verdict.
func results(output, verdict string) []string {
	re := regexp.MustCompile(`(?m)^--- ` + verdict + `: (Test\w+) `)
	var names []string
	for _, m := range re.FindAllStringSubmatch(output, -1) {
		names = append(names, m[1])
	}
	return names
}

func tailFile(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
