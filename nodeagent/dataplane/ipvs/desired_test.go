package ipvs

import (
	"maps"
	"net/netip"
	"slices"
	"strings"
	"testing"

	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

func members(st State, set string) []string {
	return slices.Sorted(maps.Keys(st.Sets[set]))
}

func addrs(st State) []string {
	var out []string
	for a := range st.Addrs {
		out = append(out, a.String())
	}
	slices.Sort(out)
	return out
}

func wantMembers(t *testing.T, st State, set string, want ...string) {
	t.Helper()
	got := members(st, set)
	slices.Sort(want)
	if !slices.Equal(got, want) && !(len(got) == 0 && len(want) == 0) {
		t.Errorf("set %s = %q, want %q", set, got, want)
	}
}

func wantVS(t *testing.T, st State, k VSKey, flags, timeout uint32, reals map[RSKey]int) {
	t.Helper()
	vs, ok := st.Services[k]
	if !ok {
		t.Fatalf("no virtual server %s; have %v", k, slices.Collect(maps.Keys(st.Services)))
	}
	if vs.Flags != flags || vs.Timeout != timeout {
		t.Errorf("%s: flags %#x timeout %d, want %#x %d", k, vs.Flags, vs.Timeout, flags, timeout)
	}
	if !maps.Equal(vs.Reals, reals) {
		t.Errorf("%s: reals %v, want %v", k, vs.Reals, reals)
	}
}

func TestDesired(t *testing.T) {
	ext := func(sp *pb.ServicePort, f func(*pb.ServicePort)) *pb.ServicePort { f(sp); return sp }
	two := map[RSKey]int{rsKey("198.19.0.1", 8080): 1, rsKey("198.19.0.2", 8080): 1}
	tests := []struct {
		name  string
		table pb.Table
		cfg   Config
		check func(t *testing.T, st State)
	}{{
		name:  "cluster IP, terminating (fallback) endpoint takes connections: weight 1",
		table: table(nil, clusterSvc("ns", "web", "198.18.100.1", 80, ep("198.19.0.1", 8080), termEP("198.19.0.2", 8080))),
		cfg:   testConfig("198.18.0.1"),
		check: func(t *testing.T, st State) {
			if len(st.Services) != 1 {
				t.Fatalf("%d virtual servers, want 1", len(st.Services))
			}
			wantVS(t, st, vsKey("198.18.100.1", TCP, 80), 0, 0, map[RSKey]int{rsKey("198.19.0.1", 8080): 1, rsKey("198.19.0.2", 8080): 1})
			if st.Services[vsKey("198.18.100.1", TCP, 80)].Scheduler != "rr" {
				t.Errorf("default scheduler is not rr")
			}
			if got := addrs(st); !slices.Equal(got, []string{"198.18.100.1"}) {
				t.Errorf("bound %v", got)
			}
			wantMembers(t, st, "SBX-IPVS-CLUSTER-IP", "198.18.100.1,tcp:80")
			wantMembers(t, st, "SBX-IPVS-IPS", "198.18.100.1")
			wantMembers(t, st, "SBX-IPVS-LOOPBACK", "198.19.0.1,tcp:8080,198.19.0.1", "198.19.0.2,tcp:8080,198.19.0.2")
			wantMembers(t, st, "SBX-IPVS-NOEP-REJECT")
		},
	}, {
		name: "client IP affinity and the mh scheduler",
		table: table(nil, ext(clusterSvc("ns", "sticky", "198.18.100.2", 443, ep("198.19.0.1", 8080), ep("198.19.0.2", 8080)),
			func(sp *pb.ServicePort) { sp.AffinityTimeoutSeconds = 600 })),
		cfg: func() Config { c := testConfig(); c.Scheduler = "mh"; return c }(),
		check: func(t *testing.T, st State) {
			k := vsKey("198.18.100.2", TCP, 443)
			wantVS(t, st, k, flagPersistent|flagSched1, 600, two)
			if st.Services[k].Scheduler != "mh" {
				t.Errorf("scheduler %q", st.Services[k].Scheduler)
			}
		},
	}, {
		name: "node port on each node address of the family, external endpoints, local policy",
		table: table(nil, ext(clusterSvc("ns", "np", "198.18.100.3", 80, ep("198.19.0.1", 8080), ep("198.19.0.2", 8080)),
			func(sp *pb.ServicePort) {
				sp.NodePort = 30080
				sp.ExternalEndpoints = []*pb.Endpoint{ep("198.19.0.1", 8080)}
				sp.ExternalPolicyLocal, sp.MasqueradeExternal = true, false
				sp.HealthCheckNodePort = 31000
			})),
		cfg: testConfig("198.18.0.1", "198.18.0.2", "2001:2::1"),
		check: func(t *testing.T, st State) {
			if len(st.Services) != 3 {
				t.Errorf("%d virtual servers, want cluster IP + 2 node ports", len(st.Services))
			}
			wantVS(t, st, vsKey("198.18.100.3", TCP, 80), 0, 0, two)
			for _, a := range []string{"198.18.0.1", "198.18.0.2"} {
				wantVS(t, st, vsKey(a, TCP, 30080), 0, 0, map[RSKey]int{rsKey("198.19.0.1", 8080): 1})
			}
			wantMembers(t, st, "SBX-IPVS-NP-TCP", "30080")
			wantMembers(t, st, "SBX-IPVS-NP-LOCAL-TCP", "30080")
			wantMembers(t, st, "SBX-IPVS-HC-NP", "31000")
			if got := addrs(st); !slices.Equal(got, []string{"198.18.100.3"}) {
				t.Errorf("bound %v; node addresses must not be bound", got)
			}
		},
	}, {
		name: "node_port_addresses restricts node ports",
		table: table(&pb.NodeSettings{NodePortAddresses: []string{"198.18.0.2/32", "2001:2::/64"}},
			ext(clusterSvc("ns", "np", "198.18.100.3", 80, ep("198.19.0.1", 8080)), func(sp *pb.ServicePort) { sp.NodePort = 30080 })),
		cfg: testConfig("198.18.0.1", "198.18.0.2"),
		check: func(t *testing.T, st State) {
			if _, ok := st.Services[vsKey("198.18.0.1", TCP, 30080)]; ok {
				t.Errorf("node port on an address outside node_port_addresses")
			}
			wantVS(t, st, vsKey("198.18.0.2", TCP, 30080), 0, 0, map[RSKey]int{rsKey("198.19.0.1", 8080): 1})
			wantMembers(t, st, "SBX-IPVS-NP-LOCAL-TCP")
		},
	}, {
		name: "SCTP node ports are per address",
		table: table(nil, ext(clusterSvc("ns", "sctp", "198.18.100.4", 9, ep("198.19.0.1", 9)),
			func(sp *pb.ServicePort) { sp.Protocol, sp.NodePort = pb.Protocol_PROTOCOL_SCTP, 30009 })),
		cfg: testConfig("198.18.0.1"),
		check: func(t *testing.T, st State) {
			wantMembers(t, st, "SBX-IPVS-NP-SCTP", "198.18.0.1,sctp:30009")
			wantMembers(t, st, "SBX-IPVS-NP-TCP")
			wantMembers(t, st, "SBX-IPVS-CLUSTER-IP", "198.18.100.4,sctp:9")
		},
	}, {
		name: "external IPs: bound unless the node has them, masquerade per table",
		table: table(nil,
			ext(clusterSvc("ns", "a", "198.18.100.5", 80, ep("198.19.0.1", 8080)), func(sp *pb.ServicePort) {
				sp.ExternalIps = []string{"198.18.200.1", "198.18.0.1", "not-an-ip", "2001:2::9"}
			}),
			ext(clusterSvc("ns", "b", "198.18.100.6", 80, ep("198.19.0.2", 8080)), func(sp *pb.ServicePort) {
				sp.ExternalIps = []string{"198.18.200.2"}
				sp.MasqueradeExternal, sp.ExternalPolicyLocal = false, true
			})),
		cfg: testConfig("198.18.0.1"),
		check: func(t *testing.T, st State) {
			if len(st.Services) != 5 {
				t.Errorf("%d virtual servers, want 5", len(st.Services))
			}
			if got := addrs(st); !slices.Equal(got, []string{"198.18.100.5", "198.18.100.6", "198.18.200.1", "198.18.200.2"}) {
				t.Errorf("bound %v", got)
			}
			wantMembers(t, st, "SBX-IPVS-EXTERNAL-IP", "198.18.200.1,tcp:80", "198.18.0.1,tcp:80")
			wantMembers(t, st, "SBX-IPVS-EXTERNAL-LOCAL", "198.18.200.2,tcp:80")
		},
	}, {
		name: "load balancer: proxy mode skipped, source ranges",
		table: table(nil, ext(clusterSvc("ns", "lb", "198.18.100.7", 80, ep("198.19.0.1", 8080)), func(sp *pb.ServicePort) {
			sp.LoadBalancerIngress = []*pb.LoadBalancerIngress{{Ip: "198.18.210.1"}, {Ip: "198.18.210.2", Proxy: true}}
			sp.LoadBalancerSourceRanges = []string{"198.18.64.7/18", "198.18.0.1/32"}
		})),
		cfg: testConfig("198.18.0.1"),
		check: func(t *testing.T, st State) {
			if _, ok := st.Services[vsKey("198.18.210.2", TCP, 80)]; ok {
				t.Errorf("ipMode Proxy load balancer IP was captured")
			}
			wantVS(t, st, vsKey("198.18.210.1", TCP, 80), 0, 0, map[RSKey]int{rsKey("198.19.0.1", 8080): 1})
			wantMembers(t, st, "SBX-IPVS-LB", "198.18.210.1,tcp:80")
			wantMembers(t, st, "SBX-IPVS-LB-LOCAL")
			wantMembers(t, st, "SBX-IPVS-LB-FW", "198.18.210.1,tcp:80")
			wantMembers(t, st, "SBX-IPVS-LB-SRC-CIDR", "198.18.210.1,tcp:80,198.18.64.0/18", "198.18.210.1,tcp:80,198.18.0.1")
			wantMembers(t, st, "SBX-IPVS-LB-SRC-IP", "198.18.210.1,tcp:80,198.18.210.1")
			if strings.Contains(strings.Join(st.Rules[V4].Filter, "\n"), "--vaddr") {
				t.Errorf("node is allowed by a range but got an OUT-FILTER rule")
			}
		},
	}, {
		name: "load balancer whose ranges exclude the node",
		table: table(nil, ext(clusterSvc("ns", "lb", "198.18.100.7", 80, ep("198.19.0.1", 8080)), func(sp *pb.ServicePort) {
			sp.LoadBalancerIngress = []*pb.LoadBalancerIngress{{Ip: "198.18.210.1"}}
			sp.LoadBalancerSourceRanges = []string{"198.18.64.0/18"}
		})),
		cfg: testConfig("198.18.0.1"),
		check: func(t *testing.T, st State) {
			wantMembers(t, st, "SBX-IPVS-LB-SRC-IP")
			want := "-A SBX-IPVS-OUT-FILTER -s 198.18.210.1 -m ipvs --vaddr 198.18.210.1 --vproto tcp --vport 80 -j DROP"
			if !slices.Contains(st.Rules[V4].Filter, want) {
				t.Errorf("filter rules lack %q", want)
			}
		},
	}, {
		name: "no endpoints: reject and drop, and local policy short-circuits cluster traffic",
		table: table(nil,
			clusterSvc("ns", "empty", "198.18.100.8", 80),
			ext(clusterSvc("ns", "drop", "198.18.100.9", 80), func(sp *pb.ServicePort) {
				sp.ClusterNoEndpoints = pb.NoEndpointsAction_NO_ENDPOINTS_ACTION_DROP
			}),
			ext(clusterSvc("ns", "local", "198.18.100.10", 80, ep("198.19.0.1", 8080)), func(sp *pb.ServicePort) {
				sp.NodePort, sp.ExternalEndpoints = 30010, nil
				sp.ExternalPolicyLocal, sp.MasqueradeExternal = true, false
				sp.ExternalNoEndpoints = pb.NoEndpointsAction_NO_ENDPOINTS_ACTION_DROP
			})),
		cfg: testConfig("198.18.0.1"),
		check: func(t *testing.T, st State) {
			wantVS(t, st, vsKey("198.18.100.8", TCP, 80), 0, 0, map[RSKey]int{})
			wantMembers(t, st, "SBX-IPVS-NOEP-REJECT", "198.18.100.8,tcp:80")
			wantMembers(t, st, "SBX-IPVS-NOEP-DROP", "198.18.100.9,tcp:80")
			wantVS(t, st, vsKey("198.18.0.1", TCP, 30010), 0, 0, map[RSKey]int{rsKey("198.19.0.1", 8080): 1})
			wantMembers(t, st, "SBX-IPVS-NOEP-EXT-DROP", "198.18.0.1,tcp:30010")
		},
	}, {
		name:  "IPv6 uses its own sets; a wrong-family endpoint is skipped",
		table: table(nil, clusterSvc("ns", "v6", "2001:2::100", 80, ep("2001:2:0:1::1", 8080), ep("198.19.0.1", 8080))),
		cfg:   testConfig(),
		check: func(t *testing.T, st State) {
			wantVS(t, st, vsKey("2001:2::100", TCP, 80), 0, 0, map[RSKey]int{rsKey("2001:2:0:1::1", 8080): 1})
			wantMembers(t, st, "SBX-IPVS6-CLUSTER-IP", "2001:2::100,tcp:80")
			wantMembers(t, st, "SBX-IPVS6-IPS", "2001:2::100")
			wantMembers(t, st, "SBX-IPVS-CLUSTER-IP")
		},
	}, {
		name:  "a family the plane does not program is ignored",
		table: table(nil, clusterSvc("ns", "v6", "2001:2::100", 80, ep("2001:2:0:1::1", 8080))),
		cfg:   func() Config { c := testConfig(); c.Families = []Family{V4}; return c }(),
		check: func(t *testing.T, st State) {
			if len(st.Services) != 0 || len(st.Addrs) != 0 {
				t.Errorf("programmed a disabled family: %v %v", st.Services, st.Addrs)
			}
			if _, ok := st.Sets["SBX-IPVS6-CLUSTER-IP"]; ok {
				t.Errorf("sets of a disabled family")
			}
			if _, ok := st.Rules[V6]; ok {
				t.Errorf("rules of a disabled family")
			}
		},
	}, {
		name: "two service ports claiming one virtual server: the first by name wins",
		table: table(nil, clusterSvc("ns", "a", "198.18.100.11", 80, ep("198.19.0.1", 8080)),
			clusterSvc("ns", "b", "198.18.100.11", 80, ep("198.19.0.2", 8080))),
		cfg: testConfig(),
		check: func(t *testing.T, st State) {
			wantVS(t, st, vsKey("198.18.100.11", TCP, 80), 0, 0, map[RSKey]int{rsKey("198.19.0.1", 8080): 1})
		},
	}}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			st := Desired(tc.table, tc.cfg)
			tc.check(t, st)
			// Every owned set exists in every programmed family.
			if want := len(setTypes) * len(tc.cfg.Families); len(st.Sets) != want {
				t.Errorf("%d sets, want %d", len(st.Sets), want)
			}
		})
	}
}

func TestDesiredIsDeterministic(t *testing.T) {
	tb := bigTable(50)
	a, b := Desired(tb, testConfig("198.18.0.1")), Desired(tb, testConfig("198.18.0.1"))
	if o := Diff(a, b); !o.Empty() {
		t.Fatalf("two computations differ: %+v", o)
	}
	if a.Objects() != 50*3+a.Rules[V4].count()+a.Rules[V6].count() {
		t.Errorf("Objects() = %d", a.Objects())
	}
}

func TestParseAddrRejectsZonesAndMapped(t *testing.T) {
	if _, ok := parseAddr("fe80::1%eth0", V6); ok {
		t.Error("zoned address accepted")
	}
	if a, ok := parseAddr("::ffff:198.18.0.1", V4); !ok || a != netip.MustParseAddr("198.18.0.1") {
		t.Errorf("mapped address: %v %v", a, ok)
	}
}

func TestConfigDefaults(t *testing.T) {
	c, err := Config{IPTables: "iptables-nft"}.withDefaults()
	if err != nil || c.IPTables != "nft" || c.Scheduler != "rr" || c.masqMark() != "0x00004000" || len(c.Families) != 2 {
		t.Errorf("defaults: %+v %v", c, err)
	}
	for _, bad := range []Config{{IPTables: "ebtables"}, {MasqueradeBit: 40}, {Families: []Family{5}}} {
		if _, err := bad.withDefaults(); err == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
	if _, err := New(Config{Scheduler: "rr; reboot"}); err == nil {
		t.Error("a malformed scheduler name was accepted")
	}
}
