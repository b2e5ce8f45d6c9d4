package ipvs

import (
	"net/netip"
	"slices"
	"testing"

	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
	"google.golang.org/protobuf/proto"
)

// edit returns a copy of t with the service port of service name replaced
// by f's result on a clone.
func edit(t pb.Table, name string, f func(*pb.ServicePort)) pb.Table {
	out := pb.Table{}
	for k, r := range t {
		if sp := r.GetServicePort(); sp != nil && sp.GetName() == name {
			sp = proto.Clone(sp).(*pb.ServicePort)
			f(sp)
			r = pb.NewServicePortResource(k, sp)
		}
		out[k] = r
	}
	return out
}

// setEPs sets both endpoint lists, as the control plane does for policies
// Cluster.
func setEPs(sp *pb.ServicePort, eps ...*pb.Endpoint) {
	sp.ClusterEndpoints, sp.ExternalEndpoints = eps, eps
}

func without(t pb.Table, name string) pb.Table {
	out := pb.Table{}
	for k, r := range t {
		if r.GetServicePort().GetName() != name {
			out[k] = r
		}
	}
	return out
}

// opCounts summarises Ops as counts, in a fixed order.
type opCounts struct {
	addVS, updVS, delVS, addRS, updRS, delRS, addAddr, delAddr, setAdd, setDel, rules int
}

func countOps(o Ops) opCounts {
	return opCounts{len(o.AddServices), len(o.UpdateServices), len(o.DelServices),
		len(o.AddReals), len(o.UpdateReals), len(o.DelReals), len(o.AddAddrs), len(o.DelAddrs),
		len(o.SetAdds), len(o.SetDels), len(o.Rules)}
}

func TestDiff(t *testing.T) {
	base := bigTable(1000)
	cfg := testConfig("198.18.0.1")
	tests := []struct {
		name string
		next pb.Table
		want opCounts
		// check looks at the operations in detail.
		check func(t *testing.T, o Ops)
	}{{
		name: "nothing changed",
		next: base,
	}, {
		name: "one endpoint added: one real server, one loopback member",
		next: edit(base, "s0500", func(sp *pb.ServicePort) {
			setEPs(sp, append(sp.ClusterEndpoints, ep("198.19.50.1", 8080))...)
		}),
		want: opCounts{addRS: 1, setAdd: 1},
		check: func(t *testing.T, o Ops) {
			want := RSOp{vsKey("198.18.102.1", TCP, 80), rsKey("198.19.50.1", 8080), 1}
			if o.AddReals[0] != want {
				t.Errorf("added %+v, want %+v", o.AddReals[0], want)
			}
			if o.SetAdds[0] != (SetMember{"SBX-IPVS-LOOPBACK", "198.19.50.1,tcp:8080,198.19.50.1"}) {
				t.Errorf("set add %+v", o.SetAdds[0])
			}
		},
	}, {
		// Fallback endpoints keep weight 1 (upstream): marking one
		// terminating changes nothing in the kernel.
		name: "one endpoint terminating: no kernel operation",
		next: edit(base, "s0007", func(sp *pb.ServicePort) {
			setEPs(sp, sp.ClusterEndpoints[0], termEP(sp.ClusterEndpoints[1].Ip, 8080))
		}),
		want: opCounts{},
	}, {
		name: "one endpoint removed",
		next: edit(base, "s0007", func(sp *pb.ServicePort) { setEPs(sp, sp.ClusterEndpoints[0]) }),
		want: opCounts{delRS: 1, setDel: 1},
	}, {
		name: "one endpoint moved to another address: delete and add",
		next: edit(base, "s0007", func(sp *pb.ServicePort) { setEPs(sp, sp.ClusterEndpoints[0], ep("198.19.60.1", 8080)) }),
		want: opCounts{addRS: 1, delRS: 1, setAdd: 1, setDel: 1},
	}, {
		name: "affinity turned on: the virtual server is updated in place",
		next: edit(base, "s0001", func(sp *pb.ServicePort) { sp.AffinityTimeoutSeconds = 10800 }),
		want: opCounts{updVS: 1},
		check: func(t *testing.T, o Ops) {
			if vs := o.UpdateServices[0].VS; vs.Flags != flagPersistent || vs.Timeout != 10800 {
				t.Errorf("update %+v", vs)
			}
		},
	}, {
		name: "service deleted: its real servers go with it, its address is unbound",
		next: without(base, "s0002"),
		want: opCounts{delVS: 1, delAddr: 1, setDel: 4}, // cluster IP, bound IP, 2 loopback
		check: func(t *testing.T, o Ops) {
			if o.DelAddrs[0] != netip.MustParseAddr("198.18.100.3") {
				t.Errorf("unbound %v", o.DelAddrs)
			}
		},
	}, {
		name: "service added with a node port",
		next: func() pb.Table {
			n := table(nil, func() *pb.ServicePort {
				sp := clusterSvc("ns", "new", "198.18.120.1", 80, ep("198.19.70.1", 8080))
				sp.NodePort = 30001
				return sp
			}())
			for k, r := range base {
				n[k] = r
			}
			return n
		}(),
		want: opCounts{addVS: 2, addRS: 2, addAddr: 1, setAdd: 4}, // cluster IP, IPS, loopback, NP-TCP
	}, {
		name: "node settings changed: only the rules",
		next: func() pb.Table {
			n := edit(base, "", nil)
			n["node/settings"] = pb.NewNodeSettingsResource("node/settings", &pb.NodeSettings{ClusterCidrs: []string{"198.19.0.0/17"}})
			return n
		}(),
		want: opCounts{rules: 1},
		check: func(t *testing.T, o Ops) {
			if !slices.Contains(o.Rules[V4].Nat, "-A SBX-IPVS-CLUSTER-IP -s 198.19.0.0/17 -j RETURN") {
				t.Errorf("new rules lack the new CIDR: %q", o.Rules[V4].Nat)
			}
		},
	}}
	prev := Desired(base, cfg)
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			o := Diff(prev, Desired(tc.next, cfg))
			if got := countOps(o); got != tc.want {
				t.Fatalf("ops %+v, want %+v", got, tc.want)
			}
			if tc.check != nil {
				tc.check(t, o)
			}
		})
	}
}

func TestDiffFromEmptyBuildsEverything(t *testing.T) {
	st := Desired(bigTable(10), testConfig())
	o := Diff(State{}, st)
	if got := countOps(o); got != (opCounts{addVS: 10, addRS: 20, addAddr: 10, setAdd: 10 + 10 + 20, rules: 2}) {
		t.Errorf("ops %+v", got)
	}
	// Added real servers come sorted by virtual server.
	if !slices.IsSortedFunc(o.AddReals, compareRS) {
		t.Error("real servers not sorted")
	}
	back := Diff(st, State{Sets: map[string]map[string]struct{}{}})
	if got := countOps(back); got != (opCounts{delVS: 10, delAddr: 10}) {
		t.Errorf("to empty: ops %+v", got)
	}
}
