package healthcheck

import (
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// freePort returns a loopback port that was free a moment ago.
func freePort(t *testing.T) int32 {
	t.Helper()
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return int32(l.Addr().(*net.TCPAddr).Port)
}

func localService(ns, name, portName string, hcPort, local int32) *pb.Resource {
	return pb.NewServicePortResource(fmt.Sprintf("svc/v4/%s/%s/%s", ns, name, portName), &pb.ServicePort{
		Namespace: ns, Name: name, PortName: portName, Family: pb.IPFamily_IP_FAMILY_IPV4,
		Protocol: pb.Protocol_PROTOCOL_TCP, ClusterIp: "198.18.0.10", Port: 80,
		ExternalPolicyLocal: true, HealthCheckNodePort: hcPort, LocalReadyEndpoints: local,
	})
}

func table(rs ...*pb.Resource) pb.Table {
	t := pb.Table{}
	for _, r := range rs {
		t[r.Name] = r
	}
	return t
}

type probe struct {
	code   int
	body   string
	header http.Header
}

func probePort(t *testing.T, port int32) (probe, error) {
	t.Helper()
	return probeAddr(t, net.JoinHostPort("127.0.0.1", strconv.Itoa(int(port))))
}

func probeAddr(t *testing.T, addr string) (probe, error) {
	t.Helper()
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get("http://" + addr + "/")
	if err != nil {
		return probe{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return probe{resp.StatusCode, string(b), resp.Header}, err
}

func newTestServer(t *testing.T, healthy *atomic.Bool) *ServiceServer {
	s := NewServiceServer(ServiceConfig{
		// Loopback only: tests never listen on the machine's other addresses.
		NodePortAddresses: []string{"127.0.0.0/8"},
		Healthy:           healthy.Load,
		Logger:            slog.New(slog.NewTextHandler(t.Output(), nil)),
	})
	t.Cleanup(s.Close)
	return s
}

func TestServiceHealthCheckAnswersLikeKubeProxy(t *testing.T) {
	var healthy atomic.Bool
	healthy.Store(true)
	s := newTestServer(t, &healthy)
	webPort, emptyPort := freePort(t), freePort(t)
	err := s.Sync(table(
		localService("default", "web", "http", webPort, 2),
		localService("default", "web", "https", webPort, 2), // second port, same server
		localService("shop", "empty", "http", emptyPort, 0),
		pb.NewServicePortResource("svc/v4/default/cluster/http", &pb.ServicePort{Namespace: "default", Name: "cluster"}),
	))
	if err != nil {
		t.Fatal(err)
	}
	if got := len(s.Ports()); got != 2 {
		t.Errorf("open health checks = %v, want 2", s.Ports())
	}

	p, err := probePort(t, webPort)
	if err != nil {
		t.Fatal(err)
	}
	want := "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
	if p.code != http.StatusOK || p.body != want {
		t.Errorf("web: %d\n%s\nwant 200\n%s", p.code, p.body, want)
	}
	for k, v := range map[string]string{
		"Content-Type": "application/json", "X-Content-Type-Options": "nosniff", "X-Load-Balancing-Endpoint-Weight": "2",
	} {
		if p.header.Get(k) != v {
			t.Errorf("header %s = %q, want %q", k, p.header.Get(k), v)
		}
	}

	p, err = probePort(t, emptyPort)
	if err != nil {
		t.Fatal(err)
	}
	if p.code != http.StatusServiceUnavailable || p.header.Get("X-Load-Balancing-Endpoint-Weight") != "0" {
		t.Errorf("no local endpoints: %d %v", p.code, p.header)
	}

	// Stale rule programming turns every health check to 503.
	healthy.Store(false)
	p, err = probePort(t, webPort)
	if err != nil {
		t.Fatal(err)
	}
	if p.code != http.StatusServiceUnavailable || p.body != "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": false\n}" {
		t.Errorf("unhealthy agent: %d %s", p.code, p.body)
	}
}

func TestServiceHealthChecksFollowTheTable(t *testing.T) {
	var healthy atomic.Bool
	healthy.Store(true)
	s := newTestServer(t, &healthy)
	p1, p2 := freePort(t), freePort(t)

	if err := s.Sync(table(localService("default", "web", "http", p1, 0))); err != nil {
		t.Fatal(err)
	}
	if p, err := probePort(t, p1); err != nil || p.code != http.StatusServiceUnavailable {
		t.Fatalf("before endpoints: %v %v", p, err)
	}
	// Endpoint counts change in place on the same server.
	if err := s.Sync(table(localService("default", "web", "http", p1, 1))); err != nil {
		t.Fatal(err)
	}
	if p, err := probePort(t, p1); err != nil || p.code != http.StatusOK {
		t.Fatalf("after endpoints: %v %v", p, err)
	}
	// A new port closes the old one.
	if err := s.Sync(table(localService("default", "web", "http", p2, 1))); err != nil {
		t.Fatal(err)
	}
	if _, err := probePort(t, p1); err == nil {
		t.Errorf("old port %d still answers", p1)
	}
	if p, err := probePort(t, p2); err != nil || p.code != http.StatusOK {
		t.Fatalf("new port: %v %v", p, err)
	}
	// Gone from the table: closed.
	if err := s.Sync(table()); err != nil {
		t.Fatal(err)
	}
	if _, err := probePort(t, p2); err == nil {
		t.Errorf("removed service's port %d still answers", p2)
	}
	if len(s.Ports()) != 0 {
		t.Errorf("open health checks after removal: %v", s.Ports())
	}
}

// A port held by someone else is reported, the other Services are served,
// and the next Sync retries it.
func TestServiceHealthCheckPortConflictIsRetried(t *testing.T) {
	var healthy atomic.Bool
	healthy.Store(true)
	s := newTestServer(t, &healthy)
	busy, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	busyPort := int32(busy.Addr().(*net.TCPAddr).Port)
	okPort := freePort(t)
	tbl := table(localService("default", "a", "http", busyPort, 1), localService("default", "b", "http", okPort, 1))

	if err := s.Sync(tbl); err == nil {
		t.Error("Sync hid the port conflict")
	}
	if p, err := probePort(t, okPort); err != nil || p.code != http.StatusOK {
		t.Errorf("unaffected service: %v %v", p, err)
	}
	busy.Close()
	if err := s.Sync(tbl); err != nil {
		t.Fatalf("retry: %v", err)
	}
	if p, err := probePort(t, busyPort); err != nil || p.code != http.StatusOK {
		t.Errorf("after retry: %v %v", p, err)
	}
}

func TestListenHosts(t *testing.T) {
	s := NewServiceServer(ServiceConfig{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	s.ifAddrs = func() ([]net.Addr, error) {
		return []net.Addr{
			&net.IPNet{IP: net.ParseIP("198.18.1.5"), Mask: net.CIDRMask(24, 32)},
			&net.IPNet{IP: net.ParseIP("198.19.0.7"), Mask: net.CIDRMask(24, 32)},
			&net.IPNet{IP: net.ParseIP("2001:2::5"), Mask: net.CIDRMask(64, 128)},
		}, nil
	}
	v4, v6 := pb.IPFamily_IP_FAMILY_IPV4, pb.IPFamily_IP_FAMILY_IPV6
	for _, tc := range []struct {
		family pb.IPFamily
		cidrs  []string
		want   string
	}{
		{v4, nil, "0.0.0.0"},
		{v6, nil, "::"},
		{v4, []string{"198.18.0.0/16"}, "198.18.1.5"},
		{v4, []string{"198.18.0.0/15"}, "198.18.1.5,198.19.0.7"},
		{v6, []string{"2001:2::/48", "198.18.0.0/15"}, "2001:2::5"},
		{v4, []string{"203.0.113.0/24"}, "0.0.0.0"}, // nothing matches: listen everywhere
		{v4, []string{"primary"}, "0.0.0.0"},
	} {
		if got := fmt.Sprint(s.listenHosts(tc.family, tc.cidrs)); got != "["+strings.ReplaceAll(tc.want, ",", " ")+"]" {
			t.Errorf("%v %v: %s, want [%s]", tc.family, tc.cidrs, got, tc.want)
		}
	}
}

// Without an agent override the table's NodeSettings choose the addresses.
func TestNodeSettingsChooseAddressesUnlessOverridden(t *testing.T) {
	port := freePort(t)
	settings := pb.NewNodeSettingsResource("node/settings", &pb.NodeSettings{NodePortAddresses: []string{"127.0.0.0/8"}})
	key := serviceKey{"default", "web", pb.IPFamily_IP_FAMILY_IPV4}
	for _, tc := range []struct {
		override []string
		want     string
	}{
		{nil, "127.0.0.1"},
		{[]string{"127.0.0.1/32"}, "127.0.0.1"},
		{[]string{"198.18.0.0/15"}, "0.0.0.0"}, // the override wins even when it matches nothing
	} {
		s := NewServiceServer(ServiceConfig{NodePortAddresses: tc.override, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
		if err := s.Sync(table(settings, localService("default", "web", "http", port, 1))); err != nil {
			t.Fatal(err)
		}
		if got := s.instances[key].addrs; got != tc.want {
			t.Errorf("override %v: listening on %q, want %q", tc.override, got, tc.want)
		}
		s.Close()
	}
}

// A dual-stack Service gets one socket per family on the same port, each
// answering with its own family's count.
func TestDualStackSharesThePort(t *testing.T) {
	var healthy atomic.Bool
	healthy.Store(true)
	s := NewServiceServer(ServiceConfig{
		NodePortAddresses: []string{"127.0.0.0/8", "::1/128"},
		Healthy:           healthy.Load,
		Logger:            slog.New(slog.NewTextHandler(t.Output(), nil)),
	})
	t.Cleanup(s.Close)
	port := freePort(t)
	v6 := pb.NewServicePortResource("svc/v6/default/web/http", &pb.ServicePort{
		Namespace: "default", Name: "web", PortName: "http", Family: pb.IPFamily_IP_FAMILY_IPV6,
		Protocol: pb.Protocol_PROTOCOL_TCP, ClusterIp: "2001:2::10", Port: 80,
		ExternalPolicyLocal: true, HealthCheckNodePort: port, LocalReadyEndpoints: 0,
	})
	if err := s.Sync(table(localService("default", "web", "http", port, 3), v6)); err != nil {
		t.Fatal(err)
	}
	p4, err := probeAddr(t, net.JoinHostPort("127.0.0.1", strconv.Itoa(int(port))))
	if err != nil || p4.code != http.StatusOK || p4.header.Get("X-Load-Balancing-Endpoint-Weight") != "3" {
		t.Errorf("IPv4: %v %v", p4, err)
	}
	p6, err := probeAddr(t, net.JoinHostPort("::1", strconv.Itoa(int(port))))
	if err != nil || p6.code != http.StatusServiceUnavailable {
		t.Errorf("IPv6: %v %v", p6, err)
	}
}
