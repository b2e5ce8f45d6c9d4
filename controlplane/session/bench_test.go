package session

import (
	"fmt"
	"runtime"
	"testing"
	"time"

	"github.com/signalbox/signalbox/controlplane/cache"
	"github.com/signalbox/signalbox/controlplane/nodeview"
	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// The DESIGN.md scale: 10,000 Services x 10 endpoints, 5,000 nodes.
const (
	benchServices = 10000
	benchEPs      = 10
	benchNodes    = 5000
)

func bigCache(b *testing.B) *cache.Cache {
	c := cache.New(nodeview.Options{}, nodeview.Settings{ClusterCIDRs: []string{"198.18.16.0/20"}})
	for n := 0; n < benchNodes; n++ {
		c.SetNode(nodeview.Node{Name: fmt.Sprintf("node-%d", n), Zone: fmt.Sprintf("z%d", n%3)})
	}
	for i := 0; i < benchServices; i++ {
		name := fmt.Sprintf("s%d", i)
		c.SetService(service(name, fmt.Sprintf("198.18.%d.%d", 128+i/250, 1+i%250)))
		ips := make([]string, benchEPs)
		for j := range ips {
			k := i*benchEPs + j
			ips[j] = fmt.Sprintf("198.19.%d.%d", k/250%256, 1+k%250)
		}
		c.SetSlice(endpoints(name, ips...))
	}
	c.Flush()
	return c
}

// BenchmarkInitialSync measures the control plane's CPU to compute and
// frame the first snapshot of every node (the simulator's cost excluded:
// nothing is sent).
func BenchmarkInitialSync(b *testing.B) {
	c := bigCache(b)
	b.ResetTimer()
	for it := 0; it < b.N; it++ {
		var bytes int
		for n := 0; n < benchNodes; n++ {
			node := fmt.Sprintf("node-%d", n)
			s := New(node, &pb.Hello{NodeName: node}, DefaultConfig)
			out := s.Next(c, time.Time{}, nil)
			bytes += len(out.Frame)
		}
		b.ReportMetric(float64(bytes)/benchNodes, "bytes/node")
	}
}

// BenchmarkOneEndpointFanout measures one endpoint change reaching every
// node: the rebuild, one diff per node and its frame.
func BenchmarkOneEndpointFanout(b *testing.B) {
	c := bigCache(b)
	sessions := make([]*Session, benchNodes)
	for n := range sessions {
		node := fmt.Sprintf("node-%d", n)
		s := New(node, &pb.Hello{NodeName: node}, DefaultConfig)
		out := s.Next(c, time.Time{}, nil)
		if err := s.Ack(&pb.Ack{Sequence: out.Delta.Sequence}, time.Time{}); err != nil {
			b.Fatal(err)
		}
		sessions[n] = s
	}
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	b.ReportMetric(float64(ms.HeapAlloc)/(1<<20), "heap-MiB")
	b.ResetTimer()
	for it := 0; it < b.N; it++ {
		c.SetSlice(endpoints("s42", "198.19.200.1", fmt.Sprintf("198.19.201.%d", 1+it%250)))
		c.Flush()
		var bytes int
		for _, s := range sessions {
			out := s.Next(c, time.Time{}, nil)
			bytes += len(out.Frame)
			if err := s.Ack(&pb.Ack{Sequence: out.Delta.Sequence}, time.Time{}); err != nil {
				b.Fatal(err)
			}
		}
		c.Compact(c.Gen())
		b.ReportMetric(float64(bytes)/benchNodes, "bytes/node")
	}
}
