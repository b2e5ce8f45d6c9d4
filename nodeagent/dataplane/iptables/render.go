// Package iptables is the iptables data plane: a pure renderer from decided
// tables to iptables-restore input (Render) and a thin executor that runs
// it (Plane). Behaviour follows upstream kube-proxy's iptables mode, with
// fewer rules: endpoints are DNATed straight from the service chain and
// hairpin traffic is caught by one ipset match instead of a rule per
// endpoint.
package iptables

import (
	"bytes"
	"fmt"
	"log/slog"
	"math/bits"
	"net/netip"
	"slices"
	"sort"
	"strconv"

	"google.golang.org/protobuf/proto"

	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// Config holds the agent-side settings of the plane.
type Config struct {
	// Backend is BackendLegacy, BackendNFT or "" to detect the one the node
	// already uses.
	Backend string
	// Families to program; nil means both.
	Families []pb.IPFamily
	// MasqueradeMark is the single mark bit for "masquerade this packet";
	// 0 means 0x4000, kube-proxy's default.
	MasqueradeMark uint32
	// NodePortAddresses, when not nil, overrides the table's
	// NodeSettings.node_port_addresses: CIDRs whose local addresses accept
	// NodePorts. Empty means every local address.
	NodePortAddresses []string
	// NodeIPs are the node's own addresses: a loadBalancerSourceRanges entry
	// that contains one lets the node reach the load balancer IP itself.
	NodeIPs []string
	// WaitSeconds bounds the wait for the xtables lock (default 5).
	WaitSeconds int
	// Logger defaults to slog.Default().
	Logger *slog.Logger
}

func (c Config) normalize() (Config, error) {
	if c.MasqueradeMark == 0 {
		c.MasqueradeMark = 0x4000
	}
	if bits.OnesCount32(c.MasqueradeMark) != 1 {
		return c, fmt.Errorf("iptables: masquerade mark %#x must be a single bit", c.MasqueradeMark)
	}
	if c.Families == nil {
		c.Families = []pb.IPFamily{pb.IPFamily_IP_FAMILY_IPV4, pb.IPFamily_IP_FAMILY_IPV6}
	}
	for _, f := range c.Families {
		if _, ok := familyOf(f); !ok {
			return c, fmt.Errorf("iptables: unknown family %v", f)
		}
	}
	if c.WaitSeconds <= 0 {
		c.WaitSeconds = 5
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return c, nil
}

// Plan is what one transaction does to the kernel, per family.
type Plan struct {
	// Full is set when the plan rewrites every chain it owns (no previous
	// table, or node settings changed); otherwise only changed services.
	Full bool
	V4   *FamilyPlan // nil when the family is not programmed
	V6   *FamilyPlan
}

func (p *Plan) family(f family) *FamilyPlan {
	if f == v6 {
		return p.V6
	}
	return p.V4
}

// FamilyPlan is one family's part of a Plan: one iptables-restore
// --noflush input and the hairpin set changes around it.
type FamilyPlan struct {
	Family pb.IPFamily
	Full   bool
	filter section
	nat    section
	// HairpinAdd entries go into the set before the rules that need them;
	// on a full plan they are the whole set. HairpinDel entries leave it
	// after the rules succeeded. HairpinFresh are the added entries that were
	// not in the set before, to remove again if the rules are refused.
	HairpinAdd, HairpinDel, HairpinFresh []string
	// Rules is, for a full plan, the number of rules in our chains after it;
	// for a partial plan, the change in that number.
	Rules int
}

// section is one table of the restore input. Line order matters: chain
// declarations (which flush) first, then row deletions (they reference
// chains about to go), new rules, and chain deletions last.
type section struct {
	decl     []string
	declared map[string]bool
	del      []byte
	head     []byte // fixed rules of the top-level chains
	rows     []byte
	tail     []byte // rules that must stay below every row
	body     []byte
	drop     []string
}

func (s *section) declare(chain string) {
	if s.declared == nil {
		s.declared = map[string]bool{}
	}
	if !s.declared[chain] {
		s.declared[chain] = true
		s.decl = append(s.decl, chain)
	}
}

// deleteChain flushes (by declaring) and removes a chain.
func (s *section) deleteChain(chain string) {
	s.declare(chain)
	s.drop = append(s.drop, chain)
}

func (s *section) empty() bool {
	return len(s.decl) == 0 && len(s.del) == 0 && len(s.head) == 0 && len(s.rows) == 0 &&
		len(s.tail) == 0 && len(s.body) == 0
}

func (s *section) writeTo(b *bytes.Buffer, table string) {
	if s.empty() {
		return
	}
	b.WriteString("*" + table + "\n")
	for _, c := range s.decl {
		b.WriteString(":" + c + " - [0:0]\n")
	}
	b.Write(s.del)
	b.Write(s.head)
	b.Write(s.rows)
	b.Write(s.tail)
	b.Write(s.body)
	for _, c := range s.drop {
		b.WriteString("-X " + c + "\n")
	}
	b.WriteString("COMMIT\n")
}

// Restore returns the iptables-restore --noflush input, empty when the
// family has nothing to change in its rules.
func (fp *FamilyPlan) Restore() []byte {
	var b bytes.Buffer
	b.Grow(len(fp.nat.body) + len(fp.nat.rows) + len(fp.filter.rows) + 4096)
	fp.filter.writeTo(&b, "filter")
	fp.nat.writeTo(&b, "nat")
	return b.Bytes()
}

// Empty reports whether the plan changes nothing for the family.
func (fp *FamilyPlan) Empty() bool {
	return fp.filter.empty() && fp.nat.empty() && len(fp.HairpinAdd) == 0 && len(fp.HairpinDel) == 0
}

// owns reports whether the nat chain remains ours after the plan.
func (fp *FamilyPlan) owns(chain string) bool {
	return fp.nat.declared[chain] && !slices.Contains(fp.nat.drop, chain)
}

func (fp *FamilyPlan) section(t top) *section {
	if topChains[t].nat {
		return &fp.nat
	}
	return &fp.filter
}

// Render computes the transaction that moves the kernel from prev to next.
// It is pure. A nil prev renders every chain (a full sync; stale chains
// from an unknown past are the executor's to find). A changed NodeSettings
// also renders everything, since settings appear in every service chain.
func Render(prev, next pb.Table, cfg Config) (Plan, error) {
	cfg, err := cfg.normalize()
	if err != nil {
		return Plan{}, err
	}
	ns, err := tableSettings(next)
	if err != nil {
		return Plan{}, err
	}
	full := prev == nil
	if !full {
		prevNS, err := tableSettings(prev)
		if err != nil {
			return Plan{}, err
		}
		full = !proto.Equal(prevNS, ns)
	}
	if err := checkBodies(prev, next, full); err != nil {
		return Plan{}, err
	}
	plan := Plan{Full: full}
	for _, pf := range cfg.Families {
		fam, _ := familyOf(pf)
		st, err := newSettings(fam, ns, cfg)
		if err != nil {
			return Plan{}, fmt.Errorf("node settings: %w", err)
		}
		var fp *FamilyPlan
		if full {
			fp, err = renderFull(prev, next, st)
		} else {
			fp, err = renderPartial(prev, next, st)
		}
		if err != nil {
			return Plan{}, err
		}
		if fam == v6 {
			plan.V6 = fp
		} else {
			plan.V4 = fp
		}
	}
	return plan, nil
}

func hairpinSet(f family) string {
	if f == v6 {
		return "SBX-HAIRPIN-V6"
	}
	return "SBX-HAIRPIN-V4"
}

func loopback(f family) string {
	if f == v6 {
		return "::1/128"
	}
	return "127.0.0.0/8"
}

func renderFull(prev, next pb.Table, st *settings) (*FamilyPlan, error) {
	fp := &FamilyPlan{Family: st.family.proto(), Full: true}
	nat, filter := &fp.nat, &fp.filter
	for _, c := range []string{chainServices, chainNodePorts, chainPostrouting, chainMarkMasq, chainOffCluster} {
		nat.declare(c)
	}
	for _, c := range []string{chainServices, chainExternalServices, chainNodePorts, chainFirewall, chainForward} {
		filter.declare(c)
	}
	mark := "0x" + strconv.FormatUint(uint64(st.markBit), 16)
	fixed := func(s *[]byte, chain, spec string) {
		*s = append(*s, "-A "+chain+" "+spec+"\n"...)
		fp.Rules++
	}
	fixed(&nat.head, chainPostrouting, "-m set --match-set "+hairpinSet(st.family)+" dst,dst,src -j "+chainMarkMasq)
	fixed(&nat.head, chainPostrouting, "-m mark ! --mark "+mark+"/"+mark+" -j RETURN")
	// Clear the bit so a packet that traverses the stack again (tunnels) is
	// not masqueraded twice.
	fixed(&nat.head, chainPostrouting, "-j MARK --set-xmark "+mark+"/0x0")
	fixed(&nat.head, chainPostrouting, `-m comment --comment "signalbox service traffic requiring SNAT" -j MASQUERADE --random-fully`)
	fixed(&nat.head, chainMarkMasq, "-j MARK --set-xmark "+mark+"/"+mark)
	if len(st.clusterCIDRs) > 1 && !st.masqueradeAll {
		for _, c := range st.clusterCIDRs {
			fixed(&nat.head, chainOffCluster, "-s "+c.String()+" -j RETURN")
		}
		fixed(&nat.head, chainOffCluster, "-j "+chainMarkMasq)
	}
	// Last in SBX-SERVICES: an external IP or VIP can also be a local
	// address, and its own rows must win over a NodePort on the same port.
	switch {
	case st.noNodePorts:
	case st.nodePortCIDRs == nil:
		fixed(&nat.tail, chainServices, "! -d "+loopback(st.family)+" -m addrtype --dst-type LOCAL -j "+chainNodePorts)
	default:
		// Localhost NodePorts need route_localnet, which we never set.
		fixed(&nat.tail, chainServices, "-d "+loopback(st.family)+" -j RETURN")
		for _, c := range st.nodePortCIDRs {
			fixed(&nat.tail, chainServices, "-d "+c.String()+" -m addrtype --dst-type LOCAL -j "+chainNodePorts)
		}
	}
	fixed(&filter.head, chainForward, "-m conntrack --ctstate INVALID -j DROP")
	fixed(&filter.head, chainForward, `-m comment --comment "signalbox forwarding rules" -m mark --mark `+mark+"/"+mark+" -j ACCEPT")
	fixed(&filter.head, chainForward, `-m comment --comment "signalbox forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT`)

	names := serviceNames(next, st.family)
	hairpin := make(map[hpKey]bool, len(names)*4)
	nat.body = make([]byte, 0, len(names)*1024)
	for _, name := range names {
		s, err := parseServicePort(name, next[name].GetServicePort())
		if err != nil {
			return nil, err
		}
		r := renderService(s, st)
		for _, c := range r.chains {
			nat.declare(c)
		}
		for _, rw := range r.rows {
			sec := fp.section(rw.top)
			sec.rows = append(sec.rows, "-A "+topChains[rw.top].chain+" "+rw.spec+"\n"...)
		}
		nat.body = append(nat.body, r.body...)
		fp.Rules += r.rules
		for _, k := range r.hairpin {
			hairpin[k] = true
		}
	}
	// Settings changed under a known prev: its chains that next does not
	// declare are stale.
	for _, name := range serviceNames(prev, st.family) {
		s, err := parseServicePort(name, prev[name].GetServicePort())
		if err != nil {
			continue // it never reached the kernel either
		}
		for _, c := range renderService(s, st).chains {
			if !nat.declared[c] {
				nat.deleteChain(c)
			}
		}
	}
	fp.HairpinAdd = hairpinStrings(hairpin)
	return fp, nil
}

func renderPartial(prev, next pb.Table, st *settings) (*FamilyPlan, error) {
	fp := &FamilyPlan{Family: st.family.proto()}
	nat := &fp.nat
	changed := changedNames(prev, next, st.family)
	if len(changed) == 0 {
		return fp, nil
	}
	prevHP, nextHP := map[hpKey]bool{}, map[hpKey]bool{}
	for _, name := range changed {
		var pr, nr rendered
		if sp := familyService(prev, name, st.family); sp != nil {
			s, err := parseServicePort(name, sp)
			if err != nil {
				return nil, fmt.Errorf("previous table: %w", err)
			}
			pr = *renderService(s, st)
		}
		if sp := familyService(next, name, st.family); sp != nil {
			s, err := parseServicePort(name, sp)
			if err != nil {
				return nil, err
			}
			nr = *renderService(s, st)
		}
		nextRows := make(map[row]bool, len(nr.rows))
		for _, rw := range nr.rows {
			nextRows[rw] = true
		}
		prevRows := make(map[row]bool, len(pr.rows))
		for _, rw := range pr.rows {
			prevRows[rw] = true
			if !nextRows[rw] {
				sec := fp.section(rw.top)
				sec.del = append(sec.del, "-D "+topChains[rw.top].chain+" "+rw.spec+"\n"...)
			}
		}
		for _, rw := range nr.rows {
			if prevRows[rw] {
				continue
			}
			sec := fp.section(rw.top)
			if rw.top == natServices {
				// Above the NodePort jump, which must stay last.
				sec.rows = append(sec.rows, "-I "+chainServices+" 1 "+rw.spec+"\n"...)
			} else {
				sec.rows = append(sec.rows, "-A "+topChains[rw.top].chain+" "+rw.spec+"\n"...)
			}
		}
		for _, c := range nr.chains {
			nat.declare(c)
		}
		nat.body = append(nat.body, nr.body...)
		for _, c := range pr.chains {
			if !slices.Contains(nr.chains, c) {
				nat.deleteChain(c)
			}
		}
		fp.Rules += nr.rules - pr.rules
		for _, k := range pr.hairpin {
			prevHP[k] = true
		}
		for _, k := range nr.hairpin {
			nextHP[k] = true
		}
	}
	planHairpin(fp, prev, next, changed, st.family, prevHP, nextHP)
	return fp, nil
}

// planHairpin diffs the set entries of the changed services. An entry can
// be shared by several services (one pod behind two Services), so removals
// and rollbacks spare entries an unchanged service still uses.
func planHairpin(fp *FamilyPlan, prev, next pb.Table, changed []string, fam family, prevHP, nextHP map[hpKey]bool) {
	added, removed := map[hpKey]bool{}, map[hpKey]bool{}
	for k := range nextHP {
		if !prevHP[k] {
			added[k] = true
		}
	}
	for k := range prevHP {
		if !nextHP[k] {
			removed[k] = true
		}
	}
	if len(added) == 0 && len(removed) == 0 {
		return
	}
	inUse := map[hpKey]bool{}
	isChanged := make(map[string]bool, len(changed))
	for _, n := range changed {
		isChanged[n] = true
	}
	for name, r := range next {
		sp := r.GetServicePort()
		if sp == nil || isChanged[name] || sp.GetFamily() != fam.proto() {
			continue
		}
		proto := protoName(sp.GetProtocol())
		for _, list := range [][]*pb.Endpoint{sp.GetClusterEndpoints(), sp.GetExternalEndpoints()} {
			for _, ep := range list {
				a, err := netip.ParseAddr(ep.GetIp())
				if err != nil {
					continue
				}
				k := hpKey{a.Unmap(), proto, uint16(ep.GetPort())}
				if added[k] || removed[k] {
					inUse[k] = true
				}
			}
		}
	}
	fresh, gone := map[hpKey]bool{}, map[hpKey]bool{}
	for k := range added {
		if !inUse[k] {
			fresh[k] = true
		}
	}
	for k := range removed {
		if !inUse[k] {
			gone[k] = true
		}
	}
	fp.HairpinAdd = hairpinStrings(added)
	fp.HairpinFresh = hairpinStrings(fresh)
	fp.HairpinDel = hairpinStrings(gone)
}

func protoName(p pb.Protocol) string {
	switch p {
	case pb.Protocol_PROTOCOL_TCP:
		return "tcp"
	case pb.Protocol_PROTOCOL_UDP:
		return "udp"
	case pb.Protocol_PROTOCOL_SCTP:
		return "sctp"
	}
	return ""
}

func hairpinStrings(m map[hpKey]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k.String())
	}
	sort.Strings(out)
	return out
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
