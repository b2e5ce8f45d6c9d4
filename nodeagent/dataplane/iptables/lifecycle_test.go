package iptables

import (
	"context"
	"net"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// addForeign installs rules of "another tool" that the plane must never
// touch, in both families.
func addForeign(t *testing.T, backend string) {
	t.Helper()
	for _, fam := range []family{v4, v6} {
		cmds := commandsFor(backend, fam)
		src := "198.18.9.9"
		if fam == v6 {
			src = "2001:2::9:9"
		}
		mustRun(t, "*nat\n:KUBE-FOO - [0:0]\n-A KUBE-FOO -s "+src+" -j RETURN\n-A PREROUTING -s "+src+" -j KUBE-FOO\nCOMMIT\n"+
			"*filter\n:OTHER - [0:0]\n-A OTHER -s "+src+" -j ACCEPT\n-A INPUT -j OTHER\nCOMMIT\n", cmds.restore, "--noflush")
	}
}

// foreignLines is everything in a save that is not ours.
func foreignLines(save string) []string {
	var out []string
	for _, l := range strings.Split(save, "\n") {
		if !strings.Contains(l, "SBX-") {
			out = append(out, l)
		}
	}
	return out
}

func TestSyncRemovesStaleChainsKeepsForeign(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			inNetns(t)
			ctx := context.Background()
			addForeign(t, backend)
			first := newPlane(t, backend, richCfg)
			if _, err := first.Sync(ctx, richTable()); err != nil {
				t.Fatal(err)
			}
			cmds4 := commandsFor(backend, v4)
			// A chain left by some older run, in our naming scheme.
			mustRun(t, "*nat\n:SBX-SVC-AAAAAAAAAAAAAAAA - [0:0]\n-A SBX-SVC-AAAAAAAAAAAAAAAA -p tcp -j DNAT --to-destination 198.19.7.7:80\nCOMMIT\n", cmds4.restore, "--noflush")
			foreign4 := foreignLines(cleanSave(t, cmds4))

			// A restart: a new plane knows nothing and gets a smaller table.
			smaller := without(richTable(), "svc/v4/ns/c/p443", "svc/v4/ns/g/p443", "svc/v6/ns/a/p80")
			second := newPlane(t, backend, richCfg)
			if _, err := second.Sync(ctx, smaller); err != nil {
				t.Fatal(err)
			}
			checkKernel(t, second, smaller)
			if got := foreignLines(cleanSave(t, cmds4)); !slices.Equal(got, foreign4) {
				t.Fatalf("foreign rules changed:\n got %q\nwant %q", got, foreign4)
			}
		})
	}
}

// TestSyncOverHeldRulesWritesNothing: an agent restart over unchanged
// rules, or a repair after a lost jump, needs no restore at all.
func TestSyncOverHeldRulesWritesNothing(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			inNetns(t)
			ctx := context.Background()
			tbl := richTable()
			// Rows inserted by a partial update sit in another order than
			// a full render writes them; that must still count as held.
			before := without(tbl, "svc/v4/ns/c/p443")
			first := newPlane(t, backend, richCfg)
			if _, err := first.Sync(ctx, before); err != nil {
				t.Fatal(err)
			}
			if _, err := first.Apply(ctx, before, tbl); err != nil {
				t.Fatal(err)
			}
			second := newPlane(t, backend, richCfg)
			res, err := second.Sync(ctx, tbl)
			if err != nil {
				t.Fatal(err)
			}
			if second.restores != 0 {
				t.Fatalf("Sync over held rules ran %d restores", second.restores)
			}
			checkKernel(t, second, tbl)
			if got := countRules(t, second); res.Rules != got {
				t.Fatalf("Result.Rules = %d, kernel holds %d", res.Rules, got)
			}
			// A lost jump: one small restore puts back just that.
			mustRun(t, "", commandsFor(backend, v4).iptables, append([]string{"-t", "nat", "-D", "OUTPUT"}, jumps[1].args()...)...)
			if _, err := second.Sync(ctx, tbl); err != nil {
				t.Fatal(err)
			}
			if second.restores != 1 {
				t.Fatalf("Sync after a lost jump ran %d restores, want 1", second.restores)
			}
			checkKernel(t, second, tbl)
			// One rule out of place: that family is written again.
			mustRun(t, "", commandsFor(backend, v6).iptables, "-t", "nat", "-A", chainMarkMasq, "-j", "RETURN")
			if _, err := second.Sync(ctx, tbl); err != nil {
				t.Fatal(err)
			}
			if second.restores != 2 {
				t.Fatalf("Sync over one changed family ran %d restores, want 1 more", second.restores)
			}
			checkKernel(t, second, tbl)
		})
	}
}

func TestRefusedPlanKeepsPrevious(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			inNetns(t)
			ctx := context.Background()
			p := newPlane(t, backend, richCfg)
			t0 := richTable()
			if _, err := p.Sync(ctx, t0); err != nil {
				t.Fatal(err)
			}
			cmds4, cmds6 := commandsFor(backend, v4), commandsFor(backend, v6)
			save4, save6 := cleanSave(t, cmds4), cleanSave(t, cmds6)
			// Changes in both families, in nat and filter.
			t1 := with(t0,
				res(svcSpec("ns", "a", v4f, "198.18.100.1", 80, bothEPs("198.19.1.1:8080", "198.19.8.8:8080"))),
				res(svcSpec("ns", "b", v6f, "2001:2::100:2", 80, bothEPs("[2001:2:1::8:8]:8080"))))
			bad := "-A " + chainServices + " -m nosuchmatch --nope -j ACCEPT\n"

			p.hook = func(pl *Plan) { pl.V4.nat.body = append(pl.V4.nat.body, bad...) }
			_, err := p.Apply(ctx, t0, t1)
			if err == nil || !strings.Contains(err.Error(), "nosuchmatch") {
				t.Fatalf("Apply of a refused IPv4 plan: err = %v, want one quoting the bad line", err)
			}
			if cleanSave(t, cmds4) != save4 || cleanSave(t, cmds6) != save6 {
				t.Fatal("a refused IPv4 plan changed the kernel")
			}

			// IPv6 refused after IPv4 went in: IPv4 is moved back. Its
			// dispatch rows may come back in another order, nothing else.
			p.hook = func(pl *Plan) { pl.V6.nat.body = append(pl.V6.nat.body, bad...) }
			if _, err := p.Apply(ctx, t0, t1); err == nil {
				t.Fatal("Apply of a refused IPv6 plan succeeded")
			}
			if d := diffStates(kernelState(t, cmds4), parseState(save4, false)); d != "" {
				t.Fatalf("IPv4 not reverted:\n%s", d)
			}
			if cleanSave(t, cmds6) != save6 {
				t.Fatalf("a refused IPv6 plan changed IPv6 rules:\n%s\nwant\n%s", cleanSave(t, cmds6), save6)
			}
			checkKernel(t, p, t0)

			// The same for a settings change, which rewrites everything.
			t2 := with(t1, settingsRes(&pb.NodeSettings{ClusterCidrs: []string{"198.19.0.0/17", "198.19.128.0/17"}}))
			if _, err := p.Apply(ctx, t0, t2); err == nil {
				t.Fatal("Apply of a refused full IPv6 plan succeeded")
			}
			if d := diffStates(kernelState(t, cmds4), parseState(save4, false)); d != "" {
				t.Fatalf("IPv4 not reverted after a full plan:\n%s", d)
			}
			if cleanSave(t, cmds6) != save6 {
				t.Fatal("a refused full IPv6 plan changed IPv6 rules")
			}

			p.hook = nil
			if _, err := p.Apply(ctx, t0, t1); err != nil {
				t.Fatalf("the same delta, unbroken, after two refusals: %v", err)
			}
			checkKernel(t, p, t1)
		})
	}
}

func TestCleanupRemovesOnlyOwned(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			inNetns(t)
			ctx := context.Background()
			addForeign(t, backend)
			cmds4, cmds6 := commandsFor(backend, v4), commandsFor(backend, v6)
			before4, before6 := cleanSave(t, cmds4), cleanSave(t, cmds6)
			p := newPlane(t, backend, richCfg)
			if _, err := p.Sync(ctx, richTable()); err != nil {
				t.Fatal(err)
			}
			if err := p.Cleanup(ctx); err != nil {
				t.Fatal(err)
			}
			if got := cleanSave(t, cmds4); got != before4 {
				t.Fatalf("IPv4 after Cleanup:\n%s\nwant:\n%s", got, before4)
			}
			if got := cleanSave(t, cmds6); got != before6 {
				t.Fatalf("IPv6 after Cleanup:\n%s\nwant:\n%s", got, before6)
			}
			if err := p.Cleanup(ctx); err != nil {
				t.Fatalf("second Cleanup: %v", err)
			}
		})
	}
}

func TestCheckDetectsFlushAndSyncRepairs(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			inNetns(t)
			ctx := context.Background()
			p := newPlane(t, backend, richCfg)
			tbl := richTable()
			if _, err := p.Sync(ctx, tbl); err != nil {
				t.Fatal(err)
			}
			if err := p.Check(ctx); err != nil {
				t.Fatal(err)
			}
			cmds := commandsFor(backend, v4)
			mustRun(t, "", cmds.iptables, append([]string{"-t", "nat", "-D", "PREROUTING"}, jumps[0].args()...)...)
			if err := p.Check(ctx); err == nil || !strings.Contains(err.Error(), "PREROUTING") {
				t.Fatalf("Check after the jump was deleted: %v", err)
			}
			mustRun(t, "", commandsFor(backend, v6).iptables, "-t", "nat", "-F", chainMarkMasq)
			if err := p.Check(ctx); err == nil || !strings.Contains(err.Error(), chainMarkMasq) {
				t.Fatalf("Check after a chain flush: %v", err)
			}
			if _, err := p.Sync(ctx, tbl); err != nil {
				t.Fatal(err)
			}
			if err := p.Check(ctx); err != nil {
				t.Fatalf("Check after repair: %v", err)
			}
			checkKernel(t, p, tbl) // also proves no jump was inserted twice
		})
	}
}

// TestConntrackCleanup plants UDP flows through netlink and checks which
// ones a delta removes.
func TestConntrackCleanup(t *testing.T) {
	inNetns(t)
	ctx := context.Background()
	h, err := netlink.NewHandle(unix.NETLINK_NETFILTER)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	udp := func(sp *pb.ServicePort) { sp.Protocol = pb.Protocol_PROTOCOL_UDP }
	t0 := tableOf(defaultSettings(),
		res(svcSpec("ns", "dns", v4f, "198.18.100.53", 53, bothEPs("198.19.5.1:5353", "198.19.5.2:5353"), udp, func(sp *pb.ServicePort) {
			sp.NodePort = 30053
		})),
		res(svcSpec("ns", "late", v4f, "198.18.100.54", 53, udp)))
	p := newPlane(t, BackendLegacy, Config{})
	if _, err := p.Sync(ctx, t0); err != nil {
		t.Fatal(err)
	}
	flow := func(sport uint16, dst string, dport uint16, replySrc string, replySport uint16) *netlink.ConntrackFlow {
		client := net.ParseIP("198.19.9.9").To4()
		return &netlink.ConntrackFlow{
			FamilyType: unix.AF_INET,
			Forward:    netlink.IPTuple{SrcIP: client, DstIP: net.ParseIP(dst).To4(), SrcPort: sport, DstPort: dport, Protocol: unix.IPPROTO_UDP},
			Reverse:    netlink.IPTuple{SrcIP: net.ParseIP(replySrc).To4(), DstIP: client, SrcPort: replySport, DstPort: sport, Protocol: unix.IPPROTO_UDP},
			TimeOut:    300,
		}
	}
	flows := map[uint16]*netlink.ConntrackFlow{
		40001: flow(40001, "198.18.100.53", 53, "198.19.5.1", 5353),  // kept endpoint
		40002: flow(40002, "198.18.100.53", 53, "198.19.5.2", 5353),  // removed endpoint
		40003: flow(40003, "198.18.0.1", 30053, "198.19.5.2", 5353),  // NodePort, removed endpoint
		40004: flow(40004, "198.18.100.54", 53, "198.18.100.54", 53), // was rejected, now served
		40005: flow(40005, "198.18.7.7", 53, "198.18.7.7", 53),       // not a service
	}
	for port, f := range flows {
		if err := h.ConntrackCreate(netlink.ConntrackTable, unix.AF_INET, f); err != nil {
			t.Fatalf("plant flow %d: %v", port, err)
		}
	}
	t1 := with(t0,
		res(svcSpec("ns", "dns", v4f, "198.18.100.53", 53, bothEPs("198.19.5.1:5353"), udp, func(sp *pb.ServicePort) {
			sp.NodePort = 30053
		})),
		res(svcSpec("ns", "late", v4f, "198.18.100.54", 53, bothEPs("198.19.5.4:5353"), udp)))
	result, err := p.Apply(ctx, t0, t1)
	if err != nil {
		t.Fatal(err)
	}
	if result.ConntrackCleaned != 3 {
		t.Errorf("ConntrackCleaned = %d, want 3", result.ConntrackCleaned)
	}
	left, err := h.ConntrackTableList(netlink.ConntrackTable, unix.AF_INET)
	if err != nil {
		t.Fatal(err)
	}
	var ports []int
	for _, f := range left {
		if f.Forward.Protocol == unix.IPPROTO_UDP {
			ports = append(ports, int(f.Forward.SrcPort))
		}
	}
	sort.Ints(ports)
	if !slices.Equal(ports, []int{40001, 40005}) {
		t.Fatalf("flows left: %v, want [40001 40005]", ports)
	}
}

func TestDetectBackend(t *testing.T) {
	inNetns(t)
	ctx := context.Background()
	out := mustRun(t, "", "iptables", "--version")
	def := BackendLegacy
	if strings.Contains(out, "nf_tables") {
		def = BackendNFT
	}
	steps := []struct {
		cmd  []string
		want string
	}{
		{nil, def}, // nothing anywhere: the node's default alternative
		{[]string{"iptables-legacy", "-A", "INPUT", "-s", "198.18.9.1", "-j", "ACCEPT"}, BackendLegacy},
		{[]string{"iptables-nft", "-A", "INPUT", "-s", "198.18.9.1", "-j", "ACCEPT"}, def},
		{[]string{"ip6tables-nft", "-A", "INPUT", "-s", "2001:2::9:1", "-j", "ACCEPT"}, BackendNFT},
		{[]string{"iptables-legacy", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT"}, BackendLegacy},
	}
	for i, s := range steps {
		if s.cmd != nil {
			mustRun(t, "", s.cmd[0], s.cmd[1:]...)
		}
		got, err := DetectBackend(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if got != s.want {
			t.Fatalf("step %d: DetectBackend = %s, want %s", i, got, s.want)
		}
	}
}

// TestSyncInChunks programs a table big enough for the nft backend to
// split the nat table into several commits, then shrinks it.
func TestSyncInChunks(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			inNetns(t)
			ctx := context.Background()
			p := newPlane(t, backend, onlyV4)
			big := bigTable(1500, 5)
			if _, err := p.Sync(ctx, big); err != nil {
				t.Fatal(err)
			}
			checkKernel(t, p, big)
			small := bigTable(300, 4)
			if _, err := p.Sync(ctx, small); err != nil {
				t.Fatal(err)
			}
			checkKernel(t, p, small)
		})
	}
}
