package ipvs

// Subtests run by TestIPVSInVM inside the VM, in a private network
// namespace, in this order. They must not run anywhere else: they program
// the kernel.

import (
	"context"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/moby/ipvs"
	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

var inVMSubtests = []struct {
	name string
	f    func(*testing.T)
}{
	{"SyncAndReadBack", testSyncAndReadBack},
	{"Schedulers", testSchedulers},
	{"ThousandServicesOneEndpoint", testThousandServices},
	{"SyncRepairsDrift", testSyncRepairsDrift},
	{"RestartReconciles", testRestartReconciles},
	{"GracefulDrain", testGracefulDrain},
	{"Cleanup", testCleanup},
	{"Backends", testBackends},
}

// vmPlane is shared by the subtests, which build on each other's state.
var (
	vmPlane *Plane
	vmTable pb.Table
)

func newPlane(t *testing.T, cfg Config) *Plane {
	t.Helper()
	p, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func sh(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(tool(name), args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// converged fails unless the kernel holds exactly what p last programmed.
func converged(t *testing.T, p *Plane) {
	t.Helper()
	start := time.Now()
	have, _, err := p.k.readState(context.Background(), true)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("read back %d virtual servers in %s", len(have.Services), time.Since(start).Round(time.Millisecond))
	o := Diff(have, p.last)
	o.Rules = nil
	if !o.Empty() {
		t.Fatalf("kernel differs from the desired state: %+v", countOps(o))
	}
	for _, f := range p.cfg.Families {
		save := sh(t, p.k.iptables(f, "save"))
		if del, add := jumpsToFix(save); del != nil || add != nil {
			t.Errorf("%s: jumps missing or out of order:\n%s", p.k.iptables(f, "save"), save)
		}
	}
}

func sampleTable() pb.Table {
	web := clusterSvc("ns", "web", "198.18.100.1", 80, ep("198.19.0.1", 8080), termEP("198.19.0.2", 8080))
	web.NodePort, web.AffinityTimeoutSeconds = 30080, 600
	dns := clusterSvc("ns", "dns", "198.18.100.2", 53, ep("198.19.0.3", 53))
	dns.Protocol = pb.Protocol_PROTOCOL_UDP
	v6 := clusterSvc("ns", "v6", "2001:2::100", 80, ep("2001:2:1::1", 8080))
	empty := clusterSvc("ns", "empty", "198.18.100.3", 80)
	lb := clusterSvc("ns", "lb", "198.18.100.4", 443, ep("198.19.0.4", 8443))
	lb.ExternalIps = []string{"198.18.200.1"}
	lb.LoadBalancerIngress = []*pb.LoadBalancerIngress{{Ip: "198.18.210.1"}}
	lb.LoadBalancerSourceRanges = []string{"198.18.64.0/18"}
	return table(&pb.NodeSettings{ClusterCidrs: []string{"198.19.0.0/16", "2001:2:1::/64"}}, web, dns, v6, empty, lb)
}

func testSyncAndReadBack(t *testing.T) {
	ctx := context.Background()
	vmPlane = newPlane(t, Config{NodeIPs: []netip.Addr{netip.MustParseAddr("198.18.0.1"), netip.MustParseAddr("2001:2::1")}})
	vmTable = sampleTable()
	start := time.Now()
	res, err := vmPlane.Sync(ctx, vmTable)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("first Sync: %s, %d objects, %+v", time.Since(start).Round(time.Millisecond), res.Rules, vmPlane.Counts())

	h, err := ipvs.New("")
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	svcs, err := h.GetServices()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]*ipvs.Service{}
	for _, s := range svcs {
		got[fmt.Sprintf("%d/%s:%d", s.Protocol, s.Address, s.Port)] = s
	}
	want := map[string]struct {
		flags, timeout uint32
		reals          map[string]int
	}{
		"6/198.18.100.1:80":  {flagPersistent, 600, map[string]int{"198.19.0.1:8080": 1, "198.19.0.2:8080": 1}},
		"6/198.18.0.1:30080": {flagPersistent, 600, map[string]int{"198.19.0.1:8080": 1, "198.19.0.2:8080": 1}},
		"17/198.18.100.2:53": {0, 0, map[string]int{"198.19.0.3:53": 1}},
		"6/2001:2::100:80":   {0, 0, map[string]int{"[2001:2:1::1]:8080": 1}},
		"6/198.18.100.3:80":  {0, 0, map[string]int{}},
		"6/198.18.100.4:443": {0, 0, map[string]int{"198.19.0.4:8443": 1}},
		"6/198.18.200.1:443": {0, 0, map[string]int{"198.19.0.4:8443": 1}},
		"6/198.18.210.1:443": {0, 0, map[string]int{"198.19.0.4:8443": 1}},
	}
	if len(got) != len(want) {
		t.Errorf("kernel has %d virtual servers, want %d: %v", len(got), len(want), slices.Sorted(maps.Keys(got)))
	}
	for k, w := range want {
		s, ok := got[k]
		if !ok {
			t.Errorf("virtual server %s missing", k)
			continue
		}
		if s.SchedName != "rr" || s.Flags&^flagHashed != w.flags || s.Timeout != w.timeout {
			t.Errorf("%s: scheduler %s flags %#x timeout %d, want rr %#x %d", k, s.SchedName, s.Flags, s.Timeout, w.flags, w.timeout)
		}
		dsts, err := h.GetDestinations(s)
		if err != nil {
			t.Fatal(err)
		}
		reals := map[string]int{}
		for _, d := range dsts {
			reals[netip.AddrPortFrom(netip.MustParseAddr(d.Address.String()), d.Port).String()] = d.Weight
			if d.ConnectionFlags&ipvs.ConnectionFlagFwdMask != ipvs.ConnectionFlagMasq {
				t.Errorf("%s: real server %s not in NAT mode", k, d.Address)
			}
		}
		if !maps.Equal(reals, w.reals) {
			t.Errorf("%s: real servers %v, want %v", k, reals, w.reals)
		}
	}

	link, err := netlink.LinkByName(DummyDevice)
	if err != nil || link.Type() != "dummy" {
		t.Fatalf("%s: %v %v", DummyDevice, link, err)
	}
	bound := boundAddrs(t)
	wantBound := []string{"198.18.100.1", "198.18.100.2", "198.18.100.3", "198.18.100.4", "198.18.200.1", "198.18.210.1", "2001:2::100"}
	if !slices.Equal(bound, wantBound) {
		t.Errorf("%s holds %v, want %v", DummyDevice, bound, wantBound)
	}
	// The kernel must take service addresses as its own, in both families.
	for _, a := range []string{"198.18.100.1", "2001:2::100"} {
		routes, err := netlink.RouteGet(net.ParseIP(a))
		if err != nil || len(routes) == 0 || routes[0].Type != unix.RTN_LOCAL {
			t.Errorf("route to %s is not local: %+v %v", a, routes, err)
		}
	}
	if b, _ := os.ReadFile("/proc/sys/net/ipv4/vs/conntrack"); strings.TrimSpace(string(b)) != "1" {
		t.Errorf("net.ipv4.vs.conntrack = %q", b)
	}
	// Equal sets prove the members are written as ipset prints them.
	converged(t, vmPlane)
	save := sh(t, "ipset", "save")
	for _, m := range []string{
		"add SBX-IPVS-CLUSTER-IP 198.18.100.2,udp:53", "add SBX-IPVS-NP-TCP 30080",
		"add SBX-IPVS-LB-SRC-CIDR 198.18.210.1,tcp:443,198.18.64.0/18", "add SBX-IPVS6-LOOPBACK 2001:2:1::1,tcp:8080,2001:2:1::1",
		"add SBX-IPVS-NOEP-REJECT 198.18.100.3,tcp:80",
	} {
		if !strings.Contains(save, m+"\n") {
			t.Errorf("ipset save lacks %q", m)
		}
	}

	// A second Sync of the same table changes nothing but the rules.
	before := vmPlane.Counts()
	if _, err := vmPlane.Sync(ctx, vmTable); err != nil {
		t.Fatal(err)
	}
	if d := vmPlane.Counts().Sub(before); d.NetlinkWrites() != 0 || d.SetMemberAdds+d.SetMemberDeletes != 0 {
		t.Errorf("idempotent Sync did work: %+v", d)
	}

	// Deleting a service unbinds its address.
	next := without(vmTable, "dns")
	before = vmPlane.Counts()
	if _, err := vmPlane.Apply(ctx, vmTable, next); err != nil {
		t.Fatal(err)
	}
	vmTable = next
	d := vmPlane.Counts().Sub(before)
	if d.VirtualServerDeletes != 1 || d.AddressDeletes != 1 || d.NetlinkWrites() != 2 {
		t.Errorf("deleting a service: %+v", d)
	}
	if slices.Contains(boundAddrs(t), "198.18.100.2") {
		t.Errorf("address of the deleted service still on %s", DummyDevice)
	}
	converged(t, vmPlane)
}

func boundAddrs(t *testing.T) []string {
	t.Helper()
	link, err := netlink.LinkByName(DummyDevice)
	if err != nil {
		t.Fatal(err)
	}
	as, err := netlink.AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, a := range as {
		out = append(out, a.IP.String())
	}
	slices.Sort(out)
	return out
}

func testSchedulers(t *testing.T) {
	ctx := context.Background()
	tb := table(nil, clusterSvc("ns", "s", "198.18.100.50", 80, ep("198.19.0.50", 8080)))
	k := vsKey("198.18.100.50", TCP, 80)
	for _, s := range []string{"rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "mh"} {
		p := newPlane(t, Config{Scheduler: s, NodeIPs: []netip.Addr{}, Families: []Family{V4}})
		if _, err := p.Sync(ctx, tb); err != nil {
			t.Fatalf("%s: %v", s, err)
		}
		got, err := p.k.ipvs.GetService(service(k, nil))
		if err != nil {
			t.Fatal(err)
		}
		wantFlags := uint32(0)
		if s == "mh" {
			wantFlags = flagSched1
		}
		if got.SchedName != s || got.Flags&^flagHashed != wantFlags {
			t.Errorf("scheduler %s: kernel has %s flags %#x", s, got.SchedName, got.Flags)
		}
		p.Close()
	}
	p := newPlane(t, Config{Scheduler: "nosuch", NodeIPs: []netip.Addr{}, Families: []Family{V4}})
	defer p.Close()
	if _, err := p.Sync(ctx, tb); err == nil {
		t.Errorf("a scheduler the kernel lacks was accepted")
	}
}

func testThousandServices(t *testing.T) {
	ctx := context.Background()
	p := vmPlane
	big := bigTable(1000)
	before, start := p.Counts(), time.Now()
	if _, err := p.Sync(ctx, big); err != nil {
		t.Fatal(err)
	}
	t.Logf("Sync to 1,000 services x 2 endpoints: %s, %+v", time.Since(start).Round(time.Millisecond), p.Counts().Sub(before))
	vmTable = big
	steps := []struct {
		name string
		f    func(*pb.ServicePort)
		want func(Counts) bool
	}{
		{"add an endpoint", func(sp *pb.ServicePort) { setEPs(sp, append(sp.ClusterEndpoints, ep("198.19.50.1", 8080))...) },
			func(d Counts) bool { return d.RealServerAdds == 1 }},
		{"remove it", func(sp *pb.ServicePort) { setEPs(sp, sp.ClusterEndpoints[:2]...) },
			func(d Counts) bool { return d.RealServerDeletes == 1 }},
	}
	for _, s := range steps {
		next := edit(vmTable, "s0500", s.f)
		before, start := p.Counts(), time.Now()
		if _, err := p.Apply(ctx, vmTable, next); err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		d := p.Counts().Sub(before)
		t.Logf("%s among 1,000 services: %s, %+v", s.name, time.Since(start).Round(time.Millisecond), d)
		if d.RealServerOps() != 1 || !s.want(d) || d.NetlinkWrites() != 1 {
			t.Errorf("%s: want exactly one real-server netlink write, got %+v", s.name, d)
		}
		vmTable = next
	}
	converged(t, p)
}

func testSyncRepairsDrift(t *testing.T) {
	ctx := context.Background()
	p := vmPlane
	h := p.k.ipvs
	gone := vsKey("198.18.100.4", TCP, 80) // s0003
	if err := h.DelService(service(gone, nil)); err != nil {
		t.Fatal(err)
	}
	stray := vsKey("198.18.99.98", TCP, 80)
	if err := h.NewService(service(stray, &VirtualServer{Scheduler: "rr"})); err != nil {
		t.Fatal(err)
	}
	other := vsKey("198.18.100.5", TCP, 80) // s0004
	if err := h.NewDestination(service(other, nil), destination(rsKey("198.19.99.1", 80), 1)); err != nil {
		t.Fatal(err)
	}
	if err := h.UpdateDestination(service(other, nil), destination(rsKey("198.19.0.5", 8080), 7)); err != nil {
		t.Fatal(err)
	}
	link, _ := netlink.LinkByName(DummyDevice)
	if err := netlink.AddrAdd(link, hostAddr(netip.MustParseAddr("198.18.99.99"))); err != nil {
		t.Fatal(err)
	}
	sh(t, "ipset", "add", "SBX-IPVS-CLUSTER-IP", "198.18.99.99,tcp:80")
	sh(t, p.k.iptables(V4, "save")) // the backend is loaded
	sh(t, strings.TrimSuffix(p.k.iptables(V4, "save"), "-save"), "-t", "nat", "-D", "PREROUTING",
		"-m", "comment", "--comment", jumpComment, "-j", chainServices)

	before, start := p.Counts(), time.Now()
	if _, err := p.Sync(ctx, vmTable); err != nil {
		t.Fatal(err)
	}
	d := p.Counts().Sub(before)
	t.Logf("repairing Sync: %s, %+v", time.Since(start).Round(time.Millisecond), d)
	want := Counts{VirtualServerAdds: 1, VirtualServerDeletes: 1, RealServerAdds: 2, RealServerUpdates: 1,
		RealServerDeletes: 1, AddressDeletes: 1, SetMemberDeletes: 1}
	if d.VirtualServerAdds != want.VirtualServerAdds || d.VirtualServerDeletes != want.VirtualServerDeletes ||
		d.RealServerAdds != want.RealServerAdds || d.RealServerUpdates != want.RealServerUpdates ||
		d.RealServerDeletes != want.RealServerDeletes || d.AddressDeletes != want.AddressDeletes ||
		d.AddressAdds != 0 || d.SetMemberDeletes != want.SetMemberDeletes || d.SetMemberAdds != 0 {
		t.Errorf("repair did %+v, want %+v", d, want)
	}
	converged(t, p)
}

func testRestartReconciles(t *testing.T) {
	ctx := context.Background()
	vmPlane.Close()
	// A new plane knows nothing; its first Sync drops what the table lacks.
	p := newPlane(t, vmPlane.cfg)
	vmPlane = p
	next := vmTable
	for i := range 10 {
		next = without(next, fmt.Sprintf("s%04d", i))
	}
	before, start := p.Counts(), time.Now()
	if _, err := p.Sync(ctx, next); err != nil {
		t.Fatal(err)
	}
	vmTable = next
	d := p.Counts().Sub(before)
	t.Logf("first Sync after restart: %s, %+v", time.Since(start).Round(time.Millisecond), d)
	if d.VirtualServerDeletes != 10 || d.AddressDeletes != 10 || d.NetlinkWrites() != 20 {
		t.Errorf("restart with 10 services fewer: %+v", d)
	}
	converged(t, p)
}

func testCleanup(t *testing.T) {
	ctx := context.Background()
	start := time.Now()
	if err := vmPlane.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("Cleanup of %d services: %s", len(vmTable), time.Since(start).Round(time.Millisecond))
	assertClean(t, vmPlane)
	vmPlane.Close()
}

func assertClean(t *testing.T, p *Plane) {
	t.Helper()
	svcs, err := p.k.ipvs.GetServices()
	if err != nil || len(svcs) != 0 {
		t.Errorf("after Cleanup: %d virtual servers, %v", len(svcs), err)
	}
	if _, err := netlink.LinkByName(DummyDevice); err == nil {
		t.Errorf("after Cleanup: %s still exists", DummyDevice)
	}
	if out := sh(t, "ipset", "list", "-n"); strings.Contains(out, setPrefix) {
		t.Errorf("after Cleanup: sets remain:\n%s", out)
	}
	for _, f := range []Family{V4, V6} {
		if out := sh(t, p.k.iptables(f, "save")); strings.Contains(out, "SBX-IPVS") {
			t.Errorf("after Cleanup: %s still lists owned chains:\n%s", p.k.iptables(f, "save"), out)
		}
	}
}

func testBackends(t *testing.T) {
	ctx := context.Background()
	for _, b := range []string{"legacy", "nft"} {
		p := newPlane(t, Config{IPTables: b, NodeIPs: []netip.Addr{netip.MustParseAddr("198.18.0.1")}})
		if _, err := p.Sync(ctx, sampleTable()); err != nil {
			t.Fatalf("%s: %v", b, err)
		}
		converged(t, p)
		if err := p.Cleanup(ctx); err != nil {
			t.Fatalf("%s: %v", b, err)
		}
		assertClean(t, p)
		p.Close()
	}
}
