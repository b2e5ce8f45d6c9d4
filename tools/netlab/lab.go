// Package netlab builds a sealed network of namespaces for data-plane tests
// and demos: a router, nodes on a shared node network, pods routed behind
// their node, an external client outside the cluster, and a control host for
// the apiserver and control plane. Pods run an echo server (package echo).
//
// Safety: every lab address (see the plan in addr.go) exists only inside the
// lab's namespaces; the root namespace gets no lab address, no lab link and
// no firewall rule, only an "unreachable" guard route for the lab ranges
// while any lab exists. Reach lab addresses only through Host.Dial, Listen,
// Do or Command. Everything here needs root.
package netlab

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"sync"

	"github.com/signalbox/signalbox/tools/netlab/echo"
)

// DefaultEchoPort is served (TCP and UDP) by pods that list no ports.
const DefaultEchoPort = 8080

// Config describes a lab.
type Config struct {
	// Name keys every namespace (sbx-<Name>-...): labs with different
	// names coexist; building a lab removes any lab of the same name, even
	// one another process still uses, so give each test package its own.
	// Lowercase letters and digits only, at most 20.
	Name  string
	Nodes []NodeConfig
	IPv6  bool // dual-stack: IPv6 next to IPv4 everywhere
}

// NodeConfig describes one node and the pods attached to it.
type NodeConfig struct {
	Name string // DNS label, as the Kubernetes Node name
	Zone string // informational, for topology tests
	Pods []PodConfig
}

// PodConfig describes one pod. Its echo server answers on each port over
// both TCP and UDP.
type PodConfig struct {
	Name  string // DNS label, unique in the lab
	Ports []int  // default [DefaultEchoPort]
}

// Reply is an echo server's answer.
type Reply = echo.Reply

// Lab is a running lab. Close it.
type Lab struct {
	cfg     Config
	router  *Host
	control *Host
	client  *Host
	nodes   []*Host
	pods    []*Host

	echoes  []*echo.Server
	created []ownedNS // in creation order

	closeOnce sync.Once
	closeErr  error
}

var (
	labNameRE  = regexp.MustCompile(`^[a-z0-9]{1,20}$`)
	hostNameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$`)
)

func checkName(kind, name string, dashes bool) error {
	re := labNameRE
	if dashes {
		re = hostNameRE
	}
	if !re.MatchString(name) {
		return fmt.Errorf("netlab: bad %s name %q (want %s)", kind, name, re)
	}
	return nil
}

func (c *Config) validate() error {
	if err := checkName("lab", c.Name, false); err != nil {
		return err
	}
	if len(c.Nodes) == 0 || len(c.Nodes) > MaxNodes {
		return fmt.Errorf("netlab: %d nodes, want 1..%d", len(c.Nodes), MaxNodes)
	}
	seen := map[string]bool{}
	for _, n := range c.Nodes {
		if err := checkName("node", n.Name, true); err != nil {
			return err
		}
		if seen["node/"+n.Name] {
			return fmt.Errorf("netlab: duplicate node %q", n.Name)
		}
		seen["node/"+n.Name] = true
		if len(n.Pods) > MaxPodsPerNode {
			return fmt.Errorf("netlab: node %q has %d pods, max %d", n.Name, len(n.Pods), MaxPodsPerNode)
		}
		for _, p := range n.Pods {
			if err := checkName("pod", p.Name, true); err != nil {
				return err
			}
			if seen["pod/"+p.Name] {
				return fmt.Errorf("netlab: duplicate pod %q", p.Name)
			}
			seen["pod/"+p.Name] = true
			for _, port := range p.Ports {
				if port < 1 || port > 65535 {
					return fmt.Errorf("netlab: pod %q: bad port %d", p.Name, port)
				}
			}
		}
	}
	return nil
}

// New builds the lab described by cfg, after removing any stale lab of the
// same name. When New returns, every link is up, every route is in place
// and every echo server is listening.
func New(ctx context.Context, cfg Config) (*Lab, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if err := removeStale(ctx, cfg.Name); err != nil {
		return nil, fmt.Errorf("netlab: remove stale lab %q: %w", cfg.Name, err)
	}
	l := &Lab{cfg: cfg}
	l.plan()
	if err := l.build(ctx); err != nil {
		return nil, errors.Join(err, l.Close())
	}
	return l, nil
}

// plan fills in names and addresses; nothing touches the kernel yet.
func (l *Lab) plan() {
	ns := func(kind, name string) string {
		if name == "" {
			return nsPrefix + l.cfg.Name + "-" + kind
		}
		return nsPrefix + l.cfg.Name + "-" + kind + "-" + name
	}
	// Single-stack labs keep IPv6 fields zero.
	if6 := func(a netip.Addr) netip.Addr {
		if l.cfg.IPv6 {
			return a
		}
		return netip.Addr{}
	}
	l.router = &Host{Name: "router", NetNS: ns("router", ""), IPv4: v4(0, hostRouter), IPv6: if6(v6(0, hostRouter))}
	l.control = &Host{Name: "control", NetNS: ns("control", ""), IPv4: v4(0, hostControl), IPv6: if6(v6(0, hostControl))}
	l.client = &Host{Name: "client", NetNS: ns("client", ""), IPv4: v4(1, hostClient), IPv6: if6(v6(1, hostClient))}
	for i, nc := range l.cfg.Nodes {
		ip4, ip6, pods4, pods6 := nodeAddrs(i + 1)
		node := &Host{Name: nc.Name, NetNS: ns("node", nc.Name), IPv4: ip4, IPv6: if6(ip6), Zone: nc.Zone, PodCIDR: pods4}
		if l.cfg.IPv6 {
			node.PodCIDR6 = pods6
		}
		l.nodes = append(l.nodes, node)
		for j, pc := range nc.Pods {
			p4, p6 := podAddrs(i+1, j+1)
			ports := slices.Clone(pc.Ports)
			if len(ports) == 0 {
				ports = []int{DefaultEchoPort}
			}
			l.pods = append(l.pods, &Host{Name: pc.Name, NetNS: ns("pod", pc.Name), IPv4: p4, IPv6: if6(p6), Node: nc.Name, EchoPorts: ports})
		}
	}
}

// Name returns the lab's name.
func (l *Lab) Name() string { return l.cfg.Name }

// Router returns the fabric namespace that joins the node and client networks.
func (l *Lab) Router() *Host { return l.router }

// Control returns the host on the node network meant for the apiserver and
// the control plane.
func (l *Lab) Control() *Host { return l.control }

// Client returns the external client, outside the cluster's networks.
func (l *Lab) Client() *Host { return l.client }

// Nodes returns the nodes in configuration order.
func (l *Lab) Nodes() []*Host { return slices.Clone(l.nodes) }

// Pods returns the pods in configuration order.
func (l *Lab) Pods() []*Host { return slices.Clone(l.pods) }

// Hosts returns every host: router, control, client, nodes, pods.
func (l *Lab) Hosts() []*Host {
	return slices.Concat([]*Host{l.router, l.control, l.client}, l.nodes, l.pods)
}

// Node returns the named node, or nil.
func (l *Lab) Node(name string) *Host { return find(l.nodes, name) }

// Pod returns the named pod, or nil.
func (l *Lab) Pod(name string) *Host { return find(l.pods, name) }

func find(hosts []*Host, name string) *Host {
	for _, h := range hosts {
		if h.Name == name {
			return h
		}
	}
	return nil
}

// RouteVia makes the router (and so the client, the control host and the
// other nodes, which all route lab traffic through it) send prefix to node,
// the way a LoadBalancer or an upstream router delivers external IPs.
// prefix must lie inside the lab ranges (ExternalNet4/ExternalNet6 are meant
// for this); replacing an earlier RouteVia for the same prefix is fine.
func (l *Lab) RouteVia(ctx context.Context, prefix netip.Prefix, node string) error {
	if err := checkLabPrefix(prefix); err != nil {
		return err
	}
	n := l.Node(node)
	if n == nil {
		return fmt.Errorf("netlab: RouteVia: no node %q", node)
	}
	via, family := n.IPv4, "-4"
	if prefix.Addr().Is6() {
		via, family = n.IPv6, "-6"
	}
	if !via.IsValid() {
		return fmt.Errorf("netlab: RouteVia %s: lab %q is not dual-stack", prefix, l.cfg.Name)
	}
	_, err := run(ctx, "ip", "-n", l.router.NetNS, family, "route", "replace", prefix.Masked().String(), "via", via.String())
	return err
}

// Ask sends one request from a host to an echo server (addr is ip:port) and
// returns the reply; see echo.Ask for timeouts and errors.
func (l *Lab) Ask(ctx context.Context, from *Host, network, addr string) (Reply, error) {
	r, err := echo.Ask(ctx, from.Dial, network, addr)
	if err != nil {
		return r, fmt.Errorf("from %s: %w", from.Name, err)
	}
	return r, nil
}

// Close stops the echo servers, kills what still runs in the lab's
// namespaces and deletes them, then drops the root guard routes if no lab is
// left. It is idempotent, and leaves alone namespaces that a newer lab of
// the same name has since recreated.
func (l *Lab) Close() error {
	l.closeOnce.Do(func() {
		ctx := context.Background()
		var errs []error
		for _, s := range l.echoes {
			errs = append(errs, s.Close())
		}
		for _, c := range slices.Backward(l.created) {
			if c.stillOurs() {
				errs = append(errs, removeNamespace(ctx, c.name))
			}
			c.handle.Close()
		}
		errs = append(errs, withLock(func() error { return dropGuardsIfIdle(ctx) }))
		l.closeErr = errors.Join(errs...)
	})
	return l.closeErr
}
