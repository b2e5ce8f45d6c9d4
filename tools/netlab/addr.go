package netlab

import (
	"fmt"
	"net/netip"
)

// The address plan. Every lab address is inside the benchmarking ranges
// (RFC 2544 198.18.0.0/15, RFC 5180 2001:2::/48), which are routed nowhere,
// and exists only inside lab namespaces. Labs with different names reuse the
// same addresses: they never share a link, so they cannot collide.
//
//	198.18.0.0/24     node network: router .1, control .2, node i .(10+i)
//	198.18.1.0/24     client network: router .1, client .10
//	198.18.16.0/20    cluster CIDR: node i owns 198.18.(16+i).0/24,
//	                  its pods' gateway .1, its pod j .(10+j)
//	198.18.64.0/20    service CIDR (not configured by the lab; reserved)
//	198.18.200.0/24   external / LoadBalancer IPs (see Lab.RouteVia)
//	198.18.250.0/24   reserved for the VM runner's user network
//
// IPv6 mirrors it with the third/fourth group as the "subnet":
//
//	2001:2::/64        node network: router ::1, control ::2, node i ::(0x10+i)
//	2001:2:0:1::/64    client network: router ::1, client ::10
//	2001:2:0:10::/60   cluster CIDR: node i owns 2001:2:0:(0x10+i)::/64,
//	                   gateway ::1, pod j ::(0x10+j)
//	2001:2:0:100::/112 service CIDR (reserved)
//	2001:2:0:200::/64  external / LoadBalancer IPs
var (
	LabRange4    = netip.MustParsePrefix("198.18.0.0/15")
	LabRange6    = netip.MustParsePrefix("2001:2::/48")
	NodeNet4     = netip.MustParsePrefix("198.18.0.0/24")
	NodeNet6     = netip.MustParsePrefix("2001:2::/64")
	ClientNet4   = netip.MustParsePrefix("198.18.1.0/24")
	ClientNet6   = netip.MustParsePrefix("2001:2:0:1::/64")
	ClusterCIDR4 = netip.MustParsePrefix("198.18.16.0/20")
	ClusterCIDR6 = netip.MustParsePrefix("2001:2:0:10::/60")
	ServiceCIDR4 = netip.MustParsePrefix("198.18.64.0/20")
	ServiceCIDR6 = netip.MustParsePrefix("2001:2:0:100::/112")
	ExternalNet4 = netip.MustParsePrefix("198.18.200.0/24")
	ExternalNet6 = netip.MustParsePrefix("2001:2:0:200::/64")
)

// Limits that follow from the plan: 15 pod /24s fit in the /20 cluster CIDR
// (index 0 is left unused so node i owns 198.18.(16+i).0), and pod j sits at
// .(10+j) of its node's /24.
const (
	MaxNodes       = 15
	MaxPodsPerNode = 200
)

// Well-known host numbers inside each subnet.
const (
	hostRouter  = 1
	hostControl = 2
	hostClient  = 10
	hostGateway = 1
)

// v4 returns 198.18.<subnet>.<host>.
func v4(subnet, host int) netip.Addr {
	return netip.AddrFrom4([4]byte{198, 18, byte(subnet), byte(host)})
}

// v6 returns 2001:2:0:<subnet>::<host>.
func v6(subnet, host int) netip.Addr {
	return netip.AddrFrom16([16]byte{
		0x20, 0x01, 0x00, 0x02, 0, 0, byte(subnet >> 8), byte(subnet),
		0, 0, 0, 0, 0, 0, byte(host >> 8), byte(host),
	})
}

// nodeAddrs returns the addresses of node i (1-based) and its pod CIDRs.
func nodeAddrs(i int) (ip4, ip6 netip.Addr, pods4, pods6 netip.Prefix) {
	return v4(0, 10+i), v6(0, 0x10+i),
		netip.PrefixFrom(v4(16+i, 0), 24), netip.PrefixFrom(v6(0x10+i, 0), 64)
}

// podAddrs returns the addresses of pod j (1-based) on node i (1-based).
func podAddrs(i, j int) (ip4, ip6 netip.Addr) {
	return v4(16+i, 10+j), v6(0x10+i, 0x10+j)
}

// gateways returns the pods' gateway addresses on node i (1-based).
func gateways(i int) (gw4, gw6 netip.Addr) {
	return v4(16+i, hostGateway), v6(0x10+i, hostGateway)
}

// checkLabPrefix refuses anything outside the lab ranges, so a test cannot
// make the lab route a real network.
func checkLabPrefix(p netip.Prefix) error {
	p = p.Masked()
	for _, r := range []netip.Prefix{LabRange4, LabRange6} {
		if r.Contains(p.Addr()) && p.Bits() >= r.Bits() {
			return nil
		}
	}
	return fmt.Errorf("netlab: prefix %s is outside the lab ranges %s and %s", p, LabRange4, LabRange6)
}
