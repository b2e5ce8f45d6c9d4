package iptables

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"

	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

const (
	v4f = pb.IPFamily_IP_FAMILY_IPV4
	v6f = pb.IPFamily_IP_FAMILY_IPV6
)

var onlyV4 = Config{Families: []pb.IPFamily{v4f}}

// baseTable has three ClusterIP services; the partial cases change it.
func baseTable() pb.Table {
	return tableOf(defaultSettings(),
		res(svcSpec("default", "a", v4f, "198.18.100.1", 80, clusterEPs("198.19.1.1:8080", "198.19.1.2:8080", "198.19.1.3:8080"))),
		res(svcSpec("default", "b", v4f, "198.18.100.2", 53, clusterEPs("198.19.2.1:5353", "198.19.2.2:5353"), func(sp *pb.ServicePort) {
			sp.Protocol = pb.Protocol_PROTOCOL_UDP
		})),
		res(svcSpec("default", "c", v4f, "198.18.100.3", 443, bothEPs("198.19.3.1:8443"), func(sp *pb.ServicePort) {
			sp.NodePort = 30443
		})),
	)
}

type goldenCase struct {
	name       string
	prev, next pb.Table
	cfg        Config
}

func goldenCases() []goldenCase {
	base := baseTable()
	etpLocal := func(external ...string) func(*pb.ServicePort) {
		return func(sp *pb.ServicePort) {
			sp.NodePort = 30080
			sp.HealthCheckNodePort = 32000
			sp.ExternalPolicyLocal = true
			sp.MasqueradeExternal = false
			sp.ClusterEndpoints = eps("198.19.1.1:8080", "198.19.1.2:8080", "198.19.1.3:8080")
			sp.ExternalEndpoints = eps(external...)
			sp.ExternalNoEndpoints = pb.NoEndpointsAction_NO_ENDPOINTS_ACTION_DROP
		}
	}
	// Both policies Local: pods and the node short-circuit to all the
	// endpoints, while internal and external traffic use local ones.
	bothLocal := func(local ...string) func(*pb.ServicePort) {
		return func(sp *pb.ServicePort) {
			sp.NodePort = 30081
			sp.HealthCheckNodePort = 32001
			sp.InternalPolicyLocal = true
			sp.ExternalPolicyLocal = true
			sp.MasqueradeExternal = false
			sp.ClusterEndpoints = eps(local...)
			sp.ExternalEndpoints = eps(local...)
			sp.ShortCircuitEndpoints = eps("198.19.1.1:8080", "198.19.1.2:8080", "198.19.1.3:8080")
			if len(local) == 0 {
				sp.ClusterNoEndpoints = pb.NoEndpointsAction_NO_ENDPOINTS_ACTION_DROP
				sp.ExternalNoEndpoints = pb.NoEndpointsAction_NO_ENDPOINTS_ACTION_DROP
			}
		}
	}
	shortCircuit := tableOf(defaultSettings(),
		res(svcSpec("default", "sc-local", v4f, "198.18.100.17", 80, bothLocal("198.19.1.2:8080"))),
		res(svcSpec("default", "sc-none", v4f, "198.18.100.18", 80, bothLocal(), func(sp *pb.ServicePort) {
			sp.NodePort, sp.HealthCheckNodePort = 30082, 32002
		})))
	return []goldenCase{
		{name: "nodeport-itp-etp-local-short-circuit", cfg: onlyV4, next: shortCircuit},
		{name: "partial-short-circuit-loses-local-endpoint", cfg: onlyV4, prev: shortCircuit,
			next: with(shortCircuit, res(svcSpec("default", "sc-local", v4f, "198.18.100.17", 80, bothLocal())))},
		{name: "clusterip-3-endpoints", cfg: onlyV4, next: tableOf(defaultSettings(),
			res(svcSpec("default", "web", v4f, "198.18.100.10", 80, clusterEPs("198.19.1.1:8080", "198.19.1.2:8080", "198.19.1.3:8080"))))},
		{name: "affinity", cfg: onlyV4, next: tableOf(defaultSettings(),
			res(svcSpec("default", "sticky", v4f, "198.18.100.11", 80, bothEPs("198.19.1.1:8080", "198.19.1.2:8080"), func(sp *pb.ServicePort) {
				sp.AffinityTimeoutSeconds = 10800
				sp.ExternalIps = []string{"198.18.200.11"}
			})))},
		{name: "nodeport-local-with-local-endpoints", cfg: onlyV4, next: tableOf(defaultSettings(),
			res(svcSpec("default", "local", v4f, "198.18.100.12", 80, etpLocal("198.19.1.2:8080"))))},
		{name: "nodeport-local-no-local-endpoints", cfg: onlyV4, next: tableOf(defaultSettings(),
			res(svcSpec("default", "local", v4f, "198.18.100.12", 80, etpLocal())))},
		{name: "loadbalancer-source-ranges-proxy", cfg: Config{Families: []pb.IPFamily{v4f}, NodeIPs: []string{"198.18.0.2", "2001:2::2"}},
			next: tableOf(defaultSettings(),
				res(svcSpec("default", "lb", v4f, "198.18.100.13", 443, bothEPs("198.19.1.1:8443", "198.19.1.2:8443"), func(sp *pb.ServicePort) {
					sp.NodePort = 30443
					sp.LoadBalancerIngress = []*pb.LoadBalancerIngress{{Ip: "198.18.250.1"}, {Ip: "198.18.250.2", Proxy: true}}
					sp.LoadBalancerSourceRanges = []string{"198.18.0.0/24", "198.18.128.7/25"}
				})),
				res(svcSpec("default", "proxied", v4f, "198.18.100.14", 80, bothEPs("198.19.1.3:8080"), func(sp *pb.ServicePort) {
					sp.LoadBalancerIngress = []*pb.LoadBalancerIngress{{Ip: "198.18.250.3", Proxy: true}}
				})))},
		{name: "no-endpoints-reject", cfg: onlyV4, next: tableOf(defaultSettings(),
			res(svcSpec("default", "empty", v4f, "198.18.100.15", 80, func(sp *pb.ServicePort) {
				sp.NodePort = 30015
				sp.ExternalIps = []string{"198.18.200.15"}
				sp.LoadBalancerIngress = []*pb.LoadBalancerIngress{{Ip: "198.18.250.15"}}
				sp.LoadBalancerSourceRanges = []string{"198.18.0.0/24"}
			})),
			res(svcSpec("default", "itp-local-none", v4f, "198.18.100.16", 80, func(sp *pb.ServicePort) {
				sp.InternalPolicyLocal = true
				sp.ClusterNoEndpoints = pb.NoEndpointsAction_NO_ENDPOINTS_ACTION_DROP
			})))},
		{name: "ipv6", cfg: Config{}, next: tableOf(defaultSettings(),
			res(svcSpec("default", "web", v6f, "2001:2::100:10", 80, bothEPs("[2001:2:1::1:1]:8080", "[2001:2:1::1:2]:8080"), func(sp *pb.ServicePort) {
				sp.NodePort = 30080
				sp.AffinityTimeoutSeconds = 60
			})),
			res(svcSpec("default", "web", v4f, "198.18.100.10", 80, bothEPs("198.19.1.1:8080"), func(sp *pb.ServicePort) {
				sp.NodePort = 30080
			})),
			res(svcSpec("default", "none", v6f, "2001:2::100:11", 80)))},
		{name: "partial-one-endpoint", cfg: onlyV4, prev: base,
			next: with(base, res(svcSpec("default", "a", v4f, "198.18.100.1", 80, clusterEPs("198.19.1.1:8080", "198.19.1.3:8080"))))},
		{name: "partial-add-remove-change-rows", cfg: onlyV4, prev: base,
			next: with(without(base, "svc/v4/default/b/p53"),
				res(svcSpec("default", "d", v4f, "198.18.100.4", 80, clusterEPs("198.19.1.1:8080"))),
				res(svcSpec("default", "c", v4f, "198.18.100.3", 443, bothEPs("198.19.3.1:8443"), func(sp *pb.ServicePort) {
					sp.NodePort = 30443
					sp.ExternalIps = []string{"198.18.200.3"}
				})))},
		{name: "partial-to-no-endpoints", cfg: onlyV4, prev: base,
			next: with(base, res(svcSpec("default", "c", v4f, "198.18.100.3", 443, func(sp *pb.ServicePort) {
				sp.NodePort = 30443
			})))},
		{name: "settings-change-is-full", cfg: onlyV4, prev: base,
			next: with(without(base, "svc/v4/default/a/p80"), settingsRes(&pb.NodeSettings{
				ClusterCidrs:      []string{"198.19.0.0/17", "198.19.128.0/17"},
				NodePortAddresses: []string{"198.18.0.0/24", "2001:2::/112"},
			}))},
		{name: "masquerade-all-sctp", cfg: onlyV4, next: tableOf(
			settingsRes(&pb.NodeSettings{MasqueradeAll: true}),
			res(svcSpec("default", "sctp", v4f, "198.18.100.20", 9999, bothEPs("198.19.1.1:9999"), func(sp *pb.ServicePort) {
				sp.Protocol = pb.Protocol_PROTOCOL_SCTP
				sp.NodePort = 30999
			})))},
	}
}

func formatPlan(p Plan) string {
	var b strings.Builder
	fmt.Fprintf(&b, "# full: %v\n", p.Full)
	for _, fp := range []*FamilyPlan{p.V4, p.V6} {
		if fp == nil {
			continue
		}
		fmt.Fprintf(&b, "## %s restore (rules %+d)\n%s", fp.Family, fp.Rules, fp.Restore())
	}
	return b.String()
}

func TestRenderGolden(t *testing.T) {
	for _, tc := range goldenCases() {
		t.Run(tc.name, func(t *testing.T) {
			plan, err := Render(tc.prev, tc.next, tc.cfg)
			if err != nil {
				t.Fatal(err)
			}
			got := []byte(formatPlan(plan))
			path := filepath.Join("testdata", tc.name+".golden")
			if *update {
				if err := os.WriteFile(path, got, 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run with -update to create it)", err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("plan differs from %s (rerun with -update after checking):\n--- got\n%s\n--- want\n%s", path, got, want)
			}
		})
	}
}

func TestRenderIsDeterministic(t *testing.T) {
	tbl := bigTable(200, 5)
	a, err := Render(nil, tbl, Config{})
	if err != nil {
		t.Fatal(err)
	}
	b, _ := Render(nil, tbl, Config{})
	if !bytes.Equal(a.V4.Restore(), b.V4.Restore()) {
		t.Fatal("two renders of one table differ")
	}
}

func TestRenderUnchangedIsEmpty(t *testing.T) {
	base := baseTable()
	plan, err := Render(base, base, Config{})
	if err != nil {
		t.Fatal(err)
	}
	if plan.Full || !plan.V4.Empty() || !plan.V6.Empty() || plan.V4.Rules != 0 {
		t.Fatalf("no change must render nothing, got:\n%s", formatPlan(plan))
	}
}

func TestRenderRejectsBadResources(t *testing.T) {
	cases := map[string]func(*pb.ServicePort){
		"injected clusterIP": func(sp *pb.ServicePort) { sp.ClusterIp = "198.18.100.1 -j ACCEPT\n-A INPUT" },
		"v6 in v4":           func(sp *pb.ServicePort) { sp.ClusterIp = "2001:2::1" },
		"bad endpoint":       func(sp *pb.ServicePort) { sp.ClusterEndpoints = []*pb.Endpoint{{Ip: "198.19.1.300", Port: 80}} },
		"endpoint port":      func(sp *pb.ServicePort) { sp.ClusterEndpoints = []*pb.Endpoint{{Ip: "198.19.1.3", Port: 70000}} },
		"port zero":          func(sp *pb.ServicePort) { sp.Port = 0 },
		"node port":          func(sp *pb.ServicePort) { sp.NodePort = -1 },
		"source range":       func(sp *pb.ServicePort) { sp.LoadBalancerSourceRanges = []string{"198.18.0.0/33"} },
		"external IP":        func(sp *pb.ServicePort) { sp.ExternalIps = []string{"example.com"} },
		"protocol":           func(sp *pb.ServicePort) { sp.Protocol = pb.Protocol_PROTOCOL_UNSPECIFIED },
		"affinity":           func(sp *pb.ServicePort) { sp.AffinityTimeoutSeconds = 86401 },
		"family":             func(sp *pb.ServicePort) { sp.Family = pb.IPFamily_IP_FAMILY_UNSPECIFIED },
	}
	for name, mutate := range cases {
		t.Run(name, func(t *testing.T) {
			sp := svcSpec("default", "bad", v4f, "198.18.100.1", 80, clusterEPs("198.19.1.1:8080"), mutate)
			next := tableOf(defaultSettings(), pb.NewServicePortResource("svc/bad", sp))
			if _, err := Render(nil, next, Config{}); err == nil {
				t.Fatal("Render accepted a bad resource")
			}
			if _, err := Render(tableOf(defaultSettings()), next, Config{}); err == nil {
				t.Fatal("partial Render accepted a bad resource")
			}
		})
	}
	// Comments come from names: anything odd is replaced, never quoted.
	sp := svcSpec(`de"fault`, "x\n-A INPUT -j ACCEPT", v4f, "198.18.100.1", 80, clusterEPs("198.19.1.1:8080"))
	plan, err := Render(nil, tableOf(res(sp)), onlyV4)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(plan.V4.Restore()), "-A INPUT") || strings.Count(string(plan.V4.Restore()), `"`)%2 != 0 {
		t.Fatalf("name leaked into the rules:\n%s", plan.V4.Restore())
	}
}

func TestRenderRejectsBadConfig(t *testing.T) {
	for name, cfg := range map[string]Config{
		"two mark bits":    {MasqueradeMark: 0x4001},
		"bad family":       {Families: []pb.IPFamily{pb.IPFamily_IP_FAMILY_UNSPECIFIED}},
		"bad node address": {NodePortAddresses: []string{"nope"}},
		"bad node IP":      {NodeIPs: []string{"nope"}},
	} {
		if _, err := Render(nil, baseTable(), cfg); err == nil {
			t.Errorf("%s: Render accepted it", name)
		}
	}
}

func TestChainNames(t *testing.T) {
	a, b := shortHash("svc/v4/default/a/http"), shortHash("svc/v4/default/a/https")
	if a == b || len(a) != 16 || a != shortHash("svc/v4/default/a/http") {
		t.Fatalf("hashes: %q %q", a, b)
	}
	for _, p := range servicePrefixes {
		if n := p + a; len(n) > 28 {
			t.Fatalf("chain %s longer than iptables allows", n)
		}
	}
}

func TestHairpinBPF(t *testing.T) {
	// The IPv4 program as tcpdump-style tools print it; IPv6 compares the
	// four words of each address in turn.
	if got, want := hairpinBPF(v4), "6,32 0 0 12,7 0 0 0,32 0 0 16,29 0 1 0,6 0 0 1,6 0 0 0"; got != want {
		t.Errorf("v4 = %s, want %s", got, want)
	}
	want6 := "18,32 0 0 8,7 0 0 0,32 0 0 24,29 0 13 0,32 0 0 12,7 0 0 0,32 0 0 28,29 0 9 0," +
		"32 0 0 16,7 0 0 0,32 0 0 32,29 0 5 0,32 0 0 20,7 0 0 0,32 0 0 36,29 0 1 0,6 0 0 1,6 0 0 0"
	if got := hairpinBPF(v6); got != want6 {
		t.Errorf("v6 = %s, want %s", got, want6)
	}
}

func TestProbabilityMatchesIptablesSave(t *testing.T) {
	// Values printed by iptables-save v1.8.9 for 1/n.
	for n, want := range map[int]string{2: "0.50000000000", 3: "0.33333333349", 7: "0.14285714272", 9: "0.11111111101", 10: "0.10000000009"} {
		if got := probability(n); got != want {
			t.Errorf("probability(%d) = %s, want %s", n, got, want)
		}
	}
	if probability(1000) != computeProbability(1000) {
		t.Error("uncached probability differs")
	}
}

func TestNatChunksCoverPlan(t *testing.T) {
	plan, err := Render(nil, bigTable(600, 10), onlyV4)
	if err != nil {
		t.Fatal(err)
	}
	one := string(plan.V4.natInput(false))
	all := string(plan.V4.natInput(true))
	chunks := strings.SplitAfter(all, "COMMIT\n")
	chunks = chunks[:len(chunks)-1]
	if strings.Count(one, "COMMIT") != 1 || len(chunks) < 4 {
		t.Fatalf("got %d commits unchunked and %d chunked", strings.Count(one, "COMMIT"), len(chunks))
	}
	strip := func(in string) []string {
		var out []string
		for _, l := range lines(in) {
			if l != "*nat" && l != "COMMIT" {
				out = append(out, l)
			}
		}
		sort.Strings(out)
		return out
	}
	if a, b := strip(one), strip(all); !slices.Equal(a, b) {
		t.Fatalf("chunks hold %d lines, the plan %d, or they differ", len(b), len(a))
	}
	for i, c := range chunks[1 : len(chunks)-1] {
		if n := strings.Count(c, "\n-A "); n > chunkLines+50 {
			t.Errorf("chunk %d holds %d rules", i+1, n)
		}
	}
	if last := chunks[len(chunks)-1]; !strings.Contains(last, ":"+chainServices+" ") || strings.Contains(chunks[0], ":"+chainServices+" ") {
		t.Error("the dispatch chain must be rewritten in the last commit only")
	}
}
