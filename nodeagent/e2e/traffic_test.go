package e2e

import (
	"encoding/json"
	"fmt"
	"net"
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/utils/ptr"

	"github.com/signalbox/signalbox/nodeagent/e2e/labenv"
	"github.com/signalbox/signalbox/tools/netlab"
)

// ClientIP session affinity: every request of one client lands on the same
// endpoint, whether it comes from a pod, a node or the external client.
func TestSessionAffinityClientIP(t *testing.T) {
	ns := newNamespace(t, "affinity")
	svc := createService(t, service(ns, "sticky", func(s *corev1.Service) {
		s.Spec.Type = corev1.ServiceTypeNodePort
		s.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
		s.Spec.SessionAffinityConfig = &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: ptr.To[int32](600)}}
	}))
	setEndpoints(t, svc, labenv.Ready(allPods()...))
	waitTables(t, ns, "sticky", clusterEndpoints(allPods()...))
	for _, c := range []struct {
		from *netlab.Host
		addr string
	}{
		{pod("pod2a"), clusterAddr(svc)},
		{node("node3"), clusterAddr(svc)},
		{client(), nodePortAddr(svc, node("node1"))},
	} {
		waitServes(t, c.from, "tcp", c.addr, allPods())
		// Six endpoints: without affinity, 30 answers from one pod would
		// happen with probability 6^-29.
		if got := answeredBy(answers(t, c.from, "tcp", c.addr, 30)); len(got) != 1 {
			t.Errorf("%s -> %s with ClientIP affinity: answered by %v, want one pod", c.from.Name, c.addr, got)
		}
	}
}

// Hairpin: a pod reaching its own Service lands on itself, which only works
// when the source is masqueraded (the pod would otherwise answer itself
// directly and drop the reply).
func TestHairpin(t *testing.T) {
	ns := newNamespace(t, "hairpin")
	svc := createService(t, service(ns, "self"))
	self := pod("pod2b")
	setEndpoints(t, svc, labenv.Ready(self))
	waitTables(t, ns, "self", clusterEndpoints(self))
	addr := clusterAddr(svc)
	waitServes(t, self, "tcp", addr, []*netlab.Host{self})
	replies := expectPods(t, self, "tcp", addr, 10, []*netlab.Host{self})
	expectSources(t, "hairpin", replies, nodeAddrs(node(self.Node))...)
}

// A UDP Service answers; when an endpoint leaves, a client that keeps
// sending from the same port moves to the remaining endpoint at once,
// because the agent deleted the conntrack entries pinning it to the old one.
func TestUDPServiceAndConntrackCleanup(t *testing.T) {
	ns := newNamespace(t, "udp")
	svc := createService(t, service(ns, "dns", func(s *corev1.Service) {
		s.Spec.Ports[0].Protocol = corev1.ProtocolUDP
		s.Spec.Ports[0].Port = 53
	}))
	two := pods("pod1a", "pod2a")
	setEndpoints(t, svc, labenv.Ready(two...))
	waitTables(t, ns, "dns", clusterEndpoints(two...))
	addr := clusterAddr(svc)
	from := pod("pod3a")
	waitServes(t, from, "udp", addr, two)
	expectPods(t, from, "udp", addr, 30, two)

	// One long-lived client socket: conntrack pins its flow to one pod.
	conn, err := from.ListenPacket("udp", ":40053")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	dst, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	first := udpAsk(t, conn, dst)
	for range 5 {
		if got := udpAsk(t, conn, dst); got != first {
			t.Fatalf("one UDP flow answered by %s then %s: conntrack did not pin it", first, got)
		}
	}

	// Remove the pinned pod. It still runs and would keep answering a
	// stale conntrack entry; only the cleanup moves the flow.
	remaining := slices.DeleteFunc(slices.Clone(two), func(p *netlab.Host) bool { return p.Name == first })
	setEndpoints(t, svc, labenv.Ready(remaining...))
	waitTables(t, ns, "dns", clusterEndpoints(remaining...))
	eventually(t, 5*time.Second, "flow moved off the removed endpoint", func() error {
		if got := udpAsk(t, conn, dst); got != remaining[0].Name {
			return fmt.Errorf("still answered by %s", got)
		}
		return nil
	})
	for range 10 {
		if got := udpAsk(t, conn, dst); got != remaining[0].Name {
			t.Fatalf("after cleanup, the flow went back to %s", got)
		}
	}
}

// udpAsk sends one datagram from conn and returns the answering pod.
func udpAsk(t *testing.T, conn net.PacketConn, dst net.Addr) string {
	t.Helper()
	if _, err := conn.WriteTo([]byte("?\n"), dst); err != nil {
		t.Fatalf("send to %s: %v", dst, err)
	}
	buf := make([]byte, 4096)
	if err := conn.SetReadDeadline(time.Now().Add(askTimeout)); err != nil {
		t.Fatal(err)
	}
	n, _, err := conn.ReadFrom(buf)
	if err != nil {
		t.Fatalf("answer from %s: %v", dst, err)
	}
	var r netlab.Reply
	if err := json.Unmarshal(buf[:n], &r); err != nil {
		t.Fatalf("bad answer %q: %v", buf[:n], err)
	}
	return r.Pod
}

// Terminating endpoints serve only while no endpoint is ready, and a
// terminating endpoint that stopped serving never does.
func TestTerminatingEndpointsOnlyAsFallback(t *testing.T) {
	ns := newNamespace(t, "terminating")
	svc := createService(t, service(ns, "drain"))
	ready, draining, gone := pod("pod1a"), pod("pod2a"), pod("pod3a")
	setEndpoints(t, svc, []labenv.Endpoint{
		{Pod: ready},
		{Pod: draining, Terminating: true},
		{Pod: gone, Terminating: true, NotServing: true},
	})
	waitTables(t, ns, "drain", clusterEndpoints(ready))
	addr := clusterAddr(svc)
	for _, from := range []*netlab.Host{node("node1"), pod("pod3b")} {
		waitServes(t, from, "tcp", addr, []*netlab.Host{ready})
		expectPods(t, from, "tcp", addr, 30, []*netlab.Host{ready})
	}

	// The ready pod stops being ready: the draining one takes over.
	setEndpoints(t, svc, []labenv.Endpoint{
		{Pod: ready, NotReady: true, NotServing: true},
		{Pod: draining, Terminating: true},
		{Pod: gone, Terminating: true, NotServing: true},
	})
	waitTables(t, ns, "drain", clusterEndpoints(draining))
	for _, from := range []*netlab.Host{node("node1"), pod("pod3b")} {
		expectPods(t, from, "tcp", addr, 30, []*netlab.Host{draining})
	}
}
