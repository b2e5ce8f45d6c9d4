package session

import (
	"fmt"
	"math/rand"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/signalbox/signalbox/controlplane/cache"
	"github.com/signalbox/signalbox/controlplane/nodeview"
	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

var cfg = Config{MinBackoff: time.Second, MaxBackoff: 8 * time.Second}

func service(name, ip string) *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name},
		Spec: corev1.ServiceSpec{
			Type: corev1.ServiceTypeClusterIP, ClusterIP: ip, ClusterIPs: []string{ip},
			IPFamilies: []corev1.IPFamily{corev1.IPv4Protocol},
			Ports:      []corev1.ServicePort{{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP, TargetPort: intstr.FromInt32(8080)}},
		},
	}
}

func endpoints(svc string, ips ...string) *discoveryv1.EndpointSlice {
	s := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "ns", Name: svc + "-1", Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr(int32(8080)), Protocol: ptr(corev1.ProtocolTCP)}},
	}
	for _, ip := range ips {
		s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{Addresses: []string{ip}, Conditions: discoveryv1.EndpointConditions{Ready: ptr(true)}})
	}
	return s
}

func ptr[T any](v T) *T { return &v }

func newCache() *cache.Cache {
	c := cache.New(nodeview.Options{}, nodeview.Settings{})
	c.SetService(service("a", "198.18.128.1"))
	c.SetSlice(endpoints("a", "198.18.16.1"))
	c.Flush()
	return c
}

// agentTable applies a delta the way an agent does.
func apply(t *testing.T, tb pb.Table, out *Outgoing) pb.Table {
	t.Helper()
	var resp pb.SyncResponse
	if err := proto.Unmarshal(out.Frame, &resp); err != nil {
		t.Fatalf("frame does not decode: %v", err)
	}
	if !proto.Equal(resp.GetDelta(), out.Delta) {
		t.Fatalf("frame and delta differ")
	}
	next, err := tb.Apply(resp.GetDelta())
	if err != nil {
		t.Fatal(err)
	}
	return next
}

func ok(seq uint64) *pb.Ack { return &pb.Ack{Sequence: seq} }

func nack(seq uint64) *pb.Ack {
	return &pb.Ack{Sequence: seq, Error: &pb.ErrorDetail{Message: "refused"}}
}

func sameAsDesired(t *testing.T, c *cache.Cache, node string, tb pb.Table) {
	t.Helper()
	want := c.Table(c.Current(node))
	if len(want) != len(tb) {
		t.Fatalf("agent holds %d resources, desired %d", len(tb), len(want))
	}
	for _, r := range want {
		if tb[r.Name].GetHash() != r.Hash {
			t.Fatalf("agent's %s differs from desired", r.Name)
		}
	}
}

func TestSnapshotThenDeltas(t *testing.T) {
	c := newCache()
	s := New("n1", &pb.Hello{NodeName: "n1"}, cfg)
	out := s.Next(c, t0, nil)
	if out == nil || !out.Delta.Replace || out.Delta.Sequence != 1 {
		t.Fatalf("first delta to an empty agent must be replace seq 1, got %v", out)
	}
	tb := apply(t, pb.Table{}, out)
	if s.Next(c, t0, nil) != nil {
		t.Fatal("a second delta while one is in flight")
	}
	if err := s.Ack(ok(1), t0); err != nil {
		t.Fatal(err)
	}
	if s.Next(c, t0, nil) != nil {
		t.Fatal("nothing changed, nothing to send")
	}
	c.SetSlice(endpoints("a", "198.18.16.1", "198.18.16.2"))
	c.Flush()
	out = s.Next(c, t0, nil)
	if out == nil || out.Delta.Replace || len(out.Delta.Upserts) != 1 || len(out.Delta.Removals) != 0 {
		t.Fatalf("one-endpoint change must be one upsert, got %v", out.Delta)
	}
	tb = apply(t, tb, out)
	sameAsDesired(t, c, "n1", tb)
}

func TestChangesCoalesceWhileInFlight(t *testing.T) {
	c := newCache()
	s := New("n1", &pb.Hello{NodeName: "n1"}, cfg)
	tb := apply(t, pb.Table{}, s.Next(c, t0, nil))
	for i := 2; i <= 5; i++ { // four generations while the snapshot is unanswered
		c.SetSlice(endpoints("a", fmt.Sprintf("198.18.16.%d", i)))
		c.Flush()
	}
	c.SetService(service("b", "198.18.128.2"))
	c.Flush()
	if err := s.Ack(ok(1), t0); err != nil {
		t.Fatal(err)
	}
	out := s.Next(c, t0, nil)
	if out == nil || out.Delta.Sequence != 2 || len(out.Delta.Upserts) != 2 {
		t.Fatalf("five generations must coalesce into one delta of two resources, got %v", out.Delta)
	}
	tb = apply(t, tb, out)
	sameAsDesired(t, c, "n1", tb)
}

func TestNackBacksOffAndKeepsAcked(t *testing.T) {
	c := newCache()
	s := New("n1", &pb.Hello{NodeName: "n1"}, cfg)
	tb := apply(t, pb.Table{}, s.Next(c, t0, nil))
	if err := s.Ack(ok(1), t0); err != nil {
		t.Fatal(err)
	}
	c.SetService(service("b", "198.18.128.2"))
	c.Flush()
	bad := s.Next(c, t0, nil)
	if err := s.Ack(nack(bad.Delta.Sequence), t0); err != nil {
		t.Fatal(err)
	}
	st := s.Status()
	if !st.Degraded || st.LastNack.GetMessage() != "refused" {
		t.Fatalf("status after NACK = %+v", st)
	}
	// Unchanged target: no resend before the backoff.
	for _, at := range []time.Duration{0, 500 * time.Millisecond, 999 * time.Millisecond} {
		if s.Next(c, t0.Add(at), nil) != nil {
			t.Fatalf("resent the rejected delta after %v", at)
		}
	}
	retry := s.Next(c, t0.Add(cfg.MinBackoff), nil)
	if retry == nil || len(retry.Delta.Upserts) != 1 {
		t.Fatalf("the rejected change must be retried once the backoff ends, got %v", retry)
	}
	if err := s.Ack(nack(retry.Delta.Sequence), t0.Add(cfg.MinBackoff)); err != nil {
		t.Fatal(err)
	}
	// The backoff doubles for the same table...
	if s.Next(c, t0.Add(cfg.MinBackoff+1500*time.Millisecond), nil) != nil {
		t.Fatal("second retry came before the doubled backoff")
	}
	// ...but a new change is tried after the minimum, on top of the acked
	// table, carrying both changes.
	c.SetService(service("c", "198.18.128.3"))
	c.Flush()
	next := s.Next(c, t0.Add(2*cfg.MinBackoff), nil)
	if next == nil || len(next.Delta.Upserts) != 2 {
		t.Fatalf("a new change after a NACK must carry the rejected one too, got %v", next)
	}
	if err := s.Ack(ok(next.Delta.Sequence), t0.Add(2*cfg.MinBackoff)); err != nil {
		t.Fatal(err)
	}
	if s.Status().Degraded {
		t.Fatal("an ACK must clear degraded")
	}
	sameAsDesired(t, c, "n1", apply(t, tb, next))
}

func TestResumeSendsOnlyTheDifference(t *testing.T) {
	c := newCache()
	c.SetService(service("b", "198.18.128.2"))
	c.Flush()
	held := pb.Table{}
	for _, r := range c.Table(c.Current("n1")) {
		held[r.Name] = r
	}
	s := New("n1", &pb.Hello{NodeName: "n1", ResourceVersions: held.Hashes()}, cfg)
	if out := s.Next(c, t0, nil); out != nil {
		t.Fatalf("an agent holding the desired table needs nothing, got %v", out.Delta)
	}
	stale := pb.Table{}
	for k, v := range held {
		stale[k] = v
	}
	delete(stale, "svc/v4/ns/b/http")
	stale["svc/v4/ns/gone/http"] = held["svc/v4/ns/a/http"]
	s = New("n1", &pb.Hello{NodeName: "n1", ResourceVersions: stale.Hashes()}, cfg)
	out := s.Next(c, t0, nil)
	if out == nil || out.Delta.Replace || len(out.Delta.Upserts) != 1 || len(out.Delta.Removals) != 1 {
		t.Fatalf("resume must send one upsert and one removal, got %v", out)
	}
	sameAsDesired(t, c, "n1", apply(t, stale, out))
}

func TestWrongSequenceIsAnError(t *testing.T) {
	c := newCache()
	s := New("n1", &pb.Hello{NodeName: "n1"}, cfg)
	s.Next(c, t0, nil)
	if err := s.Ack(ok(7), t0); err == nil {
		t.Fatal("an answer to a delta never sent must be an error")
	}
}

// TestIncrementalEqualsFullRecompute is the property test: any sequence of
// changes, ACKs, NACKs and compactions leaves an agent that applied the
// deltas holding exactly the full recompute.
func TestIncrementalEqualsFullRecompute(t *testing.T) {
	for seed := int64(0); seed < 40; seed++ {
		rng := rand.New(rand.NewSource(seed))
		c := newCache()
		nodes := []string{"n1", "n2"}
		for _, n := range nodes {
			c.SetNode(nodeview.Node{Name: n, Zone: "z" + n})
		}
		sess := map[string]*Session{}
		tables := map[string]pb.Table{}
		pending := map[string]*Outgoing{}
		for _, n := range nodes {
			sess[n] = New(n, &pb.Hello{NodeName: n}, cfg)
			tables[n] = pb.Table{}
		}
		now := t0
		for step := 0; step < 60; step++ {
			now = now.Add(time.Duration(rng.Intn(1500)) * time.Millisecond)
			svc := fmt.Sprintf("s%d", rng.Intn(5))
			switch rng.Intn(4) {
			case 0:
				c.SetService(service(svc, fmt.Sprintf("198.18.128.%d", 10+rng.Intn(50))))
			case 1:
				c.DeleteService("ns", svc)
			case 2:
				ips := []string{}
				for i := 0; i < rng.Intn(4); i++ {
					ips = append(ips, fmt.Sprintf("198.18.16.%d", 1+rng.Intn(30)))
				}
				c.SetSlice(dedup(endpoints(svc, ips...)))
			case 3:
				c.SetNode(nodeview.Node{Name: nodes[rng.Intn(2)], Zone: fmt.Sprintf("z%d", rng.Intn(3))})
			}
			if rng.Intn(3) == 0 {
				c.Flush()
			}
			min := c.Gen()
			for _, n := range nodes {
				s := sess[n]
				if out := pending[n]; out != nil && rng.Intn(2) == 0 {
					var a *pb.Ack
					if rng.Intn(5) == 0 {
						a = nack(out.Delta.Sequence)
					} else {
						a = ok(out.Delta.Sequence)
						tables[n] = apply(t, tables[n], out)
					}
					if err := s.Ack(a, now); err != nil {
						t.Fatal(err)
					}
					pending[n] = nil
				}
				if pending[n] == nil {
					pending[n] = s.Next(c, now, nil)
				}
				if g, ok := s.MinGen(); ok && g < min {
					min = g
				}
			}
			c.Compact(min)
		}
		// Drain: flush, then ACK everything until quiet.
		c.Flush()
		for _, n := range nodes {
			s := sess[n]
			for i := 0; i < 10; i++ {
				if out := pending[n]; out != nil {
					tables[n] = apply(t, tables[n], out)
					if err := s.Ack(ok(out.Delta.Sequence), now); err != nil {
						t.Fatal(err)
					}
				}
				now = now.Add(cfg.MaxBackoff)
				pending[n] = s.Next(c, now, nil)
				if pending[n] == nil {
					break
				}
			}
			sameAsDesired(t, c, n, tables[n])
		}
	}
}

func dedup(s *discoveryv1.EndpointSlice) *discoveryv1.EndpointSlice {
	seen := map[string]bool{}
	var eps []discoveryv1.Endpoint
	for _, e := range s.Endpoints {
		if !seen[e.Addresses[0]] {
			seen[e.Addresses[0]] = true
			eps = append(eps, e)
		}
	}
	s.Endpoints = eps
	return s
}
