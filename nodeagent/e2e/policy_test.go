package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/utils/ptr"

	"github.com/signalbox/signalbox/nodeagent/e2e/labenv"
	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
	"github.com/signalbox/signalbox/tools/netlab"
)

// externalTrafficPolicy Local: a node sends external traffic only to its
// own endpoints and keeps the client's address; a node without any drops
// it, and its health check node port says so (503) to load balancers.
func TestExternalTrafficPolicyLocal(t *testing.T) {
	ns := newNamespace(t, "etplocal")
	svc := createService(t, service(ns, "local", func(s *corev1.Service) {
		s.Spec.Type = corev1.ServiceTypeLoadBalancer
		s.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
	}))
	if svc.Spec.HealthCheckNodePort == 0 {
		t.Fatal("apiserver allocated no health check node port")
	}
	setIngress(t, svc, lbLocalIP)
	local := map[string][]*netlab.Host{
		"node1": pods("pod1a", "pod1b"),
		"node2": pods("pod2a"),
		"node3": nil,
	}
	setEndpoints(t, svc, labenv.Ready(slices.Concat(local["node1"], local["node2"])...))
	waitTables(t, ns, "local", func(node string, sps []*pb.ServicePort) error {
		if len(sps) != 1 || len(sps[0].GetExternalEndpoints()) != len(local[node]) {
			return fmt.Errorf("external endpoints not yet %d", len(local[node]))
		}
		return nil
	})
	clientIP := client().IPv4

	for _, n := range env.Lab.Nodes() {
		addr := nodePortAddr(svc, n)
		want := local[n.Name]
		if len(want) == 0 {
			err := expectNoAnswer(t, client(), "tcp", addr)
			if !isTimeout(err) {
				t.Errorf("client -> %s (no local endpoints): %v, want the request dropped", n.Name, err)
			}
		} else {
			waitServes(t, client(), "tcp", addr, want)
			expectSources(t, "client -> "+n.Name+" NodePort", expectPods(t, client(), "tcp", addr, 30, want), clientIP)
		}
		status, count := healthCheck(t, n, svc.Spec.HealthCheckNodePort)
		wantStatus := http.StatusOK
		if len(want) == 0 {
			wantStatus = http.StatusServiceUnavailable
		}
		if status != wantStatus || count != len(want) {
			t.Errorf("health check on %s: %d with %d local endpoints, want %d with %d", n.Name, status, count, wantStatus, len(want))
		}
	}

	// Through the load balancer IP the same holds on the node it reaches.
	routeExternal(t, node("node2"))
	addr := hostPort(lbLocalIP.String(), servicePort)
	waitServes(t, client(), "tcp", addr, local["node2"])
	expectSources(t, "client -> LB IP via node2", expectPods(t, client(), "tcp", addr, 20, local["node2"]), clientIP)
}

// healthCheck GETs a node's health check node port from the external
// client, as a load balancer would, and returns the status and the local
// endpoint count it reports.
func healthCheck(t *testing.T, n *netlab.Host, port int32) (int, int) {
	t.Helper()
	hc := &http.Client{
		Timeout:   askTimeout,
		Transport: &http.Transport{DialContext: client().Dial, DisableKeepAlives: true},
	}
	url := "http://" + hostPort(n.IPv4.String(), port) + "/"
	var status, count int
	// The agent opens the port after programming the table; allow it that.
	eventually(t, liveTimeout, "health check on "+n.Name, func() error {
		resp, err := hc.Get(url)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			return err
		}
		var hs struct {
			LocalEndpoints int `json:"localEndpoints"`
		}
		if err := json.Unmarshal(body, &hs); err != nil {
			return fmt.Errorf("GET %s: %s: body %q: %w", url, resp.Status, body, err)
		}
		status, count = resp.StatusCode, hs.LocalEndpoints
		return nil
	})
	return status, count
}

// internalTrafficPolicy Local: pods and nodes reach only endpoints on their
// own node; a node without any gets no answer.
func TestInternalTrafficPolicyLocal(t *testing.T) {
	ns := newNamespace(t, "itplocal")
	svc := createService(t, service(ns, "local", func(s *corev1.Service) {
		s.Spec.InternalTrafficPolicy = ptr.To(corev1.ServiceInternalTrafficPolicyLocal)
	}))
	setEndpoints(t, svc, labenv.Ready(pods("pod1a", "pod3a")...))
	waitTables(t, ns, "local", func(node string, sps []*pb.ServicePort) error {
		want := map[string]int{"node1": 1, "node2": 0, "node3": 1}[node]
		if len(sps) != 1 || len(sps[0].GetClusterEndpoints()) != want {
			return fmt.Errorf("cluster endpoints not yet %d", want)
		}
		return nil
	})
	addr := clusterAddr(svc)
	for _, c := range []struct {
		from *netlab.Host
		want []*netlab.Host
	}{
		{pod("pod1b"), pods("pod1a")},
		{node("node1"), pods("pod1a")},
		{node("node3"), pods("pod3a")},
		{pod("pod3b"), pods("pod3a")},
	} {
		waitServes(t, c.from, "tcp", addr, c.want)
		expectPods(t, c.from, "tcp", addr, 20, c.want)
	}
	for _, from := range []*netlab.Host{node("node2"), pod("pod2a")} {
		expectNoAnswer(t, from, "tcp", addr)
	}
}

// Zone hints: a node uses the endpoints hinted for its zone, and falls back
// to all endpoints when any endpoint lacks a hint or no hint names its zone.
func TestZoneHints(t *testing.T) {
	ns := newNamespace(t, "zones")
	svc := createService(t, service(ns, "zonal"))
	zoneA, zoneB := pods("pod1a", "pod2a"), pods("pod3a", "pod3b")
	all := slices.Concat(zoneA, zoneB)
	hinted := func(hint func(p *netlab.Host) []string) []labenv.Endpoint {
		eps := labenv.Ready(all...)
		for i := range eps {
			eps[i].ZoneHints = hint(eps[i].Pod)
		}
		return eps
	}
	ownZone := func(p *netlab.Host) []string { return []string{env.Lab.Node(p.Node).Zone} }
	addr := clusterAddr(svc)
	count := func(want map[string]int) func(string, []*pb.ServicePort) error {
		return func(node string, sps []*pb.ServicePort) error {
			if len(sps) != 1 || len(sps[0].GetClusterEndpoints()) != want[node] {
				return fmt.Errorf("cluster endpoints not yet %d", want[node])
			}
			return nil
		}
	}

	// Every endpoint hinted for its own zone.
	setEndpoints(t, svc, hinted(ownZone))
	waitTables(t, ns, "zonal", count(map[string]int{"node1": 2, "node2": 2, "node3": 2}))
	expectPods(t, node("node1"), "tcp", addr, 40, zoneA)
	expectPods(t, pod("pod2b"), "tcp", addr, 40, zoneA)
	expectPods(t, node("node3"), "tcp", addr, 40, zoneB)

	// One endpoint without a hint: hints are ignored everywhere.
	setEndpoints(t, svc, hinted(func(p *netlab.Host) []string {
		if p.Name == "pod3b" {
			return nil
		}
		return ownZone(p)
	}))
	waitTables(t, ns, "zonal", count(map[string]int{"node1": 4, "node2": 4, "node3": 4}))
	expectPods(t, node("node1"), "tcp", addr, 40, all)

	// No hint names zone-b (pod3b's names a zone without nodes): zone-a
	// nodes follow the hints, node3 falls back to every endpoint.
	setEndpoints(t, svc, hinted(func(p *netlab.Host) []string {
		if p.Name == "pod3b" {
			return []string{"zone-c"}
		}
		return []string{"zone-a"}
	}))
	waitTables(t, ns, "zonal", count(map[string]int{"node1": 3, "node2": 3, "node3": 4}))
	expectPods(t, node("node1"), "tcp", addr, 40, pods("pod1a", "pod2a", "pod3a"))
	expectPods(t, node("node3"), "tcp", addr, 40, all)
}
