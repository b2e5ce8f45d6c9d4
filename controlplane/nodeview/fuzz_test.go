package nodeview

import (
	"cmp"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	signalboxv1 "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// exercise renders s for a few nodes and checks the invariants every
// output must keep, whatever the input.
func exercise(t *testing.T, s *Service) {
	t.Helper()
	if s == nil {
		return
	}
	_ = s.Key()
	for _, n := range probeNodes {
		rs := s.Resources(n)
		if !slices.IsSortedFunc(rs, func(a, b *signalboxv1.Resource) int { return cmp.Compare(a.GetName(), b.GetName()) }) {
			t.Fatalf("resources not sorted for %v", n)
		}
		for i, r := range rs {
			if i > 0 && rs[i-1].GetName() == r.GetName() {
				t.Fatalf("duplicate resource name %q", r.GetName())
			}
			sp := r.GetServicePort()
			if r.GetHash() == "" || sp == nil || sp.GetFamily() == signalboxv1.IPFamily_IP_FAMILY_UNSPECIFIED ||
				sp.GetProtocol() == signalboxv1.Protocol_PROTOCOL_UNSPECIFIED {
				t.Fatalf("incomplete resource %v", r)
			}
			if (len(sp.GetClusterEndpoints()) == 0) == (sp.GetClusterNoEndpoints() == signalboxv1.NoEndpointsAction_NO_ENDPOINTS_ACTION_UNSPECIFIED) {
				t.Fatalf("cluster action %v with %d endpoints", sp.GetClusterNoEndpoints(), len(sp.GetClusterEndpoints()))
			}
			if len(sp.GetExternalEndpoints()) > 0 && sp.GetExternalNoEndpoints() != signalboxv1.NoEndpointsAction_NO_ENDPOINTS_ACTION_UNSPECIFIED {
				t.Fatalf("external action %v with endpoints", sp.GetExternalNoEndpoints())
			}
		}
	}
	checkSharing(t, s, probeNodes)
}

// TestBuildGarbage: objects with nil and empty fields everywhere must not
// panic, whatever they produce.
func TestBuildGarbage(t *testing.T) {
	garbageSlices := []*discoveryv1.EndpointSlice{
		nil,
		{},
		{ObjectMeta: metav1.ObjectMeta{Namespace: testNS, Labels: map[string]string{discoveryv1.LabelServiceName: testSvc}}, AddressType: discoveryv1.AddressTypeIPv4},
		{
			ObjectMeta:  metav1.ObjectMeta{Namespace: testNS, Name: "g", Labels: map[string]string{discoveryv1.LabelServiceName: testSvc}},
			AddressType: discoveryv1.AddressTypeIPv4,
			Ports: []discoveryv1.EndpointPort{
				{}, {Name: ptr.To("http")}, {Port: ptr.To[int32](-1)}, {Name: ptr.To("http"), Port: ptr.To[int32](-5)},
				{Name: ptr.To("http"), Port: ptr.To[int32](8080), Protocol: ptr.To(corev1.Protocol(""))},
				slicePortOf("http", 8080, corev1.ProtocolTCP),
			},
			Endpoints: []discoveryv1.Endpoint{
				{}, {Addresses: []string{""}}, {Addresses: []string{"10.1.0.1", "garbage"}, NodeName: ptr.To(""), Hints: &discoveryv1.EndpointHints{}},
				{Addresses: []string{"10.1.0.2"}, Hints: &discoveryv1.EndpointHints{ForZones: []discoveryv1.ForZone{{}}, ForNodes: []discoveryv1.ForNode{{}}}},
				{Addresses: []string{"::ffff:10.1.0.3"}}, {Addresses: []string{"fe80::1%eth0"}},
			},
		},
	}
	svcs := []*corev1.Service{
		{},
		{Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.1"}},
		{Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.1", IPFamilies: []corev1.IPFamily{"IPv5", corev1.IPv6Protocol}}},
		{Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.1", ClusterIPs: []string{"10.96.0.1", "fd00::1", "x"}, IPFamilies: []corev1.IPFamily{corev1.IPv4Protocol}}},
		{Spec: corev1.ServiceSpec{ClusterIP: "garbage", Ports: []corev1.ServicePort{{}}}},
		{Spec: corev1.ServiceSpec{ClusterIP: "::ffff:10.96.0.1", Ports: []corev1.ServicePort{{Port: 80}}}},
		service(func(s *corev1.Service) {
			s.Spec.Ports = append(s.Spec.Ports, corev1.ServicePort{}, corev1.ServicePort{Name: "x", Port: 1, NodePort: 1})
			s.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
			s.Spec.SessionAffinityConfig = &corev1.SessionAffinityConfig{}
			s.Spec.ExternalIPs = []string{"", " ", "x", "::"}
			s.Spec.LoadBalancerSourceRanges = []string{"", "x/", "::ffff:10.0.0.0/104", "10.0.0.0/8"}
			s.Spec.Type = corev1.ServiceTypeLoadBalancer
			s.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
			s.Spec.InternalTrafficPolicy = ptr.To(corev1.ServiceInternalTrafficPolicy(""))
			s.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{{}, {IP: "x"}, {IP: "10.0.0.1", IPMode: ptr.To(corev1.LoadBalancerIPMode(""))}}
		}),
		service(dualStack(), withITPLocal(), withNodePort(30000), withETPLocal(0)),
	}
	for i, svc := range svcs {
		for _, sl := range [][]*discoveryv1.EndpointSlice{nil, {}, garbageSlices} {
			s, _ := Build(svc, sl, Options{})
			exercise(t, s)
			if i == 0 && s != nil {
				t.Error("empty Service must not be proxied")
			}
		}
	}
}

// FuzzBuild feeds Build one Service and one slice built from fuzzed
// fields. Run with `go test -fuzz FuzzBuild ./controlplane/nodeview/`.
func FuzzBuild(f *testing.F) {
	f.Add("10.96.0.1", "IPv4", "http", int32(80), int32(30080), "TCP", "NodePort", true, false,
		"IPv4", "10.1.0.1", int32(8080), uint8(0), "n1", "z1", "n1", "203.0.113.1", "198.51.100.1", "10.0.0.0/8")
	f.Add("fd00::1", "IPv6", "", int32(53), int32(0), "UDP", "LoadBalancer", false, true,
		"IPv6", "fd00::2", int32(5353), uint8(0b110), "n2", "", "n1", "2001:db8::1", "2001:db8::2", "::/0")
	f.Add("None", "", "x", int32(-1), int32(70000), "", "", false, false, "FQDN", "", int32(0), uint8(0xff), "", "", "", "", "", "")
	f.Fuzz(func(t *testing.T, clusterIP, family, portName string, port, nodePort int32, proto, svcType string, etpLocal, itpLocal bool,
		addrType, addr string, epPort int32, conds uint8, epNode, zoneHint, nodeHint, extIP, lbIP, srcRange string) {
		svc := service(func(s *corev1.Service) {
			s.Spec.ClusterIP = clusterIP
			s.Spec.ClusterIPs = strings.Split(clusterIP, ",")
			s.Spec.IPFamilies = nil
			for _, fam := range strings.Split(family, ",") {
				s.Spec.IPFamilies = append(s.Spec.IPFamilies, corev1.IPFamily(fam))
			}
			s.Spec.Type = corev1.ServiceType(svcType)
			s.Spec.Ports = []corev1.ServicePort{{Name: portName, Port: port, NodePort: nodePort, Protocol: corev1.Protocol(proto)}}
			s.Spec.ExternalIPs = []string{extIP}
			s.Spec.LoadBalancerSourceRanges = []string{srcRange}
			s.Spec.HealthCheckNodePort = nodePort
			s.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{{IP: lbIP}}
			if conds&0x80 != 0 {
				s.Status.LoadBalancer.Ingress[0].IPMode = ptr.To(corev1.LoadBalancerIPModeProxy)
			}
		})
		if etpLocal {
			withETPLocal(nodePort)(svc)
		}
		if itpLocal {
			withITPLocal()(svc)
		}
		e := discoveryv1.Endpoint{Addresses: strings.Split(addr, ","), NodeName: &epNode}
		// Each pair of bits is nil, false or true for one condition.
		cond := func(shift uint) *bool {
			switch (conds >> shift) & 3 {
			case 1:
				return ptr.To(false)
			case 2, 3:
				return ptr.To(true)
			}
			return nil
		}
		e.Conditions = discoveryv1.EndpointConditions{Ready: cond(0), Serving: cond(2), Terminating: cond(4)}
		if zoneHint != "" || nodeHint != "" {
			e.Hints = &discoveryv1.EndpointHints{ForZones: []discoveryv1.ForZone{{Name: zoneHint}}, ForNodes: []discoveryv1.ForNode{{Name: nodeHint}}}
		}
		sl := slice("a", e, e)
		sl.AddressType = discoveryv1.AddressType(addrType)
		sl.Ports = []discoveryv1.EndpointPort{{Name: &portName, Port: &epPort, Protocol: ptr.To(corev1.Protocol(proto))}}
		s, _ := Build(svc, []*discoveryv1.EndpointSlice{sl, sl, nil}, Options{})
		exercise(t, s)
	})
}
