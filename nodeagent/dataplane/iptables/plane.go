package iptables

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	goipt "github.com/coreos/go-iptables/iptables"

	"github.com/signalbox/signalbox/nodeagent/conntrack"
	"github.com/signalbox/signalbox/nodeagent/dataplane"
	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

var _ dataplane.Plane = (*Plane)(nil)

// jump is a rule in a built-in chain that sends traffic into ours. These
// are the only rules we own outside our chains; they are inserted one by
// one because a restore would have to declare, and so flush, the built-in
// chain.
type jump struct {
	table, chain, target string
	newOnly              bool
	comment              string
}

var jumps = []jump{
	{"nat", "PREROUTING", chainServices, false, "signalbox service portals"},
	{"nat", "OUTPUT", chainServices, false, "signalbox service portals"},
	{"nat", "POSTROUTING", chainPostrouting, false, "signalbox postrouting rules"},
	{"filter", "INPUT", chainNodePorts, false, "signalbox health check service ports"},
	{"filter", "INPUT", chainExternalServices, true, "signalbox externally-visible service portals"},
	{"filter", "FORWARD", chainExternalServices, true, "signalbox externally-visible service portals"},
	{"filter", "FORWARD", chainServices, true, "signalbox service portals"},
	{"filter", "OUTPUT", chainServices, true, "signalbox service portals"},
	{"filter", "FORWARD", chainForward, false, "signalbox forwarding rules"},
	{"filter", "INPUT", chainFirewall, true, "signalbox load balancer firewall"},
	{"filter", "OUTPUT", chainFirewall, true, "signalbox load balancer firewall"},
	{"filter", "FORWARD", chainFirewall, true, "signalbox load balancer firewall"},
}

func (j jump) args() []string {
	var a []string
	if j.newOnly {
		a = append(a, "-m", "conntrack", "--ctstate", "NEW")
	}
	return append(a, "-m", "comment", "--comment", j.comment, "-j", j.target)
}

// saveLine is the rule as iptables-save prints it.
func (j jump) saveLine() string {
	s := "-A " + j.chain + " "
	if j.newOnly {
		s += "-m conntrack --ctstate NEW "
	}
	return s + `-m comment --comment "` + j.comment + `" -j ` + j.target
}

// Plane programs the node's iptables. It acts in the network namespace
// that was current when New ran, as long as it is called from the same
// OS thread (the agent runs in the node's namespace; tests lock a thread).
type Plane struct {
	cfg     Config
	backend string
	fams    []family
	ipt     map[family]*goipt.IPTables
	ct      *conntrack.Cleaner
	log     *slog.Logger

	mu    sync.Mutex
	rules map[family]int
	// hook lets tests tamper with a plan before it runs.
	hook func(*Plan)
}

// New detects (or takes from cfg) the backend and prepares the tools. It
// changes nothing in the kernel.
func New(ctx context.Context, cfg Config) (*Plane, error) {
	cfg, err := cfg.normalize()
	if err != nil {
		return nil, err
	}
	backend := cfg.Backend
	if backend == "" {
		if backend, err = DetectBackend(ctx); err != nil {
			return nil, err
		}
	}
	if backend != BackendLegacy && backend != BackendNFT {
		return nil, fmt.Errorf("iptables: unknown backend %q", backend)
	}
	p := &Plane{cfg: cfg, backend: backend, ipt: map[family]*goipt.IPTables{}, log: cfg.Logger, rules: map[family]int{}}
	for _, pf := range cfg.Families {
		fam, _ := familyOf(pf)
		proto := goipt.ProtocolIPv4
		if fam == v6 {
			proto = goipt.ProtocolIPv6
		}
		ipt, err := goipt.New(goipt.IPFamily(proto), goipt.Path(commandsFor(backend, fam).iptables), goipt.Timeout(cfg.WaitSeconds))
		if err != nil {
			return nil, fmt.Errorf("iptables: %s: %w", fam, err)
		}
		p.fams = append(p.fams, fam)
		p.ipt[fam] = ipt
	}
	if p.ct, err = conntrack.NewCleaner(); err != nil {
		return nil, err
	}
	return p, nil
}

// Name implements dataplane.Plane.
func (p *Plane) Name() string { return p.backend }

// Apply implements dataplane.Plane: one iptables-restore per family, IPv4
// first. If IPv6 is refused after IPv4 went in, IPv4 is moved back with the
// reverse plan (next to prev), so the kernel holds prev in both families.
// A nil prev is a Sync.
func (p *Plane) Apply(ctx context.Context, prev, next pb.Table) (dataplane.Result, error) {
	if prev == nil {
		return p.Sync(ctx, next)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	start := time.Now()
	plan, err := Render(prev, next, p.cfg)
	if err != nil {
		return dataplane.Result{}, fmt.Errorf("iptables: %w", err)
	}
	if p.hook != nil {
		p.hook(&plan)
	}
	var done []family
	for _, fam := range p.fams {
		if err := p.applyFamily(ctx, fam, plan.family(fam)); err != nil {
			if rerr := p.revert(ctx, done, prev, next); rerr != nil {
				err = errors.Join(err, rerr)
			}
			return dataplane.Result{Rules: p.total(), Duration: time.Since(start)}, err
		}
		done = append(done, fam)
	}
	for _, fam := range p.fams {
		if fp := plan.family(fam); plan.Full {
			p.rules[fam] = fp.Rules + p.jumpCount()
		} else {
			p.rules[fam] += fp.Rules
		}
	}
	cleaned := p.cleanConntrack(conntrack.Targets(prev, next))
	return dataplane.Result{Rules: p.total(), Duration: time.Since(start), ConntrackCleaned: cleaned}, nil
}

func (p *Plane) revert(ctx context.Context, done []family, prev, next pb.Table) error {
	if len(done) == 0 {
		return nil
	}
	back, err := Render(next, prev, p.cfg)
	if err != nil {
		return fmt.Errorf("iptables: render revert: %w", err)
	}
	for _, fam := range done {
		if err := p.applyFamily(ctx, fam, back.family(fam)); err != nil {
			// Both families cannot be put back; the agent's periodic Sync
			// will converge them.
			return fmt.Errorf("iptables: revert %s: %w", fam, err)
		}
	}
	return nil
}

// applyFamily runs one family's plan: set entries the rules need, the
// rules (one transaction), then set entries nothing needs any more.
func (p *Plane) applyFamily(ctx context.Context, fam family, fp *FamilyPlan) error {
	if fp == nil || fp.Empty() {
		return nil
	}
	if fp.Full || len(fp.HairpinAdd) > 0 {
		if err := ipsetRestore(ctx, fam, "add", fp.HairpinAdd, true); err != nil {
			return fmt.Errorf("iptables: %s hairpin set: %w", fam, err)
		}
	}
	if input := fp.Restore(); len(input) > 0 {
		if err := restore(ctx, commandsFor(p.backend, fam), p.cfg.WaitSeconds, input); err != nil {
			if rerr := ipsetRestore(ctx, fam, "del", fp.HairpinFresh, false); rerr != nil {
				p.log.Warn("iptables: could not roll back hairpin set entries", "family", fam, "err", rerr)
			}
			return fmt.Errorf("iptables: %s: %w", fam, err)
		}
	}
	// The rules are in: failures from here on leave harmless extra set
	// entries, so they are logged, not returned (the kernel holds next).
	del := fp.HairpinDel
	if fp.Full {
		members, err := ipsetMembers(ctx, fam)
		if err != nil {
			p.log.Warn("iptables: could not list hairpin set", "family", fam, "err", err)
		}
		want := make(map[string]bool, len(fp.HairpinAdd))
		for _, e := range fp.HairpinAdd {
			want[e] = true
		}
		for _, m := range members {
			if !want[normalizeEntry(m)] {
				del = append(del, m)
			}
		}
	}
	if err := ipsetRestore(ctx, fam, "del", del, false); err != nil {
		p.log.Warn("iptables: could not remove stale hairpin set entries", "family", fam, "err", err)
	}
	return nil
}

// normalizeEntry rewrites an entry as ipset prints it into our format, so
// that IPv6 spelling differences never count as a difference.
func normalizeEntry(e string) string {
	f := strings.Split(e, ",")
	if len(f) != 3 {
		return e
	}
	a, err := netip.ParseAddr(f[0])
	proto, port, ok := strings.Cut(f[1], ":")
	n, perr := strconv.Atoi(port)
	if err != nil || !ok || perr != nil {
		return e
	}
	return hpKey{a, proto, uint16(n)}.String()
}

// Sync implements dataplane.Plane: a full render, plus deletion of stale
// SBX service chains found in the kernel (left by a previous run), plus
// the jump rules from the built-in chains if they are missing.
func (p *Plane) Sync(ctx context.Context, t pb.Table) (dataplane.Result, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	start := time.Now()
	plan, err := Render(nil, t, p.cfg)
	if err != nil {
		return dataplane.Result{}, fmt.Errorf("iptables: %w", err)
	}
	saved := map[family]map[string]*savedTable{}
	for _, fam := range p.fams {
		out, err := run(ctx, nil, commandsFor(p.backend, fam).save)
		if err != nil {
			return dataplane.Result{}, fmt.Errorf("iptables: %s: %w", fam, err)
		}
		saved[fam] = parseSave(out)
		fp := plan.family(fam)
		if nat := saved[fam]["nat"]; nat != nil {
			for _, c := range nat.chains {
				if isServiceChain(c) && !fp.owns(c) {
					fp.nat.deleteChain(c)
				}
			}
		}
	}
	if p.hook != nil {
		p.hook(&plan)
	}
	for _, fam := range p.fams {
		fp := plan.family(fam)
		if err := p.applyFamily(ctx, fam, fp); err != nil {
			return dataplane.Result{Rules: p.total(), Duration: time.Since(start)}, err
		}
		p.rules[fam] = fp.Rules + p.jumpCount()
		if err := p.ensureJumps(fam, saved[fam]); err != nil {
			return dataplane.Result{Rules: p.total(), Duration: time.Since(start)}, err
		}
	}
	cleaned := p.cleanConntrack(conntrack.Targets(nil, t))
	return dataplane.Result{Rules: p.total(), Duration: time.Since(start), ConntrackCleaned: cleaned}, nil
}

func (p *Plane) jumpCount() int { return len(jumps) }

// ensureJumps inserts the jump rules that the save taken before the
// restore did not show. Their chains exist now: the restore declared them.
func (p *Plane) ensureJumps(fam family, saved map[string]*savedTable) error {
	for _, j := range jumps {
		present := false
		if t := saved[j.table]; t != nil {
			for _, r := range t.rules {
				if r == j.saveLine() {
					present = true
					break
				}
			}
		}
		if present {
			continue
		}
		if err := p.ipt[fam].Insert(j.table, j.chain, 1, j.args()...); err != nil {
			return fmt.Errorf("iptables: %s: jump %s/%s -> %s: %w", fam, j.table, j.chain, j.target, err)
		}
	}
	return nil
}

// Check reports what is missing of the rules the plane owns: the jumps
// from the built-in chains and the fixed rules of the top-level chains,
// i.e. what a flush by another tool removes. It reads only; the agent
// answers an error with Sync.
func (p *Plane) Check(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	mark := "0x" + strconv.FormatUint(uint64(p.cfg.MasqueradeMark), 16)
	canaries := []struct {
		table, chain string
		args         []string
	}{
		{"nat", chainMarkMasq, []string{"-j", "MARK", "--set-xmark", mark + "/" + mark}},
		{"nat", chainPostrouting, []string{"-m", "comment", "--comment", "signalbox service traffic requiring SNAT", "-j", "MASQUERADE", "--random-fully"}},
		{"filter", chainForward, []string{"-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"}},
	}
	var missing []string
	for _, fam := range p.fams {
		if err := ctx.Err(); err != nil {
			return err
		}
		ipt := p.ipt[fam]
		for _, j := range jumps {
			if ok, err := ipt.Exists(j.table, j.chain, j.args()...); err != nil || !ok {
				missing = append(missing, fmt.Sprintf("%s %s/%s -> %s", fam, j.table, j.chain, j.target))
			}
		}
		for _, c := range canaries {
			if ok, err := ipt.Exists(c.table, c.chain, c.args...); err != nil || !ok {
				missing = append(missing, fmt.Sprintf("%s %s/%s rule %s", fam, c.table, c.chain, strings.Join(c.args, " ")))
			}
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("iptables: rules missing: %s", strings.Join(missing, "; "))
	}
	return nil
}

// Cleanup implements dataplane.Plane: one transaction per family deletes
// the jumps from built-in chains into SBX chains and every SBX chain; then
// the hairpin sets go. Rules in other tools' chains stay, and one of them
// jumping into an SBX chain makes Cleanup fail rather than touch it.
func (p *Plane) Cleanup(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	var errs []error
	for _, fam := range p.fams {
		cmds := commandsFor(p.backend, fam)
		out, err := run(ctx, nil, cmds.save)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		var b bytes.Buffer
		tables := parseSave(out)
		for _, table := range []string{"filter", "nat"} {
			t := tables[table]
			if t == nil {
				continue
			}
			var sec section
			for _, r := range t.rules {
				if t.builtin[ruleChain(r)] && strings.HasPrefix(ruleTarget(r), "SBX-") {
					sec.del = append(sec.del, "-D"+r[2:]+"\n"...)
				}
			}
			for _, c := range t.chains {
				if strings.HasPrefix(c, "SBX-") && !t.builtin[c] {
					sec.deleteChain(c)
				}
			}
			sec.writeTo(&b, table)
		}
		if b.Len() > 0 {
			if err := restore(ctx, cmds, p.cfg.WaitSeconds, b.Bytes()); err != nil {
				errs = append(errs, fmt.Errorf("iptables: %s cleanup: %w", fam, err))
				continue
			}
		}
		if _, err := run(ctx, nil, "ipset", "destroy", hairpinSet(fam)); err != nil && !strings.Contains(err.Error(), "does not exist") {
			errs = append(errs, fmt.Errorf("iptables: %s cleanup: %w", fam, err))
		}
		p.rules[fam] = 0
	}
	return errors.Join(errs...)
}

func (p *Plane) total() int {
	n := 0
	for _, c := range p.rules {
		n += c
	}
	return n
}

// cleanConntrack deletes stale UDP flows after a transaction. Its errors
// are logged: the rules are in, so the transaction stands.
func (p *Plane) cleanConntrack(targets []conntrack.Target) int {
	var mine []conntrack.Target
	for _, t := range targets {
		if f, ok := familyOf(t.Family); ok && p.ipt[f] != nil {
			mine = append(mine, t)
		}
	}
	if len(mine) == 0 {
		return 0
	}
	n, err := p.ct.Clean(mine)
	if err != nil {
		p.log.Warn("iptables: conntrack cleanup incomplete", "deleted", n, "err", err)
	}
	return n
}
