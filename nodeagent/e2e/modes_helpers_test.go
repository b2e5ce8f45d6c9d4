// Helpers to look at each mode's kernel state, used by TestModeSwitch
// (vm tag) and by the fail-static tests.

package e2e

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
	"github.com/signalbox/signalbox/tools/netlab"
)

// switchMode restarts a node's agent with --mode=mode and waits until
// every agent is in sync.
func switchMode(n *netlab.Host, mode string) error {
	p := env.Agent(n.Name)
	if err := p.Stop(10 * time.Second); err != nil {
		return err
	}
	for i, a := range p.Argv {
		if strings.HasPrefix(a, "--mode=") {
			p.Argv[i] = "--mode=" + mode
		}
	}
	if err := p.Start(); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*liveTimeout)
	defer cancel()
	return env.WaitSynced(ctx, 2*liveTimeout)
}

func nodeMode(t *testing.T, name string) string {
	t.Helper()
	resp, err := env.Inspect.ListNodes(testContext(t), &pb.ListNodesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range resp.GetNodes() {
		if n.GetName() == name {
			return n.GetMode()
		}
	}
	t.Fatalf("%s not in the inspection API", name)
	return ""
}

// svcChains lists the iptables plane's per-Service chains in either
// iptables backend's nat table.
func svcChains(t *testing.T, n *netlab.Host) []string {
	t.Helper()
	var out []string
	for _, backend := range []string{"iptables-nft", "iptables-legacy"} {
		b, err := n.Command(testContext(t), backend+"-save", "-t", "nat").Output()
		if err != nil {
			continue // that backend is not in use
		}
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, ":SBX-SVC-") {
				out = append(out, fmt.Sprintf("%s %s", backend, strings.Fields(l)[0][1:]))
			}
		}
	}
	return out
}

// virtualServers lists the node's IPVS virtual servers ("TCP ip:port").
func virtualServers(t *testing.T, n *netlab.Host) []string {
	t.Helper()
	var out []string
	for _, l := range strings.Split(inNode(t, n, "ipvsadm", "-Ln"), "\n") {
		f := strings.Fields(l)
		if len(f) >= 2 && (f[0] == "TCP" || f[0] == "UDP" || f[0] == "SCTP") {
			out = append(out, f[0]+" "+f[1])
		}
	}
	return out
}
