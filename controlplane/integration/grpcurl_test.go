package integration

import (
	"bufio"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/signalbox/signalbox/tools/devcluster/devclustertest"
	"github.com/signalbox/signalbox/tools/repo"
)

// grpcurl returns the grpcurl binary `make tools` builds into .cache/bin.
func grpcurl(t *testing.T) string {
	t.Helper()
	dir, err := repo.Root()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, ".cache", "bin", "grpcurl")
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("grpcurl missing at %s: run 'make tools' (make test does)", bin)
	}
	return bin
}

func TestGrpcurlListsAndStreams(t *testing.T) {
	bin := grpcurl(t)
	p := startPlane(t, devclustertest.Get(t).Client())

	out, err := exec.Command(bin, "-plaintext", p.addr, "list").CombinedOutput()
	if err != nil {
		t.Fatalf("grpcurl list: %v\n%s", err, out)
	}
	for _, svc := range []string{"signalbox.v1.NodeSyncService", "signalbox.v1.InspectionService", "grpc.health.v1.Health"} {
		if !strings.Contains(string(out), svc) {
			t.Errorf("grpcurl list does not show %s:\n%s", svc, out)
		}
	}
	out, err = exec.Command(bin, "-plaintext", p.addr, "describe", "signalbox.v1.Delta").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "trace_context") {
		t.Fatalf("grpcurl describe signalbox.v1.Delta: %v\n%s", err, out)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "-plaintext", "-d", `{"node":"gc-a"}`, p.addr, "signalbox.v1.InspectionService/WatchNodeDeltas")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cancel(); cmd.Wait() }()
	// The watch registers before the agent exists; give grpcurl its
	// connection by polling for the stream on the server side.
	waitWatcher(t, p, "gc-a")
	a := connect(t, p, "gc-a", nil)
	if _, err := a.NextAck(ctxT(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	sawSent, sawAck := false, false
	sc := bufio.NewScanner(stdout)
	for sc.Scan() && !(sawSent && sawAck) {
		line := sc.Text()
		sawSent = sawSent || strings.Contains(line, `"sent"`)
		sawAck = sawAck || strings.Contains(line, `"ack"`)
	}
	if !sawSent || !sawAck {
		t.Fatalf("grpcurl WatchNodeDeltas did not stream the delta and its ack (sent=%v ack=%v)", sawSent, sawAck)
	}
}

func waitWatcher(t *testing.T, p *plane, node string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if p.hub.Watchers(node) > 0 {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("grpcurl never opened its watch on %s", node)
}
