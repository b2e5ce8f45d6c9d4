package iptables

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"sort"
	"strings"
	"testing"

	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// Every test here runs its body inside a fresh network namespace (inNetns)
// and reads the kernel back with iptables-save.

var richCfg = Config{NodeIPs: []string{"198.18.0.2", "2001:2::2"}}

// richTable exercises every kind of rule, in both families.
func richTable() pb.Table {
	three := []string{"198.19.1.1:8080", "198.19.1.2:8080", "198.19.1.3:8080"}
	return tableOf(defaultSettings(),
		res(svcSpec("ns", "a", v4f, "198.18.100.1", 80, bothEPs(three...))),
		res(svcSpec("ns", "b", v4f, "198.18.100.2", 53, bothEPs("198.19.2.1:5353", "198.19.2.2:5353"), func(sp *pb.ServicePort) {
			sp.Protocol = pb.Protocol_PROTOCOL_UDP
		})),
		res(svcSpec("ns", "c", v4f, "198.18.100.3", 443, bothEPs("198.19.3.1:8443"), func(sp *pb.ServicePort) {
			sp.NodePort = 30443
			sp.ExternalIps = []string{"198.18.200.3"}
		})),
		res(svcSpec("ns", "d", v4f, "198.18.100.4", 80, bothEPs(three...), func(sp *pb.ServicePort) {
			sp.AffinityTimeoutSeconds = 600
		})),
		res(svcSpec("ns", "e", v4f, "198.18.100.5", 80, clusterEPs(three...), func(sp *pb.ServicePort) {
			sp.NodePort, sp.HealthCheckNodePort = 30005, 32005
			sp.ExternalPolicyLocal, sp.MasqueradeExternal = true, false
			sp.ExternalEndpoints = eps("198.19.1.2:8080")
		})),
		res(svcSpec("ns", "f", v4f, "198.18.100.6", 80, clusterEPs(three...), func(sp *pb.ServicePort) {
			sp.NodePort, sp.HealthCheckNodePort = 30006, 32006
			sp.ExternalPolicyLocal, sp.MasqueradeExternal = true, false
			sp.ExternalNoEndpoints = pb.NoEndpointsAction_NO_ENDPOINTS_ACTION_DROP
		})),
		res(svcSpec("ns", "g", v4f, "198.18.100.7", 443, bothEPs("198.19.1.1:8443"), func(sp *pb.ServicePort) {
			sp.NodePort = 30007
			sp.LoadBalancerIngress = []*pb.LoadBalancerIngress{{Ip: "198.18.250.7"}, {Ip: "198.18.250.8", Proxy: true}}
			sp.LoadBalancerSourceRanges = []string{"198.18.0.0/24"}
		})),
		res(svcSpec("ns", "h", v4f, "198.18.100.8", 80, func(sp *pb.ServicePort) {
			sp.NodePort = 30008
			sp.ExternalIps = []string{"198.18.200.8"}
			sp.LoadBalancerIngress = []*pb.LoadBalancerIngress{{Ip: "198.18.250.9"}}
		})),
		res(svcSpec("ns", "i", v4f, "198.18.100.9", 9999, bothEPs("198.19.1.1:9999"), func(sp *pb.ServicePort) {
			sp.Protocol = pb.Protocol_PROTOCOL_SCTP
		})),
		res(svcSpec("ns", "a", v6f, "2001:2::100:1", 80, bothEPs("[2001:2:1::1:1]:8080", "[2001:2:1::1:2]:8080"), func(sp *pb.ServicePort) {
			sp.NodePort = 30001
			sp.AffinityTimeoutSeconds = 60
		})),
		res(svcSpec("ns", "b", v6f, "2001:2::100:2", 80)),
	)
}

func familyCmds(p *Plane) map[family]commands {
	out := map[family]commands{}
	for _, f := range p.fams {
		out[f] = commandsFor(p.backend, f)
	}
	return out
}

// checkKernel compares what the kernel holds with a full render of tbl, in
// both families.
func checkKernel(t *testing.T, p *Plane, tbl pb.Table) {
	t.Helper()
	for fam, cmds := range familyCmds(p) {
		if d := diffStates(kernelState(t, cmds), wantState(t, tbl, p.cfg, fam)); d != "" {
			t.Fatalf("%s kernel differs from a full render:\n%s", fam, d)
		}
	}
	// The NodePort jump must stay below every service row.
	nat := kernelState(t, commandsFor(p.backend, v4))["nat "+chainServices]
	if len(nat) == 0 || !strings.HasSuffix(nat[len(nat)-1], "-j "+chainNodePorts) {
		t.Fatalf("last rule of nat SBX-SERVICES is not the NodePort jump: %q", nat)
	}
}

func countRules(t *testing.T, p *Plane) int {
	n := 0
	for _, cmds := range familyCmds(p) {
		for _, rules := range kernelState(t, cmds) {
			n += len(rules)
		}
	}
	return n
}

func TestSyncProgramsTable(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			inNetns(t)
			p := newPlane(t, backend, richCfg)
			res, err := p.Sync(context.Background(), richTable())
			if err != nil {
				t.Fatal(err)
			}
			checkKernel(t, p, richTable())
			if got := countRules(t, p); res.Rules != got {
				t.Fatalf("Result.Rules = %d, kernel holds %d", res.Rules, got)
			}
			if err := p.Check(context.Background()); err != nil {
				t.Fatalf("Check after Sync: %v", err)
			}
			if p.Name() != backend {
				t.Fatalf("Name() = %q", p.Name())
			}
		})
	}
}

func TestApplyDeltaTouchesOnlyItsService(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			inNetns(t)
			ctx := context.Background()
			p := newPlane(t, backend, richCfg)
			t0 := richTable()
			if _, err := p.Sync(ctx, t0); err != nil {
				t.Fatal(err)
			}
			cmds := commandsFor(backend, v4)
			before, before6 := kernelState(t, cmds), cleanSave(t, commandsFor(backend, v6))

			// One endpoint less: only the service's own chain changes.
			t1 := with(t0, res(svcSpec("ns", "a", v4f, "198.18.100.1", 80, bothEPs("198.19.1.1:8080", "198.19.1.3:8080"))))
			if _, err := p.Apply(ctx, t0, t1); err != nil {
				t.Fatal(err)
			}
			after := kernelState(t, cmds)
			svc := "nat " + prefixSVC + shortHash("svc/v4/ns/a/p80")
			if got := changedKeys(before, after); !slices.Equal(got, []string{svc}) {
				t.Fatalf("changed chains %v, want only %s", got, svc)
			}
			if cleanSave(t, commandsFor(backend, v6)) != before6 {
				t.Fatal("an IPv4 delta changed IPv6 rules")
			}
			checkKernel(t, p, t1)

			// A new external IP: one new dispatch row and the new EXT chain
			// (the SVC chain is rewritten with the same rules).
			t2 := with(t1, res(svcSpec("ns", "a", v4f, "198.18.100.1", 80, bothEPs("198.19.1.1:8080", "198.19.1.3:8080"), func(sp *pb.ServicePort) {
				sp.ExternalIps = []string{"198.18.200.1"}
			})))
			if _, err := p.Apply(ctx, t1, t2); err != nil {
				t.Fatal(err)
			}
			final := kernelState(t, cmds)
			ext := "nat " + prefixEXT + shortHash("svc/v4/ns/a/p80")
			if got := changedKeys(after, final); !slices.Equal(got, []string{ext, "nat " + chainServices}) {
				t.Fatalf("changed chains %v", got)
			}
			if n := len(final["nat "+chainServices]) - len(after["nat "+chainServices]); n != 1 {
				t.Fatalf("SBX-SERVICES grew by %d rows, want 1", n)
			}
			checkKernel(t, p, t2)
		})
	}
}

func changedKeys(a, b state) []string {
	var out []string
	for k, v := range a {
		if !slices.Equal(v, b[k]) {
			out = append(out, k)
		}
	}
	for k := range b {
		if _, ok := a[k]; !ok {
			out = append(out, k)
		}
	}
	sort.Strings(out)
	return out
}

// randomService draws a service of any shape; reusing a name turns it into
// a random transition of that service.
func randomService(r *rand.Rand, name string, fam pb.IPFamily, idx int) *pb.ServicePort {
	pool := func() []string {
		var out []string
		for i := 1; i <= 6; i++ {
			if r.IntN(2) == 0 {
				continue
			}
			if fam == v6f {
				out = append(out, fmt.Sprintf("[2001:2:1::1:%d]:8080", i))
			} else {
				out = append(out, fmt.Sprintf("198.19.1.%d:8080", i))
			}
		}
		return out
	}
	ip := func(base string) string {
		if fam == v6f {
			return fmt.Sprintf("2001:2::%s:%x", base, idx)
		}
		return fmt.Sprintf("198.18.%s.%d", base, idx)
	}
	sp := svcSpec("rand", name, fam, ip("100"), 80, clusterEPs(pool()...))
	sp.Protocol = []pb.Protocol{pb.Protocol_PROTOCOL_TCP, pb.Protocol_PROTOCOL_UDP}[r.IntN(2)]
	sp.ExternalEndpoints = sp.ClusterEndpoints
	if r.IntN(2) == 0 {
		sp.NodePort = int32(30000 + idx)
	}
	if r.IntN(3) == 0 {
		sp.ExternalIps = []string{ip("200")}
	}
	if r.IntN(3) == 0 {
		sp.LoadBalancerIngress = []*pb.LoadBalancerIngress{{Ip: ip("250"), Proxy: r.IntN(4) == 0}}
		if r.IntN(2) == 0 {
			sp.LoadBalancerSourceRanges = []string{map[pb.IPFamily]string{v4f: "198.18.0.0/24", v6f: "2001:2::/112"}[fam]}
		}
	}
	if r.IntN(3) == 0 {
		sp.AffinityTimeoutSeconds = 300
	}
	if r.IntN(3) == 0 {
		sp.ExternalPolicyLocal, sp.MasqueradeExternal = true, false
		sp.ExternalEndpoints = eps(pool()...)
		sp.ExternalNoEndpoints = pb.NoEndpointsAction_NO_ENDPOINTS_ACTION_DROP
	}
	return sp
}

// TestIncrementalEqualsFull applies random deltas one after another and
// checks after each that the kernel holds exactly what a full render of
// the current table gives.
func TestIncrementalEqualsFull(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			inNetns(t)
			ctx := context.Background()
			r := rand.New(rand.NewPCG(7, 11))
			p := newPlane(t, backend, richCfg)
			cur := tableOf(defaultSettings())
			if _, err := p.Sync(ctx, cur); err != nil {
				t.Fatal(err)
			}
			const names = 12
			for step := 0; step < 30; step++ {
				next := with(cur)
				for n := 0; n < 1+r.IntN(3); n++ {
					i := r.IntN(names)
					fam := []pb.IPFamily{v4f, v6f}[i%2]
					name := fmt.Sprintf("s%d", i)
					sp := randomService(r, name, fam, i+1)
					if r.IntN(4) == 0 {
						next = without(next, resName(sp))
					} else {
						next = with(next, res(sp))
					}
				}
				if step == 20 { // settings change: the full path with a known prev
					next = with(next, settingsRes(&pb.NodeSettings{ClusterCidrs: []string{"198.19.0.0/17", "198.19.128.0/17", "2001:2:1::/64"}}))
				}
				if _, err := p.Apply(ctx, cur, next); err != nil {
					t.Fatalf("step %d: %v", step, err)
				}
				checkKernel(t, p, next)
				cur = next
			}
		})
	}
}
