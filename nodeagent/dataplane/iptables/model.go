package iptables

import (
	"crypto/sha256"
	"encoding/base32"
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strings"

	"google.golang.org/protobuf/proto"

	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// Chains the agent owns. Per-service chains carry a hash of the resource
// name so they stay stable across updates and never collide with
// kube-proxy's KUBE-* chains on a node that runs both during a migration.
const (
	chainServices         = "SBX-SERVICES"
	chainExternalServices = "SBX-EXTERNAL-SERVICES"
	chainNodePorts        = "SBX-NODEPORTS"
	chainPostrouting      = "SBX-POSTROUTING"
	chainMarkMasq         = "SBX-MARK-MASQ"
	chainOffCluster       = "SBX-OFFCLUSTER"
	chainForward          = "SBX-FORWARD"
	chainFirewall         = "SBX-PROXY-FIREWALL"

	prefixSVC = "SBX-SVC-" // load balancing over the cluster endpoints
	prefixSVX = "SBX-SVX-" // load balancing over the external endpoints, when they differ
	prefixSVS = "SBX-SVS-" // load balancing over the short-circuit endpoints, when they differ
	prefixEXT = "SBX-EXT-" // external traffic: masquerade or short-circuit, then SVX/SVC
	prefixFW  = "SBX-FW-"  // loadBalancerSourceRanges
)

// servicePrefixes are the chains Sync may delete when it finds them stale.
// Only per-service chains: nothing outside our own chains references them,
// so deleting one can never fail on a foreign reference.
var servicePrefixes = []string{prefixSVC, prefixSVX, prefixSVS, prefixEXT, prefixFW}

func isServiceChain(name string) bool {
	for _, p := range servicePrefixes {
		if strings.HasPrefix(name, p) {
			return true
		}
	}
	return false
}

// shortHash is 16 base32 characters of SHA-256: with the longest prefix
// (8) the chain name stays within iptables' 28-character limit.
func shortHash(s string) string {
	sum := sha256.Sum256([]byte(s))
	return base32.StdEncoding.EncodeToString(sum[:10])
}

type family int

const (
	v4 family = 4
	v6 family = 6
)

func (f family) String() string { return fmt.Sprintf("IPv%d", int(f)) }

func (f family) proto() pb.IPFamily {
	if f == v6 {
		return pb.IPFamily_IP_FAMILY_IPV6
	}
	return pb.IPFamily_IP_FAMILY_IPV4
}

func familyOf(p pb.IPFamily) (family, bool) {
	switch p {
	case pb.IPFamily_IP_FAMILY_IPV4:
		return v4, true
	case pb.IPFamily_IP_FAMILY_IPV6:
		return v6, true
	}
	return 0, false
}

func (f family) has(a netip.Addr) bool { return (f == v4) == a.Is4() }

// svcPort is a ServicePort checked and parsed. Everything that reaches the
// restore text passes through netip or an integer, so a hostile or broken
// resource can never inject a line.
type svcPort struct {
	name         string
	comment      string
	family       family
	proto        string
	clusterIP    netip.Addr
	port         int
	nodePort     int
	externalIPs  []netip.Addr
	lbIPs        []netip.Addr // ipMode VIP only: Proxy ones are not captured
	sourceRanges []netip.Prefix
	affinity     int
	cluster      []netip.AddrPort
	external     []netip.AddrPort
	short        []netip.AddrPort // empty: short-circuit to cluster
	extLocal     bool
	masqExternal bool
	hcNodePort   int
	clusterNoEP  pb.NoEndpointsAction
	externalNoEP pb.NoEndpointsAction
}

// maxAffinity is upstream's limit on sessionAffinityConfig timeouts.
const maxAffinity = 86400

func parseServicePort(name string, sp *pb.ServicePort) (*svcPort, error) {
	fam, ok := familyOf(sp.GetFamily())
	if !ok {
		return nil, fmt.Errorf("resource %q: no IP family", name)
	}
	s := &svcPort{
		name:         name,
		comment:      commentFor(sp),
		family:       fam,
		affinity:     int(sp.GetAffinityTimeoutSeconds()),
		extLocal:     sp.GetExternalPolicyLocal(),
		masqExternal: sp.GetMasqueradeExternal(),
		clusterNoEP:  sp.GetClusterNoEndpoints(),
		externalNoEP: sp.GetExternalNoEndpoints(),
	}
	switch sp.GetProtocol() {
	case pb.Protocol_PROTOCOL_TCP:
		s.proto = "tcp"
	case pb.Protocol_PROTOCOL_UDP:
		s.proto = "udp"
	case pb.Protocol_PROTOCOL_SCTP:
		s.proto = "sctp"
	default:
		return nil, fmt.Errorf("resource %q: unknown protocol %v", name, sp.GetProtocol())
	}
	var err error
	if s.port, err = checkPort(sp.GetPort(), false); err != nil {
		return nil, fmt.Errorf("resource %q: port: %w", name, err)
	}
	if s.nodePort, err = checkPort(sp.GetNodePort(), true); err != nil {
		return nil, fmt.Errorf("resource %q: nodePort: %w", name, err)
	}
	if s.hcNodePort, err = checkPort(sp.GetHealthCheckNodePort(), true); err != nil {
		return nil, fmt.Errorf("resource %q: healthCheckNodePort: %w", name, err)
	}
	if s.affinity < 0 || s.affinity > maxAffinity {
		return nil, fmt.Errorf("resource %q: affinity timeout %d out of range", name, s.affinity)
	}
	if sp.GetClusterIp() != "" {
		if s.clusterIP, err = parseAddr(fam, sp.GetClusterIp()); err != nil {
			return nil, fmt.Errorf("resource %q: clusterIP: %w", name, err)
		}
	}
	if s.externalIPs, err = parseAddrs(fam, sp.GetExternalIps()); err != nil {
		return nil, fmt.Errorf("resource %q: externalIPs: %w", name, err)
	}
	var lbs []string
	for _, lb := range sp.GetLoadBalancerIngress() {
		if !lb.GetProxy() {
			lbs = append(lbs, lb.GetIp())
		}
	}
	if s.lbIPs, err = parseAddrs(fam, lbs); err != nil {
		return nil, fmt.Errorf("resource %q: load balancer ingress: %w", name, err)
	}
	if s.sourceRanges, err = parsePrefixes(fam, sp.GetLoadBalancerSourceRanges()); err != nil {
		return nil, fmt.Errorf("resource %q: loadBalancerSourceRanges: %w", name, err)
	}
	if s.cluster, err = parseEndpoints(fam, sp.GetClusterEndpoints()); err != nil {
		return nil, fmt.Errorf("resource %q: cluster endpoints: %w", name, err)
	}
	if s.external, err = parseEndpoints(fam, sp.GetExternalEndpoints()); err != nil {
		return nil, fmt.Errorf("resource %q: external endpoints: %w", name, err)
	}
	if s.short, err = parseEndpoints(fam, sp.GetShortCircuitEndpoints()); err != nil {
		return nil, fmt.Errorf("resource %q: short-circuit endpoints: %w", name, err)
	}
	return s, nil
}

func checkPort(p int32, zeroOK bool) (int, error) {
	if (p == 0 && zeroOK) || (p > 0 && p <= 65535) {
		return int(p), nil
	}
	return 0, fmt.Errorf("%d out of range", p)
}

func parseAddr(fam family, s string) (netip.Addr, error) {
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, err
	}
	a = a.Unmap()
	if !fam.has(a) || a.Zone() != "" {
		return netip.Addr{}, fmt.Errorf("%q is not an %s address", s, fam)
	}
	return a, nil
}

// parseAddrs drops duplicates: a repeated address would render a repeated
// rule, and the partial-update diff works on sets of rules.
func parseAddrs(fam family, in []string) ([]netip.Addr, error) {
	var out []netip.Addr
	for _, s := range in {
		a, err := parseAddr(fam, s)
		if err != nil {
			return nil, err
		}
		if !slices.Contains(out, a) { // lists are short
			out = append(out, a)
		}
	}
	return out, nil
}

func parsePrefixes(fam family, in []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, s := range in {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return nil, err
		}
		// iptables stores the network, so render it that way too: what we
		// write is then byte-for-byte what iptables-save prints.
		p = p.Masked()
		if !fam.has(p.Addr()) {
			return nil, fmt.Errorf("%q is not an %s prefix", s, fam)
		}
		if !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	return out, nil
}

func parseEndpoints(fam family, in []*pb.Endpoint) ([]netip.AddrPort, error) {
	out := make([]netip.AddrPort, 0, len(in))
	var seen map[netip.AddrPort]bool
	if len(in) > 32 { // a linear scan is cheaper below that
		seen = make(map[netip.AddrPort]bool, len(in))
	}
	for _, ep := range in {
		a, err := parseAddr(fam, ep.GetIp())
		if err != nil {
			return nil, err
		}
		p, err := checkPort(ep.GetPort(), false)
		if err != nil {
			return nil, fmt.Errorf("endpoint %s: %w", ep.GetIp(), err)
		}
		ap := netip.AddrPortFrom(a, uint16(p))
		if seen != nil {
			if seen[ap] {
				continue
			}
			seen[ap] = true
		} else if slices.Contains(out, ap) {
			continue
		}
		out = append(out, ap)
	}
	return out, nil
}

// commentFor names the service port as upstream does ("ns/name:port"),
// restricted to characters that need no quoting beyond the surrounding
// double quotes.
func commentFor(sp *pb.ServicePort) string {
	s := sp.GetNamespace() + "/" + sp.GetName()
	if sp.GetPortName() != "" {
		s += ":" + sp.GetPortName()
	}
	b := []byte(s)
	for i, c := range b {
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' ||
			c == '-' || c == '.' || c == '_' || c == '/' || c == ':'
		if !ok {
			b[i] = '_'
		}
	}
	if len(b) > 200 { // the comment match holds 256 bytes, suffixes included
		b = b[:200]
	}
	return string(b)
}

// settings is the NodeSettings resource with the agent's overrides applied,
// for one family.
type settings struct {
	family        family
	clusterCIDRs  []netip.Prefix
	masqueradeAll bool
	// nodePortCIDRs nil means every local address.
	nodePortCIDRs []netip.Prefix
	// noNodePorts is set when NodePortAddresses lists only the other family.
	noNodePorts bool
	nodeIPs     []netip.Addr
	markBit     uint32
}

func tableSettings(t pb.Table) (*pb.NodeSettings, error) {
	var found *pb.NodeSettings
	for name, r := range t {
		if ns := r.GetNodeSettings(); ns != nil {
			if found != nil {
				return nil, fmt.Errorf("table holds more than one NodeSettings resource (%q)", name)
			}
			found = ns
		}
	}
	return found, nil
}

func newSettings(fam family, ns *pb.NodeSettings, cfg Config) (*settings, error) {
	s := &settings{family: fam, masqueradeAll: ns.GetMasqueradeAll(), markBit: cfg.MasqueradeMark}
	var err error
	if s.clusterCIDRs, err = prefixesOf(fam, ns.GetClusterCidrs()); err != nil {
		return nil, fmt.Errorf("cluster CIDRs: %w", err)
	}
	npa := ns.GetNodePortAddresses()
	if cfg.NodePortAddresses != nil {
		npa = cfg.NodePortAddresses
	}
	if len(npa) > 0 {
		if s.nodePortCIDRs, err = prefixesOf(fam, npa); err != nil {
			return nil, fmt.Errorf("node port addresses: %w", err)
		}
		s.noNodePorts = len(s.nodePortCIDRs) == 0
	}
	for _, ip := range cfg.NodeIPs {
		a, err := netip.ParseAddr(ip)
		if err != nil {
			return nil, fmt.Errorf("node IP: %w", err)
		}
		if a = a.Unmap(); fam.has(a) {
			s.nodeIPs = append(s.nodeIPs, a)
		}
	}
	return s, nil
}

// prefixesOf parses every CIDR and keeps those of fam: node-wide lists hold
// both families.
func prefixesOf(fam family, in []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, s := range in {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return nil, err
		}
		if p = p.Masked(); fam.has(p.Addr()) {
			out = append(out, p)
		}
	}
	return out, nil
}

// serviceNames lists the ServicePort resources of one family, sorted so
// that the output is deterministic.
func serviceNames(t pb.Table, fam family) []string {
	names := make([]string, 0, len(t))
	for name, r := range t {
		if sp := r.GetServicePort(); sp != nil && sp.GetFamily() == fam.proto() {
			names = append(names, name)
		}
	}
	sort.Strings(names)
	return names
}

// checkBodies rejects resources the per-family passes would skip
// silently: no body, or a ServicePort without a family.
func checkBodies(prev, next pb.Table, full bool) error {
	for name, r := range next {
		if !full {
			if p, ok := prev[name]; ok && sameResource(p, r) {
				continue
			}
		}
		switch {
		case r.GetNodeSettings() != nil:
		case r.GetServicePort() == nil:
			return fmt.Errorf("resource %q has no known body", name)
		default:
			if _, ok := familyOf(r.GetServicePort().GetFamily()); !ok {
				return fmt.Errorf("resource %q: no IP family", name)
			}
		}
	}
	return nil
}

// sameResource compares by hash, the resource's version; resources built
// without one (tests, tools) are compared by content.
func sameResource(a, b *pb.Resource) bool {
	if a.GetHash() != "" || b.GetHash() != "" {
		return a.GetHash() == b.GetHash()
	}
	return proto.Equal(a, b)
}

func familyService(t pb.Table, name string, fam family) *pb.ServicePort {
	sp := t[name].GetServicePort()
	if sp == nil || sp.GetFamily() != fam.proto() {
		return nil
	}
	return sp
}

// changedNames lists the family's service ports whose hash differs between
// the tables, including added and removed ones.
func changedNames(prev, next pb.Table, fam family) []string {
	var out []string
	for name, r := range next {
		if p, ok := prev[name]; ok && sameResource(p, r) {
			continue
		}
		if familyService(next, name, fam) != nil || familyService(prev, name, fam) != nil {
			out = append(out, name)
		}
	}
	for name := range prev {
		if _, ok := next[name]; !ok && familyService(prev, name, fam) != nil {
			out = append(out, name)
		}
	}
	sort.Strings(out)
	return out
}
