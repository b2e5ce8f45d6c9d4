package iptables

import (
	"context"
	"testing"

	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// The scale of DESIGN.md's baseline: 10,000 services × 10 endpoints.
const benchServices, benchEndpoints = 10000, 10

var benchTarget = "svc/v4/bench/svc-04321/p80"

func BenchmarkRender10kServices(b *testing.B) {
	tbl := bigTable(benchServices, benchEndpoints)
	var plan Plan
	b.ReportAllocs()
	for b.Loop() {
		var err error
		if plan, err = Render(nil, tbl, onlyV4); err != nil {
			b.Fatal(err)
		}
		_ = plan.V4.Restore()
	}
	b.ReportMetric(float64(plan.V4.Rules), "rules")
	b.ReportMetric(float64(len(plan.V4.Restore())), "restore-bytes")
}

func BenchmarkRenderOneEndpointUpdate(b *testing.B) {
	prev := bigTable(benchServices, benchEndpoints)
	next := withoutEndpoint(prev, benchTarget)
	var plan Plan
	b.ReportAllocs()
	for b.Loop() {
		var err error
		if plan, err = Render(prev, next, onlyV4); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(len(plan.V4.Restore())), "restore-bytes")
}

// BenchmarkApply10kServices programs a fresh network namespace:
//   - full-into-empty: Sync into a kernel without our rules (agent start);
//   - full-rewrite: Sync over a kernel holding an older table (one
//     endpoint differs), which rewrites every chain as upstream's full
//     sync does;
//   - full-held: Sync over a kernel already holding the table (restart or
//     periodic repair): read back and compare, no restore;
//   - one-endpoint: Apply removing or restoring one endpoint of one service.
func BenchmarkApply10kServices(b *testing.B) {
	ctx := context.Background()
	tbl := bigTable(benchServices, benchEndpoints)
	alt := withoutEndpoint(tbl, benchTarget)
	for _, backend := range backends {
		b.Run(backend+"/full-held", func(b *testing.B) {
			inNetns(b)
			p := newPlane(b, backend, onlyV4)
			if _, err := p.Sync(ctx, tbl); err != nil {
				b.Fatal(err)
			}
			for b.Loop() {
				r, err := p.Sync(ctx, tbl)
				if err != nil {
					b.Fatal(err)
				}
				b.ReportMetric(float64(r.Rules), "rules")
			}
		})
		b.Run(backend+"/full-rewrite", func(b *testing.B) {
			inNetns(b)
			p := newPlane(b, backend, onlyV4)
			if _, err := p.Sync(ctx, tbl); err != nil {
				b.Fatal(err)
			}
			cur := tbl
			for b.Loop() {
				cur = flip(cur, tbl, alt)
				if _, err := p.Sync(ctx, cur); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(backend+"/full-into-empty", func(b *testing.B) {
			inNetns(b)
			p := newPlane(b, backend, onlyV4)
			for b.Loop() {
				b.StopTimer()
				if err := p.Cleanup(ctx); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				if _, err := p.Sync(ctx, tbl); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(backend+"/one-endpoint", func(b *testing.B) {
			inNetns(b)
			p := newPlane(b, backend, onlyV4)
			if _, err := p.Sync(ctx, tbl); err != nil {
				b.Fatal(err)
			}
			cur := tbl
			for b.Loop() {
				next := flip(cur, tbl, alt)
				if _, err := p.Apply(ctx, cur, next); err != nil {
					b.Fatal(err)
				}
				cur = next
			}
		})
	}
}

// flip returns whichever of a and b cur is not.
func flip(cur, a, b pb.Table) pb.Table {
	if cur[benchTarget].GetHash() == a[benchTarget].GetHash() {
		return b
	}
	return a
}
