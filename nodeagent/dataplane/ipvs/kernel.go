package ipvs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/moby/ipvs"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// kernel executes Ops in the network namespace of the calling process.
// It is not safe for concurrent use; the Plane serialises calls.
type kernel struct {
	ipvs   *ipvs.Handle
	nl     *netlink.Handle
	ipt    string // iptables backend: "", "legacy" or "nft"
	counts Counts
	// draining holds real servers kept at weight 0 until their
	// connections end, so that a returning endpoint is updated, not added.
	draining map[drainKey]struct{}
}

type drainKey struct {
	vs VSKey
	rs RSKey
}

// observed is what readState found besides the State: per real server, its
// weight and connection count, for graceful deletion.
type observed map[drainKey]realServer

func newKernel(ipt string) (*kernel, error) {
	h, err := ipvs.New("")
	if err != nil {
		return nil, fmt.Errorf("ipvs: open IPVS netlink (is ip_vs loaded?): %w", err)
	}
	nl, err := netlink.NewHandle()
	if err != nil {
		h.Close()
		return nil, fmt.Errorf("ipvs: open rtnetlink: %w", err)
	}
	return &kernel{ipvs: h, nl: nl, ipt: ipt, draining: map[drainKey]struct{}{}}, nil
}

func (k *kernel) close() {
	k.ipvs.Close()
	k.nl.Close()
}

// link returns kube-ipvs0, creating it if asked. It stays down: addresses
// on a down link are still local, and a down link answers no ARP.
func (k *kernel) link(create bool) (netlink.Link, error) {
	k.counts.Reads++
	l, err := k.nl.LinkByName(DummyDevice)
	var notFound netlink.LinkNotFoundError
	if err == nil || !create || !errors.As(err, &notFound) {
		return l, err
	}
	if err := k.nl.LinkAdd(&netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Name: DummyDevice}}); err != nil {
		return nil, fmt.Errorf("ipvs: create %s: %w", DummyDevice, err)
	}
	k.counts.Reads++
	return k.nl.LinkByName(DummyDevice)
}

// nodeAddrs lists the node's addresses for NodePorts, as kube-proxy: all
// but those on kube-ipvs0, loopback and IPv6 link-local ones.
func (k *kernel) nodeAddrs() ([]netip.Addr, error) {
	k.counts.Reads++
	addrs, err := k.nl.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("ipvs: list addresses: %w", err)
	}
	skip := -1
	if l, err := k.link(false); err == nil {
		skip = l.Attrs().Index
	}
	var out []netip.Addr
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP)
		ip = ip.Unmap()
		if !ok || a.LinkIndex == skip || ip.IsLoopback() || ip.IsLinkLocalUnicast() && ip.Is6() {
			continue
		}
		out = append(out, ip)
	}
	return out, nil
}

func service(key VSKey, vs *VirtualServer) *ipvs.Service {
	s := &ipvs.Service{
		Address: key.Addr.AsSlice(), Protocol: uint16(key.Proto), Port: key.Port,
		AddressFamily: syscall.AF_INET, Netmask: 0xffffffff,
	}
	if key.Addr.Is6() {
		s.AddressFamily, s.Netmask = syscall.AF_INET6, 128
	}
	if vs != nil {
		s.SchedName, s.Flags, s.Timeout = vs.Scheduler, vs.Flags, vs.Timeout
	}
	return s
}

func destination(rs RSKey, weight int) *ipvs.Destination {
	d := &ipvs.Destination{Address: rs.Addr.AsSlice(), Port: rs.Port, Weight: weight,
		ConnectionFlags: ipvs.ConnectionFlagMasq, AddressFamily: syscall.AF_INET}
	if rs.Addr.Is6() {
		d.AddressFamily = syscall.AF_INET6
	}
	return d
}

// readState reads every virtual server (fwmark ones are not ours),
// kube-ipvs0's addresses and the owned sets; with reals, also the real
// servers. Rules are left empty: the caller rewrites them whole.
func (k *kernel) readState(ctx context.Context, reals bool) (State, observed, error) {
	st := State{Services: map[VSKey]*VirtualServer{}, Addrs: map[netip.Addr]struct{}{}}
	obs := observed{}
	var dests map[VSKey]map[RSKey]realServer
	if reals {
		k.counts.Reads++
		b, err := os.ReadFile(procIPVS)
		if err != nil {
			return st, nil, fmt.Errorf("ipvs: %w", err)
		}
		if dests, err = parseProcIPVS(string(b)); err != nil {
			return st, nil, err
		}
	}
	k.counts.Reads++
	svcs, err := k.ipvs.GetServices()
	if err != nil {
		return st, nil, fmt.Errorf("ipvs: list virtual servers: %w", err)
	}
	for _, s := range svcs {
		a, ok := netip.AddrFromSlice(s.Address)
		if s.FWMark != 0 || !ok {
			continue
		}
		key := VSKey{a.Unmap(), Proto(s.Protocol), s.Port}
		vs := &VirtualServer{Scheduler: s.SchedName, Flags: s.Flags &^ flagHashed, Timeout: s.Timeout, Reals: map[RSKey]int{}}
		for rs, d := range dests[key] {
			vs.Reals[rs] = d.weight
			obs[drainKey{key, rs}] = d
		}
		st.Services[key] = vs
	}
	if l, err := k.link(false); err == nil {
		k.counts.Reads++
		addrs, err := k.nl.AddrList(l, netlink.FAMILY_ALL)
		if err != nil {
			return st, nil, fmt.Errorf("ipvs: list %s addresses: %w", DummyDevice, err)
		}
		for _, a := range addrs {
			if ip, ok := netip.AddrFromSlice(a.IP); ok {
				st.Addrs[ip.Unmap()] = struct{}{}
			}
		}
	}
	out, err := k.run(ctx, "", "ipset", "save")
	if err != nil {
		return st, nil, err
	}
	st.Sets = parseSetMembers(out)
	return st, obs, nil
}

// execute runs ops in an order that never leaves a virtual server without
// the set members and address it needs. obs, when known from readState,
// spares a lookup per graceful deletion.
func (k *kernel) execute(ctx context.Context, o Ops, obs observed) error {
	var errs []error
	if err := k.setMembers(ctx, "add", o.SetAdds); err != nil {
		return err
	}
	var l netlink.Link
	if len(o.AddAddrs)+len(o.DelAddrs) > 0 {
		var err error
		if l, err = k.link(true); err != nil {
			return err
		}
	}
	for _, a := range o.AddAddrs {
		k.counts.AddressAdds++
		if err := k.nl.AddrAdd(l, hostAddr(a)); err != nil && !errors.Is(err, unix.EEXIST) {
			errs = append(errs, fmt.Errorf("ipvs: bind %s to %s: %w", a, DummyDevice, err))
		}
	}
	for _, op := range o.AddServices {
		k.counts.VirtualServerAdds++
		err := k.ipvs.NewService(service(op.Key, op.VS))
		if errors.Is(err, unix.EEXIST) {
			// Someone else made it since we last looked: take it over.
			o.UpdateServices = append(o.UpdateServices, op)
		} else if err != nil {
			errs = append(errs, fmt.Errorf("ipvs: add virtual server %s: %w", op.Key, err))
		}
	}
	for _, op := range o.UpdateServices {
		k.counts.VirtualServerUpdates++
		if err := k.ipvs.UpdateService(service(op.Key, op.VS)); err != nil {
			errs = append(errs, fmt.Errorf("ipvs: update virtual server %s: %w", op.Key, err))
		}
	}
	for _, op := range o.AddReals {
		errs = append(errs, k.addReal(op))
	}
	for _, op := range o.UpdateReals {
		k.counts.RealServerUpdates++
		if err := k.ipvs.UpdateDestination(service(op.VS, nil), destination(op.RS, op.Weight)); err != nil {
			errs = append(errs, fmt.Errorf("ipvs: update real server %s of %s: %w", op.RS.Addr, op.VS, err))
		}
	}
	errs = append(errs, k.deleteReals(o.DelReals, obs))
	for _, key := range o.DelServices {
		k.counts.VirtualServerDeletes++
		if err := k.ipvs.DelService(service(key, nil)); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("ipvs: delete virtual server %s: %w", key, err))
		}
		for d := range k.draining {
			if d.vs == key {
				delete(k.draining, d)
			}
		}
	}
	for _, a := range o.DelAddrs {
		k.counts.AddressDeletes++
		if err := k.nl.AddrDel(l, hostAddr(a)); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
			errs = append(errs, fmt.Errorf("ipvs: unbind %s from %s: %w", a, DummyDevice, err))
		}
	}
	errs = append(errs, k.setMembers(ctx, "del", o.SetDels))
	for _, f := range []Family{V4, V6} {
		if r, ok := o.Rules[f]; ok {
			errs = append(errs, k.restoreRules(ctx, f, r, false))
		}
	}
	return errors.Join(errs...)
}

// hostAddr is a /32 or /128. kube-ipvs0 is NOARP, so IPv6 addresses skip
// duplicate address detection and are local at once, as the VM test checks.
func hostAddr(a netip.Addr) *netlink.Addr {
	return &netlink.Addr{IPNet: &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(a.BitLen(), a.BitLen())}}
}

func (k *kernel) addReal(op RSOp) error {
	d := drainKey{op.VS, op.RS}
	if _, ok := k.draining[d]; !ok {
		k.counts.RealServerAdds++
		err := k.ipvs.NewDestination(service(op.VS, nil), destination(op.RS, op.Weight))
		if !errors.Is(err, unix.EEXIST) {
			if err != nil {
				return fmt.Errorf("ipvs: add real server %s:%d to %s: %w", op.RS.Addr, op.RS.Port, op.VS, err)
			}
			return nil
		}
	}
	// The endpoint came back while its old real server drained.
	delete(k.draining, d)
	k.counts.RealServerUpdates++
	if err := k.ipvs.UpdateDestination(service(op.VS, nil), destination(op.RS, op.Weight)); err != nil {
		return fmt.Errorf("ipvs: revive real server %s:%d of %s: %w", op.RS.Addr, op.RS.Port, op.VS, err)
	}
	return nil
}

// deleteReals removes real servers as kube-proxy's graceful termination
// does: a TCP real server with connections is set to weight 0 and kept
// until a later Sync finds it idle; UDP and SCTP ones go at once
// (expire_nodest_conn ends their flows).
func (k *kernel) deleteReals(ops []RSOp, obs observed) error {
	var errs []error
	for _, op := range ops {
		d := drainKey{op.VS, op.RS}
		if op.VS.Proto == TCP {
			if _, known := obs[d]; !known {
				obs = k.lookup(op.VS, obs)
			}
			if c := obs[d]; c.conns > 0 {
				k.draining[d] = struct{}{}
				if c.weight == 0 {
					continue
				}
				k.counts.RealServerUpdates++
				obs[d] = realServer{0, c.conns}
				if err := k.ipvs.UpdateDestination(service(op.VS, nil), destination(op.RS, 0)); err != nil {
					errs = append(errs, fmt.Errorf("ipvs: drain real server %s:%d of %s: %w", op.RS.Addr, op.RS.Port, op.VS, err))
				}
				continue
			}
		}
		delete(k.draining, d)
		k.counts.RealServerDeletes++
		if err := k.ipvs.DelDestination(service(op.VS, nil), destination(op.RS, 0)); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("ipvs: delete real server %s:%d of %s: %w", op.RS.Addr, op.RS.Port, op.VS, err))
		}
	}
	return errors.Join(errs...)
}

// lookup adds the real servers of one virtual server to obs.
func (k *kernel) lookup(key VSKey, obs observed) observed {
	if obs == nil {
		obs = observed{}
	}
	k.counts.Reads++
	dsts, _ := k.ipvs.GetDestinations(service(key, nil))
	for _, d := range dsts {
		if a, ok := netip.AddrFromSlice(d.Address); ok {
			obs[drainKey{key, RSKey{a.Unmap(), d.Port}}] = realServer{d.Weight, d.ActiveConnections + d.InactiveConnections}
		}
	}
	return obs
}

// setMembers adds or deletes members in one `ipset restore` batch.
func (k *kernel) setMembers(ctx context.Context, verb string, ms []SetMember) error {
	if len(ms) == 0 {
		return nil
	}
	var b strings.Builder
	for _, m := range ms {
		b.WriteString(verb + " " + m.Set + " " + m.Member + "\n")
	}
	if verb == "add" {
		k.counts.SetMemberAdds += len(ms)
	} else {
		k.counts.SetMemberDeletes += len(ms)
	}
	_, err := k.run(ctx, b.String(), "ipset", "restore", "-exist")
	return err
}

// ensureSets creates every owned set of the families that is missing.
func (k *kernel) ensureSets(ctx context.Context, families []Family) error {
	var b strings.Builder
	for _, f := range families {
		for _, base := range setBases() {
			b.WriteString(createLine(f, base) + "\n")
		}
	}
	_, err := k.run(ctx, b.String(), "ipset", "restore", "-exist")
	return err
}

// iptables returns the backend's command for a family: "save" or "restore".
func (k *kernel) iptables(f Family, what string) string {
	name := "iptables"
	if f == V6 {
		name = "ip6tables"
	}
	if k.ipt != "" {
		name += "-" + k.ipt
	}
	return name + "-" + what
}

// restoreRules rewrites the owned chains of one family and repairs the
// jumps into them, in one iptables-restore. With clean, it removes them.
func (k *kernel) restoreRules(ctx context.Context, f Family, r Rules, clean bool) error {
	save, err := k.run(ctx, "", k.iptables(f, "save"))
	if err != nil {
		return err
	}
	var del, add []jump
	if clean {
		del = ownedJumps(save)
	} else {
		del, add = jumpsToFix(save)
	}
	k.counts.RuleRestores++
	_, err = k.run(ctx, restoreInput(r, del, add, clean), k.iptables(f, "restore"), "-w", "--noflush")
	return err
}

// run runs a tool with stdin and returns its stdout.
func (k *kernel) run(ctx context.Context, stdin, name string, args ...string) (string, error) {
	k.counts.Commands++
	cmd := exec.CommandContext(ctx, tool(name), args...)
	cmd.Stdin = strings.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("ipvs: %s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

// tool finds a command also where PATH lacks the sbin directories.
func tool(name string) string {
	if _, err := exec.LookPath(name); err == nil {
		return name
	}
	for _, dir := range []string{"/usr/sbin", "/sbin"} {
		if p := filepath.Join(dir, name); isExecutable(p) {
			return p
		}
	}
	return name
}

func isExecutable(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode()&0o111 != 0
}
