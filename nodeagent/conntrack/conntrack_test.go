package conntrack

import (
	"net"
	"net/netip"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

func ep(s string) *pb.Endpoint {
	ap := netip.MustParseAddrPort(s)
	return &pb.Endpoint{Ip: ap.Addr().String(), Port: int32(ap.Port())}
}

func udp(name string, mutate ...func(*pb.ServicePort)) *pb.Resource {
	sp := &pb.ServicePort{
		Namespace: "ns", Name: name, Family: pb.IPFamily_IP_FAMILY_IPV4, Protocol: pb.Protocol_PROTOCOL_UDP,
		ClusterIp: "198.18.100.53", Port: 53,
		ClusterEndpoints: []*pb.Endpoint{ep("198.19.5.1:5353"), ep("198.19.5.2:5353")},
	}
	for _, m := range mutate {
		m(sp)
	}
	return pb.NewServicePortResource("svc/"+name, sp)
}

func table(rs ...*pb.Resource) pb.Table {
	t := pb.Table{}
	for _, r := range rs {
		t[r.GetName()] = r
	}
	return t
}

func only(eps ...string) func(*pb.ServicePort) {
	return func(sp *pb.ServicePort) {
		sp.ClusterEndpoints = nil
		for _, e := range eps {
			sp.ClusterEndpoints = append(sp.ClusterEndpoints, ep(e))
		}
	}
}

// describe renders targets compactly for comparison.
func describe(ts []Target) []string {
	var out []string
	for _, t := range ts {
		var parts []string
		for _, a := range t.Addrs {
			parts = append(parts, a.String())
		}
		if t.NodePort != 0 {
			parts = append(parts, "np:"+strconv.Itoa(int(t.NodePort)))
		}
		parts = append(parts, "keep")
		var keep []string
		for k := range t.Keep {
			keep = append(keep, k.String())
		}
		sort.Strings(keep)
		out = append(out, strings.Join(append(parts, keep...), " "))
	}
	return out
}

func TestTargets(t *testing.T) {
	base := table(udp("dns"))
	cases := []struct {
		name       string
		prev, next pb.Table
		want       []string
	}{
		{"unchanged", base, base, nil},
		{"endpoint added", base, table(udp("dns", only("198.19.5.1:5353", "198.19.5.2:5353", "198.19.5.3:5353"))), nil},
		{"endpoint removed", base, table(udp("dns", only("198.19.5.1:5353"))),
			[]string{"198.18.100.53:53 keep 198.19.5.1:5353"}},
		{"none to some", table(udp("dns", only())), base,
			[]string{"198.18.100.53:53 keep 198.19.5.1:5353 198.19.5.2:5353"}},
		{"service removed", table(udp("dns", func(sp *pb.ServicePort) { sp.NodePort = 30053 })), table(),
			[]string{"198.18.100.53:53 np:30053 keep"}},
		{"external IP removed", table(udp("dns", func(sp *pb.ServicePort) { sp.ExternalIps = []string{"198.18.200.53"} })), base,
			[]string{"198.18.200.53:53 keep"}},
		{"new service", table(), base,
			[]string{"198.18.100.53:53 keep 198.19.5.1:5353 198.19.5.2:5353"}},
		{"tcp is not cleaned", table(udp("web", func(sp *pb.ServicePort) { sp.Protocol = pb.Protocol_PROTOCOL_TCP })),
			table(udp("web", only(), func(sp *pb.ServicePort) { sp.Protocol = pb.Protocol_PROTOCOL_TCP })), nil},
		{"full sync reconciles every UDP port", nil, table(udp("dns", func(sp *pb.ServicePort) {
			sp.NodePort = 30053
			sp.ExternalEndpoints = []*pb.Endpoint{ep("198.19.5.9:5353")}
		})), []string{"198.18.100.53:53 np:30053 keep 198.19.5.1:5353 198.19.5.2:5353 198.19.5.9:5353"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := describe(Targets(c.prev, c.next)); !slices.Equal(got, c.want) {
				t.Fatalf("targets:\n got %q\nwant %q", got, c.want)
			}
		})
	}
}

func flow(dst string, dport uint16, replySrc string, replyPort uint16) *netlink.ConntrackFlow {
	return &netlink.ConntrackFlow{
		Forward: netlink.IPTuple{Protocol: unix.IPPROTO_UDP, SrcIP: net.ParseIP("198.19.9.9").To4(), DstIP: net.ParseIP(dst).To4(), DstPort: dport},
		Reverse: netlink.IPTuple{Protocol: unix.IPPROTO_UDP, SrcIP: net.ParseIP(replySrc).To4(), SrcPort: replyPort},
	}
}

func TestFilterMatchesOnlyStaleFlows(t *testing.T) {
	targets := Targets(table(udp("dns", func(sp *pb.ServicePort) { sp.NodePort = 30053 })),
		table(udp("dns", only("198.19.5.1:5353"), func(sp *pb.ServicePort) { sp.NodePort = 30053 })))
	f := newFilter(pb.IPFamily_IP_FAMILY_IPV4, targets)
	if f == nil || newFilter(pb.IPFamily_IP_FAMILY_IPV6, targets) != nil {
		t.Fatal("filters per family are wrong")
	}
	tcp := flow("198.18.100.53", 53, "198.19.5.2", 5353)
	tcp.Forward.Protocol = unix.IPPROTO_TCP
	for _, c := range []struct {
		name  string
		flow  *netlink.ConntrackFlow
		stale bool
	}{
		{"kept endpoint", flow("198.18.100.53", 53, "198.19.5.1", 5353), false},
		{"removed endpoint", flow("198.18.100.53", 53, "198.19.5.2", 5353), true},
		{"same IP, other port", flow("198.18.100.53", 53, "198.19.5.1", 5354), true},
		{"node port to removed endpoint", flow("198.18.0.7", 30053, "198.19.5.2", 5353), true},
		{"node port to kept endpoint", flow("198.18.0.7", 30053, "198.19.5.1", 5353), false},
		{"another service", flow("198.18.100.54", 53, "198.19.5.2", 5353), false},
		{"tcp", tcp, false},
	} {
		if got := f.MatchConntrackFlow(c.flow); got != c.stale {
			t.Errorf("%s: stale = %v, want %v", c.name, got, c.stale)
		}
	}
}
