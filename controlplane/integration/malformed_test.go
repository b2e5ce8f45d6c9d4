package integration

import (
	"slices"
	"testing"
	"time"

	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
	"github.com/signalbox/signalbox/tools/devcluster/devclustertest"
)

// The apiserver validates addresses and ports, so the malformed objects it
// lets through are duplicates across slices; the rest (bad IPs, ports out
// of range, IPv6 in an IPv4 slice) are covered where they can arrive, in
// the cache and nodeview unit tests.
func TestDuplicateEndpointsAreSkippedAndCounted(t *testing.T) {
	cs := devclustertest.Get(t).Client()
	ns := "malformed"
	mkNamespace(t, cs, ns)
	p := startPlane(t, cs)
	a := connect(t, p, "mf-a", nil)
	before := p.skipped()
	mkService(t, cs, svcSpec(ns, "dup", nil))
	mkSlice(t, cs, slice(ns, "dup", "dup-1", ep{ip: "198.18.16.40", ready: true}, ep{ip: "198.18.16.41", ready: true}))
	mkSlice(t, cs, slice(ns, "dup", "dup-2", ep{ip: "198.18.16.41", ready: true}, ep{ip: "198.18.16.42", ready: true}))
	name := "svc/v4/malformed/dup/http"
	ackUntil(t, a, "the dup service with both slices", func(tb pb.Table) bool {
		return tb[name] != nil && len(tb[name].GetServicePort().GetClusterEndpoints()) == 3
	})
	got := epIPs(sp(t, a.Table(), name).GetClusterEndpoints())
	if !slices.Equal(got, []string{"198.18.16.40:8080", "198.18.16.41:8080", "198.18.16.42:8080"}) {
		t.Fatalf("endpoints = %v, want each address once", got)
	}
	deadline := time.Now().Add(5 * time.Second)
	for p.skipped() <= before {
		if time.Now().After(deadline) {
			t.Fatal("the duplicate endpoint was not counted in signalbox_controlplane_skipped_objects_total")
		}
		time.Sleep(20 * time.Millisecond)
	}
}
