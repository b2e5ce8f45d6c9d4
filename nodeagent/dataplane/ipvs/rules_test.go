package ipvs

import (
	"flag"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden")

func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name+".golden")
	if *update {
		if err := os.MkdirAll("testdata", 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run with -update to create it)", err)
	}
	if got != string(want) {
		t.Errorf("%s differs from %s (run with -update if intended):\n%s", name, path, got)
	}
}

func TestRulesGolden(t *testing.T) {
	cfg := testConfig("198.18.0.1")
	tests := []struct {
		name     string
		f        Family
		ns       *pb.NodeSettings
		noAccess []VSKey
	}{
		{"rules-v4-cluster-cidrs", V4, &pb.NodeSettings{ClusterCidrs: []string{"198.19.0.0/16", "198.20.0.0/16", "2001:2:1::/64"}},
			[]VSKey{vsKey("198.18.210.1", TCP, 80)}},
		{"rules-v6-masquerade-all", V6, &pb.NodeSettings{MasqueradeAll: true, ClusterCidrs: []string{"2001:2:1::/64"}}, nil},
		{"rules-v4-no-cidr", V4, &pb.NodeSettings{}, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := renderRules(tc.f, cfg, tc.ns, tc.noAccess)
			golden(t, tc.name, restoreInput(r, nil, jumps, false))
		})
	}
}

func TestRulesOnlyNameOwnedChainsAndSets(t *testing.T) {
	r := renderRules(V6, testConfig(), &pb.NodeSettings{ClusterCidrs: []string{"2001:2:1::/64"}}, nil)
	for _, l := range append(r.Nat, r.Filter...) {
		chain := strings.Fields(l)[1]
		if !slices.Contains(natChains, chain) && !slices.Contains(filterChains, chain) {
			t.Errorf("rule in a chain the plane does not own: %s", l)
		}
		if i := strings.Index(l, "--match-set "); i >= 0 {
			set := strings.Fields(l[i:])[1]
			if !strings.HasPrefix(set, "SBX-IPVS6-") {
				t.Errorf("IPv6 rule matches a set of another family: %s", l)
			}
			if _, ok := setTypes[strings.TrimPrefix(set, "SBX-IPVS6-")]; !ok {
				t.Errorf("rule matches an unknown set: %s", l)
			}
		}
	}
	for _, c := range append(append([]string{}, natChains...), filterChains...) {
		if len(c) > 28 {
			t.Errorf("chain name %s longer than iptables allows", c)
		}
	}
	for _, base := range setBases() {
		if n := setName(V6, base); len(n) > 31 {
			t.Errorf("set name %s longer than ipset allows", n)
		}
	}
}

// save renders jumps as iptables-save would list them.
func save(js ...jump) string {
	var b strings.Builder
	for _, table := range []string{"nat", "filter"} {
		b.WriteString("*" + table + "\n:INPUT ACCEPT [0:0]\n-A INPUT -j OTHER\n")
		for _, j := range js {
			if j.table == table {
				b.WriteString("-A " + j.rule() + "\n")
			}
		}
		b.WriteString("COMMIT\n")
	}
	return b.String()
}

func TestJumpsToFix(t *testing.T) {
	reversed := slices.Clone(jumps)
	slices.Reverse(reversed)
	tests := []struct {
		name          string
		save          string
		wantDel, want int
	}{
		{"none present", save(), 0, len(jumps)},
		{"all present in order", save(jumps...), 0, 0},
		{"one missing", save(jumps[1:]...), len(jumps) - 1, len(jumps)},
		{"out of order", save(reversed...), len(jumps), len(jumps)},
		{"duplicated", save(append(slices.Clone(jumps), jumps[0])...), len(jumps) + 1, len(jumps)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			del, add := jumpsToFix(tc.save)
			if len(del) != tc.wantDel || len(add) != tc.want {
				t.Errorf("delete %d add %d, want %d %d", len(del), len(add), tc.wantDel, tc.want)
			}
		})
	}
	if got := ownedJumps(save(jumps...)); len(got) != len(jumps) {
		t.Errorf("ownedJumps found %d, want %d", len(got), len(jumps))
	}
}

func TestCleanupInput(t *testing.T) {
	golden(t, "cleanup", restoreInput(Rules{}, jumps, nil, true))
}

func TestParseSetMembers(t *testing.T) {
	out := `create SBX-IPVS-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 1048576 bucketsize 12 initval 0x1
add SBX-IPVS-CLUSTER-IP 198.18.100.1,tcp:80
add SBX-IPVS-CLUSTER-IP 198.18.100.2,udp:53
create SBX-IPVS-NP-TCP bitmap:port range 0-65535
create OTHER hash:ip family inet
add OTHER 198.18.0.1
`
	sets := parseSetMembers(out)
	if len(sets) != 2 || len(sets["SBX-IPVS-CLUSTER-IP"]) != 2 || sets["SBX-IPVS-NP-TCP"] == nil {
		t.Errorf("parsed %v", sets)
	}
}

func TestParseProcIPVS(t *testing.T) {
	text := `IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port Forward Weight ActiveConn InActConn
TCP  C6126401:0050 rr persistent 600 FFFFFFFF
  -> C6130001:1F90      Masq    1      2          3
  -> C6130002:1F90      Masq    0      0          0
FWM  00000001 rr
  -> C6130009:0050      Masq    1      0          0
UDP  C6126402:0035 rr
TCP  [2001:0002:0000:0000:0000:0000:0000:0100]:0050 mh
  -> [2001:0002:0001:0000:0000:0000:0000:0001]:1F90      Masq    1      0          0
`
	got, err := parseProcIPVS(text)
	if err != nil {
		t.Fatal(err)
	}
	want := map[VSKey]map[RSKey]realServer{
		vsKey("198.18.100.1", TCP, 80): {rsKey("198.19.0.1", 8080): {1, 5}, rsKey("198.19.0.2", 8080): {0, 0}},
		vsKey("198.18.100.2", UDP, 53): {},
		vsKey("2001:2::100", TCP, 80):  {rsKey("2001:2:1::1", 8080): {1, 0}},
	}
	if len(got) != len(want) {
		t.Fatalf("parsed %v, want %v", got, want)
	}
	for k, w := range want {
		if !maps.Equal(got[k], w) {
			t.Errorf("%s: %v, want %v", k, got[k], w)
		}
	}
	if _, err := parseProcIPVS("TCP  C61264:0050 rr\n"); err == nil {
		t.Error("a short address was accepted")
	}
}
