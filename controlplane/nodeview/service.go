package nodeview

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"unicode/utf8"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	netutils "k8s.io/utils/net"

	signalboxv1 "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// familyInfo ties together the spellings of one IP family.
type familyInfo struct {
	k8s         corev1.IPFamily
	tag         string
	wire        signalboxv1.IPFamily
	addressType discoveryv1.AddressType
}

// families is indexed by familyIndex: 0 is IPv4, 1 is IPv6.
var families = [2]familyInfo{
	{corev1.IPv4Protocol, FamilyV4, signalboxv1.IPFamily_IP_FAMILY_IPV4, discoveryv1.AddressTypeIPv4},
	{corev1.IPv6Protocol, FamilyV6, signalboxv1.IPFamily_IP_FAMILY_IPV6, discoveryv1.AddressTypeIPv6},
}

// familyIndex counts an IPv4-mapped IPv6 address as IPv4, as upstream's
// netutils.IPFamilyOf does; parseIP has already unmapped it.
func familyIndex(a netip.Addr) int {
	if a.Is4() {
		return 0
	}
	return 1
}

// parseIP parses as upstream does (ParseIPSloppy accepts IPv4 with leading
// zeros) and returns the canonical address.
func parseIP(s string) (netip.Addr, bool) {
	ip := netutils.ParseIPSloppy(s)
	if ip == nil {
		return netip.Addr{}, false
	}
	a, ok := netip.AddrFromSlice(ip)
	return a.Unmap(), ok
}

// parseCIDR parses as upstream does (sloppy, host bits masked off).
// IPv4-mapped IPv6 prefixes are refused: their family and length disagree.
func parseCIDR(s string) (netip.Prefix, bool) {
	_, n, err := netutils.ParseCIDRSloppy(s)
	if err != nil || n == nil {
		return netip.Prefix{}, false
	}
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok || a.Is4In6() {
		return netip.Prefix{}, false
	}
	ones, bits := n.Mask.Size()
	if bits != a.BitLen() {
		return netip.Prefix{}, false
	}
	return netip.PrefixFrom(a, ones), true
}

// builder accumulates Problems while a Service is parsed.
type builder struct {
	svc      *corev1.Service
	obj      string
	problems []Problem
	// localMatters is true when a Local traffic policy is in effect, so the
	// node hosting an endpoint changes what a node receives.
	localMatters bool
}

func (b *builder) problem(obj, format string, args ...any) {
	b.problems = append(b.problems, Problem{Object: obj, Reason: fmt.Sprintf(format, args...)})
}

// lbIngress is one load balancer ingress IP.
type lbIngress struct {
	addr  netip.Addr
	proxy bool
}

// svcPort is one validated Service port.
type svcPort struct {
	name     string
	k8s      corev1.Protocol
	protocol signalboxv1.Protocol
	port     int32
	nodePort int32
}

// parseService returns one familyData per IP family the Service has, each
// with its ports filled in but no endpoints yet.
func (b *builder) parseService() []*familyData {
	spec := &b.svc.Spec
	itpLocal := spec.InternalTrafficPolicy != nil && *spec.InternalTrafficPolicy == corev1.ServiceInternalTrafficPolicyLocal
	// Upstream honours externalTrafficPolicy Local only on Services that
	// are externally accessible by type.
	etpLocal := externallyAccessibleType(spec) && spec.ExternalTrafficPolicy == corev1.ServiceExternalTrafficPolicyLocal
	b.localMatters = itpLocal || etpLocal

	affinity := b.affinityTimeout()
	hcNodePort := b.healthCheckNodePort(etpLocal)
	externalIPs := b.externalIPs()
	ingress := b.loadBalancerIngress()
	ranges := b.sourceRanges()
	ports := b.ports()

	var out []*familyData
	for fi, fam := range families {
		raw := clusterIPFor(fam.k8s, b.svc)
		if raw == "" {
			continue
		}
		addr, ok := parseIP(raw)
		if !ok || familyIndex(addr) != fi {
			b.problem(b.obj, "cluster IP %q is not an %s address; family skipped", raw, fam.k8s)
			continue
		}
		f := newFamilyData(fi)
		for _, sp := range ports {
			p := &portView{
				resourceName: ResourceName(fam.tag, b.svc.Namespace, b.svc.Name, sp.name),
				namespace:    b.svc.Namespace,
				name:         b.svc.Name,
				portName:     sp.name,
				family:       fam.wire,
				protocol:     sp.protocol,
				k8sProtocol:  sp.k8s,
				clusterIP:    addr.String(),
				port:         sp.port,
				nodePort:     sp.nodePort,
				externalIPs:  externalIPs[fi],
				ingress:      ingress[fi],
				sourceRanges: ranges[fi],
				affinity:     affinity,
				hcNodePort:   hcNodePort,
				itpLocal:     itpLocal,
				localMatters: b.localMatters,
			}
			// Proxy-mode load balancers deliver to the node itself, so
			// upstream does not count them as an external destination.
			p.extAccessible = p.nodePort != 0 || len(p.externalIPs) > 0 ||
				slices.ContainsFunc(p.ingress, func(i lbIngress) bool { return !i.proxy })
			p.etpLocal = etpLocal && p.extAccessible
			f.ports = append(f.ports, p)
		}
		out = append(out, f)
	}
	if len(out) == 0 {
		b.problem(b.obj, "no usable cluster IP in clusterIPs/ipFamilies; Service skipped")
	}
	return out
}

// externallyAccessibleType matches upstream's apiservice.ExternallyAccessible.
// An empty type is ClusterIP, as the apiserver defaults it.
func externallyAccessibleType(spec *corev1.ServiceSpec) bool {
	switch spec.Type {
	case corev1.ServiceTypeLoadBalancer, corev1.ServiceTypeNodePort:
		return true
	case corev1.ServiceTypeClusterIP, "":
		return len(spec.ExternalIPs) > 0
	}
	return false
}

// clusterIPFor mirrors upstream's GetClusterIPByFamily, including its
// tolerance of Services written before dual-stack (no ipFamilies).
func clusterIPFor(fam corev1.IPFamily, svc *corev1.Service) string {
	if len(svc.Spec.IPFamilies) == 0 {
		a, ok := parseIP(svc.Spec.ClusterIP)
		if ok && families[familyIndex(a)].k8s == fam {
			return svc.Spec.ClusterIP
		}
		return ""
	}
	for i, f := range svc.Spec.IPFamilies {
		if f == fam && i < len(svc.Spec.ClusterIPs) {
			return svc.Spec.ClusterIPs[i]
		}
	}
	return ""
}

// maxAffinitySeconds is the apiserver's validation limit (one day).
const maxAffinitySeconds = 86400

func (b *builder) affinityTimeout() int32 {
	if b.svc.Spec.SessionAffinity != corev1.ServiceAffinityClientIP {
		return 0
	}
	cfg := b.svc.Spec.SessionAffinityConfig
	if cfg == nil || cfg.ClientIP == nil || cfg.ClientIP.TimeoutSeconds == nil {
		// The apiserver defaults the timeout; objects from elsewhere may
		// lack it, where upstream would crash.
		return corev1.DefaultClientIPServiceAffinitySeconds
	}
	t := *cfg.ClientIP.TimeoutSeconds
	if t <= 0 || t > maxAffinitySeconds {
		b.problem(b.obj, "session affinity timeout %d out of range (1-%d); using %d",
			t, maxAffinitySeconds, corev1.DefaultClientIPServiceAffinitySeconds)
		return corev1.DefaultClientIPServiceAffinitySeconds
	}
	return t
}

// healthCheckNodePort follows upstream's NeedsHealthCheck: LoadBalancer
// Services with externalTrafficPolicy Local.
func (b *builder) healthCheckNodePort(etpLocal bool) int32 {
	if b.svc.Spec.Type != corev1.ServiceTypeLoadBalancer || !etpLocal {
		return 0
	}
	p := b.svc.Spec.HealthCheckNodePort
	if p <= 0 || p > 65535 {
		b.problem(b.obj, "healthCheckNodePort %d is not a valid port; no health check", p)
		return 0
	}
	return p
}

func (b *builder) externalIPs() [2][]string {
	var addrs [2][]netip.Addr
	for _, s := range b.svc.Spec.ExternalIPs {
		a, ok := parseIP(s)
		if !ok {
			// Upstream ignores empty strings silently, as the apiserver
			// does not always reject them.
			if strings.TrimSpace(s) != "" {
				b.problem(b.obj, "externalIP %q is not an IP; skipped", s)
			}
			continue
		}
		fi := familyIndex(a)
		addrs[fi] = append(addrs[fi], a)
	}
	var out [2][]string
	for fi := range addrs {
		slices.SortFunc(addrs[fi], netip.Addr.Compare)
		for _, a := range slices.Compact(addrs[fi]) {
			out[fi] = append(out[fi], a.String())
		}
	}
	return out
}

func (b *builder) loadBalancerIngress() [2][]lbIngress {
	var out [2][]lbIngress
	for i, ing := range b.svc.Status.LoadBalancer.Ingress {
		if ing.IP == "" {
			continue // hostname-only ingress: nothing to program
		}
		a, ok := parseIP(ing.IP)
		if !ok {
			b.problem(b.obj, "status.loadBalancer.ingress[%d].ip %q is not an IP; skipped", i, ing.IP)
			continue
		}
		proxy := ing.IPMode != nil && *ing.IPMode != corev1.LoadBalancerIPModeVIP
		fi := familyIndex(a)
		out[fi] = append(out[fi], lbIngress{addr: a, proxy: proxy})
	}
	for fi := range out {
		slices.SortFunc(out[fi], func(x, y lbIngress) int {
			if c := x.addr.Compare(y.addr); c != 0 {
				return c
			}
			return cmp.Compare(boolInt(x.proxy), boolInt(y.proxy))
		})
		out[fi] = slices.Compact(out[fi])
	}
	return out
}

// sourceRanges matches upstream 1.37: entries are trimmed (validation lets
// padding through), invalid ones dropped, and a zero-length prefix in a
// family means "any source" for that family. A family left with no valid
// range is therefore unrestricted, even when the spec listed ranges that
// were all invalid or all of the other family: upstream only installs a
// firewall when the family's list is non-empty.
func (b *builder) sourceRanges() [2][]string {
	var prefixes [2][]netip.Prefix
	var anySource [2]bool
	for _, raw := range b.svc.Spec.LoadBalancerSourceRanges {
		s := strings.TrimSpace(raw)
		if s == "" {
			continue
		}
		p, ok := parseCIDR(s)
		if !ok {
			b.problem(b.obj, "loadBalancerSourceRange %q is not a CIDR; skipped", raw)
			continue
		}
		fi := familyIndex(p.Addr())
		if p.Bits() == 0 {
			anySource[fi] = true
		}
		prefixes[fi] = append(prefixes[fi], p)
	}
	var out [2][]string
	for fi := range prefixes {
		if anySource[fi] {
			continue
		}
		for _, p := range prefixes[fi] {
			out[fi] = append(out[fi], p.String())
		}
		slices.Sort(out[fi])
		out[fi] = slices.Compact(out[fi])
	}
	return out
}

// ports validates the Service's ports; a bad port is skipped alone.
func (b *builder) ports() []svcPort {
	var out []svcPort
	seen := map[string]bool{}
	for i, p := range b.svc.Spec.Ports {
		where := fmt.Sprintf("port[%d] %q", i, p.Name)
		k8s := p.Protocol
		if k8s == "" {
			k8s = corev1.ProtocolTCP // the apiserver's default
		}
		proto, ok := wireProtocol(k8s)
		switch {
		case !utf8.ValidString(p.Name):
			b.problem(b.obj, "%s: name is not valid UTF-8; port skipped", where)
		case !ok:
			b.problem(b.obj, "%s: unsupported protocol %q; port skipped", where, p.Protocol)
		case p.Port <= 0 || p.Port > 65535:
			b.problem(b.obj, "%s: port %d out of range; port skipped", where, p.Port)
		case p.NodePort < 0 || p.NodePort > 65535:
			b.problem(b.obj, "%s: nodePort %d out of range; port skipped", where, p.NodePort)
		case seen[p.Name]:
			b.problem(b.obj, "%s: duplicate port name; port skipped", where)
		default:
			seen[p.Name] = true
			out = append(out, svcPort{name: p.Name, k8s: k8s, protocol: proto, port: p.Port, nodePort: p.NodePort})
		}
	}
	return out
}

func wireProtocol(p corev1.Protocol) (signalboxv1.Protocol, bool) {
	switch p {
	case corev1.ProtocolTCP:
		return signalboxv1.Protocol_PROTOCOL_TCP, true
	case corev1.ProtocolUDP:
		return signalboxv1.Protocol_PROTOCOL_UDP, true
	case corev1.ProtocolSCTP:
		return signalboxv1.Protocol_PROTOCOL_SCTP, true
	}
	return signalboxv1.Protocol_PROTOCOL_UNSPECIFIED, false
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}
