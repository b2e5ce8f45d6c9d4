package ipvs

import (
	"bufio"
	"fmt"
	"net/netip"
	"sort"
	"strconv"
	"strings"
)

// The ipsets the plane owns, one of each per family. The fixed iptables
// rules match them, so a service change is a set member change and never a
// rule change.
const (
	setLoopback      = "LOOPBACK"        // hash:ip,port,ip  endpoint,proto:port,endpoint: hairpin
	setClusterIP     = "CLUSTER-IP"      // hash:ip,port     cluster IPs
	setExternalIP    = "EXTERNAL-IP"     // hash:ip,port     external IPs, masqueraded
	setExternalLocal = "EXTERNAL-LOCAL"  // hash:ip,port     external IPs, source kept
	setLB            = "LB"              // hash:ip,port     load balancer IPs
	setLBLocal       = "LB-LOCAL"        // hash:ip,port     load balancer IPs, source kept
	setLBFirewall    = "LB-FW"           // hash:ip,port     load balancer IPs with source ranges
	setLBSourceCIDR  = "LB-SRC-CIDR"     // hash:ip,port,net allowed source ranges
	setLBSourceIP    = "LB-SRC-IP"       // hash:ip,port,ip  the node itself, when a range allows it
	setNodePortTCP   = "NP-TCP"          // bitmap:port
	setNodePortLTCP  = "NP-LOCAL-TCP"    // bitmap:port      source kept
	setNodePortUDP   = "NP-UDP"          // bitmap:port
	setNodePortLUDP  = "NP-LOCAL-UDP"    // bitmap:port      source kept
	setNodePortSCTP  = "NP-SCTP"         // hash:ip,port     (bitmap:port has no SCTP)
	setNodePortLSCTP = "NP-LOCAL-SCTP"   // hash:ip,port     source kept
	setHealthCheck   = "HC-NP"           // bitmap:port      health check node ports
	setBound         = "IPS"             // hash:ip          every address on kube-ipvs0
	setNoEPReject    = "NOEP-REJECT"     // hash:ip,port     virtual servers without endpoints
	setNoEPDrop      = "NOEP-DROP"       // hash:ip,port
	setNoEPExtReject = "NOEP-EXT-REJECT" // hash:ip,port     same, only for traffic from outside the cluster
	setNoEPExtDrop   = "NOEP-EXT-DROP"   // hash:ip,port
)

var setTypes = map[string]string{
	setLoopback: "hash:ip,port,ip", setClusterIP: "hash:ip,port", setExternalIP: "hash:ip,port",
	setExternalLocal: "hash:ip,port", setLB: "hash:ip,port", setLBLocal: "hash:ip,port",
	setLBFirewall: "hash:ip,port", setLBSourceCIDR: "hash:ip,port,net", setLBSourceIP: "hash:ip,port,ip",
	setNodePortTCP: "bitmap:port", setNodePortLTCP: "bitmap:port", setNodePortUDP: "bitmap:port",
	setNodePortLUDP: "bitmap:port", setNodePortSCTP: "hash:ip,port", setNodePortLSCTP: "hash:ip,port",
	setHealthCheck: "bitmap:port", setBound: "hash:ip", setNoEPReject: "hash:ip,port",
	setNoEPDrop: "hash:ip,port", setNoEPExtReject: "hash:ip,port", setNoEPExtDrop: "hash:ip,port",
}

// setPrefix starts the name of every set the plane owns.
const setPrefix = "SBX-IPVS"

// setName is the kernel name of a set: SBX-IPVS-CLUSTER-IP, SBX-IPVS6-CLUSTER-IP.
func setName(f Family, base string) string {
	if f == V6 {
		return setPrefix + "6-" + base
	}
	return setPrefix + "-" + base
}

func setBases() []string {
	bases := make([]string, 0, len(setTypes))
	for b := range setTypes {
		bases = append(bases, b)
	}
	sort.Strings(bases)
	return bases
}

// createLine is an `ipset restore` line creating a set. Hash sets get a
// large maxelem: the loopback set holds every endpoint, 100,000 at scale.
func createLine(f Family, base string) string {
	typ := setTypes[base]
	if typ == "bitmap:port" {
		return fmt.Sprintf("create %s %s range 0-65535", setName(f, base), typ)
	}
	fam := "inet"
	if f == V6 {
		fam = "inet6"
	}
	return fmt.Sprintf("create %s %s family %s hashsize 1024 maxelem 1048576", setName(f, base), typ, fam)
}

// Members are written exactly as `ipset save` prints them, so that a set
// read back from the kernel compares equal to the desired one.

func ipPortMember(a netip.Addr, p Proto, port uint16) string {
	return a.String() + "," + p.String() + ":" + strconv.Itoa(int(port))
}

func ipPortIPMember(a netip.Addr, p Proto, port uint16, b netip.Addr) string {
	return ipPortMember(a, p, port) + "," + b.String()
}

func ipPortNetMember(a netip.Addr, p Proto, port uint16, n netip.Prefix) string {
	n = n.Masked()
	if n.IsSingleIP() {
		return ipPortMember(a, p, port) + "," + n.Addr().String()
	}
	return ipPortMember(a, p, port) + "," + n.String()
}

func portMember(port uint16) string { return strconv.Itoa(int(port)) }

// parseSetMembers reads `ipset save` output and returns the members of the
// sets the plane owns, by set name. Sets that exist but are empty are
// present with an empty map.
func parseSetMembers(out string) map[string]map[string]struct{} {
	sets := map[string]map[string]struct{}{}
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 2 || !strings.HasPrefix(f[1], setPrefix) {
			continue
		}
		switch {
		case f[0] == "create":
			if sets[f[1]] == nil {
				sets[f[1]] = map[string]struct{}{}
			}
		case f[0] == "add" && len(f) >= 3:
			if sets[f[1]] == nil {
				sets[f[1]] = map[string]struct{}{}
			}
			sets[f[1]][f[2]] = struct{}{}
		}
	}
	return sets
}
