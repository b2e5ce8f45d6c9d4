package netlab

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// These tests need root: they create network namespaces.

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("netlab tests need root (network namespaces, iproute2)")
	}
}

func newLab(t *testing.T, cfg Config) *Lab {
	t.Helper()
	requireRoot(t)
	lab, err := New(t.Context(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := lab.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return lab
}

// twoNodes: node1 has pods a (two echo ports) and b, node2 has pod c.
func twoNodes(name string, ipv6 bool) Config {
	return Config{Name: name, IPv6: ipv6, Nodes: []NodeConfig{
		{Name: "node1", Zone: "z1", Pods: []PodConfig{{Name: "a", Ports: []int{8080, 9090}}, {Name: "b"}}},
		{Name: "node2", Zone: "z2", Pods: []PodConfig{{Name: "c"}}},
	}}
}

func TestEchoReachesPodWithSenderAddress(t *testing.T) {
	for _, dual := range []bool{false, true} {
		t.Run("dual="+strconv.FormatBool(dual), func(t *testing.T) {
			lab := newLab(t, twoNodes("echo"+strconv.FormatBool(dual)[:1], dual))
			a := lab.Pod("a")
			senders := []*Host{lab.Client(), lab.Node("node1"), lab.Node("node2"), lab.Pod("b"), lab.Pod("c"), lab.Control()}
			for _, from := range senders {
				for i, dst := range a.Addrs() {
					src := from.Addrs()[i]
					for _, network := range []string{"tcp", "udp"} {
						for _, port := range []int{8080, 9090} {
							addr := netip.AddrPortFrom(dst, uint16(port)).String()
							r, err := lab.Ask(t.Context(), from, network, addr)
							if err != nil {
								t.Errorf("%s %s: %v", network, addr, err)
								continue
							}
							got, err := netip.ParseAddrPort(r.Source)
							if r.Pod != "a" || r.Port != port || err != nil || got.Addr() != src {
								t.Errorf("from %s %s %s: got %+v, want pod a, port %d, source %s", from.Name, network, addr, r, port, src)
							}
						}
					}
				}
			}
		})
	}
}

func TestAskRefusedAndUnrouted(t *testing.T) {
	lab := newLab(t, twoNodes("refuse", false))
	closed := netip.AddrPortFrom(lab.Pod("c").IPv4, 9999).String()
	for _, network := range []string{"tcp", "udp"} {
		start := time.Now()
		_, err := lab.Ask(t.Context(), lab.Client(), network, closed)
		if !errors.Is(err, syscall.ECONNREFUSED) || time.Since(start) > time.Second {
			t.Errorf("%s %s: got %v after %s, want a fast connection refused", network, closed, err, time.Since(start))
		}
	}
	// No route at the router: the packet dies inside the lab.
	if _, err := lab.Ask(t.Context(), lab.Client(), "tcp", "198.18.200.1:80"); err == nil {
		t.Error("reached an address nobody routes")
	}
}

func TestSealed(t *testing.T) {
	requireRoot(t)
	lab, err := New(t.Context(), twoNodes("sealed", true))
	if err != nil {
		t.Fatal(err)
	}
	defer lab.Close()

	addrs, err := net.InterfaceAddrs() // this goroutine runs in the root namespace
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range addrs {
		p, _ := netip.ParsePrefix(a.String())
		if LabRange4.Contains(p.Addr()) || LabRange6.Contains(p.Addr()) {
			t.Errorf("root namespace holds lab address %s", p)
		}
	}
	for _, g := range guards {
		out, err := run(t.Context(), "ip", g.family, "route", "show", "exact", g.prefix)
		if err != nil || !strings.Contains(out, "unreachable "+g.prefix) {
			t.Errorf("root guard route for %s missing: %q %v", g.prefix, out, err)
		}
	}

	// Every route of every lab namespace stays inside the lab; only
	// nodes and pods have a default route, and it points into the lab.
	for _, h := range lab.Hosts() {
		var defaults int
		for _, rt := range routes(t, h) {
			if rt.Dst == "default" {
				defaults++
				gw, err := netip.ParseAddr(rt.Gateway)
				if err != nil || !(LabRange4.Contains(gw) || LabRange6.Contains(gw)) {
					t.Errorf("%s: default route %+v leaves the lab", h.Name, rt)
				}
				continue
			}
			if !inLab(rt.Dst) {
				t.Errorf("%s: route %+v leaves the lab", h.Name, rt)
			}
		}
		wantDefaults := 0
		if h.PodCIDR.IsValid() || h.Node != "" {
			wantDefaults = 2
		}
		if defaults != wantDefaults {
			t.Errorf("%s: %d default routes, want %d", h.Name, defaults, wantDefaults)
		}
	}

	node := lab.Node("node1")
	for key, want := range map[string]string{
		"net.ipv4.ip_forward":              "1",
		"net.ipv4.conf.all.route_localnet": "1",
		"net.ipv4.conf.all.rp_filter":      "2",
		"net.ipv6.conf.all.forwarding":     "1",
	} {
		out, err := node.Command(t.Context(), "sysctl", "-n", key).Output()
		if got := strings.TrimSpace(string(out)); err != nil || got != want {
			t.Errorf("node1 %s = %q (%v), want %s", key, got, err, want)
		}
	}

	if err := lab.Close(); err != nil {
		t.Fatal(err)
	}
	if err := lab.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if left, _ := listNamespaces(nsPrefix + "sealed-"); len(left) > 0 {
		t.Errorf("namespaces left after Close: %v", left)
	}
	// Other processes may hold labs too; decide under their lock.
	err = withLock(func() error {
		if left, _ := listNamespaces(nsPrefix); len(left) > 0 {
			return nil
		}
		for _, g := range guards {
			if out, _ := run(t.Context(), "ip", g.family, "route", "show", "exact", g.prefix); strings.TrimSpace(out) != "" {
				t.Errorf("guard %s left with no lab: %q", g.prefix, out)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

type route struct {
	Dst     string `json:"dst"`
	Gateway string `json:"gateway"`
	Dev     string `json:"dev"`
}

func routes(t *testing.T, h *Host) []route {
	t.Helper()
	var all []route
	for _, family := range []string{"-4", "-6"} {
		out, err := run(t.Context(), "ip", "-n", h.NetNS, "-j", family, "route", "show", "table", "all")
		if err != nil {
			t.Fatal(err)
		}
		var rs []route
		if err := json.Unmarshal([]byte(out), &rs); err != nil {
			t.Fatalf("%s: %v: %s", h.Name, err, out)
		}
		all = append(all, rs...)
	}
	return all
}

// inLab accepts lab prefixes plus what the kernel adds on its own:
// loopback, link-local and multicast.
func inLab(dst string) bool {
	if !strings.Contains(dst, "/") {
		dst += map[bool]string{true: "/128", false: "/32"}[strings.Contains(dst, ":")]
	}
	p, err := netip.ParsePrefix(dst)
	if err != nil {
		return false
	}
	a := p.Addr()
	return LabRange4.Contains(a) || LabRange6.Contains(a) || a.IsLoopback() ||
		a.IsLinkLocalUnicast() || a.IsMulticast() || (a.Is4() && a.As4()[0] == 127)
}

func TestStaleLabIsRebuilt(t *testing.T) {
	requireRoot(t)
	old, err := New(t.Context(), twoNodes("stale", false))
	if err != nil {
		t.Fatal(err)
	}
	// A process left in the forgotten lab, as by a killed test run.
	sleeper := old.Node("node2").Command(context.Background(), "sleep", "300")
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sleeper.Process.Kill() }) // in case New did not
	exited := make(chan error, 1)
	go func() { exited <- sleeper.Wait() }()

	lab := newLab(t, twoNodes("stale", false))
	select {
	case err := <-exited:
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
			t.Errorf("stale process: got %v, want killed", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("process in the stale lab still runs")
	}
	// The forgotten lab's Close must leave the new namespaces alone.
	if err := old.Close(); err != nil {
		t.Fatal(err)
	}
	if names, _ := listNamespaces(nsPrefix + "stale-"); len(names) != len(lab.Hosts()) {
		t.Fatalf("after the stale lab's Close: namespaces %v, want all %d of the new lab", names, len(lab.Hosts()))
	}
	r, err := lab.Ask(t.Context(), lab.Client(), "tcp", netip.AddrPortFrom(lab.Pod("c").IPv4, 8080).String())
	if err != nil || r.Pod != "c" {
		t.Fatalf("rebuilt lab: %+v %v", r, err)
	}

	if labs, err := List(); err != nil || !contains(labs, "stale") {
		t.Fatalf("List = %v %v, want it to include stale", labs, err)
	}
	if err := Cleanup(t.Context(), "stale"); err != nil {
		t.Fatal(err)
	}
	if labs, err := List(); err != nil || contains(labs, "stale") {
		t.Fatalf("List after Cleanup = %v %v", labs, err)
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func TestTwoLabsCoexist(t *testing.T) {
	requireRoot(t)
	labs := make([]*Lab, 2)
	errs := make(chan error, 2)
	for i, name := range []string{"twox", "twoy"} {
		go func() {
			var err error
			labs[i], err = New(t.Context(), Config{Name: name, Nodes: []NodeConfig{
				{Name: "node1", Pods: []PodConfig{{Name: "pod" + name}}},
			}})
			errs <- err
		}()
	}
	for range labs {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	for _, l := range labs {
		if l != nil {
			t.Cleanup(func() { l.Close() })
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	// Same addresses, separate wires: each client reaches its own pod.
	for _, l := range labs {
		r, err := l.Ask(t.Context(), l.Client(), "udp", "198.18.17.11:8080")
		if err != nil || r.Pod != "pod"+l.Name() {
			t.Errorf("lab %s: got %+v %v", l.Name(), r, err)
		}
	}
}

func TestRouteViaAndControl(t *testing.T) {
	lab := newLab(t, twoNodes("routevia", true))
	node2 := lab.Node("node2")
	for _, tc := range []struct{ prefix, vip string }{
		{"198.18.200.0/24", "198.18.200.10"},
		{"2001:2:0:200::/64", "2001:2:0:200::10"},
	} {
		if err := lab.RouteVia(t.Context(), netip.MustParsePrefix(tc.prefix), "node2"); err != nil {
			t.Fatal(err)
		}
		// Stand-in for a data plane: node2 owns the external IP.
		if out, err := node2.Command(t.Context(), "ip", "addr", "add", tc.vip, "dev", "lo").CombinedOutput(); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		expectAccept(t, node2, lab.Client(), net.JoinHostPort(tc.vip, "80"))
	}
	for _, bad := range []string{"10.0.0.0/8", "8.8.8.0/24", "198.16.0.0/14", "2001:db8::/32"} {
		if err := lab.RouteVia(t.Context(), netip.MustParsePrefix(bad), "node2"); err == nil {
			t.Errorf("RouteVia(%s) accepted a non-lab prefix", bad)
		}
	}
	// Agents in node namespaces reach the control host.
	expectAccept(t, lab.Control(), lab.Node("node1"), "198.18.0.2:6443")
	expectAccept(t, lab.Control(), lab.Pod("c"), "[2001:2::2]:6443")
}

// expectAccept listens on addr inside server, dials it from client, and
// checks that the server sees the client's own address.
func expectAccept(t *testing.T, server, client *Host, addr string) {
	t.Helper()
	ln, err := server.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := client.Dial(t.Context(), "tcp", addr)
	if err != nil {
		t.Fatalf("%s -> %s: %v", client.Name, addr, err)
	}
	defer c.Close()
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	got := s.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
	if !contains(addrStrings(client), got.String()) {
		t.Errorf("%s -> %s: server saw %s, want one of %v", client.Name, addr, got, client.Addrs())
	}
}

func addrStrings(h *Host) []string {
	var s []string
	for _, a := range h.Addrs() {
		s = append(s, a.String())
	}
	return s
}
