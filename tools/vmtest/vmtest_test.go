package vmtest

// These tests boot real VMs (a few seconds each under TCG). They need root
// on Debian 12, as CI has: missing packages are installed with apt-get.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"
)

// lineLogger sends the VM console to the test log, so -v shows it live.
type lineLogger struct{ t *testing.T }

func (l lineLogger) Write(p []byte) (int, error) {
	l.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func testOptions(t *testing.T) Options {
	opts := Options{Timeout: 5 * time.Minute, Logf: t.Logf}
	if testing.Verbose() {
		opts.Stdout = lineLogger{t}
	}
	return opts
}

func buildProbe(t *testing.T) string {
	t.Helper()
	path, err := BuildProgram(context.Background(), "./tools/vmtest/internal/ipvsprobe")
	if err != nil {
		t.Fatal(err)
	}
	return path
}

func TestIPVSProbeInVM(t *testing.T) {
	probe := buildProbe(t)
	res, err := Run(context.Background(), testOptions(t), []string{probe})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("boot %s, total %s", res.BootTime.Round(time.Millisecond), res.Duration.Round(time.Millisecond))
	if res.ExitCode != 0 {
		t.Fatalf("probe exit code %d, want 0; output:\n%s", res.ExitCode, res.Output)
	}
	for _, want := range []string{
		"ipvsprobe: ok   create dummy kube-ipvs0",
		"TCP  198.18.128.10:80 rr",
		"-> 198.18.129.20:8080           Masq    1",
		"ipvsprobe: ok   ipset create x hash:ip,port,ip",
		"ipvsprobe: ok   iptables-legacy: kube-proxy style nat rules listed back",
		"ipvsprobe: ok   iptables-nft: kube-proxy style nat rules listed back",
		"ipvsprobe: all checks passed",
	} {
		if !strings.Contains(res.Output, want) {
			t.Errorf("output lacks %q; output:\n%s", want, res.Output)
		}
	}
	if strings.Contains(res.Output, "FAIL") {
		t.Errorf("output reports a failed check:\n%s", res.Output)
	}
}

func TestExitCodeAndOutput(t *testing.T) {
	// The fake marker proves that a command cannot forge its exit code.
	res, err := Run(context.Background(), testOptions(t),
		[]string{"sh", "-c", `echo "out $SIGNALBOX_IN_VM $FOO"; echo err >&2; echo VMTEST-EXIT=0; pwd; printf no-newline; exit 7`})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("boot %s, total %s", res.BootTime.Round(time.Millisecond), res.Duration.Round(time.Millisecond))
	if res.ExitCode != 7 {
		t.Errorf("exit code %d, want 7", res.ExitCode)
	}
	wd, _ := os.Getwd()
	want := "out 1 \nerr\nVMTEST-EXIT=0\n" + wd + "\nno-newline"
	if res.Output != want {
		t.Errorf("output %q, want %q", res.Output, want)
	}
}

func TestEnvAndDir(t *testing.T) {
	opts := testOptions(t)
	opts.Env = map[string]string{"FOO": "it's $set"}
	opts.Dir = "/usr/share"
	res, err := Run(context.Background(), opts, []string{"sh", "-c", `echo "$FOO"; pwd; test ! -e /lib/modules/$(uname -r)/modules.dep || echo mods`})
	if err != nil {
		t.Fatal(err)
	}
	if want := "it's $set\n/usr/share\nmods\n"; res.ExitCode != 0 || res.Output != want {
		t.Errorf("exit %d output %q, want 0 %q", res.ExitCode, res.Output, want)
	}
}

// TestNetworkOnlyReachesHostPort: the guest reaches the host server through
// the forward, and not through the host alias that unrestricted user
// networking would route to the host's loopback.
func TestNetworkOnlyReachesHostPort(t *testing.T) {
	probe := buildProbe(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var mu sync.Mutex
	var got []string
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			line, _ := bufio.NewReader(c).ReadString('\n')
			mu.Lock()
			got = append(got, strings.TrimSpace(line))
			mu.Unlock()
			fmt.Fprintln(c, "hello from the host")
			c.Close()
		}
	}()
	port := ln.Addr().(*net.TCPAddr).Port
	opts := testOptions(t)
	opts.HostPort = port
	res, err := Run(context.Background(), opts, []string{probe,
		"-dial", GuestServerAddr, "-blocked", fmt.Sprintf("198.18.250.2:%d", port)})
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != 0 || !strings.Contains(res.Output, `reply from host server: "hello from the host"`) {
		t.Errorf("probe exit %d; output:\n%s", res.ExitCode, res.Output)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(got) != 1 || got[0] != "hello from the VM" {
		t.Errorf("host server saw %q, want exactly one hello", got)
	}
}

func TestTimeoutKillsVM(t *testing.T) {
	opts := testOptions(t)
	opts.Timeout = 3 * time.Second
	start := time.Now()
	_, err := Run(context.Background(), opts, []string{"sleep", "600"})
	if err == nil || !strings.Contains(err.Error(), "timed out") {
		t.Fatalf("err = %v, want a timeout", err)
	}
	if d := time.Since(start); d > 20*time.Second {
		t.Errorf("Run returned after %s, long after its 3s timeout", d)
	}
}

func TestProbeRefusesToRunOnHost(t *testing.T) {
	probe := buildProbe(t)
	cmd := exec.Command(probe)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	out, err := cmd.CombinedOutput()
	var exitErr *exec.ExitError
	if !errors.As(err, &exitErr) || exitErr.ExitCode() != 2 || !strings.Contains(string(out), "refusing to run outside a vmtest VM") {
		t.Fatalf("probe on the host: err %v, output %q; want exit 2 and a refusal", err, out)
	}
}

func TestConsoleMarkers(t *testing.T) {
	c := console{nonce: "n0nce", live: io.Discard, start: time.Now()}
	var starts, exits int
	for _, l := range []string{
		"[ 1.0] booting", "VMTEST-START other", "VMTEST-START n0nce",
		"a", "VMTEST-EXIT=0 other", "partialVMTEST-EXIT=42 n0nce", "after",
	} {
		c.line(l+"\r", func() { starts++ }, func() { exits++ })
	}
	if !c.started || !c.exited || c.exitCode != 42 || starts != 1 || exits != 1 {
		t.Fatalf("started %v exited %v code %d starts %d exits %d", c.started, c.exited, c.exitCode, starts, exits)
	}
	if want := "a\nVMTEST-EXIT=0 other\npartial"; c.output.String() != want {
		t.Errorf("output %q, want %q", c.output.String(), want)
	}
	f := console{nonce: "n"}
	f.line("VMTEST-BOOT-FAILED: mount of the host root over 9p", nil, nil)
	if f.bootFailure != "mount of the host root over 9p" || f.started {
		t.Errorf("boot failure %q started %v", f.bootFailure, f.started)
	}
}

func TestLoadOrder(t *testing.T) {
	dir := t.TempDir()
	dep := "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko\n" +
		"kernel/net/9p/9pnet.ko:\nkernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko\nkernel/fs/netfs/netfs.ko:\n" +
		"kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko\n"
	if err := os.WriteFile(dir+"/modules.dep", []byte(dep), 0o644); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(dir+"/modules.builtin", []byte("kernel/net/netfilter/x_tables.ko\n"), 0o644)
	idx, err := readModuleIndex(dir)
	if err != nil {
		t.Fatal(err)
	}
	got, err := idx.loadOrder([]string{"9pnet_virtio", "9p"})
	if err != nil {
		t.Fatal(err)
	}
	want := "kernel/net/9p/9pnet.ko kernel/net/9p/9pnet_virtio.ko kernel/fs/netfs/netfs.ko kernel/fs/fscache/fscache.ko kernel/fs/9p/9p.ko"
	if strings.Join(got, " ") != want {
		t.Errorf("order %v, want %s", got, want)
	}
	if err := idx.check([]string{"x_tables", "9p", "ip_vs"}); err == nil || !strings.Contains(err.Error(), "ip_vs") {
		t.Errorf("check = %v, want ip_vs missing", err)
	}
}
