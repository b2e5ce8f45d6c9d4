// Package conntrack removes UDP conntrack entries that rule changes leave
// stale. UDP has no connection teardown: an entry created while a Service
// pointed at an endpoint keeps steering the client's packets to it after the
// endpoint is gone, and an entry created while the Service had no endpoints
// (the packet was rejected, never DNATed) keeps bypassing the new rules.
//
// Which entries are stale is decided from the tables alone (Targets, pure);
// Cleaner only deletes what a Target says, so every data plane (iptables,
// IPVS, nftables) shares the decision.
package conntrack

import (
	"fmt"
	"net"
	"net/netip"
	"sort"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// Target says: UDP flows of Family whose original destination is one of
// Addrs (or any address at NodePort, when set) must be answered by one of
// Keep; every other such flow is stale.
type Target struct {
	Family   pb.IPFamily
	Addrs    []netip.AddrPort
	NodePort uint16
	Keep     map[netip.AddrPort]bool
}

// Targets returns what to clean after the kernel moved from prev to next:
// UDP service ports that lost an endpoint, went from no endpoints to some,
// lost an address, or disappeared. A nil prev means "unknown" (a full
// sync): every UDP service port of next is reconciled.
func Targets(prev, next pb.Table) []Target {
	var out []Target
	names := make([]string, 0, len(next))
	for name, r := range next {
		if r.GetServicePort().GetProtocol() == pb.Protocol_PROTOCOL_UDP {
			names = append(names, name)
		}
	}
	for name, r := range prev {
		if _, ok := next[name]; !ok && r.GetServicePort().GetProtocol() == pb.Protocol_PROTOCOL_UDP {
			names = append(names, name)
		}
	}
	sort.Strings(names)
	for _, name := range names {
		var p, n *pb.ServicePort
		if r, ok := prev[name]; ok {
			p = r.GetServicePort()
		}
		if r, ok := next[name]; ok {
			n = r.GetServicePort()
		}
		if prev != nil && p != nil && n != nil && same(prev[name], next[name]) {
			continue
		}
		out = append(out, targetsFor(prev == nil, p, n)...)
	}
	return out
}

// same compares by hash, the resource's version, or by content when a
// resource was built without one.
func same(a, b *pb.Resource) bool {
	if a.GetHash() != "" || b.GetHash() != "" {
		return a.GetHash() == b.GetHash()
	}
	return proto.Equal(a, b)
}

func targetsFor(full bool, p, n *pb.ServicePort) []Target {
	var out []Target
	if n != nil && n.GetProtocol() == pb.Protocol_PROTOCOL_UDP {
		keep := endpointSet(n)
		if full || p == nil || needsCleaning(p, n, keep) {
			out = append(out, Target{Family: n.GetFamily(), Addrs: serviceAddrs(n), NodePort: uint16(n.GetNodePort()), Keep: keep})
		}
	}
	if p != nil && p.GetProtocol() == pb.Protocol_PROTOCOL_UDP {
		// Addresses the service no longer has: nothing may use them.
		var gone []netip.AddrPort
		still := map[netip.AddrPort]bool{}
		if n != nil && n.GetProtocol() == pb.Protocol_PROTOCOL_UDP {
			for _, a := range serviceAddrs(n) {
				still[a] = true
			}
		}
		for _, a := range serviceAddrs(p) {
			if !still[a] {
				gone = append(gone, a)
			}
		}
		var np uint16
		if p.GetNodePort() != 0 && (n == nil || n.GetNodePort() != p.GetNodePort() || n.GetProtocol() != pb.Protocol_PROTOCOL_UDP) {
			np = uint16(p.GetNodePort())
		}
		if len(gone) > 0 || np != 0 {
			out = append(out, Target{Family: p.GetFamily(), Addrs: gone, NodePort: np, Keep: map[netip.AddrPort]bool{}})
		}
	}
	return out
}

// needsCleaning is true when a flow could point somewhere next no longer
// allows: an endpoint was removed, or the port had none (flows were not
// DNATed) and now has some.
func needsCleaning(p, n *pb.ServicePort, keep map[netip.AddrPort]bool) bool {
	before := endpointSet(p)
	if len(before) == 0 && len(keep) > 0 {
		return true
	}
	for ep := range before {
		if !keep[ep] {
			return true
		}
	}
	return false
}

func endpointSet(sp *pb.ServicePort) map[netip.AddrPort]bool {
	out := map[netip.AddrPort]bool{}
	for _, list := range [][]*pb.Endpoint{sp.GetClusterEndpoints(), sp.GetExternalEndpoints()} {
		for _, ep := range list {
			a, err := netip.ParseAddr(ep.GetIp())
			if err != nil || ep.GetPort() <= 0 || ep.GetPort() > 65535 {
				continue // the renderer rejects such a table before we get here
			}
			out[netip.AddrPortFrom(a.Unmap(), uint16(ep.GetPort()))] = true
		}
	}
	return out
}

func serviceAddrs(sp *pb.ServicePort) []netip.AddrPort {
	port := sp.GetPort()
	if port <= 0 || port > 65535 {
		return nil
	}
	ips := []string{sp.GetClusterIp()}
	ips = append(ips, sp.GetExternalIps()...)
	for _, lb := range sp.GetLoadBalancerIngress() {
		ips = append(ips, lb.GetIp())
	}
	var out []netip.AddrPort
	for _, s := range ips {
		if a, err := netip.ParseAddr(s); err == nil {
			out = append(out, netip.AddrPortFrom(a.Unmap(), uint16(port)))
		}
	}
	return out
}

// Cleaner deletes flows through one netlink socket, opened in the network
// namespace that was current when NewCleaner ran.
type Cleaner struct {
	h *netlink.Handle
}

// NewCleaner opens the netlink socket in the current network namespace.
func NewCleaner() (*Cleaner, error) {
	h, err := netlink.NewHandle(unix.NETLINK_NETFILTER)
	if err != nil {
		return nil, fmt.Errorf("conntrack: netlink: %w", err)
	}
	return &Cleaner{h: h}, nil
}

// Close releases the socket.
func (c *Cleaner) Close() { c.h.Close() }

// Clean deletes the stale flows the targets describe and returns how many
// it deleted. The kernel's table is dumped once per family with targets.
func (c *Cleaner) Clean(targets []Target) (int, error) {
	total := 0
	for _, fam := range []pb.IPFamily{pb.IPFamily_IP_FAMILY_IPV4, pb.IPFamily_IP_FAMILY_IPV6} {
		f := newFilter(fam, targets)
		if f == nil {
			continue
		}
		nlFam := netlink.InetFamily(unix.AF_INET)
		if fam == pb.IPFamily_IP_FAMILY_IPV6 {
			nlFam = unix.AF_INET6
		}
		n, err := c.h.ConntrackDeleteFilters(netlink.ConntrackTable, nlFam, f)
		total += int(n)
		if err != nil {
			return total, fmt.Errorf("conntrack: delete %s flows: %w", fam, err)
		}
	}
	return total, nil
}

// filter matches stale UDP flows of one family.
type filter struct {
	addrs     map[netip.AddrPort]map[netip.AddrPort]bool
	nodePorts map[uint16]map[netip.AddrPort]bool
}

func newFilter(fam pb.IPFamily, targets []Target) *filter {
	f := &filter{addrs: map[netip.AddrPort]map[netip.AddrPort]bool{}, nodePorts: map[uint16]map[netip.AddrPort]bool{}}
	for _, t := range targets {
		if t.Family != fam {
			continue
		}
		for _, a := range t.Addrs {
			f.addrs[a] = t.Keep
		}
		if t.NodePort != 0 {
			f.nodePorts[t.NodePort] = t.Keep
		}
	}
	if len(f.addrs) == 0 && len(f.nodePorts) == 0 {
		return nil
	}
	return f
}

// MatchConntrackFlow implements netlink.CustomConntrackFilter.
func (f *filter) MatchConntrackFlow(flow *netlink.ConntrackFlow) bool {
	if flow.Forward.Protocol != unix.IPPROTO_UDP {
		return false
	}
	dst, ok1 := addrPort(flow.Forward.DstIP, flow.Forward.DstPort)
	replySrc, ok2 := addrPort(flow.Reverse.SrcIP, flow.Reverse.SrcPort)
	if !ok1 || !ok2 {
		return false
	}
	if keep, ok := f.addrs[dst]; ok {
		return !keep[replySrc]
	}
	if keep, ok := f.nodePorts[dst.Port()]; ok {
		return !keep[replySrc]
	}
	return false
}

func addrPort(ip net.IP, port uint16) (netip.AddrPort, bool) {
	a, ok := netip.AddrFromSlice(ip)
	if !ok {
		return netip.AddrPort{}, false
	}
	return netip.AddrPortFrom(a.Unmap(), port), true
}
