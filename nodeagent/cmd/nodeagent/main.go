// Command nodeagent is signalbox's per-node agent (a DaemonSet): it keeps
// a stream to the control plane, programs the node's kernel from the deltas
// it receives, and serves kube-proxy's health and metrics endpoints.
//
// On SIGTERM or SIGINT it closes the stream and exits without touching the
// kernel: the rules stay and keep serving (fail static). Only --cleanup
// removes them.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/signalbox/signalbox/nodeagent/agent"
	"github.com/signalbox/signalbox/nodeagent/healthcheck"
	"github.com/signalbox/signalbox/nodeagent/metrics"
	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// version is set at build time:
// go build -ldflags "-X main.version=v1.2.3" ./nodeagent/cmd/nodeagent
var version = "dev"

func main() {
	os.Exit(run(os.Args[1:], os.Getenv))
}

func run(args []string, getenv func(string) string) int {
	opts, err := parseFlags(args, getenv)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprintln(os.Stdout, err)
		return 0
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "nodeagent:", err)
		return 2
	}
	log, err := newLogger(opts.logFormat, opts.logLevel)
	if err != nil {
		fmt.Fprintln(os.Stderr, "nodeagent:", err)
		return 2
	}
	slog.SetDefault(log)

	plane, err := newPlane(context.Background(), opts.mode, planeOptions{
		logger:            log,
		nodePortAddresses: opts.nodePortAddresses,
		iptablesBackend:   opts.iptablesBackend,
		masqueradeBit:     opts.masqueradeBit,
		ipvsScheduler:     opts.ipvsScheduler,
	})
	if err != nil {
		log.Error("cannot start data plane", "mode", opts.mode, "err", err)
		return 1
	}
	if opts.cleanup {
		if err := plane.Cleanup(context.Background()); err != nil {
			log.Error("cleanup failed", "mode", opts.mode, "err", err)
			return 1
		}
		log.Info("removed every kernel object the agent owns", "mode", opts.mode)
		return 0
	}
	// A node switched from another mode must not keep that mode's rules
	// next to the new ones. This is the one start-up step that removes
	// rules, and it removes only the other mode's.
	if err := cleanupOtherModes(context.Background(), opts.mode, log); err != nil {
		log.Error("cannot remove the previous mode's state", "err", err)
		return 1
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	m := metrics.New()
	m.RegisterRuntime()
	tracker := healthcheck.NewTracker(opts.healthzTimeout, nil)
	hc := healthcheck.NewServiceServer(healthcheck.ServiceConfig{
		NodePortAddresses: opts.nodePortAddresses,
		Healthy:           func() bool { return tracker.Health().Healthy },
		Logger:            log,
	})
	defer hc.Close()

	var servers []*http.Server
	for _, s := range []struct {
		name, addr string
		handler    http.Handler
	}{
		{"health", opts.healthAddr, healthcheck.HealthHandler(tracker, m)},
		{"metrics", opts.metricsAddr, healthcheck.MetricsHandler(tracker, m, opts.mode)},
	} {
		if s.addr == "" {
			continue
		}
		srv, err := listenAndServe(s.addr, s.handler, log.With("server", s.name))
		if err != nil {
			log.Error("cannot listen", "server", s.name, "addr", s.addr, "err", err)
			return 1
		}
		servers = append(servers, srv)
	}

	a, err := agent.New(agent.Config{
		Address:      opts.controlPlane,
		NodeName:     opts.nodeName,
		Version:      version,
		Mode:         opts.mode,
		Plane:        plane,
		Insecure:     opts.insecure,
		CAFile:       opts.caFile,
		ServerName:   opts.serverName,
		TokenFile:    opts.tokenFile,
		ResyncPeriod: opts.resyncPeriod,
		Metrics:      m,
		Health:       tracker,
		OnTable: func(t pb.Table) {
			if err := hc.Sync(t); err != nil {
				log.Warn("service health checks", "err", err)
			}
		},
		Logger: log,
		// TracerProvider: the global one, a no-op until an OTLP exporter
		// is installed here; spans are already created and parented.
	})
	if err != nil {
		log.Error("invalid configuration", "err", err)
		return 2
	}
	log.Info("starting", "version", version, "node", opts.nodeName, "mode", opts.mode,
		"backend", plane.Name(), "controlPlane", opts.controlPlane)
	runErr := a.Run(ctx)

	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, srv := range servers {
		_ = srv.Shutdown(shutdownCtx)
	}
	if runErr != nil {
		log.Error("agent stopped", "err", runErr)
		return 1
	}
	log.Info("exiting; kernel rules left in place")
	return 0
}

// listenAndServe listens before returning so a taken port fails the start
// instead of a background goroutine.
func listenAndServe(addr string, h http.Handler, log *slog.Logger) (*http.Server, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("http server stopped", "err", err)
		}
	}()
	log.Info("serving", "addr", l.Addr().String())
	return srv, nil
}

func newLogger(format, level string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	ho := &slog.HandlerOptions{Level: lv}
	switch format {
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, ho)), nil
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, ho)), nil
	default:
		return nil, fmt.Errorf("--log-format %q: want json or text", format)
	}
}
