package nodeview

import (
	"fmt"
	"net"
	"strconv"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	signalboxv1 "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// Every test Service is default/web; slices belong to it unless a test
// says otherwise.
const (
	testNS  = "default"
	testSvc = "web"
)

type svcOpt func(*corev1.Service)

// service builds a ClusterIP IPv4 Service with one TCP port "http" 80 ->
// 8080, then applies opts.
func service(opts ...svcOpt) *corev1.Service {
	s := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: testNS, Name: testSvc},
		Spec: corev1.ServiceSpec{
			Type:       corev1.ServiceTypeClusterIP,
			ClusterIP:  "10.96.0.10",
			ClusterIPs: []string{"10.96.0.10"},
			IPFamilies: []corev1.IPFamily{corev1.IPv4Protocol},
			Ports:      []corev1.ServicePort{portSpec("http", 80, corev1.ProtocolTCP)},
		},
	}
	for _, o := range opts {
		o(s)
	}
	return s
}

func portSpec(name string, port int32, proto corev1.Protocol) corev1.ServicePort {
	return corev1.ServicePort{Name: name, Port: port, Protocol: proto, TargetPort: intstr.FromString(name)}
}

func withPorts(ps ...corev1.ServicePort) svcOpt {
	return func(s *corev1.Service) { s.Spec.Ports = ps }
}

// withClusterIPs sets clusterIP(s) and ipFamilies from the addresses.
func withClusterIPs(ips ...string) svcOpt {
	return func(s *corev1.Service) {
		s.Spec.ClusterIP = ips[0]
		s.Spec.ClusterIPs = ips
		s.Spec.IPFamilies = nil
		for _, ip := range ips {
			fam := corev1.IPv4Protocol
			if strings.Contains(ip, ":") {
				fam = corev1.IPv6Protocol
			}
			s.Spec.IPFamilies = append(s.Spec.IPFamilies, fam)
		}
	}
}

func dualStack() svcOpt { return withClusterIPs("10.96.0.10", "fd00:96::10") }

func withType(t corev1.ServiceType) svcOpt {
	return func(s *corev1.Service) { s.Spec.Type = t }
}

// withNodePort makes a NodePort Service with the first port's nodePort.
func withNodePort(np int32) svcOpt {
	return func(s *corev1.Service) {
		if s.Spec.Type != corev1.ServiceTypeLoadBalancer {
			s.Spec.Type = corev1.ServiceTypeNodePort
		}
		s.Spec.Ports[0].NodePort = np
	}
}

// withLB makes a LoadBalancer Service whose status lists these VIP-mode
// ingress IPs (nodePort as allocated by default).
func withLB(ips ...string) svcOpt {
	return func(s *corev1.Service) {
		s.Spec.Type = corev1.ServiceTypeLoadBalancer
		for _, ip := range ips {
			s.Status.LoadBalancer.Ingress = append(s.Status.LoadBalancer.Ingress, corev1.LoadBalancerIngress{IP: ip})
		}
	}
}

func withIngress(ing ...corev1.LoadBalancerIngress) svcOpt {
	return func(s *corev1.Service) {
		s.Spec.Type = corev1.ServiceTypeLoadBalancer
		s.Status.LoadBalancer.Ingress = append(s.Status.LoadBalancer.Ingress, ing...)
	}
}

func withExternalIPs(ips ...string) svcOpt {
	return func(s *corev1.Service) { s.Spec.ExternalIPs = ips }
}

func withSourceRanges(r ...string) svcOpt {
	return func(s *corev1.Service) { s.Spec.LoadBalancerSourceRanges = r }
}

func withETPLocal(healthCheckNodePort int32) svcOpt {
	return func(s *corev1.Service) {
		s.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
		s.Spec.HealthCheckNodePort = healthCheckNodePort
	}
}

func withITPLocal() svcOpt {
	return func(s *corev1.Service) {
		s.Spec.InternalTrafficPolicy = ptr.To(corev1.ServiceInternalTrafficPolicyLocal)
	}
}

func withLabel(k, v string) svcOpt {
	return func(s *corev1.Service) {
		if s.Labels == nil {
			s.Labels = map[string]string{}
		}
		s.Labels[k] = v
	}
}

type sliceOpt func(*discoveryv1.EndpointSlice)

// slice builds an EndpointSlice of default/web with port "http" 8080/TCP;
// the address type follows the first endpoint (IPv4 when none).
func slice(name string, eps ...discoveryv1.Endpoint) *discoveryv1.EndpointSlice {
	at := discoveryv1.AddressTypeIPv4
	if len(eps) > 0 && len(eps[0].Addresses) > 0 && strings.Contains(eps[0].Addresses[0], ":") {
		at = discoveryv1.AddressTypeIPv6
	}
	return &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: testNS,
			Name:      name,
			Labels:    map[string]string{discoveryv1.LabelServiceName: testSvc},
		},
		AddressType: at,
		Ports:       []discoveryv1.EndpointPort{slicePortOf("http", 8080, corev1.ProtocolTCP)},
		Endpoints:   eps,
	}
}

func with(s *discoveryv1.EndpointSlice, opts ...sliceOpt) *discoveryv1.EndpointSlice {
	for _, o := range opts {
		o(s)
	}
	return s
}

func slicePortOf(name string, port int32, proto corev1.Protocol) discoveryv1.EndpointPort {
	return discoveryv1.EndpointPort{Name: ptr.To(name), Port: ptr.To(port), Protocol: ptr.To(proto)}
}

func slicePorts(ps ...discoveryv1.EndpointPort) sliceOpt {
	return func(s *discoveryv1.EndpointSlice) { s.Ports = ps }
}

func addressType(at discoveryv1.AddressType) sliceOpt {
	return func(s *discoveryv1.EndpointSlice) { s.AddressType = at }
}

func sliceLabel(k, v string) sliceOpt {
	return func(s *discoveryv1.EndpointSlice) { s.Labels[k] = v }
}

type epOpt func(*discoveryv1.Endpoint)

// ep builds a ready endpoint (all conditions nil, as upstream reads them).
func ep(ip string, opts ...epOpt) discoveryv1.Endpoint {
	e := discoveryv1.Endpoint{Addresses: []string{ip}}
	for _, o := range opts {
		o(&e)
	}
	return e
}

func on(node string) epOpt {
	return func(e *discoveryv1.Endpoint) { e.NodeName = ptr.To(node) }
}

// notReady: not ready, not serving, not terminating.
func notReady(e *discoveryv1.Endpoint) {
	e.Conditions.Ready = ptr.To(false)
	e.Conditions.Serving = ptr.To(false)
}

// terminating: still serving while terminating (fallback candidate).
func terminating(e *discoveryv1.Endpoint) {
	e.Conditions.Ready = ptr.To(false)
	e.Conditions.Serving = ptr.To(true)
	e.Conditions.Terminating = ptr.To(true)
}

// gone: terminating and no longer serving.
func gone(e *discoveryv1.Endpoint) {
	e.Conditions.Ready = ptr.To(false)
	e.Conditions.Serving = ptr.To(false)
	e.Conditions.Terminating = ptr.To(true)
}

func zones(zs ...string) epOpt {
	return func(e *discoveryv1.Endpoint) {
		if e.Hints == nil {
			e.Hints = &discoveryv1.EndpointHints{}
		}
		for _, z := range zs {
			e.Hints.ForZones = append(e.Hints.ForZones, discoveryv1.ForZone{Name: z})
		}
	}
}

func nodeHints(ns ...string) epOpt {
	return func(e *discoveryv1.Endpoint) {
		if e.Hints == nil {
			e.Hints = &discoveryv1.EndpointHints{}
		}
		for _, n := range ns {
			e.Hints.ForNodes = append(e.Hints.ForNodes, discoveryv1.ForNode{Name: n})
		}
	}
}

// build runs Build and fails the test on a nil Service.
func build(t *testing.T, svc *corev1.Service, slices ...*discoveryv1.EndpointSlice) (*Service, []Problem) {
	t.Helper()
	s, probs := Build(svc, slices, Options{})
	if s == nil {
		t.Fatalf("Build returned nil Service; problems: %v", probs)
	}
	return s, probs
}

// ports renders s for n and returns the ServicePorts by resource name.
func ports(s *Service, n Node) map[string]*signalboxv1.ServicePort {
	out := map[string]*signalboxv1.ServicePort{}
	for _, r := range s.Resources(n) {
		out[r.GetName()] = r.GetServicePort()
	}
	return out
}

// only renders s for n and returns its single ServicePort.
func only(t *testing.T, s *Service, n Node) *signalboxv1.ServicePort {
	t.Helper()
	rs := s.Resources(n)
	if len(rs) != 1 {
		t.Fatalf("want 1 resource, got %d: %v", len(rs), rs)
	}
	return rs[0].GetServicePort()
}

// epList renders endpoints compactly: "10.0.0.1:8080/l/t" where /l marks
// local and /t terminating; "-" for none.
func epList(eps []*signalboxv1.Endpoint) string {
	if len(eps) == 0 {
		return "-"
	}
	parts := make([]string, len(eps))
	for i, e := range eps {
		s := net.JoinHostPort(e.GetIp(), strconv.Itoa(int(e.GetPort())))
		if e.GetLocal() {
			s += "/l"
		}
		if e.GetTerminating() {
			s += "/t"
		}
		parts[i] = s
	}
	return strings.Join(parts, " ")
}

// action renders a NoEndpointsAction briefly: "", "REJECT" or "DROP".
func action(a signalboxv1.NoEndpointsAction) string {
	return strings.TrimPrefix(strings.TrimPrefix(a.String(), "NO_ENDPOINTS_ACTION_"), "UNSPECIFIED")
}

func problemStrings(ps []Problem) []string {
	out := make([]string, len(ps))
	for i, p := range ps {
		out[i] = p.String()
	}
	return out
}

// wantProblems checks that each substring matches a distinct problem, in
// order, and that there are no others.
func wantProblems(t *testing.T, got []Problem, want ...string) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("problems: got %d %q, want %d matching %q", len(got), problemStrings(got), len(want), want)
	}
	for i, w := range want {
		if !strings.Contains(got[i].String(), w) {
			t.Errorf("problem %d: got %q, want it to contain %q", i, got[i].String(), w)
		}
	}
}

// describe renders the endpoint decisions; " short=<endpoints>" is added
// only when short_circuit_endpoints is set.
func describe(sp *signalboxv1.ServicePort) string {
	s := fmt.Sprintf("cluster=%s(%s) external=%s(%s)", epList(sp.GetClusterEndpoints()), action(sp.GetClusterNoEndpoints()),
		epList(sp.GetExternalEndpoints()), action(sp.GetExternalNoEndpoints()))
	if sc := sp.GetShortCircuitEndpoints(); len(sc) > 0 {
		s += " short=" + epList(sc)
	}
	return s
}
