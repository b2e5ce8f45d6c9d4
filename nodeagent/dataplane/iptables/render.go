// Package iptables is the iptables data plane: a pure renderer from decided
// tables to iptables-restore input (Render) and a thin executor that runs
// it (Plane). Behaviour follows upstream kube-proxy's iptables mode, with
// fewer rules: endpoints are DNATed straight from the service chain and
// hairpin traffic is caught by one static rule instead of a rule per
// endpoint.
//
// Per service port: a dispatch row per captured address (ClusterIP,
// external IP, load balancer IP, NodePort), one rule masquerading
// off-cluster ClusterIP traffic, one DNAT rule per endpoint (two with
// session affinity), and two to five rules in EXT and FW chains when the
// service is reachable from outside. Upstream spends three rules per
// endpoint (four with affinity).
//
// Beyond what upstream needs, the kernel must have the bpf match (xt_bpf,
// CONFIG_NETFILTER_XT_MATCH_BPF; Debian's kernels build it as a module),
// for the hairpin rule.
package iptables

import (
	"bytes"
	"fmt"
	"log/slog"
	"math/bits"
	"slices"
	"strconv"
	"strings"

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

func (p *Plan) setFamily(f family, fp *FamilyPlan) {
	if f == v6 {
		p.V6 = fp
	} else {
		p.V4 = fp
	}
}

// FamilyPlan is one family's part of a Plan: iptables-restore --noflush
// input for the filter and nat tables.
type FamilyPlan struct {
	Family pb.IPFamily
	Full   bool
	filter section
	nat    section
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
	jumps    []byte // into our chains from built-in ones (Sync only)
	drop     []string
	// marks are service boundaries in decl and body, kept by full renders
	// so that the executor can cut the nat table into several commits.
	marks []boundary
}

type boundary struct{ decl, body int }

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
		len(s.tail) == 0 && len(s.body) == 0 && len(s.jumps) == 0
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
	b.Write(s.jumps)
	for _, c := range s.drop {
		b.WriteString("-X " + c + "\n")
	}
	b.WriteString("COMMIT\n")
}

// Restore returns the iptables-restore --noflush input, empty when the
// family has nothing to change in its rules.
func (fp *FamilyPlan) Restore() []byte {
	var b bytes.Buffer
	b.Grow(len(fp.nat.body) + len(fp.nat.rows) + len(fp.filter.rows) + 40*len(fp.nat.decl) + 4096)
	fp.filter.writeTo(&b, "filter")
	fp.nat.writeTo(&b, "nat")
	return b.Bytes()
}

// Empty reports whether the plan changes nothing for the family.
func (fp *FamilyPlan) Empty() bool {
	return fp.filter.empty() && fp.nat.empty()
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
		plan.setFamily(fam, fp)
	}
	return plan, nil
}

// hairpinBPF is a classic BPF program for the bpf match that accepts a
// packet whose source address equals its destination address. After DNAT
// that is exactly a pod reaching itself through its service, upstream's
// per-endpoint "-s EP -j MARK" rule, as one rule for every endpoint: no
// per-endpoint rule and no ipset to keep in step with the rules.
// Offsets are into the IP header: IPv4 saddr 12, daddr 16; IPv6 8, 24.
func hairpinBPF(f family) string {
	words, src, dst := 1, 12, 16
	if f == v6 {
		words, src, dst = 4, 8, 24
	}
	const (
		ldAbsW = 0x20 // BPF_LD|BPF_W|BPF_ABS: A = word at k
		tax    = 0x07 // BPF_MISC|BPF_TAX: X = A
		jeqX   = 0x1d // BPF_JMP|BPF_JEQ|BPF_X: A == X ?
		retK   = 0x06 // BPF_RET|BPF_K
	)
	n := 4*words + 2
	ins := []string{strconv.Itoa(n)}
	op := func(code, jt, jf, k int) {
		ins = append(ins, fmt.Sprintf("%d %d %d %d", code, jt, jf, k))
	}
	for i := 0; i < words; i++ {
		op(ldAbsW, 0, 0, src+4*i)
		op(tax, 0, 0, 0)
		op(ldAbsW, 0, 0, dst+4*i)
		// On a difference jump to the final "return 0".
		op(jeqX, 0, n-1-(4*i+4), 0)
	}
	op(retK, 0, 0, 1)
	op(retK, 0, 0, 0)
	return strings.Join(ins, ",")
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
	// Hairpin: only DNATed packets, or the node talking to its own
	// addresses over lo would be masqueraded too.
	fixed(&nat.head, chainPostrouting, `-m conntrack --ctstate DNAT -m comment --comment "signalbox hairpin" -m bpf --bytecode "`+hairpinBPF(st.family)+`" -j `+chainMarkMasq)
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
	size := 0
	for _, name := range names {
		sp := next[name].GetServicePort()
		size += 400 + 120*(len(sp.GetClusterEndpoints())+len(sp.GetExternalEndpoints()))
	}
	nat.body = make([]byte, 0, size)
	for _, name := range names {
		s, err := parseServicePort(name, next[name].GetServicePort())
		if err != nil {
			return nil, err
		}
		var r *rendered
		r, nat.body = renderService(s, st, nat.body)
		for _, c := range r.chains {
			nat.declare(c)
		}
		nat.marks = append(nat.marks, boundary{len(nat.decl), len(nat.body)})
		for _, rw := range r.rows {
			sec := fp.section(rw.top)
			sec.rows = append(sec.rows, "-A "+topChains[rw.top].chain+" "+rw.spec+"\n"...)
		}
		fp.Rules += r.rules
	}
	// Settings changed under a known prev: its chains that next does not
	// declare are stale.
	for _, name := range serviceNames(prev, st.family) {
		s, err := parseServicePort(name, prev[name].GetServicePort())
		if err != nil {
			continue // it never reached the kernel either
		}
		r, _ := renderService(s, st, nil)
		for _, c := range r.chains {
			if !nat.declared[c] {
				nat.deleteChain(c)
			}
		}
	}
	return fp, nil
}

// renderPartial rewrites the chains of changed services only, and edits
// the dispatch chains row by row (-D of rows that went, -I/-A of new ones)
// instead of rewriting them as upstream does. A one-endpoint change is
// then a restore input of a dozen lines whatever the number of services,
// which is what makes iptables-nft fast; iptables-legacy still loads and
// replaces the whole table per commit, so there it saves the rendering
// and parsing only. The price: -D needs the row exactly as we wrote it.
// If another tool changed a row, the delta is refused (the kernel keeps
// prev, the agent NACKs) until the periodic Check/Sync puts it back.
func renderPartial(prev, next pb.Table, st *settings) (*FamilyPlan, error) {
	fp := &FamilyPlan{Family: st.family.proto()}
	nat := &fp.nat
	changed := changedNames(prev, next, st.family)
	if len(changed) == 0 {
		return fp, nil
	}
	for _, name := range changed {
		pr, nr := &rendered{}, &rendered{}
		if sp := familyService(prev, name, st.family); sp != nil {
			s, err := parseServicePort(name, sp)
			if err != nil {
				return nil, fmt.Errorf("previous table: %w", err)
			}
			pr, _ = renderService(s, st, nil)
		}
		if sp := familyService(next, name, st.family); sp != nil {
			s, err := parseServicePort(name, sp)
			if err != nil {
				return nil, err
			}
			nr, nat.body = renderService(s, st, nat.body)
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
		for _, c := range pr.chains {
			if !slices.Contains(nr.chains, c) {
				nat.deleteChain(c)
			}
		}
		fp.Rules += nr.rules - pr.rules
	}
	return fp, nil
}
