package nodeview

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
)

// TestCategorize follows upstream's CategorizeEndpoints and the iptables
// proxier's choice of chains and REJECT/DROP, for node n1 in zone z1.
// Output format: cluster=<endpoints>(<action>) external=<endpoints>(<action>),
// endpoints marked /l (local) and /t (terminating fallback).
func TestCategorize(t *testing.T) {
	n1 := Node{Name: "n1", Zone: "z1"}
	nodePort := withNodePort(30080)
	tests := []struct {
		name string
		svc  *corev1.Service
		eps  []discoveryv1.Endpoint
		node Node
		want string
	}{
		// Readiness and the terminating fallback.
		{"ready endpoints only", service(),
			[]discoveryv1.Endpoint{ep("10.1.0.1"), ep("10.1.0.2", notReady), ep("10.1.0.3", gone)}, n1,
			"cluster=10.1.0.1:8080() external=-()"},
		{"serving terminating endpoints when none ready", service(),
			[]discoveryv1.Endpoint{ep("10.1.0.1", notReady), ep("10.1.0.2", terminating), ep("10.1.0.3", gone)}, n1,
			"cluster=10.1.0.2:8080/t() external=-()"},
		{"ready wins over terminating", service(),
			[]discoveryv1.Endpoint{ep("10.1.0.1", terminating), ep("10.1.0.2")}, n1,
			"cluster=10.1.0.2:8080() external=-()"},
		{"nothing usable: REJECT internal and external", service(nodePort),
			[]discoveryv1.Endpoint{ep("10.1.0.1", notReady), ep("10.1.0.2", gone)}, n1,
			"cluster=-(REJECT) external=-(REJECT)"},
		{"no endpoints at all: REJECT", service(nodePort), nil, n1,
			"cluster=-(REJECT) external=-(REJECT)"},
		{"NodePort, Cluster policy: external uses cluster endpoints, no locality", service(nodePort),
			[]discoveryv1.Endpoint{ep("10.1.0.1", on("n1")), ep("10.1.0.2", on("n2"))}, n1,
			"cluster=10.1.0.1:8080 10.1.0.2:8080() external=10.1.0.1:8080 10.1.0.2:8080()"},

		// internalTrafficPolicy Local.
		{"ITP Local: local endpoints only", service(withITPLocal()),
			[]discoveryv1.Endpoint{ep("10.1.0.1", on("n1")), ep("10.1.0.2", on("n2"))}, n1,
			"cluster=10.1.0.1:8080/l() external=-()"},
		{"ITP Local, no local endpoint: DROP", service(withITPLocal()),
			[]discoveryv1.Endpoint{ep("10.1.0.2", on("n2"))}, n1,
			"cluster=-(DROP) external=-()"},
		{"ITP Local, nothing usable anywhere: REJECT", service(withITPLocal()),
			[]discoveryv1.Endpoint{ep("10.1.0.2", on("n2"), notReady)}, n1,
			"cluster=-(REJECT) external=-()"},
		{"ITP Local: local terminating fallback even though remote ones are ready", service(withITPLocal()),
			[]discoveryv1.Endpoint{ep("10.1.0.1", on("n1"), terminating), ep("10.1.0.2", on("n2"))}, n1,
			"cluster=10.1.0.1:8080/l/t() external=-()"},
		{"ITP Local: node without a name is never local", service(withITPLocal()),
			[]discoveryv1.Endpoint{ep("10.1.0.1")}, Node{Zone: "z1"},
			"cluster=-(DROP) external=-()"},
		{"ITP Local ignores topology hints", service(withITPLocal()),
			[]discoveryv1.Endpoint{ep("10.1.0.1", on("n1"), zones("z2")), ep("10.1.0.2", on("n2"), zones("z1"))}, n1,
			"cluster=10.1.0.1:8080/l() external=-()"},
		{"ITP Local, ETP Cluster NodePort: external uses all endpoints", service(withITPLocal(), nodePort),
			[]discoveryv1.Endpoint{ep("10.1.0.1", on("n1")), ep("10.1.0.2", on("n2"))}, n1,
			"cluster=10.1.0.1:8080/l() external=10.1.0.1:8080/l 10.1.0.2:8080()"},
		{"ITP Local, ETP Cluster NodePort, no local: internal DROP, external served", service(withITPLocal(), nodePort),
			[]discoveryv1.Endpoint{ep("10.1.0.2", on("n2"))}, n1,
			"cluster=-(DROP) external=10.1.0.2:8080()"},

		// externalTrafficPolicy Local.
		{"ETP Local: external uses local endpoints", service(nodePort, withETPLocal(0)),
			[]discoveryv1.Endpoint{ep("10.1.0.1", on("n1")), ep("10.1.0.2", on("n2"))}, n1,
			"cluster=10.1.0.1:8080/l 10.1.0.2:8080() external=10.1.0.1:8080/l()"},
		{"ETP Local, no local endpoint: external DROP, cluster intact", service(nodePort, withETPLocal(0)),
			[]discoveryv1.Endpoint{ep("10.1.0.2", on("n2"))}, n1,
			"cluster=10.1.0.2:8080() external=-(DROP)"},
		{"ETP Local, nothing usable: REJECT both", service(nodePort, withETPLocal(0)),
			[]discoveryv1.Endpoint{ep("10.1.0.1", on("n1"), notReady)}, n1,
			"cluster=-(REJECT) external=-(REJECT)"},
		{"ETP Local: fallback decided separately for local (terminating) and cluster (ready)", service(nodePort, withETPLocal(0)),
			[]discoveryv1.Endpoint{ep("10.1.0.1", on("n1"), terminating), ep("10.1.0.2", on("n2"))}, n1,
			"cluster=10.1.0.2:8080() external=10.1.0.1:8080/l/t()"},
		{"ETP Local: both fall back when nothing is ready", service(nodePort, withETPLocal(0)),
			[]discoveryv1.Endpoint{ep("10.1.0.1", on("n1"), terminating), ep("10.1.0.2", on("n2"), terminating)}, n1,
			"cluster=10.1.0.1:8080/l/t 10.1.0.2:8080/t() external=10.1.0.1:8080/l/t()"},
		{"ETP Local: local endpoint outside the hinted zone still takes external traffic", service(nodePort, withETPLocal(0)),
			[]discoveryv1.Endpoint{ep("10.1.0.1", on("n1"), zones("z2")), ep("10.1.0.2", on("n2"), zones("z1"))}, n1,
			"cluster=10.1.0.2:8080() external=10.1.0.1:8080/l()"},
		{"ETP Local on a plain ClusterIP Service is Cluster policy", service(withETPLocal(0)),
			[]discoveryv1.Endpoint{ep("10.1.0.1", on("n1")), ep("10.1.0.2", on("n2"))}, n1,
			"cluster=10.1.0.1:8080 10.1.0.2:8080() external=-()"},
		{"ITP Local and ETP Local: pods and the node short-circuit to all endpoints", service(nodePort, withITPLocal(), withETPLocal(0)),
			[]discoveryv1.Endpoint{ep("10.1.0.1", on("n1")), ep("10.1.0.2", on("n2"))}, n1,
			"cluster=10.1.0.1:8080/l() external=10.1.0.1:8080/l() short=10.1.0.1:8080/l 10.1.0.2:8080"},

		// Short-circuit endpoints: upstream's Cluster-policy endpoints for
		// pod and node traffic to external destinations of an ETP Local
		// Service, set only when they differ from the cluster endpoints.
		{"ITP+ETP Local NodePort, no local endpoint: short-circuit to all", service(nodePort, withITPLocal(), withETPLocal(0)),
			[]discoveryv1.Endpoint{ep("10.1.0.2", on("n2")), ep("10.1.0.3", on("n3"))}, n1,
			"cluster=-(DROP) external=-(DROP) short=10.1.0.2:8080 10.1.0.3:8080"},
		{"ITP+ETP Local externalIP, no local endpoint: short-circuit to all", service(withExternalIPs("192.0.2.10"), withITPLocal(), withETPLocal(0)),
			[]discoveryv1.Endpoint{ep("10.1.0.2", on("n2"))}, n1,
			"cluster=-(DROP) external=-(DROP) short=10.1.0.2:8080"},
		{"ITP+ETP Local LoadBalancer, no local endpoint: short-circuit to all", service(withLB("198.51.100.1"), nodePort, withITPLocal(), withETPLocal(32000)),
			[]discoveryv1.Endpoint{ep("10.1.0.2", on("n2"))}, n1,
			"cluster=-(DROP) external=-(DROP) short=10.1.0.2:8080"},
		{"ITP+ETP Local: every endpoint local, short-circuit unset (same as cluster)", service(nodePort, withITPLocal(), withETPLocal(0)),
			[]discoveryv1.Endpoint{ep("10.1.0.1", on("n1")), ep("10.1.0.2", on("n1"))}, n1,
			"cluster=10.1.0.1:8080/l 10.1.0.2:8080/l() external=10.1.0.1:8080/l 10.1.0.2:8080/l()"},
		{"ITP+ETP Local: short-circuit follows zone hints", service(nodePort, withITPLocal(), withETPLocal(0)),
			[]discoveryv1.Endpoint{ep("10.1.0.2", on("n2"), zones("z1")), ep("10.1.0.3", on("n3"), zones("z2"))}, n1,
			"cluster=-(DROP) external=-(DROP) short=10.1.0.2:8080"},
		{"ITP+ETP Local: short-circuit takes the terminating fallback", service(nodePort, withITPLocal(), withETPLocal(0)),
			[]discoveryv1.Endpoint{ep("10.1.0.2", on("n2"), terminating), ep("10.1.0.3", on("n3"), notReady)}, n1,
			"cluster=-(DROP) external=-(DROP) short=10.1.0.2:8080/t"},
		{"ITP+ETP Local: local fallback, remote ready", service(nodePort, withITPLocal(), withETPLocal(0)),
			[]discoveryv1.Endpoint{ep("10.1.0.1", on("n1"), terminating), ep("10.1.0.2", on("n2"))}, n1,
			"cluster=10.1.0.1:8080/l/t() external=10.1.0.1:8080/l/t() short=10.1.0.2:8080"},
		{"ITP+ETP Local, nothing usable: REJECT, no short-circuit", service(nodePort, withITPLocal(), withETPLocal(0)),
			[]discoveryv1.Endpoint{ep("10.1.0.2", on("n2"), notReady)}, n1,
			"cluster=-(REJECT) external=-(REJECT)"},
		{"ITP+ETP Local ClusterIP Service is not externally accessible: no short-circuit", service(withITPLocal(), withETPLocal(0)),
			[]discoveryv1.Endpoint{ep("10.1.0.2", on("n2"))}, n1,
			"cluster=-(DROP) external=-()"},
		{"ITP Local, ETP Cluster: no short-circuit", service(nodePort, withITPLocal()),
			[]discoveryv1.Endpoint{ep("10.1.0.2", on("n2"))}, n1,
			"cluster=-(DROP) external=10.1.0.2:8080()"},
		{"ETP Local, ITP Cluster, no local endpoint: no short-circuit", service(nodePort, withETPLocal(0)),
			[]discoveryv1.Endpoint{ep("10.1.0.2", on("n2"))}, n1,
			"cluster=10.1.0.2:8080() external=-(DROP)"},

		// Zone hints (PreferSameZone / PreferClose).
		{"zone hints: same-zone endpoints only", service(),
			[]discoveryv1.Endpoint{ep("10.1.0.1", zones("z1")), ep("10.1.0.2", zones("z2"))}, n1,
			"cluster=10.1.0.1:8080() external=-()"},
		{"zone hints apply to external traffic under Cluster policy", service(nodePort),
			[]discoveryv1.Endpoint{ep("10.1.0.1", zones("z1")), ep("10.1.0.2", zones("z2"))}, n1,
			"cluster=10.1.0.1:8080() external=10.1.0.1:8080()"},
		{"zone hints ignored when a ready endpoint lacks them", service(),
			[]discoveryv1.Endpoint{ep("10.1.0.1", zones("z1")), ep("10.1.0.2")}, n1,
			"cluster=10.1.0.1:8080 10.1.0.2:8080() external=-()"},
		{"zone hints: unready endpoints without hints do not count", service(),
			[]discoveryv1.Endpoint{ep("10.1.0.1", zones("z1")), ep("10.1.0.2", zones("z2")), ep("10.1.0.3", notReady)}, n1,
			"cluster=10.1.0.1:8080() external=-()"},
		{"zone hints: no hint for the node's zone means all endpoints", service(),
			[]discoveryv1.Endpoint{ep("10.1.0.1", zones("z2")), ep("10.1.0.2", zones("z3"))}, n1,
			"cluster=10.1.0.1:8080 10.1.0.2:8080() external=-()"},
		{"zone hints: node without a zone gets all endpoints", service(),
			[]discoveryv1.Endpoint{ep("10.1.0.1", zones("z1")), ep("10.1.0.2", zones("z2"))}, Node{Name: "n1"},
			"cluster=10.1.0.1:8080 10.1.0.2:8080() external=-()"},
		{"zone hints: endpoint hinted for several zones", service(),
			[]discoveryv1.Endpoint{ep("10.1.0.1", zones("z2", "z1")), ep("10.1.0.2", zones("z2"))}, n1,
			"cluster=10.1.0.1:8080() external=-()"},
		{"zone hints: only ready endpoints are considered", service(),
			[]discoveryv1.Endpoint{ep("10.1.0.1", zones("z2")), ep("10.1.0.2", zones("z1"), terminating)}, n1,
			"cluster=10.1.0.1:8080() external=-()"},
		{"hints ignored by the terminating fallback", service(),
			[]discoveryv1.Endpoint{ep("10.1.0.1", zones("z2"), terminating), ep("10.1.0.2", zones("z1"), terminating)}, n1,
			"cluster=10.1.0.1:8080/t 10.1.0.2:8080/t() external=-()"},

		// Node hints (PreferSameNode).
		{"node hints: endpoints hinted for this node only", service(),
			[]discoveryv1.Endpoint{ep("10.1.0.1", nodeHints("n1"), zones("z1")), ep("10.1.0.2", nodeHints("n2"), zones("z1"))}, n1,
			"cluster=10.1.0.1:8080() external=-()"},
		{"node hints not naming this node fall back to zone hints", service(),
			[]discoveryv1.Endpoint{ep("10.1.0.1", nodeHints("n3"), zones("z2")), ep("10.1.0.2", nodeHints("n2"), zones("z1"))}, n1,
			"cluster=10.1.0.2:8080() external=-()"},
		{"node hints missing on one endpoint fall back to zone hints", service(),
			[]discoveryv1.Endpoint{ep("10.1.0.1", nodeHints("n1"), zones("z2")), ep("10.1.0.2", zones("z1"))}, n1,
			"cluster=10.1.0.2:8080() external=-()"},
		{"node hints without zone hints, not naming this node: all", service(),
			[]discoveryv1.Endpoint{ep("10.1.0.1", nodeHints("n2")), ep("10.1.0.2", nodeHints("n3"))}, n1,
			"cluster=10.1.0.1:8080 10.1.0.2:8080() external=-()"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var slices []*discoveryv1.EndpointSlice
			if tt.eps != nil {
				slices = append(slices, slice("a", tt.eps...))
			}
			s, probs := build(t, tt.svc, slices...)
			wantProblems(t, probs)
			sp := only(t, s, tt.node)
			if got := describe(sp); got != tt.want {
				t.Errorf("got  %s\nwant %s", got, tt.want)
			}
			checkSharing(t, s, probeNodes)
		})
	}
}

// TestPolicyFlags checks the flags a data plane renders from.
func TestPolicyFlags(t *testing.T) {
	eps := slice("a", ep("10.1.0.1", on("n1")))
	tests := []struct {
		name                    string
		svc                     *corev1.Service
		wantETPLocal, wantMasq  bool
		wantITPLocal            bool
		wantHealthCheck, wantLR int32
	}{
		{"Cluster NodePort", service(withNodePort(30080)), false, true, false, 0, 0},
		{"ETP Local NodePort", service(withNodePort(30080), withETPLocal(0)), true, false, false, 0, 0},
		{"ETP Local LoadBalancer", service(withLB("198.51.100.1"), withNodePort(30080), withETPLocal(32000)), true, false, false, 32000, 1},
		{"ITP Local ClusterIP", service(withITPLocal()), false, false, true, 0, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, _ := build(t, tt.svc, eps)
			sp := only(t, s, Node{Name: "n1"})
			if sp.GetExternalPolicyLocal() != tt.wantETPLocal || sp.GetMasqueradeExternal() != tt.wantMasq ||
				sp.GetInternalPolicyLocal() != tt.wantITPLocal || sp.GetHealthCheckNodePort() != tt.wantHealthCheck ||
				sp.GetLocalReadyEndpoints() != tt.wantLR {
				t.Errorf("got etpLocal=%v masq=%v itpLocal=%v hc=%d localReady=%d", sp.GetExternalPolicyLocal(), sp.GetMasqueradeExternal(),
					sp.GetInternalPolicyLocal(), sp.GetHealthCheckNodePort(), sp.GetLocalReadyEndpoints())
			}
		})
	}
}

// TestLocalReadyEndpoints counts what upstream's health check server
// reports: distinct ready IPs on the node, over every port of the Service
// in the family, including slice ports the Service does not list.
func TestLocalReadyEndpoints(t *testing.T) {
	svc := service(withLB("198.51.100.1"), withNodePort(30080), withETPLocal(32000), dualStack(),
		withPorts(portSpec("http", 80, corev1.ProtocolTCP), portSpec("https", 443, corev1.ProtocolTCP)))
	svc.Spec.Ports[0].NodePort = 30080
	svc.Spec.Ports[1].NodePort = 30443
	both := slicePorts(slicePortOf("http", 8080, corev1.ProtocolTCP), slicePortOf("https", 8443, corev1.ProtocolTCP))
	s, probs := build(t, svc,
		with(slice("a", ep("10.1.0.1", on("n1")), ep("10.1.0.2", on("n1")), ep("10.1.0.3", on("n1"), terminating), ep("10.1.0.4", on("n2"))), both),
		with(slice("b", ep("10.1.0.5", on("n1"))), slicePorts(slicePortOf("metrics", 9100, corev1.ProtocolTCP))),
		slice("c", ep("fd00::1", on("n1"))),
	)
	wantProblems(t, probs)
	tests := []struct {
		node       string
		want4      int32
		want6      int32
		wantLocal4 string
	}{
		{"n1", 3, 1, "10.1.0.1:8080/l 10.1.0.2:8080/l"},
		{"n2", 1, 0, "10.1.0.4:8080/l"},
		{"n3", 0, 0, "-"},
	}
	for _, tt := range tests {
		got := ports(s, Node{Name: tt.node})
		for name, want := range map[string]int32{
			"svc/v4/default/web/http": tt.want4, "svc/v4/default/web/https": tt.want4,
			"svc/v6/default/web/http": tt.want6, "svc/v6/default/web/https": tt.want6,
		} {
			if c := got[name].GetLocalReadyEndpoints(); c != want {
				t.Errorf("%s %s: local ready endpoints %d, want %d", tt.node, name, c, want)
			}
		}
		if e := epList(got["svc/v4/default/web/http"].GetExternalEndpoints()); e != tt.wantLocal4 {
			t.Errorf("%s: external endpoints %s, want %s", tt.node, e, tt.wantLocal4)
		}
	}
}
