package iptables

import (
	"math"
	"net/netip"
	"slices"
	"strconv"

	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// top is a dispatch chain shared by all services: a service owns rows in
// it, not the chain.
type top int

const (
	natServices top = iota
	natNodePorts
	filterServices
	filterExternal
	filterNodePorts
	filterFirewall
	numTops
)

var topChains = [numTops]struct {
	nat   bool
	chain string
}{
	natServices:     {true, chainServices},
	natNodePorts:    {true, chainNodePorts},
	filterServices:  {false, chainServices},
	filterExternal:  {false, chainExternalServices},
	filterNodePorts: {false, chainNodePorts},
	filterFirewall:  {false, chainFirewall},
}

// isDispatch reports whether a chain holds the rows of many services. Row
// order there carries no meaning: partial updates insert new rows at the
// top, and only the fixed tail must stay last.
func isDispatch(table, chain string) bool {
	for _, tc := range topChains {
		if tc.chain == chain && tc.nat == (table == "nat") {
			return true
		}
	}
	return false
}

type row struct {
	top  top
	spec string // the rule after "-A CHAIN "
}

// rendered is everything one service port puts into the kernel, except
// the rules of its own chains, which go to the body buffer.
type rendered struct {
	rows   []row
	chains []string // nat chains the service owns
	rules  int
}

// renderService appends the rules of the service's chains to body and
// returns the rest. A full render passes one buffer for all services.
func renderService(s *svcPort, st *settings, body []byte) (*rendered, []byte) {
	h := shortHash(s.name)
	svc, svx, svs, ext, fw := prefixSVC+h, prefixSVX+h, prefixSVS+h, prefixEXT+h, prefixFW+h
	r := &rendered{}

	hasCluster, hasExternal := len(s.cluster) > 0, len(s.external) > 0
	accessible := s.nodePort != 0 || len(s.externalIPs) > 0 || len(s.lbIPs) > 0
	// Under externalTrafficPolicy Local, pods and the node reach external
	// destinations through upstream's Cluster-policy endpoints: the
	// short-circuit ones when the table sets them, else the cluster ones.
	short := s.cluster
	if len(s.short) > 0 {
		short = s.short
	}
	hasShort := s.extLocal && len(short) > 0
	// The EXT chain exists whenever anything can serve: even with no
	// external endpoints it short-circuits pod and node traffic. Under
	// Local policy that is exactly when the Cluster-policy endpoints are
	// not empty (upstream's hasEndpoints); without them upstream has no
	// chains at all and every destination gets the no-endpoints action.
	usesExt := accessible && (hasCluster || hasExternal)
	if s.extLocal {
		usesExt = accessible && hasShort
	}
	extTarget := ""
	if hasExternal {
		extTarget = svx
		if hasCluster && slices.Equal(s.cluster, s.external) {
			extTarget = svc // one chain serves both, as upstream's Cluster policy
		}
	}
	shortTarget := ""
	if hasShort {
		switch {
		case hasCluster && slices.Equal(short, s.cluster):
			shortTarget = svc
		case extTarget == svx && slices.Equal(short, s.external):
			shortTarget = svx
		default:
			shortTarget = svs
		}
	}
	// rejectExt: external destinations that no EXT chain serves.
	rejectExt := !hasExternal || !usesExt
	usesFW := usesExt && len(s.lbIPs) > 0 && len(s.sourceRanges) > 0

	add := func(t top, spec string) {
		r.rows = append(r.rows, row{t, spec})
		r.rules++
	}

	// Capture. Unserved traffic is answered in the filter table, because
	// the nat table cannot REJECT; it matches only packets no nat rule
	// DNATed (their destination is still the service address).
	if s.clusterIP.IsValid() {
		if hasCluster {
			add(natServices, dispatch(s.clusterIP, s, "", "cluster IP", s.port, "-j "+svc))
		} else {
			add(filterServices, dispatch(s.clusterIP, s, "", "has no endpoints", s.port, st.action(s.clusterNoEP)))
		}
	}
	for _, ip := range s.externalIPs {
		if usesExt {
			add(natServices, dispatch(ip, s, "", "external IP", s.port, "-j "+ext))
		}
		if rejectExt {
			add(filterExternal, dispatch(ip, s, "", "has no external endpoints", s.port, st.action(s.externalNoEP)))
		}
	}
	for _, ip := range s.lbIPs {
		if usesExt {
			target := ext
			if usesFW {
				target = fw
			}
			add(natServices, dispatch(ip, s, "", "loadbalancer IP", s.port, "-j "+target))
		}
		if usesFW {
			add(filterFirewall, dispatch(ip, s, "", "traffic not accepted by "+fw, s.port, "-j DROP"))
		}
		if rejectExt {
			add(filterExternal, dispatch(ip, s, "", "has no external endpoints", s.port, st.action(s.externalNoEP)))
		}
	}
	if s.nodePort != 0 {
		if usesExt {
			add(natNodePorts, dispatch(netip.Addr{}, s, "", "", s.nodePort, "-j "+ext))
		}
		if rejectExt {
			add(filterExternal, dispatch(netip.Addr{}, s, "-m addrtype --dst-type LOCAL ", "has no external endpoints", s.nodePort, st.action(s.externalNoEP)))
		}
	}
	if s.hcNodePort != 0 {
		// The health check is served over TCP whatever the service's protocol.
		add(filterNodePorts, dispatchProto(netip.Addr{}, "tcp", s.comment, "", "health check node port", s.hcNodePort, "-j ACCEPT"))
	}

	b := body
	if hasCluster {
		r.chains = append(r.chains, svc)
		b = r.masqClusterIP(b, svc, s, st)
		b = r.balance(b, svc, s, s.cluster, st)
	}
	if extTarget == svx {
		r.chains = append(r.chains, svx)
		b = r.balance(b, svx, s, s.external, st)
	}
	if shortTarget == svs {
		r.chains = append(r.chains, svs)
		b = r.balance(b, svs, s, short, st)
	}
	if usesExt {
		r.chains = append(r.chains, ext)
		if s.masqExternal {
			b = r.line(b, ext, "-j "+chainMarkMasq)
		}
		if shortTarget != "" {
			// Pods and the node itself reach "external" addresses as if from
			// outside and back in: they get the Cluster-policy endpoints,
			// subject to neither traffic policy, as upstream.
			for _, c := range st.clusterCIDRs {
				b = r.line(b, ext, "-s "+c.String()+" -j "+shortTarget)
			}
			b = r.line(b, ext, "-m addrtype --src-type LOCAL -j "+chainMarkMasq)
			b = r.line(b, ext, "-m addrtype --src-type LOCAL -j "+shortTarget)
		}
		if extTarget != "" {
			b = r.line(b, ext, "-j "+extTarget)
		}
	}
	if usesFW {
		r.chains = append(r.chains, fw)
		allowNode := false
		for _, p := range s.sourceRanges {
			b = r.line(b, fw, "-s "+p.String()+" -j "+ext)
			for _, ip := range st.nodeIPs {
				allowNode = allowNode || p.Contains(ip)
			}
		}
		// Node traffic to a VIP that is also a local address comes from the
		// VIP itself; let it through when the node is an allowed source.
		if allowNode {
			for _, ip := range s.lbIPs {
				b = r.line(b, fw, "-s "+hostPrefix(ip)+" -j "+ext)
			}
		}
	}
	return r, b
}

// dispatch renders a row of service s in iptables-save's canonical order,
// so what the kernel prints back equals what we wrote.
func dispatch(dst netip.Addr, s *svcPort, pre, what string, port int, target string) string {
	return dispatchProto(dst, s.proto, s.comment, pre, what, port, target)
}

func dispatchProto(dst netip.Addr, proto, comment, pre, what string, port int, target string) string {
	b := make([]byte, 0, 160)
	if dst.IsValid() {
		b = append(b, "-d "...)
		b = append(b, hostPrefix(dst)...)
		b = append(b, ' ')
	}
	b = append(b, "-p "...)
	b = append(b, proto...)
	b = append(b, ' ')
	b = append(b, pre...)
	b = append(b, `-m comment --comment "`...)
	b = append(b, comment...)
	if what != "" {
		b = append(b, ' ')
		b = append(b, what...)
	}
	b = append(b, `" -m `...)
	b = append(b, proto...)
	b = append(b, " --dport "...)
	b = strconv.AppendInt(b, int64(port), 10)
	b = append(b, ' ')
	b = append(b, target...)
	return string(b)
}

func hostPrefix(a netip.Addr) string {
	if a.Is4() {
		return a.String() + "/32"
	}
	return a.String() + "/128"
}

func (r *rendered) line(b []byte, chain, spec string) []byte {
	r.rules++
	b = append(b, "-A "...)
	b = append(b, chain...)
	b = append(b, ' ')
	b = append(b, spec...)
	return append(b, '\n')
}

// masqClusterIP marks ClusterIP traffic from outside the cluster so that
// replies come back through this node. It matches the ClusterIP because
// the chain is also entered from EXT, whose traffic is handled there.
func (r *rendered) masqClusterIP(b []byte, chain string, s *svcPort, st *settings) []byte {
	if !s.clusterIP.IsValid() {
		return b
	}
	dst := "-d " + hostPrefix(s.clusterIP)
	switch {
	case st.masqueradeAll:
		return r.line(b, chain, dst+" -j "+chainMarkMasq)
	case len(st.clusterCIDRs) == 1:
		return r.line(b, chain, "! -s "+st.clusterCIDRs[0].String()+" "+dst+" -j "+chainMarkMasq)
	case len(st.clusterCIDRs) > 1:
		return r.line(b, chain, dst+" -j "+chainOffCluster)
	}
	return b
}

// balance DNATs straight from the service chain: one rule per endpoint
// (two with affinity), where upstream spends three. Hairpin masquerade,
// upstream's per-endpoint rule, is one static rule in SBX-POSTROUTING
// (see hairpinBPF).
func (r *rendered) balance(b []byte, chain string, s *svcPort, eps []netip.AddrPort, st *settings) []byte {
	mask := "255.255.255.255"
	if st.family == v6 {
		mask = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
	}
	var lists []string
	if s.affinity > 0 {
		lists = make([]string, len(eps))
		for i, ep := range eps {
			// Named after service and endpoint, not the chain: SVC and SVX
			// share a client's stickiness, and it survives chain rewrites.
			lists[i] = "SBX-" + shortHash(s.name+"|"+ep.String())
			b = append(b, "-A "...)
			b = append(b, chain...)
			b = append(b, " -p "...)
			b = append(b, s.proto...)
			b = append(b, " -m recent --update --seconds "...)
			b = strconv.AppendInt(b, int64(s.affinity), 10)
			b = append(b, " --reap --name "...)
			b = append(b, lists[i]...)
			b = append(b, " --mask "...)
			b = append(b, mask...)
			b = append(b, " --rsource -j DNAT --to-destination "...)
			b = ep.AppendTo(b)
			b = append(b, '\n')
			r.rules++
		}
	}
	for i, ep := range eps {
		b = append(b, "-A "...)
		b = append(b, chain...)
		b = append(b, " -p "...)
		b = append(b, s.proto...)
		if i < len(eps)-1 {
			b = append(b, " -m statistic --mode random --probability "...)
			b = append(b, probability(len(eps)-i)...)
		}
		if lists != nil {
			b = append(b, " -m recent --set --name "...)
			b = append(b, lists[i]...)
			b = append(b, " --mask "...)
			b = append(b, mask...)
			b = append(b, " --rsource"...)
		}
		b = append(b, " -j DNAT --to-destination "...)
		b = ep.AppendTo(b)
		b = append(b, '\n')
		r.rules++
	}
	return b
}

var probabilities = func() []string {
	p := make([]string, 257)
	for n := 1; n < len(p); n++ {
		p[n] = computeProbability(n)
	}
	return p
}()

func probability(n int) string {
	if n < len(probabilities) {
		return probabilities[n]
	}
	return computeProbability(n)
}

// computeProbability returns 1/n as iptables-save prints it: the statistic
// match stores round(p * 2^31) and prints it back with 11 decimals.
func computeProbability(n int) string {
	stored := math.Round(float64(1<<31) / float64(n))
	return strconv.FormatFloat(stored/float64(1<<31), 'f', 11, 64)
}

func (st *settings) action(a pb.NoEndpointsAction) string {
	if a == pb.NoEndpointsAction_NO_ENDPOINTS_ACTION_DROP {
		return "-j DROP"
	}
	// REJECT also stands in for an unspecified action: failing fast is the
	// safer reading of a table that forgot to say.
	if st.family == v6 {
		return "-j REJECT --reject-with icmp6-port-unreachable"
	}
	return "-j REJECT --reject-with icmp-port-unreachable"
}
