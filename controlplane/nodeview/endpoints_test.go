package nodeview

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/utils/ptr"
)

// TestEndpointGathering covers how slices are merged and matched to ports.
func TestEndpointGathering(t *testing.T) {
	tests := []struct {
		name      string
		svc       *corev1.Service
		slices    []*discoveryv1.EndpointSlice
		want      map[string]string // resource name -> cluster endpoints
		wantProbs []string
	}{
		{
			name:   "several slices merged and sorted by IP then port",
			svc:    service(),
			slices: []*discoveryv1.EndpointSlice{slice("b", ep("10.1.0.10"), ep("10.1.0.2")), slice("a", ep("10.1.0.9"))},
			want:   map[string]string{"svc/v4/default/web/http": "10.1.0.2:8080 10.1.0.9:8080 10.1.0.10:8080"},
		},
		{
			// The EndpointSlice controller resolves a named targetPort per
			// pod and groups pods by resolved number, one slice each.
			name: "named target port resolved per slice",
			svc:  service(),
			slices: []*discoveryv1.EndpointSlice{
				slice("a", ep("10.1.0.1")),
				with(slice("b", ep("10.1.0.2")), slicePorts(slicePortOf("http", 9090, corev1.ProtocolTCP))),
			},
			want: map[string]string{"svc/v4/default/web/http": "10.1.0.1:8080 10.1.0.2:9090"},
		},
		{
			name: "slice ports matched by name and protocol",
			svc:  service(withPorts(portSpec("dns", 53, corev1.ProtocolUDP), portSpec("dns-tcp", 53, corev1.ProtocolTCP))),
			slices: []*discoveryv1.EndpointSlice{with(slice("a", ep("10.1.0.1")), slicePorts(
				slicePortOf("dns", 5353, corev1.ProtocolUDP),
				slicePortOf("dns-tcp", 5354, corev1.ProtocolTCP),
				slicePortOf("dns", 6000, corev1.ProtocolTCP), // wrong protocol: not ours
				slicePortOf("metrics", 9100, corev1.ProtocolTCP),
			))},
			want: map[string]string{
				"svc/v4/default/web/dns":     "10.1.0.1:5353",
				"svc/v4/default/web/dns-tcp": "10.1.0.1:5354",
			},
		},
		{
			name: "unnamed single port",
			svc:  service(withPorts(portSpec("", 80, corev1.ProtocolTCP))),
			slices: []*discoveryv1.EndpointSlice{with(slice("a", ep("10.1.0.1")), slicePorts(
				discoveryv1.EndpointPort{Name: ptr.To(""), Port: ptr.To[int32](8080)}, // nil protocol: TCP
			))},
			want: map[string]string{"svc/v4/default/web/_": "10.1.0.1:8080"},
		},
		{
			name: "FQDN slices, other proxies' and headless slices ignored",
			svc:  service(),
			slices: []*discoveryv1.EndpointSlice{
				slice("a", ep("10.1.0.1")),
				with(slice("b", ep("example.com")), addressType(discoveryv1.AddressTypeFQDN)),
				with(slice("c", ep("10.1.0.3")), sliceLabel(labelServiceProxyName, "other")),
				with(slice("d", ep("10.1.0.4")), sliceLabel(corev1.IsHeadlessService, "")),
				slice("e", ep("fd00::1")), // IPv6 slice, IPv4-only Service
			},
			want: map[string]string{"svc/v4/default/web/http": "10.1.0.1:8080"},
		},
		{
			name: "slices of another Service or namespace reported",
			svc:  service(),
			slices: []*discoveryv1.EndpointSlice{
				slice("a", ep("10.1.0.1")),
				with(slice("b", ep("10.1.0.2")), sliceLabel(discoveryv1.LabelServiceName, "other")),
				with(slice("c", ep("10.1.0.3")), func(s *discoveryv1.EndpointSlice) { s.Namespace = "kube-system" }),
				nil,
			},
			want:      map[string]string{"svc/v4/default/web/http": "10.1.0.1:8080"},
			wantProbs: []string{"nil EndpointSlice", "EndpointSlice default/b: labelled for Service default/other", "EndpointSlice kube-system/c"},
		},
		{
			name:   "no slices",
			svc:    service(),
			slices: nil,
			want:   map[string]string{"svc/v4/default/web/http": "-"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, probs := build(t, tt.svc, tt.slices...)
			wantProblems(t, probs, tt.wantProbs...)
			got := ports(s, Node{Name: "n1"})
			if len(got) != len(tt.want) {
				t.Fatalf("got %d resources, want %d", len(got), len(tt.want))
			}
			for name, want := range tt.want {
				sp, ok := got[name]
				if !ok {
					t.Fatalf("missing resource %s", name)
				}
				if g := epList(sp.GetClusterEndpoints()); g != want {
					t.Errorf("%s: cluster endpoints %s, want %s", name, g, want)
				}
			}
		})
	}
}

// TestMalformedEndpoints: one bad endpoint or port never drops the others.
func TestMalformedEndpoints(t *testing.T) {
	tests := []struct {
		name      string
		slices    []*discoveryv1.EndpointSlice
		want      string
		wantProbs []string
	}{
		{
			name:      "unparseable IP",
			slices:    []*discoveryv1.EndpointSlice{slice("a", ep("10.1.0.1"), ep("10.1.0.300"), ep("10.1.0.2"))},
			want:      "10.1.0.1:8080 10.1.0.2:8080",
			wantProbs: []string{`endpoints[1] address "10.1.0.300" is not an IP`},
		},
		{
			name:      "IPv6 address in an IPv4 slice",
			slices:    []*discoveryv1.EndpointSlice{slice("a", ep("10.1.0.1"), ep("fd00::2"))},
			want:      "10.1.0.1:8080",
			wantProbs: []string{`endpoints[1] address "fd00::2" is not IPv4`},
		},
		{
			name:      "endpoint without addresses",
			slices:    []*discoveryv1.EndpointSlice{slice("a", discoveryv1.Endpoint{}, ep("10.1.0.1"))},
			want:      "10.1.0.1:8080",
			wantProbs: []string{"endpoints[0] has no address"},
		},
		{
			name:   "leading zeros accepted and canonicalised, as upstream",
			slices: []*discoveryv1.EndpointSlice{slice("a", ep("010.001.000.001"))},
			want:   "10.1.0.1:8080",
		},
		{
			name: "port out of range, missing number, missing name",
			slices: []*discoveryv1.EndpointSlice{
				with(slice("a", ep("10.1.0.1")), slicePorts(slicePortOf("http", 70000, corev1.ProtocolTCP))),
				with(slice("b", ep("10.1.0.2")), slicePorts(discoveryv1.EndpointPort{Name: ptr.To("http")})),
				with(slice("c", ep("10.1.0.3")), slicePorts(discoveryv1.EndpointPort{Port: ptr.To[int32](8080)})),
				slice("d", ep("10.1.0.4")),
			},
			want: "10.1.0.4:8080",
			wantProbs: []string{
				"EndpointSlice default/a: ports[0] \"http\": port 70000 out of range",
				"EndpointSlice default/b: ports[0] \"http\" has no port number",
				"EndpointSlice default/c: ports[0] has no name",
			},
		},
		{
			name:      "duplicate across slices kept once",
			slices:    []*discoveryv1.EndpointSlice{slice("a", ep("10.1.0.1"), ep("10.1.0.2")), slice("b", ep("10.1.0.1"))},
			want:      "10.1.0.1:8080 10.1.0.2:8080",
			wantProbs: []string{"EndpointSlice default/b: duplicate endpoint 10.1.0.1:8080 for port \"http\" (also in EndpointSlice default/a)"},
		},
		{
			// Upstream prefers the live endpoint when a terminating pod's
			// IP was reused.
			name:      "duplicate: ready endpoint preferred over terminating one",
			slices:    []*discoveryv1.EndpointSlice{slice("a", ep("10.1.0.1", terminating)), slice("b", ep("10.1.0.1"))},
			want:      "10.1.0.1:8080",
			wantProbs: []string{"duplicate endpoint 10.1.0.1:8080"},
		},
		{
			name:      "duplicate: first kept when neither terminates",
			slices:    []*discoveryv1.EndpointSlice{slice("a", ep("10.1.0.1")), slice("b", ep("10.1.0.1", notReady))},
			want:      "10.1.0.1:8080",
			wantProbs: []string{"duplicate endpoint"},
		},
		{
			name:      "same IP on different ports is not a duplicate",
			slices:    []*discoveryv1.EndpointSlice{slice("a", ep("10.1.0.1")), with(slice("b", ep("10.1.0.1")), slicePorts(slicePortOf("http", 9090, corev1.ProtocolTCP)))},
			want:      "10.1.0.1:8080 10.1.0.1:9090",
			wantProbs: nil,
		},
		{
			name:      "unknown address type",
			slices:    []*discoveryv1.EndpointSlice{with(slice("a", ep("10.1.0.1")), addressType("IPv5")), slice("b", ep("10.1.0.2"))},
			want:      "10.1.0.2:8080",
			wantProbs: []string{`unknown addressType "IPv5"`},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, probs := build(t, service(), tt.slices...)
			wantProblems(t, probs, tt.wantProbs...)
			if got := epList(only(t, s, Node{Name: "n1"}).GetClusterEndpoints()); got != tt.want {
				t.Errorf("cluster endpoints %s, want %s", got, tt.want)
			}
		})
	}
}

func TestDualStack(t *testing.T) {
	svc := service(dualStack(), withNodePort(30080), withExternalIPs("203.0.113.1", "2001:db8::1"),
		withPorts(portSpec("http", 80, corev1.ProtocolTCP), portSpec("dns", 53, corev1.ProtocolUDP)))
	svc.Spec.Ports[0].NodePort = 30080
	sliceDNS := func(s *discoveryv1.EndpointSlice) {
		s.Ports = append(s.Ports, slicePortOf("dns", 5353, corev1.ProtocolUDP))
	}
	s, probs := build(t, svc,
		with(slice("v4", ep("10.1.0.1"), ep("fd00::9")), sliceDNS),
		with(slice("v6", ep("fd00::1"), ep("10.1.0.9")), sliceDNS),
	)
	wantProblems(t, probs, `address "fd00::9" is not IPv4`, `address "10.1.0.9" is not IPv6`)
	got := ports(s, Node{Name: "n1"})
	want := map[string]struct{ clusterIP, eps, extIP string }{
		"svc/v4/default/web/http": {"10.96.0.10", "10.1.0.1:8080", "203.0.113.1"},
		"svc/v4/default/web/dns":  {"10.96.0.10", "10.1.0.1:5353", "203.0.113.1"},
		"svc/v6/default/web/http": {"fd00:96::10", "[fd00::1]:8080", "2001:db8::1"},
		"svc/v6/default/web/dns":  {"fd00:96::10", "[fd00::1]:5353", "2001:db8::1"},
	}
	if len(got) != len(want) {
		t.Fatalf("got %d resources, want %d", len(got), len(want))
	}
	for name, w := range want {
		sp := got[name]
		if sp.GetClusterIp() != w.clusterIP || epList(sp.GetClusterEndpoints()) != w.eps ||
			len(sp.GetExternalIps()) != 1 || sp.GetExternalIps()[0] != w.extIP {
			t.Errorf("%s: clusterIP %s endpoints %s externalIPs %v; want %+v", name, sp.GetClusterIp(),
				epList(sp.GetClusterEndpoints()), sp.GetExternalIps(), w)
		}
	}
	if got["svc/v4/default/web/http"].GetNodePort() != 30080 || got["svc/v6/default/web/http"].GetNodePort() != 30080 {
		t.Error("nodePort must reach both families")
	}

	// Each family decides alone: v6 endpoints all gone leaves v4 intact.
	s, _ = build(t, service(dualStack()), slice("v4", ep("10.1.0.1")), slice("v6", ep("fd00::1", gone)))
	got = ports(s, Node{Name: "n1"})
	if d := describe(got["svc/v4/default/web/http"]); d != "cluster=10.1.0.1:8080() external=-()" {
		t.Errorf("v4: %s", d)
	}
	if d := describe(got["svc/v6/default/web/http"]); d != "cluster=-(REJECT) external=-()" {
		t.Errorf("v6: %s", d)
	}

	// IPv6-only Service.
	s, _ = build(t, service(withClusterIPs("fd00:96::10")), slice("v6", ep("fd00::1")))
	if sp := only(t, s, Node{Name: "n1"}); sp.GetClusterIp() != "fd00:96::10" || epList(sp.GetClusterEndpoints()) != "[fd00::1]:8080" {
		t.Errorf("IPv6-only: %v", sp)
	}
}
