package netlab

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strconv"

	"github.com/signalbox/signalbox/tools/netlab/echo"
)

// Interface names. They live in different namespaces, so they repeat.
const (
	bridgeName  = "nodes"  // router: the node network
	clientLink  = "client" // router: the client network
	controlPort = "ctl"    // router: bridge port of the control host
	hostLink    = "eth0"   // every host's uplink
)

// build creates the namespaces and wires them. On error the caller closes
// the lab, which removes whatever was created.
func (l *Lab) build(ctx context.Context) error {
	hosts := l.Hosts()
	// The guard goes in before the first namespace, under the lock, so no
	// lab namespace ever exists without it (see dropGuardsIfIdle).
	err := withLock(func() error {
		if err := addGuards(ctx); err != nil {
			return err
		}
		for _, h := range hosts {
			if _, err := run(ctx, "ip", "netns", "add", h.NetNS); err != nil {
				return err
			}
			owned, err := ownNamespace(h.NetNS)
			if err != nil {
				return err
			}
			l.created = append(l.created, owned)
		}
		return nil
	})
	if err != nil {
		return err
	}
	for _, h := range hosts {
		if err := l.baseline(ctx, h); err != nil {
			return err
		}
	}

	b := &builder{ctx: ctx, dual: l.cfg.IPv6}
	l.wireRouter(b)
	l.wireClient(b)
	l.wireControl(b)
	for i, node := range l.nodes {
		l.wireNode(b, i+1, node)
	}
	if b.err != nil {
		return b.err
	}
	return l.startEchoes()
}

// sysctls to set before any link exists, so new interfaces inherit the
// "default" values. Optional ones are skipped where the kernel lacks them.
type sysctl struct {
	key, value string
	optional   bool
}

var (
	everyHost = []sysctl{
		// Loose reverse-path filtering: data planes under test send
		// replies over paths that strict mode would drop.
		{key: "net/ipv4/conf/all/rp_filter", value: "2"},
		{key: "net/ipv4/conf/default/rp_filter", value: "2"},
		// No duplicate address detection: addresses are usable at once
		// instead of "tentative" for a second or two.
		{key: "net/ipv6/conf/all/accept_dad", value: "0"},
		{key: "net/ipv6/conf/default/accept_dad", value: "0"},
	}
	forwarder = []sysctl{
		{key: "net/ipv4/ip_forward", value: "1"},
		{key: "net/ipv6/conf/all/forwarding", value: "1"},
		// Node-to-node pod traffic hairpins through the router on the
		// shared node network; keep the path fixed instead of letting
		// redirects change it mid-test.
		{key: "net/ipv4/conf/all/send_redirects", value: "0"},
		{key: "net/ipv4/conf/default/send_redirects", value: "0"},
		{key: "net/ipv4/conf/all/accept_redirects", value: "0"},
		{key: "net/ipv4/conf/default/accept_redirects", value: "0"},
		{key: "net/ipv6/conf/all/accept_redirects", value: "0"},
		{key: "net/ipv6/conf/default/accept_redirects", value: "0"},
	}
	routerOnly = []sysctl{
		// The router's bridge is a plain wire: bridged frames must not
		// meet the router's (empty) netfilter when br_netfilter is loaded.
		{key: "net/bridge/bridge-nf-call-iptables", value: "0", optional: true},
		{key: "net/bridge/bridge-nf-call-ip6tables", value: "0", optional: true},
	}
	nodeOnly = []sysctl{
		// kube-proxy DNATs NodePorts on 127.0.0.1 (iptables mode).
		{key: "net/ipv4/conf/all/route_localnet", value: "1"},
		// IPVS needs conntrack for masquerade; present only once ip_vs is
		// loaded (in the VM), absent on this host's kernel.
		{key: "net/ipv4/vs/conntrack", value: "1", optional: true},
	}
)

// baseline brings lo up and sets the host's sysctls, from a thread inside
// its namespace: /proc/sys/net shows the namespace of the thread that reads
// it.
func (l *Lab) baseline(ctx context.Context, h *Host) error {
	settings := everyHost
	switch {
	case h == l.router:
		settings = slices.Concat(everyHost, forwarder, routerOnly)
	case h.PodCIDR.IsValid():
		settings = slices.Concat(everyHost, forwarder, nodeOnly)
	}
	err := h.Do(func() error {
		for _, s := range settings {
			err := os.WriteFile("/proc/sys/"+s.key, []byte(s.value), 0)
			if err != nil && !(s.optional && errors.Is(err, os.ErrNotExist)) {
				return fmt.Errorf("netlab: sysctl %s=%s in %s: %w", s.key, s.value, h.NetNS, err)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	_, err = run(ctx, "ip", "-n", h.NetNS, "link", "set", "lo", "up")
	return err
}

// builder runs iproute2 commands inside lab namespaces and remembers the
// first error, so the wiring below reads as the list of steps it is.
type builder struct {
	ctx  context.Context
	dual bool
	err  error
}

func (b *builder) ip(h *Host, args ...string) {
	if b.err == nil {
		_, b.err = run(b.ctx, "ip", append([]string{"-n", h.NetNS}, args...)...)
	}
}

// ip6 runs the command only in dual-stack labs.
func (b *builder) ip6(h *Host, args ...string) {
	if b.dual {
		b.ip(h, args...)
	}
}

// veth creates a pair directly inside the two namespaces, so no lab
// interface ever appears in the root namespace, even for a moment.
func (b *builder) veth(h *Host, name string, peer *Host, peerName string) {
	b.ip(h, "link", "add", name, "type", "veth", "peer", "name", peerName, "netns", peer.NetNS)
}

func pfx(a netip.Addr, bits int) string { return netip.PrefixFrom(a, bits).String() }

func (l *Lab) wireRouter(b *builder) {
	r := l.router
	// mcast_snooping off: without a querier, snooping may drop the
	// multicast neighbour solicitations IPv6 needs.
	b.ip(r, "link", "add", bridgeName, "type", "bridge", "mcast_snooping", "0")
	b.ip(r, "addr", "add", pfx(r.IPv4, NodeNet4.Bits()), "dev", bridgeName)
	b.ip6(r, "addr", "add", pfx(r.IPv6, NodeNet6.Bits()), "dev", bridgeName, "nodad")
	b.ip(r, "link", "set", bridgeName, "up")
}

func (l *Lab) wireClient(b *builder) {
	r, c := l.router, l.client
	gw4, gw6 := v4(1, hostRouter), v6(1, hostRouter)
	b.veth(c, hostLink, r, clientLink)
	b.ip(r, "addr", "add", pfx(gw4, ClientNet4.Bits()), "dev", clientLink)
	b.ip6(r, "addr", "add", pfx(gw6, ClientNet6.Bits()), "dev", clientLink, "nodad")
	b.ip(r, "link", "set", clientLink, "up")
	b.ip(c, "addr", "add", pfx(c.IPv4, ClientNet4.Bits()), "dev", hostLink)
	b.ip6(c, "addr", "add", pfx(c.IPv6, ClientNet6.Bits()), "dev", hostLink, "nodad")
	b.ip(c, "link", "set", hostLink, "up")
	// Only the lab ranges, no default route: nothing in the lab can
	// route toward a real network.
	b.ip(c, "route", "add", LabRange4.String(), "via", gw4.String())
	b.ip6(c, "route", "add", LabRange6.String(), "via", gw6.String())
}

func (l *Lab) wireControl(b *builder) {
	r, c := l.router, l.control
	b.veth(c, hostLink, r, controlPort)
	b.ip(r, "link", "set", controlPort, "master", bridgeName, "up")
	b.ip(c, "addr", "add", pfx(c.IPv4, NodeNet4.Bits()), "dev", hostLink)
	b.ip6(c, "addr", "add", pfx(c.IPv6, NodeNet6.Bits()), "dev", hostLink, "nodad")
	b.ip(c, "link", "set", hostLink, "up")
	b.ip(c, "route", "add", LabRange4.String(), "via", r.IPv4.String())
	b.ip6(c, "route", "add", LabRange6.String(), "via", r.IPv6.String())
}

// wireNode attaches node i (1-based) to the node network and its pods to it.
// Pods are routed, not bridged: every pod packet crosses the node's IP
// layer (and so its netfilter), as with most CNI plugins; with a bridge,
// same-node replies would bypass the node's conntrack without br_netfilter.
func (l *Lab) wireNode(b *builder, i int, n *Host) {
	r := l.router
	port := "n" + strconv.Itoa(i)
	b.veth(n, hostLink, r, port)
	b.ip(r, "link", "set", port, "master", bridgeName, "up")
	b.ip(n, "addr", "add", pfx(n.IPv4, NodeNet4.Bits()), "dev", hostLink)
	b.ip6(n, "addr", "add", pfx(n.IPv6, NodeNet6.Bits()), "dev", hostLink, "nodad")
	b.ip(n, "link", "set", hostLink, "up")
	// A real default route: kube-proxy needs one. The router has none,
	// so it still ends inside the lab.
	b.ip(n, "route", "add", "default", "via", r.IPv4.String())
	b.ip6(n, "route", "add", "::/0", "via", r.IPv6.String())
	b.ip(r, "route", "add", n.PodCIDR.String(), "via", n.IPv4.String())
	b.ip6(r, "route", "add", n.PodCIDR6.String(), "via", n.IPv6.String())

	gw4, gw6 := gateways(i)
	for j, p := range l.podsOf(n.Name) {
		veth := "veth" + strconv.Itoa(j+1)
		b.veth(p, hostLink, n, veth)
		// Every pod veth carries the same gateway address; the node's
		// own traffic to a pod still leaves from the node's address.
		b.ip(n, "addr", "add", pfx(gw4, 32), "dev", veth)
		b.ip6(n, "addr", "add", pfx(gw6, 128), "dev", veth, "nodad")
		b.ip(n, "link", "set", veth, "up")
		b.ip(n, "route", "add", pfx(p.IPv4, 32), "dev", veth, "src", n.IPv4.String())
		b.ip6(n, "route", "add", pfx(p.IPv6, 128), "dev", veth, "src", n.IPv6.String())

		b.ip(p, "addr", "add", pfx(p.IPv4, 32), "dev", hostLink)
		b.ip6(p, "addr", "add", pfx(p.IPv6, 128), "dev", hostLink, "nodad")
		b.ip(p, "link", "set", hostLink, "up")
		b.ip(p, "route", "add", pfx(gw4, 32), "dev", hostLink, "scope", "link")
		b.ip(p, "route", "add", "default", "via", gw4.String(), "dev", hostLink)
		b.ip6(p, "route", "add", pfx(gw6, 128), "dev", hostLink)
		b.ip6(p, "route", "add", "::/0", "via", gw6.String(), "dev", hostLink)
	}
}

func (l *Lab) podsOf(node string) []*Host {
	var pods []*Host
	for _, p := range l.pods {
		if p.Node == node {
			pods = append(pods, p)
		}
	}
	return pods
}

// startEchoes opens every pod's echo sockets inside the pod's namespace;
// once they exist the kernel queues requests, so no readiness wait is needed.
func (l *Lab) startEchoes() error {
	for _, p := range l.pods {
		s := echo.NewServer(p.Name)
		l.echoes = append(l.echoes, s)
		for _, port := range p.EchoPorts {
			addr := ":" + strconv.Itoa(port)
			ln, err := p.Listen("tcp", addr)
			if err != nil {
				return fmt.Errorf("netlab: echo on pod %s: %w", p.Name, err)
			}
			s.ServeTCP(ln)
			pc, err := p.ListenPacket("udp", addr)
			if err != nil {
				return fmt.Errorf("netlab: echo on pod %s: %w", p.Name, err)
			}
			s.ServeUDP(pc)
		}
	}
	return nil
}
