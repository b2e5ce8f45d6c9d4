package iptables

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
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
// are the only rules we own outside our chains. Sync inserts the missing
// ones (-I, top of the chain) in the same transaction as the chains; a
// restore must never declare a built-in chain, which would flush it.
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

// Plane programs the node's iptables through the iptables-restore family
// of tools. The tools run in the network namespace of the calling OS
// thread, and the conntrack socket is opened by New in the namespace
// current then: the agent runs in the node's namespace; tests lock a
// thread into a namespace of their own before New.
type Plane struct {
	cfg     Config
	backend string
	fams    []family
	ipt     map[family]*goipt.IPTables
	ct      *conntrack.Cleaner
	log     *slog.Logger

	mu    sync.Mutex
	rules map[family]int
	// restores counts iptables-restore runs, for tests and debugging.
	restores int
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

// Close releases the conntrack socket. The rules stay: the agent fails
// static.
func (p *Plane) Close() { p.ct.Close() }

// Apply implements dataplane.Plane. The plan runs as a few table-sized
// transactions (see runPlan); if one is refused, those already taken are
// undone with the reverse plan (next to prev), so on error the kernel holds
// prev in both families. A nil prev is a Sync.
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
	undo := func() (Plan, error) { return Render(next, prev, p.cfg) }
	if err := p.runPlan(ctx, &plan, undo); err != nil {
		return dataplane.Result{Rules: p.total(), Duration: time.Since(start)}, blame(err, prev, next)
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

// Sync implements dataplane.Plane: a full render, plus deletion of stale
// SBX service chains found in the kernel (left by a previous run), plus
// the jump rules from the built-in chains if they are missing. When the
// kernel already holds every chain as rendered, only missing jumps are
// written. A refused Sync is not undone: what the kernel held before is
// unknown; the next Sync converges.
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
		if fp.heldBy(saved[fam]) {
			p.log.Debug("iptables: kernel already holds the table", "family", fam)
			fp = &FamilyPlan{Family: fp.Family, Rules: fp.Rules}
			plan.setFamily(fam, fp)
		}
		addMissingJumps(fp, saved[fam])
	}
	if err := p.runPlan(ctx, &plan, nil); err != nil {
		return dataplane.Result{Rules: p.total(), Duration: time.Since(start)}, err
	}
	for _, fam := range p.fams {
		p.rules[fam] = plan.family(fam).Rules + p.jumpCount()
	}
	cleaned := p.cleanConntrack(conntrack.Targets(nil, t))
	return dataplane.Result{Rules: p.total(), Duration: time.Since(start), ConntrackCleaned: cleaned}, nil
}

func (p *Plane) jumpCount() int { return len(jumps) }

// addMissingJumps puts the jumps the save did not show into the plan's
// transaction, next to the chains they lead to.
func addMissingJumps(fp *FamilyPlan, saved map[string]*savedTable) {
	for _, j := range jumps {
		if t := saved[j.table]; t != nil && slices.Contains(t.rules, j.saveLine()) {
			continue
		}
		sec := &fp.filter
		if j.table == "nat" {
			sec = &fp.nat
		}
		sec.jumps = append(sec.jumps, "-I"+j.saveLine()[2:]+"\n"...)
	}
}

// Check reports what is missing of the rules the plane owns: the jumps
// from the built-in chains and fixed rules of the top-level chains, i.e.
// what a flush by another tool removes. It reads only; the agent answers
// an error with Sync. It stays cheap at scale: iptables-legacy loads a
// whole table per command, so all probes go through one
// "iptables-restore --test" run; iptables-nft checks one chain at a time.
func (p *Plane) Check(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	mark := "0x" + strconv.FormatUint(uint64(p.cfg.MasqueradeMark), 16)
	probes := []struct{ table, line string }{
		{"nat", "-A " + chainMarkMasq + " -j MARK --set-xmark " + mark + "/" + mark},
		{"nat", "-A " + chainPostrouting + ` -m comment --comment "signalbox service traffic requiring SNAT" -j MASQUERADE --random-fully`},
		{"filter", "-A " + chainForward + " -m conntrack --ctstate INVALID -j DROP"},
	}
	for _, j := range jumps {
		probes = append(probes, struct{ table, line string }{j.table, j.saveLine()})
	}
	var missing []string
	for _, fam := range p.fams {
		if err := ctx.Err(); err != nil {
			return err
		}
		if p.backend == BackendLegacy {
			var b strings.Builder
			for _, table := range []string{"nat", "filter"} {
				b.WriteString("*" + table + "\n")
				for _, pr := range probes {
					if pr.table == table {
						b.WriteString("-C" + pr.line[2:] + "\n")
					}
				}
				b.WriteString("COMMIT\n")
			}
			cmds := commandsFor(p.backend, fam)
			_, err := run(ctx, []byte(b.String()), cmds.restore, "--noflush", "--test", "-w", strconv.Itoa(p.cfg.WaitSeconds))
			if err != nil {
				missing = append(missing, fmt.Sprintf("%s: %v", fam, restoreError(err, []byte(b.String()))))
			}
			continue
		}
		for _, pr := range probes {
			args := tokens(pr.line)
			if ok, err := p.ipt[fam].Exists(pr.table, args[1], args[2:]...); err != nil || !ok {
				missing = append(missing, fmt.Sprintf("%s %s: %s", fam, pr.table, pr.line))
			}
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("iptables: rules missing: %s", strings.Join(missing, "; "))
	}
	return nil
}

// Cleanup implements dataplane.Plane: one transaction per family deletes
// the jumps from built-in chains into SBX chains and every SBX chain.
// Rules in other tools' chains stay, and one of them jumping into an SBX
// chain makes Cleanup fail rather than touch it.
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
				if t.builtin[ruleChain(r)] && ownChain(ruleTarget(r)) {
					sec.del = append(sec.del, "-D"+r[2:]+"\n"...)
				}
			}
			for _, c := range t.chains {
				if ownChain(c) && !t.builtin[c] {
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

// ownChain reports whether this plane owns a chain: every SBX- chain except
// the IPVS plane's SBX-IPVS- ones, so a cleanup on an IPVS node (a mode
// switch, or --cleanup of the iptables mode) leaves IPVS traffic alone.
func ownChain(name string) bool {
	return strings.HasPrefix(name, "SBX-") && !strings.HasPrefix(name, "SBX-IPVS")
}

// ResourceError is a refused transaction with the resources whose chains
// the kernel named, so the NACK tells the operator which Service failed.
type ResourceError struct {
	err   error
	names []string
}

func (e *ResourceError) Error() string       { return e.err.Error() }
func (e *ResourceError) Unwrap() error       { return e.err }
func (e *ResourceError) Resources() []string { return e.names }

// blame finds the resources whose chain hash appears in a restore error.
func blame(err error, tables ...pb.Table) error {
	msg := err.Error()
	seen := map[string]bool{}
	var names []string
	for _, t := range tables {
		for name := range t {
			if !seen[name] && strings.Contains(msg, shortHash(name)) {
				seen[name] = true
				names = append(names, name)
			}
		}
	}
	if len(names) == 0 {
		return err
	}
	sort.Strings(names)
	return &ResourceError{err: err, names: names}
}
