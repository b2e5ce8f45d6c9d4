// Package ipvs is the IPVS data plane: it renders a node's decided table as
// IPVS virtual and real servers, addresses on the dummy kube-ipvs0 link,
// ipset members, and a small fixed set of iptables rules that match those
// sets, as kube-proxy's IPVS mode does.
//
// Desired and Diff are pure; the Plane executes their result with netlink
// (github.com/moby/ipvs, github.com/vishvananda/netlink), `ipset restore`
// and `iptables-restore --noflush`.
package ipvs

import (
	"fmt"
	"net/netip"
	"strings"
)

// Family is an IP family.
type Family uint8

// The two families.
const (
	V4 Family = 4
	V6 Family = 6
)

func familyOf(a netip.Addr) Family {
	if a.Is4() {
		return V4
	}
	return V6
}

// Config configures a Plane. The zero value is usable.
type Config struct {
	// Scheduler is the IPVS scheduler of every virtual server: rr (the
	// default), wrr, lc, wlc, lblc, lblcr, dh, sh, sed, nq, mh, or any other
	// the kernel offers (ip_vs_<name> must be loadable).
	Scheduler string
	// NodeIPs are the addresses NodePorts listen on (further restricted by
	// NodeSettings.node_port_addresses). Nil means: every address of every
	// interface but kube-ipvs0 and IPv6 link-local ones, read at each Sync.
	NodeIPs []netip.Addr
	// IPTables selects the iptables backend: "legacy", "nft" (or
	// "iptables-legacy", "iptables-nft", as iptables.DetectBackend says),
	// or "" for whatever `iptables-restore` is on the node. It must be the
	// backend the node's other components use.
	IPTables string
	// MasqueradeBit is the bit of the packet mark that requests SNAT;
	// 0 means 14 (0x4000), as kube-proxy.
	MasqueradeBit int
	// Families the plane programs; nil means both.
	Families []Family
}

const (
	defaultScheduler = "rr"
	defaultMasqBit   = 14
	// DummyDevice carries every service address so the kernel accepts
	// packets for them; IPVS then intercepts them in LOCAL_IN.
	DummyDevice = "kube-ipvs0"
)

func (c Config) withDefaults() (Config, error) {
	if c.Scheduler == "" {
		c.Scheduler = defaultScheduler
	}
	if c.MasqueradeBit == 0 {
		c.MasqueradeBit = defaultMasqBit
	}
	if c.MasqueradeBit < 0 || c.MasqueradeBit > 31 {
		return c, fmt.Errorf("ipvs: masquerade bit %d out of range 0-31", c.MasqueradeBit)
	}
	// Also the iptables plane's names, so DetectBackend's answer fits.
	c.IPTables = strings.TrimPrefix(c.IPTables, "iptables-")
	switch c.IPTables {
	case "", "legacy", "nft":
	default:
		return c, fmt.Errorf("ipvs: unknown iptables backend %q (want legacy, nft or empty)", c.IPTables)
	}
	if c.Families == nil {
		c.Families = []Family{V4, V6}
	}
	for _, f := range c.Families {
		if f != V4 && f != V6 {
			return c, fmt.Errorf("ipvs: unknown family %d", f)
		}
	}
	return c, nil
}

func (c Config) masqMark() string {
	return fmt.Sprintf("%#08x", uint32(1)<<c.MasqueradeBit)
}

func (c Config) hasFamily(f Family) bool {
	for _, g := range c.Families {
		if g == f {
			return true
		}
	}
	return false
}

// Counts are the kernel operations a Plane performed, cumulative since New.
// Tests diff two snapshots, e.g. "one endpoint change is one real-server op".
type Counts struct {
	VirtualServerAdds, VirtualServerUpdates, VirtualServerDeletes int
	RealServerAdds, RealServerUpdates, RealServerDeletes          int
	AddressAdds, AddressDeletes                                   int
	// Reads counts kernel reads: netlink dumps and lookups (services,
	// destinations, addresses, links) and reads of /proc/net/ip_vs.
	Reads int
	// SetMemberAdds and SetMemberDeletes are the ipset lines executed.
	SetMemberAdds, SetMemberDeletes int
	// RuleRestores counts iptables-restore runs.
	RuleRestores int
	// Commands counts every ipset and iptables process started.
	Commands int
}

// RealServerOps is the number of real-server netlink writes.
func (c Counts) RealServerOps() int {
	return c.RealServerAdds + c.RealServerUpdates + c.RealServerDeletes
}

// VirtualServerOps is the number of virtual-server netlink writes.
func (c Counts) VirtualServerOps() int {
	return c.VirtualServerAdds + c.VirtualServerUpdates + c.VirtualServerDeletes
}

// NetlinkWrites is every netlink write: servers and addresses.
func (c Counts) NetlinkWrites() int {
	return c.RealServerOps() + c.VirtualServerOps() + c.AddressAdds + c.AddressDeletes
}

// Sub returns c - d, for the operations between two snapshots.
func (c Counts) Sub(d Counts) Counts {
	return Counts{
		VirtualServerAdds:    c.VirtualServerAdds - d.VirtualServerAdds,
		VirtualServerUpdates: c.VirtualServerUpdates - d.VirtualServerUpdates,
		VirtualServerDeletes: c.VirtualServerDeletes - d.VirtualServerDeletes,
		RealServerAdds:       c.RealServerAdds - d.RealServerAdds,
		RealServerUpdates:    c.RealServerUpdates - d.RealServerUpdates,
		RealServerDeletes:    c.RealServerDeletes - d.RealServerDeletes,
		AddressAdds:          c.AddressAdds - d.AddressAdds,
		AddressDeletes:       c.AddressDeletes - d.AddressDeletes,
		Reads:                c.Reads - d.Reads,
		SetMemberAdds:        c.SetMemberAdds - d.SetMemberAdds,
		SetMemberDeletes:     c.SetMemberDeletes - d.SetMemberDeletes,
		RuleRestores:         c.RuleRestores - d.RuleRestores,
		Commands:             c.Commands - d.Commands,
	}
}
