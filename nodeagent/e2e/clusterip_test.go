package e2e

import (
	"errors"
	"fmt"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/signalbox/signalbox/nodeagent/e2e/labenv"
	"github.com/signalbox/signalbox/tools/netlab"
)

// A ClusterIP spreads over every endpoint, from a pod and from a node, and
// an endpoint removed from the slice stops receiving traffic.
func TestClusterIPSpreadsAndFollowsSlice(t *testing.T) {
	ns := newNamespace(t, "clusterip")
	svc := createService(t, service(ns, "web"))
	setEndpoints(t, svc, labenv.Ready(allPods()...))
	waitTables(t, ns, "web", clusterEndpoints(allPods()...))
	addr := clusterAddr(svc)

	// From a pod: pod-to-service traffic keeps the pod's address, except
	// when it lands on the sender itself (hairpin, masqueraded).
	from := pod("pod1a")
	waitServes(t, from, "tcp", addr, allPods())
	for _, r := range expectPods(t, from, "tcp", addr, 60, allPods()) {
		src := sourceIP(t, r)
		if r.Pod == from.Name {
			if src == from.IPv4 {
				t.Errorf("hairpin reply from %s saw its own address %s: not masqueraded", r.Pod, src)
			}
		} else if src != from.IPv4 {
			t.Errorf("%s saw source %s, want the sending pod's %s", r.Pod, src, from.IPv4)
		}
	}

	// From a node: traffic from outside the cluster CIDR is masqueraded.
	n2 := node("node2")
	waitServes(t, n2, "tcp", addr, allPods())
	expectSources(t, "node2 -> ClusterIP", expectPods(t, n2, "tcp", addr, 60, allPods()), nodeAddrs(n2)...)

	// pod3b leaves the slice: once every agent applied it, pod3b gets
	// nothing while the other five still share the traffic.
	rest := pods("pod1a", "pod1b", "pod2a", "pod2b", "pod3a")
	setEndpoints(t, svc, labenv.Ready(rest...))
	waitTables(t, ns, "web", clusterEndpoints(rest...))
	for _, from := range []*netlab.Host{pod("pod2b"), node("node3")} {
		expectPods(t, from, "tcp", addr, 60, rest)
	}
}

// A Service without endpoints rejects at once: a client gets "connection
// refused" in milliseconds, not a timeout.
func TestClusterIPWithoutEndpointsRejects(t *testing.T) {
	ns := newNamespace(t, "noendpoints")
	svc := createService(t, service(ns, "empty"))
	setEndpoints(t, svc, nil)
	waitTables(t, ns, "empty", clusterEndpoints())
	addr := clusterAddr(svc)
	for _, from := range []*netlab.Host{pod("pod1a"), node("node3")} {
		// The first request may race the kernel (the ack means applied,
		// but be lenient once); after that it must be refused every time.
		eventually(t, liveTimeout, from.Name+" refused", func() error {
			r, err := ask(from, "tcp", addr, askTimeout)
			switch {
			case err == nil:
				return fmt.Errorf("answered by %s", r.Pod)
			case !errors.Is(err, syscall.ECONNREFUSED):
				return err
			}
			return nil
		})
		for range 5 {
			start := time.Now()
			_, err := ask(from, "tcp", addr, askTimeout)
			took := time.Since(start)
			if !errors.Is(err, syscall.ECONNREFUSED) {
				t.Fatalf("%s -> %s: %v, want connection refused", from.Name, addr, err)
			}
			if took > 500*time.Millisecond {
				t.Fatalf("%s -> %s: refused only after %s, want at once", from.Name, addr, took)
			}
		}
	}

	// The ClusterIP is a real address of the service range, not a typo.
	if ip := netip.MustParseAddr(svc.Spec.ClusterIP); !netlab.ServiceCIDR4.Contains(ip) {
		t.Fatalf("ClusterIP %s outside %s", ip, netlab.ServiceCIDR4)
	}
}
