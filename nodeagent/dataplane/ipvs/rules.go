package ipvs

import (
	"net/netip"
	"strconv"
	"strings"

	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// Chains the plane owns, in both families. Distinct from the iptables
// plane's chains, so that a mode switch can clean one up without touching
// the other.
const (
	chainServices    = "SBX-IPVS-SERVICES"      // nat: PREROUTING, OUTPUT
	chainPostrouting = "SBX-IPVS-POSTROUTING"   // nat: POSTROUTING
	chainNodePorts   = "SBX-IPVS-NODE-PORTS"    // nat
	chainLB          = "SBX-IPVS-LOAD-BALANCER" // nat
	chainClusterIP   = "SBX-IPVS-CLUSTER-IP"    // nat: masquerade off-cluster sources
	chainMarkMasq    = "SBX-IPVS-MARK-MASQ"     // nat
	chainForward     = "SBX-IPVS-FORWARD"       // filter: FORWARD
	chainFilter      = "SBX-IPVS-FILTER"        // filter: INPUT; host ports on service IPs
	chainFirewall    = "SBX-IPVS-FIREWALL"      // filter: INPUT, FORWARD
	chainSrcRanges   = "SBX-IPVS-SOURCE-RANGES" // filter
	chainExtReject   = "SBX-IPVS-EXT-REJECT"    // filter
	chainExtDrop     = "SBX-IPVS-EXT-DROP"      // filter
	chainHealthCheck = "SBX-IPVS-HEALTH-CHECK"  // filter: INPUT
	chainOutFilter   = "SBX-IPVS-OUT-FILTER"    // filter: OUTPUT
)

var (
	natChains    = []string{chainServices, chainPostrouting, chainNodePorts, chainLB, chainClusterIP, chainMarkMasq}
	filterChains = []string{chainForward, chainFilter, chainFirewall, chainSrcRanges, chainExtReject, chainExtDrop, chainHealthCheck, chainOutFilter}
)

// jump is a rule in a built-in chain that enters one of ours.
type jump struct{ table, from, to string }

// jumps in the order they must appear in each built-in chain.
var jumps = []jump{
	{"nat", "PREROUTING", chainServices},
	{"nat", "OUTPUT", chainServices},
	{"nat", "POSTROUTING", chainPostrouting},
	{"filter", "INPUT", chainFilter},
	{"filter", "INPUT", chainFirewall},
	{"filter", "INPUT", chainHealthCheck},
	{"filter", "FORWARD", chainFirewall},
	{"filter", "FORWARD", chainForward},
	{"filter", "OUTPUT", chainOutFilter},
}

// jumpComment marks our jumps; no spaces, so iptables-save prints it as is.
const jumpComment = "signalbox-ipvs"

// rule is the jump as iptables-save prints it, without the leading -A/-I/-D.
func (j jump) rule() string {
	return j.from + " -m comment --comment " + jumpComment + " -j " + j.to
}

// Rules is the iptables-restore input for one family's owned chains; the
// executor adds the jumps from built-in chains.
type Rules struct {
	Nat, Filter []string
}

func (r Rules) count() int { return len(r.Nat) + len(r.Filter) }

func (r Rules) equal(s Rules) bool {
	return strings.Join(r.Nat, "\n") == strings.Join(s.Nat, "\n") &&
		strings.Join(r.Filter, "\n") == strings.Join(s.Filter, "\n")
}

// renderRules writes the fixed rule set of kube-proxy's IPVS mode for one
// family. Only the cluster CIDRs, masquerade_all and the load balancers the
// node may not reach change it; everything per service lives in the sets.
func renderRules(f Family, cfg Config, ns *pb.NodeSettings, noAccess []VSKey) Rules {
	set := func(base string) string { return "-m set --match-set " + setName(f, base) }
	mark := cfg.masqMark() + "/" + cfg.masqMark()
	var cidrs []string
	for _, c := range ns.GetClusterCidrs() {
		if p, err := netip.ParsePrefix(c); err == nil && familyOf(p.Addr()) == f {
			cidrs = append(cidrs, p.Masked().String())
		}
	}
	loopback := "127.0.0.0/8"
	if f == V6 {
		loopback = "::1/128"
	}
	var r Rules
	nat := func(chain, rest string) { r.Nat = append(r.Nat, "-A "+chain+" "+rest) }
	filter := func(chain, rest string) { r.Filter = append(r.Filter, "-A "+chain+" "+rest) }

	// Connections from localhost are never masqueraded nor redirected here.
	nat(chainServices, "-s "+loopback+" -j RETURN")
	nat(chainServices, set(setLB)+" dst,dst -j "+chainLB)
	switch {
	case ns.GetMasqueradeAll():
		nat(chainServices, set(setClusterIP)+" dst,dst -j "+chainMarkMasq)
	case len(cidrs) > 0:
		nat(chainServices, set(setClusterIP)+" dst,dst -j "+chainClusterIP)
		for _, c := range cidrs {
			nat(chainClusterIP, "-s "+c+" -j RETURN")
		}
		nat(chainClusterIP, "-j "+chainMarkMasq)
	default:
		// Without a cluster CIDR, masquerade at least node processes that
		// picked a service address on kube-ipvs0 as their source.
		nat(chainServices, set(setClusterIP)+" src,dst -j "+chainMarkMasq)
	}
	nat(chainServices, set(setExternalIP)+" dst,dst -j "+chainMarkMasq)
	// Service addresses are done here: a service port that happens to equal
	// a NodePort must not fall into the NodePort rules below.
	for _, base := range []string{setClusterIP, setLB, setExternalIP, setExternalLocal} {
		nat(chainServices, set(base)+" dst,dst -j ACCEPT")
	}
	nat(chainServices, "-m addrtype --dst-type LOCAL -j "+chainNodePorts)
	nat(chainLB, set(setLBLocal)+" dst,dst -j RETURN")
	nat(chainLB, "-j "+chainMarkMasq)
	for _, np := range []struct{ proto, local, all, match string }{
		{"tcp", setNodePortLTCP, setNodePortTCP, "dst"},
		{"udp", setNodePortLUDP, setNodePortUDP, "dst"},
		{"sctp", setNodePortLSCTP, setNodePortSCTP, "dst,dst"},
	} {
		nat(chainNodePorts, "-p "+np.proto+" "+set(np.local)+" "+np.match+" -j RETURN")
		nat(chainNodePorts, "-p "+np.proto+" "+set(np.all)+" "+np.match+" -j "+chainMarkMasq)
	}
	// Hairpin: a pod whose connection to its own service landed on itself.
	nat(chainPostrouting, set(setLoopback)+" dst,dst,src -j MASQUERADE")
	nat(chainPostrouting, "-m mark ! --mark "+mark+" -j RETURN")
	// Clear the mark so a packet that traverses the stack again is not
	// masqueraded twice.
	nat(chainPostrouting, "-j MARK --xor-mark "+cfg.masqMark())
	nat(chainPostrouting, "-j MASQUERADE --random-fully")
	nat(chainMarkMasq, "-j MARK --or-mark "+cfg.masqMark())

	filter(chainForward, "-m mark --mark "+mark+" -j ACCEPT")
	filter(chainForward, "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")
	// Service addresses live on kube-ipvs0, so the host's own listeners
	// would answer on them: only service ports may open connections.
	for _, base := range []string{setLB, setClusterIP, setExternalIP, setExternalLocal} {
		filter(chainFilter, set(base)+" dst,dst -j RETURN")
	}
	filter(chainFilter, "-p tcp "+set(setHealthCheck)+" dst -j RETURN")
	filter(chainFilter, "-m conntrack --ctstate NEW "+set(setBound)+" dst -j REJECT")
	// INPUT filters run before IPVS takes the packet in LOCAL_IN.
	filter(chainFirewall, set(setLBFirewall)+" dst,dst -j "+chainSrcRanges)
	filter(chainFirewall, set(setNoEPReject)+" dst,dst -j REJECT")
	filter(chainFirewall, set(setNoEPDrop)+" dst,dst -j DROP")
	filter(chainFirewall, set(setNoEPExtReject)+" dst,dst -j "+chainExtReject)
	filter(chainFirewall, set(setNoEPExtDrop)+" dst,dst -j "+chainExtDrop)
	filter(chainSrcRanges, set(setLBSourceCIDR)+" dst,dst,src -j RETURN")
	filter(chainSrcRanges, set(setLBSourceIP)+" dst,dst,src -j RETURN")
	filter(chainSrcRanges, "-j DROP")
	for _, c := range cidrs {
		filter(chainExtReject, "-s "+c+" -j RETURN")
		filter(chainExtDrop, "-s "+c+" -j RETURN")
	}
	filter(chainExtReject, "-j REJECT")
	filter(chainExtDrop, "-j DROP")
	filter(chainHealthCheck, "-p tcp "+set(setHealthCheck)+" dst -j ACCEPT")
	// After IPVS rewrote a node-originated packet in LOCAL_OUT, only the
	// ipvs match still knows which virtual server it was for.
	for _, k := range noAccess {
		a := k.Addr.String()
		filter(chainOutFilter, "-s "+a+" -m ipvs --vaddr "+a+" --vproto "+k.Proto.String()+
			" --vport "+strconv.Itoa(int(k.Port))+" -j DROP")
	}
	return r
}

// restoreInput is the input of `iptables-restore --noflush`: it flushes and
// refills the owned chains, deletes the listed jumps and inserts the
// missing ones in order. With clean, it deletes the owned chains instead.
func restoreInput(r Rules, delJumps, addJumps []jump, clean bool) string {
	var b strings.Builder
	for _, t := range []struct {
		name   string
		chains []string
		rules  []string
	}{{"nat", natChains, r.Nat}, {"filter", filterChains, r.Filter}} {
		b.WriteString("*" + t.name + "\n")
		for _, c := range t.chains {
			b.WriteString(":" + c + " - [0:0]\n")
		}
		for _, j := range delJumps {
			if j.table == t.name {
				b.WriteString("-D " + j.rule() + "\n")
			}
		}
		// Inserted at the top in reverse, so they end up in list order.
		for i := len(addJumps) - 1; i >= 0; i-- {
			if j := addJumps[i]; j.table == t.name {
				b.WriteString("-I " + strings.Replace(j.rule(), " ", " 1 ", 1) + "\n")
			}
		}
		if clean {
			for _, c := range t.chains {
				b.WriteString("-X " + c + "\n")
			}
		} else {
			for _, l := range t.rules {
				b.WriteString(l + "\n")
			}
		}
		b.WriteString("COMMIT\n")
	}
	return b.String()
}

// jumpsToFix compares the jumps in iptables-save output with the wanted
// ones. If any is missing or out of order, all present ones are deleted
// and all re-inserted, in one atomic restore.
func jumpsToFix(save string) (del, add []jump) {
	present := map[string][]int{} // rule -> positions in its chain
	pos := map[string]int{}       // table/chain -> rules seen
	table := ""
	for _, l := range strings.Split(save, "\n") {
		switch {
		case strings.HasPrefix(l, "*"):
			table = l[1:]
		case strings.HasPrefix(l, "-A "):
			chain, _, _ := strings.Cut(l[3:], " ")
			pos[table+"/"+chain]++
			present[table+"/"+l[3:]] = append(present[table+"/"+l[3:]], pos[table+"/"+chain])
		}
	}
	ok, last := true, map[string]int{}
	for _, j := range jumps {
		ps := present[j.table+"/"+j.rule()]
		key := j.table + "/" + j.from
		if len(ps) != 1 || ps[0] <= last[key] {
			ok = false
		}
		if len(ps) > 0 {
			last[key] = ps[0]
		}
		for range ps {
			del = append(del, j)
		}
	}
	if ok {
		return nil, nil
	}
	return del, jumps
}

// ownedJumps lists the jumps present in iptables-save output, once per
// copy, for Cleanup.
func ownedJumps(save string) []jump {
	var out []jump
	table := ""
	for _, l := range strings.Split(save, "\n") {
		if strings.HasPrefix(l, "*") {
			table = l[1:]
		}
		for _, j := range jumps {
			if j.table == table && l == "-A "+j.rule() {
				out = append(out, j)
			}
		}
	}
	return out
}
