package ipvs

import (
	"context"
	"net"
	"os"
	"testing"
	"time"

	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
	"github.com/vishvananda/netlink"
)

// testGracefulDrain: a removed TCP real server with connections stays at
// weight 0 until idle, Sync leaves it so, and a returning endpoint revives
// it with one update.
func testGracefulDrain(t *testing.T) {
	ctx := context.Background()
	p := vmPlane
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetUp(lo); err != nil {
		t.Fatal(err)
	}
	// s0999: 198.18.103.250:80 -> 198.19.3.250:8080, 198.19.13.250:8080.
	vs := vsKey("198.18.103.250", TCP, 80)
	gone := rsKey("198.19.13.250", 8080)
	// No route leads to the endpoints, so the SYNs die after IPVS
	// scheduled them: each attempt leaves an IPVS connection entry.
	start := time.Now()
	for range 4 {
		if c, err := net.DialTimeout("tcp", "198.18.103.250:80", 200*time.Millisecond); err == nil {
			c.Close()
		}
	}
	t.Logf("4 connection attempts: %s", time.Since(start).Round(time.Millisecond))
	if c := procReal(t, vs, gone); c.conns == 0 {
		t.Fatalf("no IPVS connection to %v after connecting; cannot test draining", gone)
	}

	next := edit(vmTable, "s0999", func(sp *pb.ServicePort) { setEPs(sp, sp.ClusterEndpoints[0]) })
	before, start := p.Counts(), time.Now()
	if _, err := p.Apply(ctx, vmTable, next); err != nil {
		t.Fatal(err)
	}
	t.Logf("Apply removing a busy real server: %s", time.Since(start).Round(time.Millisecond))
	if d := p.Counts().Sub(before); d.RealServerUpdates != 1 || d.NetlinkWrites() != 1 {
		t.Errorf("removing a busy real server: %+v, want one weight update", d)
	}
	if c := procReal(t, vs, gone); c.weight != 0 {
		t.Errorf("draining real server has weight %d", c.weight)
	}
	before, start = p.Counts(), time.Now()
	if _, err := p.Sync(ctx, next); err != nil {
		t.Fatal(err)
	}
	t.Logf("Sync: %s", time.Since(start).Round(time.Millisecond))
	if d := p.Counts().Sub(before); d.NetlinkWrites() != 0 {
		t.Errorf("Sync touched a draining real server: %+v", d)
	}
	procReal(t, vs, gone)

	before = p.Counts()
	if _, err := p.Apply(ctx, next, vmTable); err != nil {
		t.Fatal(err)
	}
	if d := p.Counts().Sub(before); d.RealServerUpdates != 1 || d.NetlinkWrites() != 1 {
		t.Errorf("reviving a draining real server: %+v, want one weight update", d)
	}
	if c := procReal(t, vs, gone); c.weight != 1 {
		t.Errorf("revived real server has weight %d", c.weight)
	}
	converged(t, p)
}

// procReal returns a real server as /proc/net/ip_vs shows it, failing if
// it is absent.
func procReal(t *testing.T, vs VSKey, rs RSKey) realServer {
	t.Helper()
	b, err := os.ReadFile(procIPVS)
	if err != nil {
		t.Fatal(err)
	}
	all, err := parseProcIPVS(string(b))
	if err != nil {
		t.Fatal(err)
	}
	c, ok := all[vs][rs]
	if !ok {
		t.Fatalf("real server %v of %s is gone", rs, vs)
	}
	return c
}
