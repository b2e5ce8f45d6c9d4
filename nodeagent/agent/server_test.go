package agent

import (
	"context"
	"errors"
	"log/slog"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"

	"github.com/signalbox/signalbox/nodeagent/dataplane"
	"github.com/signalbox/signalbox/nodeagent/metrics"
	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// waitFor bounds every wait in these tests; nothing sleeps to synchronise.
const waitFor = 10 * time.Second

// ctlServer is a minimal control plane: it records what the agent says and
// sends the deltas the test hands it.
type ctlServer struct {
	pb.UnimplementedNodeSyncServiceServer
	hellos  chan *pb.Hello
	tokens  chan string
	acks    chan *pb.Ack
	healths chan *pb.HealthReport
	send    chan *pb.Delta
	ended   chan struct{} // one value per finished stream
}

func newCtlServer() *ctlServer {
	return &ctlServer{
		hellos:  make(chan *pb.Hello, 8),
		tokens:  make(chan string, 8),
		acks:    make(chan *pb.Ack, 64),
		healths: make(chan *pb.HealthReport, 64),
		send:    make(chan *pb.Delta),
		ended:   make(chan struct{}, 8),
	}
}

func (s *ctlServer) Sync(stream pb.NodeSyncService_SyncServer) error {
	defer func() { s.ended <- struct{}{} }()
	md, _ := metadata.FromIncomingContext(stream.Context())
	s.tokens <- strings.Join(md.Get("authorization"), ",")
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	if first.GetHello() == nil {
		return errors.New("first message is not a hello")
	}
	s.hellos <- first.GetHello()
	recvErr := make(chan error, 1)
	go func() {
		for {
			req, err := stream.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			switch k := req.GetKind().(type) {
			case *pb.SyncRequest_Ack:
				s.acks <- k.Ack
			case *pb.SyncRequest_Health:
				select {
				case s.healths <- k.Health:
				default: // tests that do not read reports must not block
				}
			}
		}
	}()
	for {
		select {
		case d := <-s.send:
			if err := stream.Send(&pb.SyncResponse{Delta: d}); err != nil {
				return err
			}
		case err := <-recvErr:
			return err
		case <-stream.Context().Done():
			return stream.Context().Err()
		}
	}
}

// serve starts a ctlServer on addr ("127.0.0.1:0" for a fresh port) and
// returns it with its address and a stop function.
func serve(t *testing.T, addr string, opts ...grpc.ServerOption) (*ctlServer, string, func()) {
	t.Helper()
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	srv := grpc.NewServer(opts...)
	cs := newCtlServer()
	pb.RegisterNodeSyncServiceServer(srv, cs)
	go func() { _ = srv.Serve(lis) }()
	stopped := false
	stop := func() {
		if !stopped {
			stopped = true
			srv.Stop()
		}
	}
	t.Cleanup(stop)
	return cs, lis.Addr().String(), stop
}

// recv takes one value from ch or fails the test.
func recv[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(waitFor):
		t.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}

// deliver hands d to the server's stream and returns the agent's answer.
func (s *ctlServer) deliver(t *testing.T, d *pb.Delta) *pb.Ack {
	t.Helper()
	select {
	case s.send <- d:
	case <-time.After(waitFor):
		t.Fatalf("timed out sending delta %d", d.GetSequence())
	}
	ack := recv(t, s.acks, "ack")
	if ack.GetSequence() != d.GetSequence() {
		t.Fatalf("ack for sequence %d, want %d", ack.GetSequence(), d.GetSequence())
	}
	return ack
}

type running struct {
	agent   *Agent
	cfg     Config
	metrics *metrics.Metrics
	token   string // token file path
	stop    func() // cancels Run and waits for it to return nil
}

// startAgent runs an agent against addr in plaintext with a token file.
// prepare may change the config before New, hook the agent's test hooks
// before Run; either may be nil.
func startAgent(t *testing.T, addr string, plane dataplane.Plane, prepare func(*Config), hook func(*Agent)) *running {
	t.Helper()
	token := filepath.Join(t.TempDir(), "token")
	writeFile(t, token, "token-1")
	m := metrics.New()
	cfg := Config{
		Address:        addr,
		NodeName:       "node-a",
		Version:        "v0.0.0-test",
		Mode:           "fake",
		Plane:          plane,
		Insecure:       true,
		TokenFile:      token,
		BackoffInitial: 5 * time.Millisecond,
		BackoffMax:     20 * time.Millisecond,
		Metrics:        m,
		Logger:         slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	if prepare != nil {
		prepare(&cfg)
	}
	a, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if hook != nil {
		hook(a)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	stopped := false
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := recv(t, done, "Run to return"); err != nil {
			t.Errorf("Run returned %v, want nil", err)
		}
	}
	t.Cleanup(stop)
	return &running{agent: a, cfg: a.cfg, metrics: a.cfg.Metrics, token: token, stop: stop}
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

// svc builds a ServicePort resource; port makes bodies (and hashes) differ.
func svc(name string, port int32) *pb.Resource {
	return pb.NewServicePortResource("svc/v4/default/"+name+"/http", &pb.ServicePort{
		Namespace: "default", Name: name, Family: pb.IPFamily_IP_FAMILY_IPV4,
		Protocol: pb.Protocol_PROTOCOL_TCP, ClusterIp: "198.18.0.10", Port: port,
	})
}

func names(t pb.Table) []string {
	return slices.Sorted(maps.Keys(t))
}

// counter returns the value of a counter or gauge, or the sample count of
// a histogram, from m's registry.
func counter(t *testing.T, m *metrics.Metrics, name string) float64 {
	t.Helper()
	families, err := m.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
		var sum float64
		for _, metric := range f.GetMetric() {
			sum += value(metric)
		}
		return sum
	}
	return 0 // a vector with no children yet is not gathered
}

func value(m *dto.Metric) float64 {
	switch {
	case m.GetCounter() != nil:
		return m.GetCounter().GetValue()
	case m.GetGauge() != nil:
		return m.GetGauge().GetValue()
	case m.GetHistogram() != nil:
		return float64(m.GetHistogram().GetSampleCount())
	}
	return 0
}
