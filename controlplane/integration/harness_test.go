package integration

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/signalbox/signalbox/controlplane/auth"
	"github.com/signalbox/signalbox/controlplane/cache"
	"github.com/signalbox/signalbox/controlplane/hub"
	"github.com/signalbox/signalbox/controlplane/nodeview"
	"github.com/signalbox/signalbox/controlplane/server"
	"github.com/signalbox/signalbox/controlplane/watch"
	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
	"github.com/signalbox/signalbox/tools/devcluster/devclustertest"
	"github.com/signalbox/signalbox/tools/testagent"
)

func TestMain(m *testing.M) { devclustertest.Main(m) }

// plane is a control plane running in the test process against the dev
// cluster, serving on loopback.
type plane struct {
	addr    string
	hub     *hub.Hub
	metrics *hub.Metrics
	inspect pb.InspectionServiceClient
	stop    func()
}

func startPlane(t *testing.T, client kubernetes.Interface) *plane {
	t.Helper()
	return startPlaneAuth(t, client, nil)
}

// startPlaneAuth starts a plane that authenticates agents with authn (nil:
// trust the hello, as --insecure does).
func startPlaneAuth(t *testing.T, client kubernetes.Interface, authn auth.Authenticator) *plane {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	c := cache.New(nodeview.Options{}, nodeview.Settings{ClusterCIDRs: []string{"198.18.16.0/20"}})
	m := hub.NewMetrics(prometheus.NewRegistry())
	cfg := hub.DefaultConfig
	cfg.Session.MinBackoff = 50 * time.Millisecond
	cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	h := hub.New(c, cfg, m)
	go h.Run(ctx)
	if err := watch.Start(ctx, client, h); err != nil {
		cancel()
		t.Fatalf("start watch: %v", err)
	}
	srv, _ := server.NewGRPC()
	pb.RegisterNodeSyncServiceServer(srv, &server.Sync{Hub: h, Auth: authn})
	pb.RegisterInspectionServiceServer(srv, &server.Inspect{Hub: h})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	go srv.Serve(lis)
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	p := &plane{addr: lis.Addr().String(), hub: h, metrics: m, inspect: pb.NewInspectionServiceClient(conn)}
	stopped := false
	p.stop = func() {
		if stopped {
			return
		}
		stopped = true
		conn.Close()
		srv.Stop()
		cancel()
	}
	t.Cleanup(p.stop)
	return p
}

func (p *plane) skipped() float64 { return testutil.ToFloat64(p.metrics.Skipped) }

func connect(t *testing.T, p *plane, node string, table pb.Table) *testagent.Agent {
	t.Helper()
	a, err := testagent.Connect(context.Background(), p.addr, node, table)
	if err != nil {
		t.Fatalf("connect %s: %v", node, err)
	}
	t.Cleanup(a.Close)
	return a
}

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// fixtures write objects as the EndpointSlice controller and the
// scheduler would; no controller runs in the dev cluster.

func mkNamespace(t *testing.T, cs kubernetes.Interface, name string) {
	t.Helper()
	_, err := cs.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
}

func mkNode(t *testing.T, cs kubernetes.Interface, name, zone string) {
	t.Helper()
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{corev1.LabelTopologyZone: zone}}}
	if _, err := cs.CoreV1().Nodes().Create(context.Background(), n, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

func svcSpec(ns, name string, mutate func(*corev1.Service)) *corev1.Service {
	s := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: corev1.ServiceSpec{
			Ports: []corev1.ServicePort{{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP, TargetPort: intstr.FromInt32(8080)}},
		},
	}
	if mutate != nil {
		mutate(s)
	}
	return s
}

func mkService(t *testing.T, cs kubernetes.Interface, s *corev1.Service) *corev1.Service {
	t.Helper()
	out, err := cs.CoreV1().Services(s.Namespace).Create(context.Background(), s, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

type ep struct {
	ip, node, zone string
	ready          bool
}

func slice(ns, svc, name string, eps ...ep) *discoveryv1.EndpointSlice {
	s := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr(int32(8080)), Protocol: ptr(corev1.ProtocolTCP)}},
	}
	for _, e := range eps {
		d := discoveryv1.Endpoint{Addresses: []string{e.ip}, Conditions: discoveryv1.EndpointConditions{Ready: ptr(e.ready)}}
		if e.node != "" {
			d.NodeName = ptr(e.node)
		}
		if e.zone != "" {
			d.Zone = ptr(e.zone)
			d.Hints = &discoveryv1.EndpointHints{ForZones: []discoveryv1.ForZone{{Name: e.zone}}}
		}
		s.Endpoints = append(s.Endpoints, d)
	}
	return s
}

func mkSlice(t *testing.T, cs kubernetes.Interface, s *discoveryv1.EndpointSlice) {
	t.Helper()
	if _, err := cs.DiscoveryV1().EndpointSlices(s.Namespace).Create(context.Background(), s, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

func updateSlice(t *testing.T, cs kubernetes.Interface, s *discoveryv1.EndpointSlice) {
	t.Helper()
	cur, err := cs.DiscoveryV1().EndpointSlices(s.Namespace).Get(context.Background(), s.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	s.ResourceVersion = cur.ResourceVersion
	if _, err := cs.DiscoveryV1().EndpointSlices(s.Namespace).Update(context.Background(), s, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
}

func ptr[T any](v T) *T { return &v }

// names lists a delta's upserted and removed names.
func names(d *pb.Delta) (up, rm []string) {
	for _, r := range d.GetUpserts() {
		up = append(up, r.GetName())
	}
	return up, d.GetRemovals()
}

func sp(t *testing.T, table pb.Table, name string) *pb.ServicePort {
	t.Helper()
	r := table[name]
	if r == nil {
		keys := make([]string, 0, len(table))
		for k := range table {
			keys = append(keys, k)
		}
		t.Fatalf("table has no %q; has %v", name, keys)
	}
	return r.GetServicePort()
}

func epIPs(eps []*pb.Endpoint) []string {
	var out []string
	for _, e := range eps {
		out = append(out, fmt.Sprintf("%s:%d", e.GetIp(), e.GetPort()))
	}
	return out
}

func connectErr(t *testing.T, p *plane, node string, opts ...grpc.DialOption) *testagent.Agent {
	t.Helper()
	a, err := testagent.Connect(context.Background(), p.addr, node, nil, opts...)
	if err != nil {
		t.Fatalf("connect %s: %v", node, err)
	}
	t.Cleanup(a.Close)
	return a
}
