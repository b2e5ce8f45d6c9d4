// Package agent is the node agent's core: the stream client that talks to
// the control plane and the apply loop (Core) that turns each Delta into one
// data plane transaction answered by an Ack or a NACK.
//
// The agent fails static: losing the stream, or being told to stop, never
// touches the kernel. Only a Delta or the periodic check changes rules.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"

	"github.com/signalbox/signalbox/nodeagent/dataplane"
	"github.com/signalbox/signalbox/nodeagent/healthcheck"
	"github.com/signalbox/signalbox/nodeagent/metrics"
	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// DialFunc dials like net.Dialer.DialContext; a network-namespace-aware
// dialer (tools/devcluster.NetNSDialer) fits as is.
type DialFunc func(ctx context.Context, network, address string) (net.Conn, error)

// Config configures an Agent. Plane, Address and NodeName are required;
// every other field has a default.
type Config struct {
	// Address of the control plane: "host:port", "unix:/path", or a gRPC
	// target with an explicit scheme ("dns:///svc:port"). Without a scheme
	// the address goes to Dial unresolved, so a namespace-aware dialer
	// resolves it where it dials.
	Address string
	// NodeName is sent in the Hello; the control plane checks it against
	// the token's node claim.
	NodeName string
	// Version is the agent's build version.
	Version string
	// Mode is the data plane mode reported in the Hello ("iptables", ...).
	Mode string
	// Capabilities are optional features announced in the Hello.
	Capabilities []string
	// Plane programs the kernel.
	Plane dataplane.Plane

	// Insecure uses plaintext (tests, the lab). Otherwise TLS verifies the
	// server against CAFile, or the system roots when CAFile is empty.
	Insecure   bool
	CAFile     string
	ServerName string // overrides the name checked in the server certificate
	// TokenFile holds the bearer token (a projected ServiceAccount token).
	// It is read again for every stream, because the kubelet rotates it.
	TokenFile string
	// Dial replaces the default dialer (net.Dialer).
	Dial DialFunc
	// DialOptions are appended to the agent's own gRPC options.
	DialOptions []grpc.DialOption

	// ResyncPeriod is how often the held table is re-synced to repair
	// rules flushed by someone else; 0 disables the periodic check.
	ResyncPeriod time.Duration
	// HealthPeriod is how often a health report is sent between deltas;
	// default 30s.
	HealthPeriod time.Duration
	// BackoffInitial and BackoffMax bound the reconnect delay; defaults
	// 250ms and 30s.
	BackoffInitial, BackoffMax time.Duration

	// Metrics defaults to a fresh metrics.New().
	Metrics *metrics.Metrics
	// Health tracks staleness for /healthz and the reports; defaults to a
	// tracker with a 2 minute window.
	Health *healthcheck.Tracker
	// OnTable is called with each table after it is programmed, e.g. to
	// sync the Service health check servers. It must not block for long.
	OnTable func(pb.Table)
	// TracerProvider defaults to the global provider (a no-op unless the
	// binary installs an exporter).
	TracerProvider trace.TracerProvider
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// Now defaults to time.Now.
	Now func() time.Time
}

// Agent keeps a stream to the control plane open and applies what arrives.
type Agent struct {
	cfg  Config
	core *Core

	// Test hooks: wait sleeps between reconnects, resyncC drives the
	// periodic check. Nil means real timers.
	wait    func(ctx context.Context, d time.Duration) error
	resyncC <-chan time.Time
}

// New validates cfg, fills defaults and returns an Agent holding nothing.
func New(cfg Config) (*Agent, error) {
	switch {
	case cfg.Plane == nil:
		return nil, errors.New("agent: no data plane")
	case cfg.Address == "":
		return nil, errors.New("agent: no control plane address")
	case cfg.NodeName == "":
		return nil, errors.New("agent: no node name")
	}
	if cfg.HealthPeriod <= 0 {
		cfg.HealthPeriod = 30 * time.Second
	}
	if cfg.BackoffInitial <= 0 {
		cfg.BackoffInitial = 250 * time.Millisecond
	}
	if cfg.BackoffMax < cfg.BackoffInitial {
		cfg.BackoffMax = max(30*time.Second, cfg.BackoffInitial)
	}
	if cfg.Metrics == nil {
		cfg.Metrics = metrics.New()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Health == nil {
		cfg.Health = healthcheck.NewTracker(2*time.Minute, cfg.Now)
	}
	if cfg.TracerProvider == nil {
		cfg.TracerProvider = otel.GetTracerProvider()
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Dial == nil {
		cfg.Dial = (&net.Dialer{}).DialContext
	}
	if _, err := dialOptions(&cfg); err != nil {
		return nil, err
	}
	return &Agent{cfg: cfg, core: newCore(&cfg)}, nil
}

// Core returns the apply loop, for health reporting and inspection.
func (a *Agent) Core() *Core { return a.core }

// Run keeps the stream open until ctx ends, reconnecting with jittered
// exponential backoff. It returns nil when ctx ends; the kernel keeps the
// rules it has (fail static).
func (a *Agent) Run(ctx context.Context) error {
	log := a.cfg.Logger
	if a.cfg.ResyncPeriod > 0 || a.resyncC != nil {
		done := make(chan struct{})
		defer func() { <-done }()
		go func() { defer close(done); a.resyncLoop(ctx) }()
	}
	wait := a.wait
	if wait == nil {
		wait = sleep
	}
	bo := newBackoff(a.cfg.BackoffInitial, a.cfg.BackoffMax)
	for {
		start := a.cfg.Now()
		gotDelta, err := a.session(ctx)
		a.cfg.Metrics.StreamConnected.Set(0)
		if ctx.Err() != nil {
			log.Info("stopped; data plane rules left in place")
			return nil
		}
		// A session that worked, or that lived longer than the longest
		// delay, starts the next series of delays from the beginning.
		if gotDelta || a.cfg.Now().Sub(start) > a.cfg.BackoffMax {
			bo.reset()
		}
		d := bo.next()
		log.Warn("stream to control plane ended; rules kept, reconnecting", "err", err, "in", d)
		if wait(ctx, d) != nil {
			log.Info("stopped; data plane rules left in place")
			return nil
		}
		a.cfg.Metrics.Reconnects.Inc()
	}
}

// session runs one stream from dial to failure. It reports whether any
// delta arrived, which proves the control plane accepted the agent.
func (a *Agent) session(ctx context.Context) (gotDelta bool, err error) {
	opts, err := dialOptions(&a.cfg)
	if err != nil {
		return false, err
	}
	conn, err := grpc.NewClient(target(a.cfg.Address), opts...)
	if err != nil {
		return false, err
	}
	defer conn.Close()

	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := pb.NewNodeSyncServiceClient(conn).Sync(sctx)
	if err != nil {
		return false, fmt.Errorf("open stream: %w", err)
	}
	hello := &pb.Hello{
		NodeName:         a.cfg.NodeName,
		AgentVersion:     a.cfg.Version,
		Capabilities:     a.cfg.Capabilities,
		Mode:             a.cfg.Mode,
		ResourceVersions: a.core.Hashes(),
	}
	if err := stream.Send(&pb.SyncRequest{Kind: &pb.SyncRequest_Hello{Hello: hello}}); err != nil {
		return false, fmt.Errorf("send hello: %w", err)
	}
	a.cfg.Logger.Info("stream open", "address", a.cfg.Address, "held", len(hello.ResourceVersions))
	a.cfg.Metrics.StreamConnected.Set(1)

	// Recv runs apart so the loop below can send health reports while no
	// delta arrives; all Sends stay on this goroutine, as gRPC requires.
	deltas := make(chan *pb.Delta)
	recvErr := make(chan error, 1)
	go func() {
		for {
			msg, err := stream.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			select {
			case deltas <- msg.GetDelta():
			case <-sctx.Done():
				return
			}
		}
	}()

	ticker := time.NewTicker(a.cfg.HealthPeriod)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return gotDelta, ctx.Err()
		case err := <-recvErr:
			return gotDelta, err
		case d := <-deltas:
			if ctx.Err() != nil {
				return gotDelta, ctx.Err() // shutting down: apply nothing more
			}
			if d == nil {
				continue
			}
			gotDelta = true
			// A transaction that has begun completes even if shutdown
			// starts meanwhile: the plane is atomic, and a cancelled
			// restore would only leave the previous rules anyway.
			ack := a.core.HandleDelta(context.WithoutCancel(ctx), d)
			if err := stream.Send(&pb.SyncRequest{Kind: &pb.SyncRequest_Ack{Ack: ack}}); err != nil {
				return gotDelta, fmt.Errorf("send ack %d: %w", d.GetSequence(), err)
			}
		case <-ticker.C:
			h := a.core.Health()
			if err := stream.Send(&pb.SyncRequest{Kind: &pb.SyncRequest_Health{Health: h}}); err != nil {
				return gotDelta, fmt.Errorf("send health: %w", err)
			}
		}
	}
}

// resyncLoop runs the periodic check whether or not the stream is up: a
// flushed table must be repaired even while the control plane is away.
func (a *Agent) resyncLoop(ctx context.Context) {
	tick := a.resyncC
	if tick == nil {
		t := time.NewTicker(a.cfg.ResyncPeriod)
		defer t.Stop()
		tick = t.C
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick:
		}
		ran, res, err := a.core.Resync(context.WithoutCancel(ctx))
		switch {
		case !ran:
			a.cfg.Logger.Debug("periodic sync skipped: no table held yet")
		case err != nil:
			a.cfg.Logger.Error("periodic sync failed", "err", err)
		default:
			a.cfg.Logger.Info("periodic sync restored held table", "rules", res.Rules,
				"duration", res.Duration, "conntrackCleaned", res.ConntrackCleaned)
		}
	}
}

// target keeps a scheme-less address away from gRPC's DNS resolver so the
// dialer (possibly inside another network namespace) sees it verbatim.
func target(addr string) string {
	if strings.Contains(addr, "://") {
		return addr
	}
	return "passthrough:///" + addr
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
