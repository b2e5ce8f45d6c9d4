package ipvs

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/signalbox/signalbox/nodeagent/dataplane"
	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// Plane is the IPVS data plane. It programs the network namespace of the
// process that calls New.
type Plane struct {
	mu  sync.Mutex
	cfg Config
	k   *kernel
	// nodeIPs are the addresses the last Desired used: Config.NodeIPs, or
	// those read at the last Sync.
	nodeIPs []netip.Addr
	synced  bool
	// last caches the state of the last applied table, so an Apply does not
	// recompute the state of prev.
	lastTable pb.Table
	last      State
}

var _ dataplane.Plane = (*Plane)(nil)

var schedulerRE = regexp.MustCompile(`^[a-z][a-z0-9]{0,14}$`)

// New opens the kernel interfaces. It changes nothing: the first Sync
// creates kube-ipvs0, the sets and the rules.
func New(cfg Config) (*Plane, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	// The kernel loads ip_vs_<name> on demand; only the shape is checked.
	if !schedulerRE.MatchString(cfg.Scheduler) {
		return nil, fmt.Errorf("ipvs: bad scheduler name %q", cfg.Scheduler)
	}
	k, err := newKernel(cfg.IPTables)
	if err != nil {
		return nil, err
	}
	return &Plane{cfg: cfg, k: k}, nil
}

// Close releases the netlink sockets; the kernel state stays (fail static).
func (p *Plane) Close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.k.close()
}

// Name implements dataplane.Plane.
func (p *Plane) Name() string {
	if p.cfg.IPTables != "" {
		return "ipvs+iptables-" + p.cfg.IPTables
	}
	return "ipvs"
}

// Counts returns the kernel operations performed since New.
func (p *Plane) Counts() Counts {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.k.counts
}

// Apply implements dataplane.Plane: it executes Diff(Desired(prev),
// Desired(next)). IPVS has no transactions, so on error it puts prev back
// with a Sync before returning the error.
func (p *Plane) Apply(ctx context.Context, prev, next pb.Table) (dataplane.Result, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.synced {
		return p.sync(ctx, next)
	}
	start := time.Now()
	cfg := p.desiredConfig()
	from := p.last
	if !sameTable(prev, p.lastTable) {
		from = Desired(prev, cfg)
	}
	to := Desired(next, cfg)
	if err := p.k.execute(ctx, Diff(from, to), nil); err != nil {
		if _, rerr := p.sync(ctx, prev); rerr != nil {
			err = errors.Join(err, fmt.Errorf("ipvs: restoring the previous table: %w", rerr))
		}
		return dataplane.Result{}, err
	}
	p.lastTable, p.last = next, to
	return dataplane.Result{Rules: to.Objects(), Duration: time.Since(start)}, nil
}

// Sync implements dataplane.Plane: it reads the kernel, diffs it against
// Desired(t) and repairs the difference, removing stale virtual servers,
// real servers, addresses and set members.
func (p *Plane) Sync(ctx context.Context, t pb.Table) (dataplane.Result, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.sync(ctx, t)
}

func (p *Plane) sync(ctx context.Context, t pb.Table) (dataplane.Result, error) {
	start := time.Now()
	p.synced, p.lastTable = false, nil
	if err := ensureSysctls(); err != nil {
		return dataplane.Result{}, err
	}
	if _, err := p.k.link(true); err != nil {
		return dataplane.Result{}, err
	}
	if err := p.k.ensureSets(ctx, p.cfg.Families); err != nil {
		return dataplane.Result{}, err
	}
	if p.cfg.NodeIPs == nil {
		addrs, err := p.k.nodeAddrs()
		if err != nil {
			return dataplane.Result{}, err
		}
		p.nodeIPs = addrs
	}
	have, obs, err := p.k.readState(ctx, true)
	if err != nil {
		return dataplane.Result{}, err
	}
	want := Desired(t, p.desiredConfig())
	// Rules are rewritten whole: reading them back is no cheaper.
	ops := Diff(have, want)
	ops.Rules = want.Rules
	if err := p.k.execute(ctx, ops, obs); err != nil {
		return dataplane.Result{}, err
	}
	p.synced, p.lastTable, p.last = true, t, want
	return dataplane.Result{Rules: want.Objects(), Duration: time.Since(start)}, nil
}

// desiredConfig is the Config with the node addresses in force.
func (p *Plane) desiredConfig() Config {
	cfg := p.cfg
	if cfg.NodeIPs == nil {
		cfg.NodeIPs = p.nodeIPs
	}
	return cfg
}

// Cleanup implements dataplane.Plane: it removes the owned chains and
// jumps, sets, every virtual server but fwmark ones, and kube-ipvs0.
func (p *Plane) Cleanup(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.synced, p.lastTable = false, nil
	var errs []error
	// Rules first: a set cannot be destroyed while a rule references it.
	for _, f := range p.cfg.Families {
		errs = append(errs, p.k.restoreRules(ctx, f, Rules{}, true))
	}
	// Each step runs whatever the others found: a half-programmed node
	// (say, ip_vs never loaded) must still come out clean.
	if _, err := os.Stat(procIPVS); err == nil {
		var ops Ops
		p.k.counts.Reads++
		svcs, err := p.k.ipvs.GetServices()
		errs = append(errs, err)
		for _, s := range svcs {
			if a, ok := netip.AddrFromSlice(s.Address); ok && s.FWMark == 0 {
				ops.DelServices = append(ops.DelServices, VSKey{a.Unmap(), Proto(s.Protocol), s.Port})
			}
		}
		errs = append(errs, p.k.execute(ctx, ops, nil))
	}
	out, err := p.k.run(ctx, "", "ipset", "save")
	errs = append(errs, err)
	if sets := parseSetMembers(out); len(sets) > 0 {
		var b strings.Builder
		for name := range sets {
			b.WriteString("destroy " + name + "\n")
		}
		_, err := p.k.run(ctx, b.String(), "ipset", "restore")
		errs = append(errs, err)
	}
	if l, err := p.k.link(false); err == nil {
		if err := p.k.nl.LinkDel(l); err != nil {
			errs = append(errs, fmt.Errorf("ipvs: delete %s: %w", DummyDevice, err))
		}
	}
	clear(p.k.draining)
	return errors.Join(errs...)
}

// sameTable is true when a and b hold the same resource versions.
func sameTable(a, b pb.Table) bool {
	if a == nil || b == nil || len(a) != len(b) {
		return false
	}
	for name, r := range a {
		if s, ok := b[name]; !ok || s.GetHash() != r.GetHash() {
			return false
		}
	}
	return true
}

// sysctls IPVS mode needs in the node's namespace, as kube-proxy sets them.
var sysctls = []struct{ path, value string }{
	// Let netfilter see IPVS connections, for the masquerade rules.
	{"net/ipv4/vs/conntrack", "1"},
	// Drop packets of connections whose real server was deleted, so
	// clients reconnect instead of hanging.
	{"net/ipv4/vs/expire_nodest_conn", "1"},
	// Likewise expire persistence templates of weight-0 real servers.
	{"net/ipv4/vs/expire_quiescent_template", "1"},
	{"net/ipv4/ip_forward", "1"},
	{"net/ipv4/conf/all/route_localnet", "1"},
}

func ensureSysctls() error {
	for _, s := range sysctls {
		p := filepath.Join("/proc/sys", s.path)
		if b, err := os.ReadFile(p); err == nil && strings.TrimSpace(string(b)) == s.value {
			continue
		}
		if err := os.WriteFile(p, []byte(s.value), 0o644); err != nil {
			return fmt.Errorf("ipvs: set sysctl %s=%s: %w", strings.ReplaceAll(s.path, "/", "."), s.value, err)
		}
	}
	return nil
}
