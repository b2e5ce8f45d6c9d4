package e2e

import (
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/signalbox/signalbox/nodeagent/e2e/labenv"
	"github.com/signalbox/signalbox/tools/netlab"
)

// The control plane dies: every node keeps serving with the rules it has.
// It comes back: agents resume on their own, and a change made while it
// was away reaches every node.
func TestControlPlaneKilledAndRestarted(t *testing.T) {
	ns := newNamespace(t, "cpkill")
	svc := createService(t, service(ns, "steady"))
	before := pods("pod1a", "pod2a", "pod3a")
	setEndpoints(t, svc, labenv.Ready(before...))
	waitTables(t, ns, "steady", clusterEndpoints(before...))
	addr := clusterAddr(svc)

	if err := env.KillControlPlane(); err != nil {
		t.Fatalf("kill control plane: %v", err)
	}
	// Whatever happens below, later tests need a control plane.
	t.Cleanup(func() { restartControlPlane(t) })

	for _, n := range env.Lab.Nodes() {
		expectPods(t, n, "tcp", addr, 30, before)
	}
	expectPods(t, pod("pod2b"), "tcp", addr, 30, before)

	// Changes while nobody programs the nodes: pod3a leaves, a new
	// Service appears. Neither can be live yet.
	after := pods("pod1a", "pod2a")
	setEndpoints(t, svc, labenv.Ready(after...))
	late := createService(t, service(ns, "late"))
	setEndpoints(t, late, labenv.Ready(pod("pod3b")))
	expectNoAnswer(t, node("node1"), "tcp", clusterAddr(late))

	restartControlPlane(t)
	waitTables(t, ns, "steady", clusterEndpoints(after...))
	waitTables(t, ns, "late", clusterEndpoints(pod("pod3b")))
	for _, n := range env.Lab.Nodes() {
		expectPods(t, n, "tcp", addr, 30, after)
		waitServes(t, n, "tcp", clusterAddr(late), pods("pod3b"))
	}
}

// restartControlPlane starts the control plane if it is down and waits for
// every agent to reconnect and catch up.
func restartControlPlane(t *testing.T) {
	t.Helper()
	ctx := testContext(t)
	if env.ControlPlaneDown() {
		if err := env.StartControlPlane(ctx); err != nil {
			t.Fatalf("restart control plane: %v", err)
		}
	}
	// Agents back off exponentially while it is down (up to 30 s).
	if err := env.WaitSynced(ctx, liveTimeout*2); err != nil {
		t.Fatalf("agents after control plane restart: %v", err)
	}
}

// An agent dies (SIGKILL): its node keeps serving. A Service deleted while
// it is down stays programmed (nobody removes it), and the restarted agent
// reconciles the kernel with its first snapshot, removing the stale rules.
func TestAgentKilledAndRestarted(t *testing.T) {
	ns := newNamespace(t, "agentkill")
	keep := createService(t, service(ns, "keep"))
	setEndpoints(t, keep, labenv.Ready(pods("pod1a", "pod3a")...))
	doomed := createService(t, service(ns, "doomed"))
	setEndpoints(t, doomed, labenv.Ready(pods("pod2a")...))
	waitTables(t, ns, "keep", clusterEndpoints(pods("pod1a", "pod3a")...))
	waitTables(t, ns, "doomed", clusterEndpoints(pods("pod2a")...))

	victim := node("node2")
	var tool, staleChain string
	if env.Mode == "iptables" {
		tool, staleChain = serviceChain(t, victim, ns, "doomed")
	}
	agent := env.Agent(victim.Name)
	if err := agent.Kill(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { restartAgent(t, victim) })

	for _, from := range []*netlab.Host{victim, pod("pod2b")} {
		expectPods(t, from, "tcp", clusterAddr(keep), 30, pods("pod1a", "pod3a"))
		expectPods(t, from, "tcp", clusterAddr(doomed), 10, pods("pod2a"))
	}

	ctx := testContext(t)
	if err := env.Kube.CoreV1().Services(ns).Delete(ctx, "doomed", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := env.Kube.DiscoveryV1().EndpointSlices(ns).Delete(ctx, "doomed-1", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	others := []*netlab.Host{node("node1"), node("node3")}
	waitTables(t, ns, "doomed", absent, others...)
	for _, n := range others {
		expectNoAnswer(t, n, "tcp", clusterAddr(doomed))
	}
	// Fail static: the dead agent's node still holds the old rules.
	expectPods(t, victim, "tcp", clusterAddr(doomed), 10, pods("pod2a"))

	restartAgent(t, victim)
	waitTables(t, ns, "doomed", absent)
	expectNoAnswer(t, victim, "tcp", clusterAddr(doomed))
	expectNoAnswer(t, pod("pod2b"), "tcp", clusterAddr(doomed))
	for _, from := range []*netlab.Host{victim, pod("pod2b")} {
		expectPods(t, from, "tcp", clusterAddr(keep), 30, pods("pod1a", "pod3a"))
	}
	// Unreachable is not enough: the orphaned chain with its DNAT rules
	// must be gone from the kernel too.
	if staleChain != "" {
		if out := inNode(t, victim, tool+"-save", "-t", "nat"); strings.Contains(out, staleChain) {
			t.Errorf("%s still holds %s of the deleted Service after the restart", victim.Name, staleChain)
		}
	}
	// In ipvs mode the orphans are a virtual server and an address on
	// kube-ipvs0.
	if env.Mode == "ipvs" {
		cip := doomed.Spec.ClusterIP
		for _, vs := range virtualServers(t, victim) {
			if strings.Contains(vs, cip+":") {
				t.Errorf("%s still holds virtual server %s of the deleted Service after the restart", victim.Name, vs)
			}
		}
		if out := inNode(t, victim, "ip", "-o", "addr", "show", "dev", "kube-ipvs0"); strings.Contains(out, " "+cip+"/") {
			t.Errorf("%s still binds %s of the deleted Service to kube-ipvs0 after the restart", victim.Name, cip)
		}
	}
}

// restartAgent starts a node's agent if it is down and waits until every
// agent is in sync.
func restartAgent(t *testing.T, n *netlab.Host) {
	t.Helper()
	ctx := testContext(t)
	if env.Agent(n.Name).PID() == 0 {
		if err := env.StartAgent(n.Name); err != nil {
			t.Fatalf("restart agent on %s: %v", n.Name, err)
		}
	}
	if err := env.WaitSynced(ctx, liveTimeout); err != nil {
		t.Fatalf("agents after restarting %s's: %v", n.Name, err)
	}
}
