package iptables

import (
	"fmt"
	"maps"
	"net/netip"
	"strconv"
	"strings"

	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// Test tables use only benchmarking ranges: services 198.18.100.0/24 and
// 2001:2::100:0/112, pods (the cluster CIDR) 198.19.0.0/16 and
// 2001:2:1::/64, nodes 198.18.0.0/24 and 2001:2::/112.

const settingsName = "node/settings"

func settingsRes(ns *pb.NodeSettings) *pb.Resource {
	return pb.NewNodeSettingsResource(settingsName, ns)
}

func defaultSettings() *pb.Resource {
	return settingsRes(&pb.NodeSettings{ClusterCidrs: []string{"198.19.0.0/16", "2001:2:1::/64"}, NodeName: "node-a"})
}

// svcSpec builds a ServicePort; mutate adjusts it.
func svcSpec(ns, name string, fam pb.IPFamily, clusterIP string, port int32, mutate ...func(*pb.ServicePort)) *pb.ServicePort {
	sp := &pb.ServicePort{
		Namespace: ns, Name: name, PortName: "p" + strconv.Itoa(int(port)),
		Family: fam, Protocol: pb.Protocol_PROTOCOL_TCP,
		ClusterIp: clusterIP, Port: port,
		ClusterNoEndpoints:  pb.NoEndpointsAction_NO_ENDPOINTS_ACTION_REJECT,
		ExternalNoEndpoints: pb.NoEndpointsAction_NO_ENDPOINTS_ACTION_REJECT,
		MasqueradeExternal:  true,
	}
	for _, m := range mutate {
		m(sp)
	}
	return sp
}

func resName(sp *pb.ServicePort) string {
	f := "v4"
	if sp.GetFamily() == pb.IPFamily_IP_FAMILY_IPV6 {
		f = "v6"
	}
	return fmt.Sprintf("svc/%s/%s/%s/%s", f, sp.GetNamespace(), sp.GetName(), sp.GetPortName())
}

func res(sp *pb.ServicePort) *pb.Resource { return pb.NewServicePortResource(resName(sp), sp) }

func tableOf(rs ...*pb.Resource) pb.Table {
	t := pb.Table{}
	for _, r := range rs {
		t[r.GetName()] = r
	}
	return t
}

// with returns a copy of t with rs upserted.
func with(t pb.Table, rs ...*pb.Resource) pb.Table {
	out := maps.Clone(t)
	for _, r := range rs {
		out[r.GetName()] = r
	}
	return out
}

// without returns a copy of t without the named resources.
func without(t pb.Table, names ...string) pb.Table {
	out := maps.Clone(t)
	for _, n := range names {
		delete(out, n)
	}
	return out
}

// eps parses "ip:port" (or "[v6]:port") endpoints.
func eps(list ...string) []*pb.Endpoint {
	var out []*pb.Endpoint
	for _, s := range list {
		ap := netip.MustParseAddrPort(s)
		out = append(out, &pb.Endpoint{Ip: ap.Addr().String(), Port: int32(ap.Port())})
	}
	return out
}

func clusterEPs(list ...string) func(*pb.ServicePort) {
	return func(sp *pb.ServicePort) { sp.ClusterEndpoints = eps(list...) }
}

func bothEPs(list ...string) func(*pb.ServicePort) {
	return func(sp *pb.ServicePort) {
		sp.ClusterEndpoints = eps(list...)
		sp.ExternalEndpoints = eps(list...)
	}
}

// bigTable builds n IPv4 services with k endpoints each, every tenth one
// with a NodePort, as the benchmarks' 10,000 × 10. ClusterIPs come from
// 198.18.0.0/18, endpoints from the rest of 198.18.0.0/15 (114,688
// addresses).
func bigTable(n, k int) pb.Table {
	t := tableOf(defaultSettings())
	ep := func(e int) string {
		v := uint32(198)<<24 | uint32(18)<<16 | uint32(64)<<8 + uint32(e)
		return fmt.Sprintf("%d.%d.%d.%d:8080", v>>24, v>>16&255, v>>8&255, v&255)
	}
	for i := 0; i < n; i++ {
		var list []string
		for j := 0; j < k; j++ {
			list = append(list, ep(i*k+j))
		}
		cip := fmt.Sprintf("198.18.%d.%d", i/250, i%250+1)
		sp := svcSpec("bench", fmt.Sprintf("svc-%05d", i), pb.IPFamily_IP_FAMILY_IPV4, cip, 80, bothEPs(list...))
		if i%10 == 0 {
			sp.NodePort = int32(30000 + i/10)
		}
		r := res(sp)
		t[r.GetName()] = r
	}
	return t
}

// withoutEndpoint returns t with the last endpoint of resource name
// dropped: the benchmarks' one-endpoint update.
func withoutEndpoint(t pb.Table, name string) pb.Table {
	sp := t[name].GetServicePort()
	cp := &pb.ServicePort{}
	*cp = pb.ServicePort{
		Namespace: sp.Namespace, Name: sp.Name, PortName: sp.PortName, Family: sp.Family,
		Protocol: sp.Protocol, ClusterIp: sp.ClusterIp, Port: sp.Port, NodePort: sp.NodePort,
		ClusterEndpoints:    sp.ClusterEndpoints[:len(sp.ClusterEndpoints)-1],
		ExternalEndpoints:   sp.ExternalEndpoints[:len(sp.ExternalEndpoints)-1],
		ClusterNoEndpoints:  sp.ClusterNoEndpoints,
		ExternalNoEndpoints: sp.ExternalNoEndpoints,
		MasqueradeExternal:  sp.MasqueradeExternal,
	}
	return with(t, res(cp))
}

// lines splits text into its non-empty lines.
func lines(s string) []string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if l != "" {
			out = append(out, l)
		}
	}
	return out
}
