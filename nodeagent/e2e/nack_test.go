package e2e

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/signalbox/signalbox/nodeagent/e2e/labenv"
	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
	"github.com/signalbox/signalbox/tools/netlab"
)

// A delta the kernel refuses is NACKed: the node keeps its previous rules,
// the control plane marks it degraded and shows why, and once the cause is
// gone the node converges. The refusal is a real one: another tool's rule
// references the Service's chain, so the kernel will not delete the chain
// when the Service goes away (kube-proxy's classic failure).
//
// In ipvs mode there is no per-Service chain to hold: a Service is a
// virtual server plus ipset members, and the kernel deletes those whoever
// else looks at them. The refusal there is on an addition instead (see
// TestRejectedDeltaIsNACKedAndRulesStay's ipvs branch, rejectedAddIPVS).
func TestRejectedDeltaIsNACKedAndRulesStay(t *testing.T) {
	if env.Mode == "ipvs" {
		rejectedAddIPVS(t)
		return
	}
	ns := newNamespace(t, "nack")
	svc := createService(t, service(ns, "held"))
	setEndpoints(t, svc, labenv.Ready(pod("pod1a")))
	waitTables(t, ns, "held", clusterEndpoints(pod("pod1a")))
	addr := clusterAddr(svc)
	victim := node("node1")
	waitServes(t, victim, "tcp", addr, pods("pod1a"))

	release := holdServiceChain(t, victim, ns, "held")
	t.Cleanup(release)

	ctx := testContext(t)
	if err := env.Kube.CoreV1().Services(ns).Delete(ctx, "held", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	others := []*netlab.Host{node("node2"), node("node3")}
	waitTables(t, ns, "held", absent, others...)

	nack := waitNACK(t, victim.Name)
	t.Logf("%s rejected the delta: %q (resources %v)", victim.Name, nack.GetMessage(), nack.GetResources())
	if nack.GetMessage() == "" {
		t.Error("NACK carries no error message")
	}
	conv, err := env.Inspect.GetServiceConvergence(ctx, &pb.GetServiceConvergenceRequest{Namespace: ns, Name: "held"})
	if err != nil {
		t.Fatal(err)
	}
	if len(conv.GetRejected()) != 1 || conv.GetRejected()[0].GetNode() != victim.Name {
		t.Errorf("convergence of %s/held: rejected by %v, want %s only", ns, conv.GetRejected(), victim.Name)
	}
	// The previous rules are in force on the rejecting node only.
	expectPods(t, victim, "tcp", addr, 10, pods("pod1a"))
	expectPods(t, pod("pod1b"), "tcp", addr, 10, pods("pod1a"))
	for _, n := range others {
		expectNoAnswer(t, n, "tcp", addr)
	}

	// Cause removed; a new change makes the control plane try again now
	// rather than after its backoff, and the whole table goes in.
	release()
	nudge := createService(t, service(ns, "nudge"))
	setEndpoints(t, nudge, labenv.Ready(pod("pod2a")))
	waitTables(t, ns, "held", absent)
	waitTables(t, ns, "nudge", clusterEndpoints(pod("pod2a")))
	if err := env.WaitSynced(ctx, liveTimeout); err != nil {
		t.Fatalf("after the cause was removed: %v", err)
	}
	expectNoAnswer(t, victim, "tcp", addr)
	waitServes(t, victim, "tcp", clusterAddr(nudge), pods("pod2a"))
}

// waitNACK waits until the inspection API shows the node degraded by a
// rejected delta and returns the error it reported.
func waitNACK(t *testing.T, nodeName string) *pb.ErrorDetail {
	t.Helper()
	var detail *pb.ErrorDetail
	eventually(t, liveTimeout, nodeName+" NACK visible in the inspection API", func() error {
		ctx, cancel := context.WithTimeout(context.Background(), askTimeout)
		defer cancel()
		resp, err := env.Inspect.ListNodes(ctx, &pb.ListNodesRequest{})
		if err != nil {
			return err
		}
		for _, n := range resp.GetNodes() {
			if n.GetName() == nodeName && n.GetDegraded() && n.GetLastNack() != nil {
				detail = n.GetLastNack()
				return nil
			}
		}
		return fmt.Errorf("%s not degraded", nodeName)
	})
	return detail
}

// holdServiceChain makes the kernel refuse to delete the chain a node's
// data plane uses for Service ns/name, by referencing it from a chain of
// "another tool", and returns the function that drops the reference.
func holdServiceChain(t *testing.T, n *netlab.Host, ns, name string) (release func()) {
	t.Helper()
	if env.Mode != "iptables" {
		t.Fatalf("holdServiceChain is for the iptables plane, not %s", env.Mode)
	}
	tool, chain := serviceChain(t, n, ns, name)
	const holder = "E2E-FOREIGN-HOLD"
	inNode(t, n, tool, "-t", "nat", "-N", holder)
	inNode(t, n, tool, "-t", "nat", "-A", holder, "-j", chain)
	released := false
	return func() {
		if released {
			return
		}
		released = true
		inNode(t, n, tool, "-t", "nat", "-F", holder)
		inNode(t, n, tool, "-t", "nat", "-X", holder)
	}
}

// serviceChain finds the nat chain the iptables plane jumps to for Service
// ns/name's ClusterIP on a node, and which iptables (nft or legacy) holds
// it: the agent drives whichever backend the node already uses.
func serviceChain(t *testing.T, n *netlab.Host, ns, name string) (tool, chain string) {
	t.Helper()
	comment := fmt.Sprintf(`"%s/%s:echo cluster IP"`, ns, name)
	for _, backend := range []string{"iptables-nft", "iptables-legacy"} {
		out, err := n.Command(testContext(t), backend+"-save", "-t", "nat").Output()
		if err != nil {
			continue // that backend is not in use (or not installed)
		}
		for _, line := range strings.Split(string(out), "\n") {
			if strings.Contains(line, comment) {
				if _, target, ok := strings.Cut(line, " -j "); ok {
					return backend, strings.Fields(target)[0]
				}
			}
		}
	}
	t.Fatalf("no iptables rule for %s/%s on %s", ns, name, n.Name)
	return "", ""
}

// inNode runs a command inside a node's namespace.
func inNode(t *testing.T, n *netlab.Host, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := n.Command(ctx, name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %s %s: %v: %s", n.Name, name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// rejectedAddIPVS is the NACK case for the IPVS plane, by its design
// different from the iptables one: the kernel refuses a delta that adds a
// Service, because "another tool" has swapped the plane's cluster-IP ipset
// for a set of the same type holding exactly the same members but with no
// room for more (maxelem reached; the kernel answers "Hash is full"). The
// node's existing Services keep working, since the kernel's rules see the
// same members; the new Service is NACKed on that node only; once the sets
// are swapped back the node converges.
func rejectedAddIPVS(t *testing.T) {
	ns := newNamespace(t, "nack")
	steady := createService(t, service(ns, "steady"))
	setEndpoints(t, steady, labenv.Ready(pod("pod1a")))
	waitTables(t, ns, "steady", clusterEndpoints(pod("pod1a")))
	victim := node("node1")
	waitServes(t, victim, "tcp", clusterAddr(steady), pods("pod1a"))

	release := fillClusterIPSet(t, victim)
	t.Cleanup(release)

	refused := createService(t, service(ns, "refused"))
	setEndpoints(t, refused, labenv.Ready(pod("pod1b")))
	others := []*netlab.Host{node("node2"), node("node3")}
	waitTables(t, ns, "refused", clusterEndpoints(pod("pod1b")), others...)
	for _, n := range others {
		waitServes(t, n, "tcp", clusterAddr(refused), pods("pod1b"))
	}

	nack := waitNACK(t, victim.Name)
	t.Logf("%s rejected the delta: %q (resources %v)", victim.Name, nack.GetMessage(), nack.GetResources())
	if !strings.Contains(nack.GetMessage(), "ipset") {
		t.Errorf("NACK message %q does not name the refusing ipset operation", nack.GetMessage())
	}
	ctx := testContext(t)
	conv, err := env.Inspect.GetServiceConvergence(ctx, &pb.GetServiceConvergenceRequest{Namespace: ns, Name: "refused"})
	if err != nil {
		t.Fatal(err)
	}
	if len(conv.GetRejected()) != 1 || conv.GetRejected()[0].GetNode() != victim.Name {
		t.Errorf("convergence of %s/refused: rejected by %v, want %s only", ns, conv.GetRejected(), victim.Name)
	}
	// The previous rules are in force on the rejecting node: the old
	// Service answers, the refused one is not there.
	expectPods(t, victim, "tcp", clusterAddr(steady), 10, pods("pod1a"))
	expectPods(t, pod("pod1b"), "tcp", clusterAddr(steady), 10, pods("pod1a"))
	expectNoAnswer(t, victim, "tcp", clusterAddr(refused))

	// Cause removed; a new change makes the control plane try again now.
	release()
	nudge := createService(t, service(ns, "nudge"))
	setEndpoints(t, nudge, labenv.Ready(pod("pod2a")))
	waitTables(t, ns, "refused", clusterEndpoints(pod("pod1b")))
	waitTables(t, ns, "nudge", clusterEndpoints(pod("pod2a")))
	if err := env.WaitSynced(ctx, liveTimeout); err != nil {
		t.Fatalf("after the cause was removed: %v", err)
	}
	waitServes(t, victim, "tcp", clusterAddr(refused), pods("pod1b"))
	waitServes(t, victim, "tcp", clusterAddr(nudge), pods("pod2a"))
	expectPods(t, victim, "tcp", clusterAddr(steady), 10, pods("pod1a"))
}

// fillClusterIPSet swaps the IPVS plane's IPv4 cluster-IP set on a node for
// a full copy (same type, same members, maxelem = their count) and returns
// the function that swaps it back and removes the copy.
func fillClusterIPSet(t *testing.T, n *netlab.Host) (release func()) {
	t.Helper()
	const set, holder = "SBX-IPVS-CLUSTER-IP", "E2E-FULL-CLUSTER-IP"
	var members []string
	for _, l := range strings.Split(inNode(t, n, "ipset", "save", set), "\n") {
		if f := strings.Fields(l); len(f) == 3 && f[0] == "add" && f[1] == set {
			members = append(members, f[2])
		}
	}
	if len(members) == 0 {
		t.Fatalf("%s: %s has no members; the test's own Service should be one", n.Name, set)
	}
	var in strings.Builder
	fmt.Fprintf(&in, "create %s hash:ip,port family inet hashsize 64 maxelem %d\n", holder, len(members))
	for _, m := range members {
		fmt.Fprintf(&in, "add %s %s\n", holder, m)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := n.Command(ctx, "ipset", "restore")
	cmd.Stdin = strings.NewReader(in.String())
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s: ipset restore: %v: %s", n.Name, err, out)
	}
	inNode(t, n, "ipset", "swap", set, holder)
	released := false
	return func() {
		if released {
			return
		}
		released = true
		inNode(t, n, "ipset", "swap", set, holder)
		inNode(t, n, "ipset", "destroy", holder)
	}
}
