package e2e

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/signalbox/signalbox/nodeagent/e2e/labenv"
	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
	"github.com/signalbox/signalbox/tools/netlab"
)

// Bounds. Rules normally go live in well under a second; the bounds leave
// room for a loaded 2-core CI machine.
const (
	liveTimeout = 30 * time.Second       // a change reaching every node
	askTimeout  = 2 * time.Second        // one answered request
	dropTimeout = 700 * time.Millisecond // how long an unanswered request waits
	pollEvery   = 100 * time.Millisecond
)

// servicePort is the Service port every test uses; pods echo on 8080.
const servicePort = 80

// service returns a ClusterIP Service with one TCP port 80 -> 8080.
func service(ns, name string, mutate ...func(*corev1.Service)) *corev1.Service {
	s := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: corev1.ServiceSpec{
			Type: corev1.ServiceTypeClusterIP,
			Ports: []corev1.ServicePort{{
				Name: "echo", Protocol: corev1.ProtocolTCP, Port: servicePort,
				TargetPort: intstr.FromInt32(netlab.DefaultEchoPort),
			}},
		},
	}
	for _, m := range mutate {
		m(s)
	}
	return s
}

func createService(t *testing.T, s *corev1.Service) *corev1.Service {
	t.Helper()
	out, err := env.Kube.CoreV1().Services(s.Namespace).Create(testContext(t), s, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create service %s/%s: %v", s.Namespace, s.Name, err)
	}
	return out
}

// setEndpoints writes the Service's one EndpointSlice, as the EndpointSlice
// controller would after pods changed.
func setEndpoints(t *testing.T, svc *corev1.Service, eps []labenv.Endpoint) {
	t.Helper()
	if err := env.ApplySlice(testContext(t), env.Slice(svc, svc.Name+"-1", eps)); err != nil {
		t.Fatalf("write EndpointSlice of %s: %v", svc.Name, err)
	}
}

func clusterAddr(svc *corev1.Service) string {
	return hostPort(svc.Spec.ClusterIP, svc.Spec.Ports[0].Port)
}

func nodePortAddr(svc *corev1.Service, n *netlab.Host) string {
	return hostPort(n.IPv4.String(), svc.Spec.Ports[0].NodePort)
}

func hostPort(ip string, port int32) string {
	return netip.AddrPortFrom(netip.MustParseAddr(ip), uint16(port)).String()
}

// ask sends one request; the deadline keeps a dropped request short.
func ask(from *netlab.Host, network, addr string, timeout time.Duration) (netlab.Reply, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return env.Lab.Ask(ctx, from, network, addr)
}

// eventually polls fn until it returns nil, failing the test with fn's
// last error after timeout.
func eventually(t *testing.T, timeout time.Duration, what string, fn func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := fn()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s: %v", what, timeout, err)
		}
		time.Sleep(pollEvery)
	}
}

// answers sends n requests and returns the replies; any failed request
// fails the test.
func answers(t *testing.T, from *netlab.Host, network, addr string, n int) []netlab.Reply {
	t.Helper()
	out := make([]netlab.Reply, 0, n)
	for i := range n {
		r, err := ask(from, network, addr, askTimeout)
		if err != nil {
			t.Fatalf("request %d/%d from %s to %s %s: %v", i+1, n, from.Name, network, addr, err)
		}
		out = append(out, r)
	}
	return out
}

// answeredBy returns the sorted set of pods that answered.
func answeredBy(replies []netlab.Reply) []string {
	var names []string
	for _, r := range replies {
		if !slices.Contains(names, r.Pod) {
			names = append(names, r.Pod)
		}
	}
	slices.Sort(names)
	return names
}

// expectPods sends n requests and requires that exactly the given pods
// answered: every one of them at least once, no other.
func expectPods(t *testing.T, from *netlab.Host, network, addr string, n int, want []*netlab.Host) []netlab.Reply {
	t.Helper()
	replies := answers(t, from, network, addr, n)
	if got := answeredBy(replies); !slices.Equal(got, podNames(want)) {
		t.Fatalf("%d requests from %s to %s %s: answered by %v, want exactly %v", n, from.Name, network, addr, got, podNames(want))
	}
	return replies
}

// waitServes polls until a request from `from` is answered by one of want:
// the sign that the rules are live on from's node.
func waitServes(t *testing.T, from *netlab.Host, network, addr string, want []*netlab.Host) {
	t.Helper()
	eventually(t, liveTimeout, fmt.Sprintf("%s reaching %s %s", from.Name, network, addr), func() error {
		r, err := ask(from, network, addr, askTimeout)
		if err != nil {
			return err
		}
		if !slices.Contains(podNames(want), r.Pod) {
			return fmt.Errorf("answered by %s, want one of %v", r.Pod, podNames(want))
		}
		return nil
	})
}

// expectNoAnswer requires that a request gets no answer at all.
func expectNoAnswer(t *testing.T, from *netlab.Host, network, addr string) error {
	t.Helper()
	r, err := ask(from, network, addr, dropTimeout)
	if err == nil {
		t.Fatalf("%s -> %s %s: answered by %s (source %s), want no answer", from.Name, network, addr, r.Pod, r.Source)
	}
	return err
}

// isTimeout tells a dropped request from a refused or unroutable one.
func isTimeout(err error) bool {
	return errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, context.DeadlineExceeded)
}

// sourceIP is the client address the pod saw.
func sourceIP(t *testing.T, r netlab.Reply) netip.Addr {
	t.Helper()
	ap, err := netip.ParseAddrPort(r.Source)
	if err != nil {
		t.Fatalf("reply from %s: bad source %q: %v", r.Pod, r.Source, err)
	}
	return ap.Addr()
}

// nodeAddrs are the addresses a node's masquerading can give a packet:
// its node network address, or the pod gateway address on its pod links.
func nodeAddrs(n *netlab.Host) []netip.Addr {
	return []netip.Addr{n.IPv4, n.PodCIDR.Addr().Next()}
}

// expectSources requires every reply's source address to be one of want.
func expectSources(t *testing.T, what string, replies []netlab.Reply, want ...netip.Addr) {
	t.Helper()
	for _, r := range replies {
		if got := sourceIP(t, r); !slices.Contains(want, got) {
			t.Fatalf("%s: %s saw source %s, want one of %v", what, r.Pod, got, want)
		}
	}
}

// waitTables waits until, on each of the nodes (all when none given), the
// control plane's table for Service ns/name satisfies check and the agent
// has acknowledged it, that is, applied it to the kernel.
func waitTables(t *testing.T, ns, name string, check func(node string, sps []*pb.ServicePort) error, nodes ...*netlab.Host) {
	t.Helper()
	if err := env.WaitTables(testContext(t), liveTimeout, ns, name, check, nodes...); err != nil {
		t.Fatal(err)
	}
}

// clusterEndpoints requires one resource whose cluster endpoints are
// exactly the given pods.
func clusterEndpoints(want ...*netlab.Host) func(string, []*pb.ServicePort) error {
	return func(_ string, sps []*pb.ServicePort) error {
		if len(sps) != 1 {
			return fmt.Errorf("%d resources for the service, want 1", len(sps))
		}
		var got []string
		for _, e := range sps[0].GetClusterEndpoints() {
			got = append(got, e.GetIp())
		}
		slices.Sort(got)
		if !slices.Equal(got, podIPs(want)) {
			return fmt.Errorf("cluster endpoints %v, want %v", got, podIPs(want))
		}
		return nil
	}
}

// present requires the Service to be in the table at all.
func present(_ string, sps []*pb.ServicePort) error {
	if len(sps) == 0 {
		return errors.New("service not in the table yet")
	}
	return nil
}

// absent requires the Service to be gone from the table.
func absent(_ string, sps []*pb.ServicePort) error {
	if len(sps) != 0 {
		return fmt.Errorf("service still in the table (%d resources)", len(sps))
	}
	return nil
}
