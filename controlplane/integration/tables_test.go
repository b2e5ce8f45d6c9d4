package integration

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
	"github.com/signalbox/signalbox/tools/devcluster/devclustertest"
	"github.com/signalbox/signalbox/tools/testagent"
)

// ackUntil acknowledges deltas until cond holds for the agent's table.
func ackUntil(t *testing.T, a *testagent.Agent, what string, cond func(pb.Table) bool) {
	t.Helper()
	ctx := ctxT(t, 20*time.Second)
	for !cond(a.Table()) {
		if _, err := a.NextAck(ctx); err != nil {
			t.Fatalf("node %s waiting for %s: %v", a.Node, what, err)
		}
	}
}

func has(names ...string) func(pb.Table) bool {
	return func(tb pb.Table) bool {
		for _, n := range names {
			if tb[n] == nil {
				return false
			}
		}
		return true
	}
}

// marker creates a Service every node receives; the first delta a node
// gets after a change must then be either that change or the marker, which
// proves deterministically that unaffected nodes got nothing.
func marker(t *testing.T, ns, name string) string {
	mkService(t, devclustertest.Get(t).Client(), svcSpec(ns, name, nil))
	return "svc/v4/" + ns + "/" + name + "/http"
}

func TestPerNodeTablesAndSmallDeltas(t *testing.T) {
	cs := devclustertest.Get(t).Client()
	ns := "pernode"
	mkNamespace(t, cs, ns)
	mkNode(t, cs, "pn-a", "z1")
	mkNode(t, cs, "pn-b", "z2")
	mkNode(t, cs, "pn-c", "z1")
	p := startPlane(t, cs)
	agents := map[string]*testagent.Agent{}
	for _, n := range []string{"pn-a", "pn-b", "pn-c"} {
		agents[n] = connect(t, p, n, nil)
		d, err := agents[n].NextAck(ctxT(t, 10*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		if !d.GetReplace() {
			t.Fatalf("%s: first delta to an empty agent must be a replace snapshot", n)
		}
	}

	mkService(t, cs, svcSpec(ns, "web", nil))
	mkService(t, cs, svcSpec(ns, "local", func(s *corev1.Service) {
		s.Spec.Type = corev1.ServiceTypeNodePort
		s.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
	}))
	mkService(t, cs, svcSpec(ns, "zonal", nil))
	mkSlice(t, cs, slice(ns, "web", "web-1",
		ep{ip: "198.18.16.10", node: "pn-a", ready: true}, ep{ip: "198.18.17.10", node: "pn-b", ready: true}, ep{ip: "198.18.18.10", node: "pn-c", ready: true}))
	mkSlice(t, cs, slice(ns, "local", "local-1", ep{ip: "198.18.16.11", node: "pn-a", ready: true}))
	zonal := slice(ns, "zonal", "zonal-1",
		ep{ip: "198.18.16.12", node: "pn-a", zone: "z1", ready: true}, ep{ip: "198.18.17.12", node: "pn-b", zone: "z2", ready: true})
	mkSlice(t, cs, zonal)

	web, local, zn := "svc/v4/pernode/web/http", "svc/v4/pernode/local/http", "svc/v4/pernode/zonal/http"
	full := func(tb pb.Table) bool {
		return has(web, local, zn)(tb) && len(sp(t, tb, web).GetClusterEndpoints()) == 3 &&
			len(sp(t, tb, local).GetClusterEndpoints()) == 1 && len(sp(t, tb, zn).GetClusterEndpoints()) >= 1
	}
	for _, a := range agents {
		ackUntil(t, a, "all three services", full)
	}
	ta, tb, tc := agents["pn-a"].Table(), agents["pn-b"].Table(), agents["pn-c"].Table()

	if ta[web].GetHash() != tb[web].GetHash() || ta[web].GetHash() != tc[web].GetHash() {
		t.Errorf("a Cluster-policy Service must be the same resource on every node")
	}
	if got := epIPs(sp(t, ta, local).GetExternalEndpoints()); !slices.Equal(got, []string{"198.18.16.11:8080"}) {
		t.Errorf("pn-a local external endpoints = %v, want its local endpoint", got)
	}
	if got := sp(t, tb, local); len(got.GetExternalEndpoints()) != 0 || got.GetExternalNoEndpoints() != pb.NoEndpointsAction_NO_ENDPOINTS_ACTION_DROP {
		t.Errorf("pn-b has no local endpoint: want no external endpoints and DROP, got %v", got)
	}
	if tb[local].GetHash() != tc[local].GetHash() {
		t.Errorf("nodes without local endpoints must share the ETP Local resource")
	}
	for node, tab := range map[string]pb.Table{"pn-a": ta, "pn-c": tc} {
		if got := epIPs(sp(t, tab, zn).GetClusterEndpoints()); !slices.Equal(got, []string{"198.18.16.12:8080"}) {
			t.Errorf("%s (zone z1) zonal endpoints = %v, want the z1 endpoint only", node, got)
		}
	}
	if got := epIPs(sp(t, tb, zn).GetClusterEndpoints()); !slices.Equal(got, []string{"198.18.17.12:8080"}) {
		t.Errorf("pn-b (zone z2) zonal endpoints = %v, want the z2 endpoint only", got)
	}

	// One endpoint changes in zone z2: only pn-b gets a delta, of one
	// resource and under 1 KiB.
	zonal.Endpoints[1].Addresses = []string{"198.18.17.13"}
	updateSlice(t, cs, zonal)
	d, err := agents["pn-b"].NextAck(ctxT(t, 10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if up, rm := names(d); !slices.Equal(up, []string{zn}) || len(rm) != 0 {
		t.Fatalf("pn-b delta = upserts %v removals %v, want only %s", up, rm, zn)
	}
	if size := proto.Size(&pb.SyncResponse{Delta: d}); size > 1024 {
		t.Errorf("one-endpoint delta is %d bytes, want <= 1 KiB", size)
	}
	m := marker(t, ns, "marker1")
	for _, n := range []string{"pn-a", "pn-c"} {
		d, err := agents[n].NextAck(ctxT(t, 10*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		if up, rm := names(d); !slices.Equal(up, []string{m}) || len(rm) != 0 {
			t.Fatalf("%s is unaffected by the z2 change, but its next delta is upserts %v removals %v", n, up, rm)
		}
	}
	ackUntil(t, agents["pn-b"], "marker", has(m))

	// Delete → removal everywhere.
	if err := cs.CoreV1().Services(ns).Delete(context.Background(), "local", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	for n, a := range agents {
		d, err := a.NextAck(ctxT(t, 10*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		if up, rm := names(d); len(up) != 0 || !slices.Equal(rm, []string{local}) {
			t.Fatalf("%s: delete delta = upserts %v removals %v, want removal of %s", n, up, rm, local)
		}
	}
}

func TestResumeAfterReconnectAndRestart(t *testing.T) {
	cs := devclustertest.Get(t).Client()
	ns := "resume"
	mkNamespace(t, cs, ns)
	mkService(t, cs, svcSpec(ns, "one", nil))
	mkService(t, cs, svcSpec(ns, "two", nil))
	mkSlice(t, cs, slice(ns, "one", "one-1", ep{ip: "198.18.16.20", ready: true}))
	two := slice(ns, "two", "two-1", ep{ip: "198.18.16.21", ready: true})
	mkSlice(t, cs, two)
	one, twoName := "svc/v4/resume/one/http", "svc/v4/resume/two/http"

	p := startPlane(t, cs)
	a := connect(t, p, "rs-a", nil)
	ackUntil(t, a, "both services", has(one, twoName))
	held := a.Table()
	a.Close()

	// A change while disconnected: the reconnect carries hashes and gets
	// only the difference, not a snapshot.
	two.Endpoints[0].Addresses = []string{"198.18.16.22"}
	updateSlice(t, cs, two)
	a = connect(t, p, "rs-a", held)
	d, err := a.NextAck(ctxT(t, 10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if d.GetReplace() {
		t.Fatalf("a resuming agent must not get a replace snapshot")
	}
	if up, rm := names(d); !slices.Equal(up, []string{twoName}) || len(rm) != 0 {
		t.Fatalf("resume delta = upserts %v removals %v, want only %s", up, rm, twoName)
	}
	if got := epIPs(sp(t, a.Table(), twoName).GetClusterEndpoints()); !slices.Equal(got, []string{"198.18.16.22:8080"}) {
		t.Fatalf("resumed table has %v", got)
	}

	// Control-plane restart: a new plane resumes the agent without resending
	// anything unchanged; the first delta is the marker made afterwards.
	held = a.Table()
	a.Close()
	p.stop()
	p2 := startPlane(t, cs)
	a = connect(t, p2, "rs-a", held)
	m := marker(t, ns, "after-restart")
	d, err = a.NextAck(ctxT(t, 10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if up, rm := names(d); !slices.Equal(up, []string{m}) || len(rm) != 0 || d.GetReplace() {
		t.Fatalf("after a control-plane restart the first delta = upserts %v removals %v replace %v, want only %s",
			up, rm, d.GetReplace(), m)
	}
}

func TestNackIsVisibleAndNextChangeIsDelivered(t *testing.T) {
	cs := devclustertest.Get(t).Client()
	ns := "nack"
	mkNamespace(t, cs, ns)
	p := startPlane(t, cs)
	a := connect(t, p, "nk-a", nil)
	if _, err := a.NextAck(ctxT(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	bad := marker(t, ns, "bad")
	d, err := a.Next(ctxT(t, 10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Nack(d, "kernel refused rule for "+bad, bad); err != nil {
		t.Fatal(err)
	}
	waitNode(t, p, "nk-a", func(s *pb.NodeStatus) bool {
		return s.GetDegraded() && strings.Contains(s.GetLastNack().GetMessage(), "kernel refused")
	})
	conv, err := p.inspect.GetServiceConvergence(ctxT(t, 5*time.Second), &pb.GetServiceConvergenceRequest{Namespace: ns, Name: "bad"})
	if err != nil {
		t.Fatal(err)
	}
	if len(conv.GetRejected()) != 1 || conv.GetRejected()[0].GetNode() != "nk-a" {
		t.Fatalf("convergence = %v, want nk-a rejected", conv)
	}

	good := marker(t, ns, "good")
	ackUntil(t, a, "the next good change", has(good, bad))
	waitNode(t, p, "nk-a", func(s *pb.NodeStatus) bool { return !s.GetDegraded() && s.GetPendingChanges() == 0 })
	conv, err = p.inspect.GetServiceConvergence(ctxT(t, 5*time.Second), &pb.GetServiceConvergenceRequest{Namespace: ns, Name: "good"})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(conv.GetConverged(), []string{"nk-a"}) {
		t.Fatalf("convergence after ACK = %v, want nk-a converged", conv)
	}
}

func waitNode(t *testing.T, p *plane, node string, cond func(*pb.NodeStatus) bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	var last *pb.NodeStatus
	for time.Now().Before(deadline) {
		resp, err := p.inspect.ListNodes(context.Background(), &pb.ListNodesRequest{})
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range resp.GetNodes() {
			if s.GetName() == node {
				last = s
				if cond(s) {
					return
				}
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("node %s never reached the expected state; last status %v", node, last)
}
