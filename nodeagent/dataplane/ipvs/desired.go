package ipvs

import (
	"net/netip"
	"sort"

	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// Proto is an IP protocol number as IPVS takes it.
type Proto uint16

// The protocols a ServicePort can have.
const (
	TCP  Proto = 6
	UDP  Proto = 17
	SCTP Proto = 132
)

func (p Proto) String() string {
	switch p {
	case TCP:
		return "tcp"
	case UDP:
		return "udp"
	case SCTP:
		return "sctp"
	}
	return "proto" + portMember(uint16(p))
}

// VSKey identifies a virtual server.
type VSKey struct {
	Addr  netip.Addr
	Proto Proto
	Port  uint16
}

func (k VSKey) String() string {
	return k.Proto.String() + "/" + netip.AddrPortFrom(k.Addr, k.Port).String()
}

// RSKey identifies a real server within a virtual server.
type RSKey struct {
	Addr netip.Addr
	Port uint16
}

// IPVS service flags (include/uapi/linux/ip_vs.h).
const (
	flagPersistent = 0x0001
	flagHashed     = 0x0002 // set by the kernel on every service; ignored
	// flagSched1 is mh-fallback for mh (and sh-fallback for sh); kube-proxy
	// sets it for mh so a dead real server's clients move elsewhere.
	flagSched1 = 0x0010
)

// VirtualServer is the wanted state of one IPVS service.
type VirtualServer struct {
	Scheduler string
	Flags     uint32
	Timeout   uint32 // persistence timeout in seconds
	// Reals maps each real server to its weight.
	Reals map[RSKey]int
}

func (v *VirtualServer) sameService(w *VirtualServer) bool {
	return v.Scheduler == w.Scheduler && v.Flags == w.Flags && v.Timeout == w.Timeout
}

// Weights of real servers. Endpoints chosen by the terminating fallback
// are the only ones left for the Service, so they must take new
// connections: upstream gives them weight 1 too. Graceful drain (weight 0)
// is for endpoints that left the table while connections remain, handled
// by the executor.
const (
	readyWeight       = 1
	terminatingWeight = 1
)

// State is everything the plane programs for one table.
type State struct {
	Services map[VSKey]*VirtualServer
	// Addrs are bound to kube-ipvs0.
	Addrs map[netip.Addr]struct{}
	// Sets holds every owned ipset by kernel name, empty ones included.
	Sets map[string]map[string]struct{}
	// Rules holds the iptables-restore input per family.
	Rules map[Family]Rules
}

// Objects is the number of kernel objects the state holds: virtual
// servers, real servers and iptables rules.
func (s State) Objects() int {
	n := len(s.Services)
	for _, v := range s.Services {
		n += len(v.Reals)
	}
	for _, r := range s.Rules {
		n += r.count()
	}
	return n
}

// builder accumulates a State from one table.
type builder struct {
	cfg      Config
	st       State
	nodeIPs  map[netip.Addr]bool
	npIPs    map[Family][]netip.Addr // node IPs that carry NodePorts
	noAccess map[Family][]VSKey      // LB services the node itself must not reach
}

// Desired computes the state a table asks for. It is pure: cfg must carry
// the node's addresses (Config.NodeIPs) and defaults already applied.
func Desired(t pb.Table, cfg Config) State {
	b := &builder{
		cfg: cfg,
		st: State{
			Services: map[VSKey]*VirtualServer{},
			Addrs:    map[netip.Addr]struct{}{},
			Sets:     map[string]map[string]struct{}{},
			Rules:    map[Family]Rules{},
		},
		nodeIPs:  map[netip.Addr]bool{},
		npIPs:    map[Family][]netip.Addr{},
		noAccess: map[Family][]VSKey{},
	}
	for _, f := range cfg.Families {
		for _, base := range setBases() {
			b.st.Sets[setName(f, base)] = map[string]struct{}{}
		}
	}
	settings := &pb.NodeSettings{}
	names := make([]string, 0, len(t))
	for name, r := range t {
		if ns := r.GetNodeSettings(); ns != nil {
			settings = ns
		}
		names = append(names, name)
	}
	// Sorted, so that when two services claim one virtual server the same
	// one wins every time.
	sort.Strings(names)
	b.nodePortIPs(settings.GetNodePortAddresses())
	for _, name := range names {
		if sp := t[name].GetServicePort(); sp != nil {
			b.servicePort(sp)
		}
	}
	for a := range b.st.Addrs {
		b.add(familyOf(a), setBound, a.String())
	}
	for _, f := range cfg.Families {
		b.st.Rules[f] = renderRules(f, cfg, settings, b.noAccess[f])
	}
	return b.st
}

// nodePortIPs picks the node addresses that carry NodePorts: those inside
// node_port_addresses, or all when it names no CIDR of the family.
func (b *builder) nodePortIPs(cidrs []string) {
	byFamily := map[Family][]netip.Prefix{}
	for _, c := range cidrs {
		if p, err := netip.ParsePrefix(c); err == nil {
			byFamily[familyOf(p.Addr())] = append(byFamily[familyOf(p.Addr())], p.Masked())
		}
	}
	for _, a := range b.cfg.NodeIPs {
		a = a.Unmap()
		b.nodeIPs[a] = true
		f := familyOf(a)
		if !b.cfg.hasFamily(f) || !inAny(a, byFamily[f], len(byFamily[f]) == 0) {
			continue
		}
		b.npIPs[f] = append(b.npIPs[f], a)
	}
}

func inAny(a netip.Addr, ps []netip.Prefix, empty bool) bool {
	if empty {
		return true
	}
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

func (b *builder) add(f Family, base, member string) {
	if s := b.st.Sets[setName(f, base)]; s != nil {
		s[member] = struct{}{}
	}
}

// parseAddr parses an address of family f, or returns false.
func parseAddr(s string, f Family) (netip.Addr, bool) {
	a, err := netip.ParseAddr(s)
	if err != nil || a.Zone() != "" {
		return netip.Addr{}, false
	}
	a = a.Unmap()
	return a, familyOf(a) == f
}

func (b *builder) servicePort(sp *pb.ServicePort) {
	var f Family
	switch sp.GetFamily() {
	case pb.IPFamily_IP_FAMILY_IPV4:
		f = V4
	case pb.IPFamily_IP_FAMILY_IPV6:
		f = V6
	default:
		return
	}
	var proto Proto
	switch sp.GetProtocol() {
	case pb.Protocol_PROTOCOL_TCP:
		proto = TCP
	case pb.Protocol_PROTOCOL_UDP:
		proto = UDP
	case pb.Protocol_PROTOCOL_SCTP:
		proto = SCTP
	default:
		return
	}
	if !b.cfg.hasFamily(f) || !validPort(sp.GetPort()) {
		return
	}
	port := uint16(sp.GetPort())
	cluster := b.reals(sp.GetClusterEndpoints(), f)
	external := b.reals(sp.GetExternalEndpoints(), f)
	for _, eps := range [][]*pb.Endpoint{sp.GetClusterEndpoints(), sp.GetExternalEndpoints(), sp.GetShortCircuitEndpoints()} {
		b.loopback(eps, f, proto)
	}
	// One virtual server cannot tell pods from outside clients. With
	// externalTrafficPolicy Local and no local endpoint, the table sends
	// cluster traffic to the cluster endpoints: so does the virtual server,
	// and the no-endpoint action is scoped to traffic from outside the
	// cluster by the firewall rules (kube-proxy's IPVS mode likewise falls
	// back to cluster endpoints, kubernetes#97081).
	// The short-circuit list, when the table sets it (internal and
	// external policy both Local), is the cluster-policy set upstream uses.
	fallback := cluster
	if sc := sp.GetShortCircuitEndpoints(); len(sc) > 0 {
		fallback = b.reals(sc, f)
	}
	extAction, extScoped := sp.GetExternalNoEndpoints(), false
	if len(external) == 0 && sp.GetExternalPolicyLocal() && len(fallback) > 0 {
		external, extScoped = fallback, true
	}
	local := !sp.GetMasqueradeExternal()

	if a, ok := parseAddr(sp.GetClusterIp(), f); ok {
		k := VSKey{a, proto, port}
		if b.virtualServer(k, sp, cluster, sp.GetClusterNoEndpoints(), false) {
			b.st.Addrs[a] = struct{}{}
			b.add(f, setClusterIP, ipPortMember(a, proto, port))
		}
	}
	for _, s := range sp.GetExternalIps() {
		a, ok := parseAddr(s, f)
		if !ok || !b.virtualServer(VSKey{a, proto, port}, sp, external, extAction, extScoped) {
			continue
		}
		// An address the node already has must stay on its interface.
		if !b.nodeIPs[a] {
			b.st.Addrs[a] = struct{}{}
		}
		if local {
			b.add(f, setExternalLocal, ipPortMember(a, proto, port))
		} else {
			b.add(f, setExternalIP, ipPortMember(a, proto, port))
		}
	}
	for _, ing := range sp.GetLoadBalancerIngress() {
		a, ok := parseAddr(ing.GetIp(), f)
		// ipMode Proxy: the load balancer delivers to the node itself.
		if !ok || ing.GetProxy() || !b.virtualServer(VSKey{a, proto, port}, sp, external, extAction, extScoped) {
			continue
		}
		if !b.nodeIPs[a] {
			b.st.Addrs[a] = struct{}{}
		}
		m := ipPortMember(a, proto, port)
		b.add(f, setLB, m)
		if local {
			b.add(f, setLBLocal, m)
		}
		b.sourceRanges(f, VSKey{a, proto, port}, sp.GetLoadBalancerSourceRanges())
	}
	if validPort(sp.GetNodePort()) {
		b.nodePort(f, proto, uint16(sp.GetNodePort()), local, sp, external, extAction, extScoped)
	}
	if validPort(sp.GetHealthCheckNodePort()) {
		b.add(f, setHealthCheck, portMember(uint16(sp.GetHealthCheckNodePort())))
	}
}

func validPort(p int32) bool { return p > 0 && p < 65536 }

// reals converts endpoints to real servers, skipping malformed ones.
func (b *builder) reals(eps []*pb.Endpoint, f Family) map[RSKey]int {
	out := make(map[RSKey]int, len(eps))
	for _, ep := range eps {
		a, ok := parseAddr(ep.GetIp(), f)
		if !ok || !validPort(ep.GetPort()) {
			continue
		}
		w := readyWeight
		if ep.GetTerminating() {
			w = terminatingWeight
		}
		out[RSKey{a, uint16(ep.GetPort())}] = w
	}
	return out
}

// loopback lists every endpoint, not only local ones: the table marks
// locality only where policy needs it, and an entry can only match a
// packet whose source is its own destination, i.e. a pod reaching itself.
func (b *builder) loopback(eps []*pb.Endpoint, f Family, proto Proto) {
	for _, ep := range eps {
		if a, ok := parseAddr(ep.GetIp(), f); ok && validPort(ep.GetPort()) {
			b.add(f, setLoopback, ipPortIPMember(a, proto, uint16(ep.GetPort()), a))
		}
	}
}

// virtualServer adds a virtual server unless another service port holds
// it already, and files it in the no-endpoint sets its action asks for.
func (b *builder) virtualServer(k VSKey, sp *pb.ServicePort, reals map[RSKey]int,
	action pb.NoEndpointsAction, scoped bool) bool {
	if _, dup := b.st.Services[k]; dup {
		return false
	}
	vs := &VirtualServer{Scheduler: b.cfg.Scheduler, Reals: reals}
	if t := sp.GetAffinityTimeoutSeconds(); t > 0 {
		vs.Flags |= flagPersistent
		vs.Timeout = uint32(t)
	}
	if b.cfg.Scheduler == "mh" {
		vs.Flags |= flagSched1
	}
	b.st.Services[k] = vs
	f := familyOf(k.Addr)
	m := ipPortMember(k.Addr, k.Proto, k.Port)
	switch {
	case len(reals) == 0 && action == pb.NoEndpointsAction_NO_ENDPOINTS_ACTION_REJECT:
		b.add(f, setNoEPReject, m)
	case len(reals) == 0 && action == pb.NoEndpointsAction_NO_ENDPOINTS_ACTION_DROP:
		b.add(f, setNoEPDrop, m)
	case scoped && action == pb.NoEndpointsAction_NO_ENDPOINTS_ACTION_REJECT:
		b.add(f, setNoEPExtReject, m)
	case scoped && action == pb.NoEndpointsAction_NO_ENDPOINTS_ACTION_DROP:
		b.add(f, setNoEPExtDrop, m)
	}
	return true
}

// sourceRanges files a load balancer's allowed sources. When no range
// covers a node address, the node itself is blocked by a rule: IPVS
// rewrites node-originated packets in LOCAL_OUT, before the INPUT firewall.
func (b *builder) sourceRanges(f Family, k VSKey, ranges []string) {
	var ps []netip.Prefix
	for _, r := range ranges {
		if p, err := netip.ParsePrefix(r); err == nil && familyOf(p.Addr()) == f {
			ps = append(ps, p)
		}
	}
	if len(ps) == 0 {
		return
	}
	b.add(f, setLBFirewall, ipPortMember(k.Addr, k.Proto, k.Port))
	allowNode := false
	for _, p := range ps {
		b.add(f, setLBSourceCIDR, ipPortNetMember(k.Addr, k.Proto, k.Port, p))
		for a := range b.nodeIPs {
			allowNode = allowNode || p.Contains(a)
		}
	}
	if allowNode {
		b.add(f, setLBSourceIP, ipPortIPMember(k.Addr, k.Proto, k.Port, k.Addr))
	} else {
		b.noAccess[f] = append(b.noAccess[f], k)
	}
}

func (b *builder) nodePort(f Family, proto Proto, np uint16, local bool, sp *pb.ServicePort,
	reals map[RSKey]int, action pb.NoEndpointsAction, scoped bool) {
	switch proto {
	case TCP, UDP:
		all, loc := setNodePortTCP, setNodePortLTCP
		if proto == UDP {
			all, loc = setNodePortUDP, setNodePortLUDP
		}
		b.add(f, all, portMember(np))
		if local {
			b.add(f, loc, portMember(np))
		}
	case SCTP:
		for _, a := range b.npIPs[f] {
			b.add(f, setNodePortSCTP, ipPortMember(a, proto, np))
			if local {
				b.add(f, setNodePortLSCTP, ipPortMember(a, proto, np))
			}
		}
	}
	for _, a := range b.npIPs[f] {
		b.virtualServer(VSKey{a, proto, np}, sp, reals, action, scoped)
	}
}
