package ipvs

import (
	"fmt"
	"net/netip"

	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// Test tables use 198.18.0.0/15 and 2001:2::/48 only.

func ep(ip string, port int32) *pb.Endpoint { return &pb.Endpoint{Ip: ip, Port: port} }

func termEP(ip string, port int32) *pb.Endpoint {
	return &pb.Endpoint{Ip: ip, Port: port, Terminating: true}
}

// clusterSvc is a TCP ClusterIP service port whose cluster and external
// endpoints are the same, as for policies Cluster.
func clusterSvc(ns, name, ip string, port int32, eps ...*pb.Endpoint) *pb.ServicePort {
	fam := pb.IPFamily_IP_FAMILY_IPV4
	if netip.MustParseAddr(ip).Is6() {
		fam = pb.IPFamily_IP_FAMILY_IPV6
	}
	return &pb.ServicePort{
		Namespace: ns, Name: name, Family: fam, Protocol: pb.Protocol_PROTOCOL_TCP,
		ClusterIp: ip, Port: port, ClusterEndpoints: eps, ExternalEndpoints: eps,
		MasqueradeExternal: true,
		ClusterNoEndpoints: pb.NoEndpointsAction_NO_ENDPOINTS_ACTION_REJECT, ExternalNoEndpoints: pb.NoEndpointsAction_NO_ENDPOINTS_ACTION_REJECT,
	}
}

// table builds a table from service ports (named after their service) and
// optional node settings.
func table(ns *pb.NodeSettings, sps ...*pb.ServicePort) pb.Table {
	t := pb.Table{}
	for _, sp := range sps {
		fam := "v4"
		if sp.GetFamily() == pb.IPFamily_IP_FAMILY_IPV6 {
			fam = "v6"
		}
		name := fmt.Sprintf("svc/%s/%s/%s/%s", fam, sp.GetNamespace(), sp.GetName(), sp.GetPortName())
		t[name] = pb.NewServicePortResource(name, sp)
	}
	if ns != nil {
		t["node/settings"] = pb.NewNodeSettingsResource("node/settings", ns)
	}
	return t
}

func testConfig(nodeIPs ...string) Config {
	cfg, err := Config{}.withDefaults()
	if err != nil {
		panic(err)
	}
	for _, a := range nodeIPs {
		cfg.NodeIPs = append(cfg.NodeIPs, netip.MustParseAddr(a))
	}
	return cfg
}

func vsKey(addr string, p Proto, port uint16) VSKey {
	return VSKey{netip.MustParseAddr(addr), p, port}
}

func rsKey(addr string, port uint16) RSKey { return RSKey{netip.MustParseAddr(addr), port} }

// bigTable has n ClusterIP services with two endpoints each.
func bigTable(n int) pb.Table {
	sps := make([]*pb.ServicePort, 0, n)
	for i := range n {
		ip := fmt.Sprintf("198.18.%d.%d", 100+i/250, 1+i%250)
		a := fmt.Sprintf("198.19.%d.%d", i/250, 1+i%250)
		b := fmt.Sprintf("198.19.%d.%d", 10+i/250, 1+i%250)
		sps = append(sps, clusterSvc("load", fmt.Sprintf("s%04d", i), ip, 80, ep(a, 8080), ep(b, 8080)))
	}
	return table(&pb.NodeSettings{ClusterCidrs: []string{"198.19.0.0/16"}}, sps...)
}
