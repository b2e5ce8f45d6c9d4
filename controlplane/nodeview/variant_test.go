package nodeview

import (
	"bytes"
	"slices"
	"strconv"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	signalboxv1 "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// probeNodes cover nodes with and without endpoints, hinted and unhinted
// zones, and the degenerate unnamed/unzoned node.
var probeNodes = []Node{
	{"n1", "z1"}, {"n2", "z1"}, {"n3", "z2"}, {"n4", "z1"}, {"n5", "z3"}, {"n6", ""}, {"", "z1"}, {"", ""},
}

// checkSharing asserts the cache's contract: nodes with equal VariantKey
// get byte-identical resources.
func checkSharing(t *testing.T, s *Service, nodes []Node) {
	t.Helper()
	byKey := map[string][]byte{}
	owner := map[string]Node{}
	for _, n := range nodes {
		k := s.VariantKey(n)
		var buf []byte
		for _, r := range s.Resources(n) {
			buf = append(buf, signalboxv1.EncodeResource(r)...)
		}
		if prev, ok := byKey[k]; ok && !bytes.Equal(prev, buf) {
			t.Errorf("nodes %v and %v share variant key %q but get different resources", owner[k], n, k)
		}
		byKey[k], owner[k] = buf, n
	}
}

func TestVariantKey(t *testing.T) {
	twoNodes := slice("a", ep("10.1.0.1", on("n1")), ep("10.1.0.2", on("n2")))
	tests := []struct {
		name   string
		svc    *corev1.Service
		slices []*discoveryv1.EndpointSlice
		want   map[string]string // node name -> key, for probeNodes with a name
	}{
		{"Cluster policy, no hints: one variant for all", service(withNodePort(30080)), []*discoveryv1.EndpointSlice{twoNodes},
			map[string]string{"n1": "", "n2": "", "n3": "", "n4": "", "n5": "", "n6": ""}},
		{"ETP Local: nodes with endpoints get their own variant", service(withNodePort(30080), withETPLocal(0)), []*discoveryv1.EndpointSlice{twoNodes},
			map[string]string{"n1": "node/n1", "n2": "node/n2", "n3": "", "n4": "", "n5": "", "n6": ""}},
		{"ITP Local: same", service(withITPLocal()), []*discoveryv1.EndpointSlice{twoNodes},
			map[string]string{"n1": "node/n1", "n2": "node/n2", "n3": ""}},
		{"ETP Local: a node with only unusable endpoints shares the default", service(withNodePort(30080), withETPLocal(0)),
			[]*discoveryv1.EndpointSlice{slice("a", ep("10.1.0.1", on("n1")), ep("10.1.0.2", on("n2"), gone))},
			map[string]string{"n1": "node/n1", "n2": "", "n3": ""}},
		{"ETP Local LoadBalancer: health check count varies by node", service(withLB("198.51.100.1"), withNodePort(30080), withETPLocal(32000)),
			[]*discoveryv1.EndpointSlice{with(slice("a", ep("10.1.0.1", on("n1"))), slicePorts(slicePortOf("metrics", 9100, corev1.ProtocolTCP)))},
			map[string]string{"n1": "node/n1", "n2": ""}},
		{"zone hints: one variant per hinted zone", service(),
			[]*discoveryv1.EndpointSlice{slice("a", ep("10.1.0.1", on("n1"), zones("z1")), ep("10.1.0.2", on("n3"), zones("z2")))},
			map[string]string{"n1": "zone/z1", "n2": "zone/z1", "n3": "zone/z2", "n4": "zone/z1", "n5": "", "n6": ""}},
		{"incomplete zone hints: one variant for all", service(),
			[]*discoveryv1.EndpointSlice{slice("a", ep("10.1.0.1", zones("z1")), ep("10.1.0.2"))},
			map[string]string{"n1": "", "n3": "", "n5": ""}},
		{"node hints: hinted nodes get their own variant, others by zone", service(),
			[]*discoveryv1.EndpointSlice{slice("a", ep("10.1.0.1", nodeHints("n1"), zones("z1")), ep("10.1.0.2", nodeHints("n3"), zones("z2")))},
			map[string]string{"n1": "node/n1", "n2": "zone/z1", "n3": "node/n3", "n4": "zone/z1", "n5": ""}},
		{"ITP+ETP Local NodePort: short-circuit endpoints follow zone hints", service(withNodePort(30080), withITPLocal(), withETPLocal(0)),
			[]*discoveryv1.EndpointSlice{slice("a", ep("10.1.0.1", on("n1"), zones("z1")), ep("10.1.0.2", on("n3"), zones("z2")))},
			map[string]string{"n1": "node/n1", "n2": "zone/z1", "n3": "node/n3", "n4": "zone/z1", "n5": "", "n6": ""}},
		{"ITP Local without external access ignores hints", service(withITPLocal()),
			[]*discoveryv1.EndpointSlice{slice("a", ep("10.1.0.1", on("n1"), zones("z1")), ep("10.1.0.2", on("n3"), zones("z2")))},
			map[string]string{"n1": "node/n1", "n2": "", "n3": "node/n3", "n4": ""}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, probs := build(t, tt.svc, tt.slices...)
			wantProblems(t, probs)
			for _, n := range probeNodes {
				want, ok := tt.want[n.Name]
				if !ok {
					continue
				}
				if got := s.VariantKey(n); got != want {
					t.Errorf("VariantKey(%v) = %q, want %q", n, got, want)
				}
			}
			checkSharing(t, s, probeNodes)
		})
	}
}

// TestVariantResourcesDiffer makes sure distinct keys are not handed out
// for nothing in the ETP Local case, and that sharing nodes really match.
func TestVariantResourcesDiffer(t *testing.T) {
	s, _ := build(t, service(withNodePort(30080), withETPLocal(0)), slice("a", ep("10.1.0.1", on("n1")), ep("10.1.0.2", on("n2"))))
	n1, n3, n4 := s.Resources(Node{Name: "n1"}), s.Resources(Node{Name: "n3"}), s.Resources(Node{Name: "n4", Zone: "z9"})
	if n1[0].GetHash() == n3[0].GetHash() {
		t.Error("node with local endpoints got the same resource as one without")
	}
	if n3[0].GetHash() != n4[0].GetHash() || !bytes.Equal(signalboxv1.EncodeResource(n3[0]), signalboxv1.EncodeResource(n4[0])) {
		t.Error("nodes without local endpoints differ")
	}
}

func TestDeterminism(t *testing.T) {
	svc := func() *corev1.Service {
		return service(dualStack(), withLB("198.51.100.2", "198.51.100.1"), withExternalIPs("203.0.113.2", "203.0.113.1"),
			withSourceRanges("10.0.0.0/8", "192.0.2.0/24"),
			withPorts(portSpec("b", 81, corev1.ProtocolTCP), portSpec("a", 80, corev1.ProtocolTCP)))
	}
	bothPorts := slicePorts(slicePortOf("a", 8080, corev1.ProtocolTCP), slicePortOf("b", 8081, corev1.ProtocolTCP))
	mk := func(reverse bool) []*discoveryv1.EndpointSlice {
		eps := []discoveryv1.Endpoint{ep("10.1.0.3"), ep("10.1.0.1"), ep("10.1.0.2")}
		out := []*discoveryv1.EndpointSlice{
			with(slice("x", eps...), bothPorts),
			with(slice("y", ep("fd00::2"), ep("fd00::1")), bothPorts),
			with(slice("z", ep("10.1.0.1", terminating)), bothPorts), // duplicate
		}
		if reverse {
			slices.Reverse(out)
			slices.Reverse(out[2].Endpoints)
		}
		return out
	}
	s1, p1 := build(t, svc(), mk(false)...)
	s2, p2 := build(t, svc(), mk(true)...)
	if !slices.Equal(problemStrings(p1), problemStrings(p2)) {
		t.Errorf("problems depend on input order: %q vs %q", problemStrings(p1), problemStrings(p2))
	}
	r1, r2 := s1.Resources(Node{Name: "n1"}), s2.Resources(Node{Name: "n1"})
	var names []string
	for i := range r1 {
		names = append(names, r1[i].GetName())
		if r1[i].GetName() != r2[i].GetName() || r1[i].GetHash() != r2[i].GetHash() {
			t.Errorf("resource %d differs: %s/%s vs %s/%s", i, r1[i].GetName(), r1[i].GetHash(), r2[i].GetName(), r2[i].GetHash())
		}
	}
	want := []string{"svc/v4/default/web/a", "svc/v4/default/web/b", "svc/v6/default/web/a", "svc/v6/default/web/b"}
	if !slices.Equal(names, want) {
		t.Errorf("names %q, want %q", names, want)
	}
	if again := s1.Resources(Node{Name: "n1"}); again[0].GetHash() != r1[0].GetHash() {
		t.Error("Resources is not repeatable")
	}
	if got := epList(r1[0].GetServicePort().GetClusterEndpoints()); got != "10.1.0.1:8080 10.1.0.2:8080 10.1.0.3:8080" {
		t.Errorf("endpoints %s", got)
	}
}

func TestResourcesDoNotAlias(t *testing.T) {
	s, _ := build(t, service(withExternalIPs("203.0.113.1"), withLB("198.51.100.1"), withSourceRanges("10.0.0.0/8")), slice("a", ep("10.1.0.1")))
	first := only(t, s, Node{Name: "n1"})
	hash := s.Resources(Node{Name: "n1"})[0].GetHash()
	first.ExternalIps[0] = "changed"
	first.LoadBalancerSourceRanges[0] = "changed"
	first.LoadBalancerIngress[0].Ip = "changed"
	first.ClusterEndpoints[0].Ip = "changed"
	if again := s.Resources(Node{Name: "n1"})[0].GetHash(); again != hash {
		t.Error("changing a returned resource changed later ones")
	}
}

// BenchmarkBuild and BenchmarkResources size the per-Service and
// per-variant costs at the design's scale (10 endpoints per Service).
func benchService() (*corev1.Service, []*discoveryv1.EndpointSlice) {
	var eps []discoveryv1.Endpoint
	for i := range 10 {
		eps = append(eps, ep("10.1.0."+strconv.Itoa(i+1), on("n"+strconv.Itoa(i+1)), zones("z1")))
	}
	return service(withNodePort(30080)), []*discoveryv1.EndpointSlice{slice("a", eps...)}
}

func BenchmarkBuild(b *testing.B) {
	svc, sl := benchService()
	for b.Loop() {
		Build(svc, sl, Options{})
	}
}

func BenchmarkResources(b *testing.B) {
	svc, sl := benchService()
	s, probs := Build(svc, sl, Options{})
	if len(probs) != 0 {
		b.Fatal(problemStrings(probs))
	}
	n := Node{Name: "n1", Zone: "z1"}
	for b.Loop() {
		s.Resources(n)
	}
}
