package nodeview

import (
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/utils/ptr"

	signalboxv1 "github.com/signalbox/signalbox/proto/signalbox/v1"
)

func TestSelection(t *testing.T) {
	tests := []struct {
		name   string
		svc    *corev1.Service
		opts   Options
		wantOK bool
	}{
		{"plain ClusterIP", service(), Options{}, true},
		{"nil Service", nil, Options{}, false},
		{"ExternalName", service(withType(corev1.ServiceTypeExternalName)), Options{}, false},
		{"headless clusterIP None", service(func(s *corev1.Service) { s.Spec.ClusterIP = corev1.ClusterIPNone }), Options{}, false},
		{"no clusterIP", service(func(s *corev1.Service) { s.Spec.ClusterIP = "" }), Options{}, false},
		{"headless label", service(withLabel(corev1.IsHeadlessService, "")), Options{}, false},
		{"proxy-name label, default proxy", service(withLabel(labelServiceProxyName, "other")), Options{}, false},
		{"empty proxy-name label, default proxy", service(withLabel(labelServiceProxyName, "")), Options{}, false},
		{"proxy-name label names us", service(withLabel(labelServiceProxyName, "signalbox")), Options{ProxyName: "signalbox"}, true},
		{"proxy-name label names another", service(withLabel(labelServiceProxyName, "other")), Options{ProxyName: "signalbox"}, false},
		{"unlabelled, named proxy", service(), Options{ProxyName: "signalbox"}, false},
		{"headless label beats our proxy name", service(withLabel(labelServiceProxyName, "signalbox"), withLabel(corev1.IsHeadlessService, "")), Options{ProxyName: "signalbox"}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, probs := Build(tt.svc, nil, tt.opts)
			if (s != nil) != tt.wantOK {
				t.Fatalf("Build proxied=%v, want %v", s != nil, tt.wantOK)
			}
			if len(probs) != 0 {
				t.Errorf("selection must not report problems, got %v", problemStrings(probs))
			}
			if s != nil && s.Key() != "default/web" {
				t.Errorf("Key = %q", s.Key())
			}
		})
	}
}

func TestServicePortFields(t *testing.T) {
	proxyMode := ptr.To(corev1.LoadBalancerIPModeProxy)
	vipMode := ptr.To(corev1.LoadBalancerIPModeVIP)
	tests := []struct {
		name  string
		svc   *corev1.Service
		check func(t *testing.T, sp *signalboxv1.ServicePort)
	}{
		{"basics", service(), func(t *testing.T, sp *signalboxv1.ServicePort) {
			if sp.GetNamespace() != "default" || sp.GetName() != "web" || sp.GetPortName() != "http" ||
				sp.GetClusterIp() != "10.96.0.10" || sp.GetPort() != 80 || sp.GetNodePort() != 0 ||
				sp.GetProtocol() != signalboxv1.Protocol_PROTOCOL_TCP || sp.GetFamily() != signalboxv1.IPFamily_IP_FAMILY_IPV4 {
				t.Errorf("unexpected basics: %v", sp)
			}
			if sp.GetAffinityTimeoutSeconds() != 0 || sp.GetMasqueradeExternal() || sp.GetExternalPolicyLocal() || sp.GetHealthCheckNodePort() != 0 {
				t.Errorf("ClusterIP-only Service got external or affinity settings: %v", sp)
			}
		}},
		{"UDP", service(withPorts(portSpec("dns", 53, corev1.ProtocolUDP))), func(t *testing.T, sp *signalboxv1.ServicePort) {
			if sp.GetProtocol() != signalboxv1.Protocol_PROTOCOL_UDP {
				t.Errorf("protocol %v", sp.GetProtocol())
			}
		}},
		{"SCTP", service(withPorts(portSpec("sig", 3868, corev1.ProtocolSCTP))), func(t *testing.T, sp *signalboxv1.ServicePort) {
			if sp.GetProtocol() != signalboxv1.Protocol_PROTOCOL_SCTP {
				t.Errorf("protocol %v", sp.GetProtocol())
			}
		}},
		{"empty protocol defaults to TCP", service(withPorts(portSpec("http", 80, ""))), func(t *testing.T, sp *signalboxv1.ServicePort) {
			if sp.GetProtocol() != signalboxv1.Protocol_PROTOCOL_TCP {
				t.Errorf("protocol %v", sp.GetProtocol())
			}
		}},
		{"nodePort", service(withNodePort(30080)), func(t *testing.T, sp *signalboxv1.ServicePort) {
			if sp.GetNodePort() != 30080 || !sp.GetMasqueradeExternal() {
				t.Errorf("nodePort %d masquerade %v", sp.GetNodePort(), sp.GetMasqueradeExternal())
			}
		}},
		{"externalIPs of this family only, sorted, canonical", service(withExternalIPs("203.0.113.9", "2001:db8::1", "203.0.113.001", "203.0.113.1")),
			func(t *testing.T, sp *signalboxv1.ServicePort) {
				if want := []string{"203.0.113.1", "203.0.113.9"}; !slices.Equal(sp.GetExternalIps(), want) {
					t.Errorf("externalIPs %v, want %v", sp.GetExternalIps(), want)
				}
				if !sp.GetMasqueradeExternal() {
					t.Error("externalIPs make the port externally accessible")
				}
			}},
		{"LB ingress with ipMode", service(withIngress(
			corev1.LoadBalancerIngress{IP: "198.51.100.2", IPMode: proxyMode},
			corev1.LoadBalancerIngress{IP: "198.51.100.1"},
			corev1.LoadBalancerIngress{IP: "198.51.100.3", IPMode: vipMode},
			corev1.LoadBalancerIngress{Hostname: "lb.example.com"},
			corev1.LoadBalancerIngress{IP: "2001:db8::5"},
		)), func(t *testing.T, sp *signalboxv1.ServicePort) {
			var got []string
			for _, i := range sp.GetLoadBalancerIngress() {
				s := i.GetIp()
				if i.GetProxy() {
					s += "/proxy"
				}
				got = append(got, s)
			}
			if want := []string{"198.51.100.1", "198.51.100.2/proxy", "198.51.100.3"}; !slices.Equal(got, want) {
				t.Errorf("ingress %v, want %v", got, want)
			}
		}},
		{"only Proxy-mode ingress and no nodePort: not externally accessible", service(withIngress(corev1.LoadBalancerIngress{IP: "198.51.100.2", IPMode: proxyMode}), withETPLocal(32000)),
			func(t *testing.T, sp *signalboxv1.ServicePort) {
				if sp.GetMasqueradeExternal() || sp.GetExternalPolicyLocal() || sp.GetExternalNoEndpoints() != 0 || len(sp.GetLoadBalancerIngress()) != 1 {
					t.Errorf("want the ingress listed but no external handling: %v", sp)
				}
				// Upstream still runs the health check: it is decided per Service.
				if sp.GetHealthCheckNodePort() != 32000 {
					t.Errorf("health check node port %d", sp.GetHealthCheckNodePort())
				}
			}},
		{"ClientIP affinity, default timeout", service(func(s *corev1.Service) { s.Spec.SessionAffinity = corev1.ServiceAffinityClientIP }),
			func(t *testing.T, sp *signalboxv1.ServicePort) {
				if sp.GetAffinityTimeoutSeconds() != 10800 {
					t.Errorf("timeout %d", sp.GetAffinityTimeoutSeconds())
				}
			}},
		{"ClientIP affinity, explicit timeout", service(func(s *corev1.Service) {
			s.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
			s.Spec.SessionAffinityConfig = &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: ptr.To[int32](60)}}
		}), func(t *testing.T, sp *signalboxv1.ServicePort) {
			if sp.GetAffinityTimeoutSeconds() != 60 {
				t.Errorf("timeout %d", sp.GetAffinityTimeoutSeconds())
			}
		}},
		{"affinity None ignores config", service(func(s *corev1.Service) {
			s.Spec.SessionAffinity = corev1.ServiceAffinityNone
			s.Spec.SessionAffinityConfig = &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: ptr.To[int32](60)}}
		}), func(t *testing.T, sp *signalboxv1.ServicePort) {
			if sp.GetAffinityTimeoutSeconds() != 0 {
				t.Errorf("timeout %d", sp.GetAffinityTimeoutSeconds())
			}
		}},
		{"health check node port for LoadBalancer ETP Local", service(withLB("198.51.100.1"), withNodePort(30080), withETPLocal(32000)),
			func(t *testing.T, sp *signalboxv1.ServicePort) {
				if sp.GetHealthCheckNodePort() != 32000 || !sp.GetExternalPolicyLocal() || sp.GetMasqueradeExternal() {
					t.Errorf("hc %d local %v masq %v", sp.GetHealthCheckNodePort(), sp.GetExternalPolicyLocal(), sp.GetMasqueradeExternal())
				}
			}},
		{"no health check for NodePort ETP Local", service(withNodePort(30080), withETPLocal(32000)),
			func(t *testing.T, sp *signalboxv1.ServicePort) {
				if sp.GetHealthCheckNodePort() != 0 || !sp.GetExternalPolicyLocal() {
					t.Errorf("hc %d local %v", sp.GetHealthCheckNodePort(), sp.GetExternalPolicyLocal())
				}
			}},
		{"ETP Local ignored on ClusterIP Service without externalIPs", service(withETPLocal(0)),
			func(t *testing.T, sp *signalboxv1.ServicePort) {
				if sp.GetExternalPolicyLocal() || sp.GetMasqueradeExternal() {
					t.Errorf("local %v masq %v", sp.GetExternalPolicyLocal(), sp.GetMasqueradeExternal())
				}
			}},
		{"ETP Local honoured on ClusterIP Service with externalIPs", service(withExternalIPs("203.0.113.1"), withETPLocal(0)),
			func(t *testing.T, sp *signalboxv1.ServicePort) {
				if !sp.GetExternalPolicyLocal() || sp.GetMasqueradeExternal() {
					t.Errorf("local %v masq %v", sp.GetExternalPolicyLocal(), sp.GetMasqueradeExternal())
				}
			}},
		{"ITP Local", service(withITPLocal()), func(t *testing.T, sp *signalboxv1.ServicePort) {
			if !sp.GetInternalPolicyLocal() {
				t.Error("internal_policy_local not set")
			}
		}},
		{"legacy Service without ipFamilies", service(func(s *corev1.Service) { s.Spec.IPFamilies, s.Spec.ClusterIPs = nil, nil }),
			func(t *testing.T, sp *signalboxv1.ServicePort) {
				if sp.GetClusterIp() != "10.96.0.10" {
					t.Errorf("clusterIP %q", sp.GetClusterIp())
				}
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, probs := build(t, tt.svc)
			wantProblems(t, probs)
			tt.check(t, only(t, s, Node{Name: "n1"}))
		})
	}
}

func TestSourceRanges(t *testing.T) {
	tests := []struct {
		name      string
		ranges    []string
		dual      bool
		want4     []string
		want6     []string
		wantProbs []string
	}{
		{name: "none", want4: nil},
		{name: "valid, sorted, deduplicated", ranges: []string{"192.0.2.0/24", "10.0.0.0/8", "10.0.0.0/8"}, want4: []string{"10.0.0.0/8", "192.0.2.0/24"}},
		{name: "padding trimmed", ranges: []string{" 203.0.113.0/25 "}, want4: []string{"203.0.113.0/25"}},
		{name: "host bits and leading zeros normalised", ranges: []string{"203.0.113.000/025", "10.1.2.3/8"}, want4: []string{"10.0.0.0/8", "203.0.113.0/25"}},
		{name: "zero prefix means any source", ranges: []string{"10.0.0.0/8", "0.0.0.0/0"}, want4: nil},
		{name: "bad range skipped, rest kept", ranges: []string{"10.0.0.0/8", "bogus"}, want4: []string{"10.0.0.0/8"}, wantProbs: []string{`"bogus" is not a CIDR`}},
		// Upstream 1.37 drops invalid ranges one by one; a family left with
		// none installs no firewall, so the LB is open to all.
		{name: "all invalid: unrestricted, as upstream", ranges: []string{"bogus", "10.0.0.0/33"}, want4: nil, wantProbs: []string{"bogus", "10.0.0.0/33"}},
		{name: "empty strings ignored silently", ranges: []string{"", "  "}, want4: nil},
		{name: "other family only: this family unrestricted", ranges: []string{"2001:db8::/32"}, want4: nil},
		{name: "dual-stack split per family", dual: true, ranges: []string{"2001:db8::/32", "10.0.0.0/8"}, want4: []string{"10.0.0.0/8"}, want6: []string{"2001:db8::/32"}},
		{name: "dual-stack: zero prefix opens only its family", dual: true, ranges: []string{"::/0", "10.0.0.0/8", "2001:db8::/32"}, want4: []string{"10.0.0.0/8"}, want6: nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			opts := []svcOpt{withLB("198.51.100.1", "2001:db8:1::1"), withSourceRanges(tt.ranges...)}
			if tt.dual {
				opts = append(opts, dualStack())
			}
			s, probs := build(t, service(opts...))
			wantProblems(t, probs, tt.wantProbs...)
			got := ports(s, Node{Name: "n1"})
			if r := got["svc/v4/default/web/http"].GetLoadBalancerSourceRanges(); !slices.Equal(r, tt.want4) {
				t.Errorf("v4 ranges %q, want %q", r, tt.want4)
			}
			if tt.dual {
				if r := got["svc/v6/default/web/http"].GetLoadBalancerSourceRanges(); !slices.Equal(r, tt.want6) {
					t.Errorf("v6 ranges %q, want %q", r, tt.want6)
				}
			}
		})
	}
}

// TestServiceProblems: each bad field is reported and skipped alone.
func TestServiceProblems(t *testing.T) {
	tests := []struct {
		name      string
		svc       *corev1.Service
		wantNames []string
		wantProbs []string
	}{
		{"unknown protocol", service(withPorts(portSpec("a", 80, "HTTP"), portSpec("b", 81, corev1.ProtocolTCP))),
			[]string{"svc/v4/default/web/b"}, []string{`unsupported protocol "HTTP"`}},
		{"port zero and out of range", service(withPorts(portSpec("a", 0, corev1.ProtocolTCP), portSpec("b", 70000, corev1.ProtocolTCP), portSpec("c", 82, corev1.ProtocolTCP))),
			[]string{"svc/v4/default/web/c"}, []string{"port 0 out of range", "port 70000 out of range"}},
		{"nodePort out of range", service(withPorts(corev1.ServicePort{Name: "a", Port: 80, NodePort: 70000}, portSpec("b", 81, corev1.ProtocolTCP))),
			[]string{"svc/v4/default/web/b"}, []string{"nodePort 70000"}},
		{"duplicate port name", service(withPorts(portSpec("a", 80, corev1.ProtocolTCP), portSpec("a", 81, corev1.ProtocolUDP))),
			[]string{"svc/v4/default/web/a"}, []string{"duplicate port name"}},
		{"bad externalIP", service(withExternalIPs("bogus", "", "203.0.113.1")),
			[]string{"svc/v4/default/web/http"}, []string{`externalIP "bogus"`}},
		{"bad LB ingress IP", service(withLB("bogus", "198.51.100.1")),
			[]string{"svc/v4/default/web/http"}, []string{`ingress[0].ip "bogus"`}},
		{"cluster IP of the wrong family", service(withClusterIPs("10.96.0.10", "fd00::10"), func(s *corev1.Service) { s.Spec.ClusterIPs[1] = "10.96.0.11" }),
			[]string{"svc/v4/default/web/http"}, []string{`cluster IP "10.96.0.11" is not an IPv6`}},
		{"unparseable cluster IP", service(withClusterIPs("bogus")),
			nil, []string{`cluster IP "bogus"`, "no usable cluster IP"}},
		{"affinity timeout out of range", service(func(s *corev1.Service) {
			s.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
			s.Spec.SessionAffinityConfig = &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: ptr.To[int32](0)}}
		}), []string{"svc/v4/default/web/http"}, []string{"session affinity timeout 0"}},
		{"LoadBalancer ETP Local without healthCheckNodePort", service(withLB("198.51.100.1"), withETPLocal(0)),
			[]string{"svc/v4/default/web/http"}, []string{"healthCheckNodePort 0"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, probs := build(t, tt.svc)
			wantProblems(t, probs, tt.wantProbs...)
			var names []string
			for _, r := range s.Resources(Node{Name: "n1"}) {
				names = append(names, r.GetName())
			}
			if !slices.Equal(names, tt.wantNames) {
				t.Errorf("resources %q, want %q", names, tt.wantNames)
			}
		})
	}
}

func TestResourceName(t *testing.T) {
	tests := []struct{ family, port, want string }{
		{"v4", "http", "svc/v4/ns/web/http"},
		{"IPv4", "http", "svc/v4/ns/web/http"},
		{"v6", "", "svc/v6/ns/web/_"},
		{"IPv6", "dns", "svc/v6/ns/web/dns"},
	}
	for _, tt := range tests {
		if got := ResourceName(tt.family, "ns", "web", tt.port); got != tt.want {
			t.Errorf("ResourceName(%q, %q) = %q, want %q", tt.family, tt.port, got, tt.want)
		}
	}
}

func TestNodeSettings(t *testing.T) {
	set := Settings{ClusterCIDRs: []string{"10.244.0.0/16"}, MasqueradeAll: true, NodePortAddresses: []string{"198.18.0.0/15"}}
	r := NodeSettings(Node{Name: "n1", Zone: "z1"}, set)
	ns := r.GetNodeSettings()
	if r.GetName() != "node/settings" || r.GetHash() == "" || ns.GetNodeName() != "n1" || ns.GetZone() != "z1" ||
		!ns.GetMasqueradeAll() || !slices.Equal(ns.GetClusterCidrs(), set.ClusterCIDRs) || !slices.Equal(ns.GetNodePortAddresses(), set.NodePortAddresses) {
		t.Fatalf("unexpected resource %v", r)
	}
	set.ClusterCIDRs[0] = "changed"
	if ns.GetClusterCidrs()[0] != "10.244.0.0/16" {
		t.Error("NodeSettings aliases the caller's slice")
	}
	if again := NodeSettings(Node{Name: "n1", Zone: "z1"}, Settings{ClusterCIDRs: []string{"10.244.0.0/16"}, MasqueradeAll: true, NodePortAddresses: []string{"198.18.0.0/15"}}); again.GetHash() != r.GetHash() {
		t.Error("equal settings hash differently")
	}
	if other := NodeSettings(Node{Name: "n2", Zone: "z1"}, Settings{}); other.GetHash() == r.GetHash() {
		t.Error("different settings hash equally")
	}
}
