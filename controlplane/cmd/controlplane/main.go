// Command controlplane watches the Kubernetes API once and streams every
// node's service table to its agent.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/signalbox/signalbox/controlplane/auth"
	"github.com/signalbox/signalbox/controlplane/cache"
	"github.com/signalbox/signalbox/controlplane/hub"
	"github.com/signalbox/signalbox/controlplane/nodeview"
	"github.com/signalbox/signalbox/controlplane/server"
	"github.com/signalbox/signalbox/controlplane/watch"
	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

type options struct {
	kubeconfig, syncAddr, inspectAddr, metricsAddr string
	proxyName, tlsCert, tlsKey, audience           string
	clusterCIDRs, nodePortAddrs, agentAccounts     string
	masqueradeAll, insecure                        bool
	logFormat                                      string
	drain                                          time.Duration
}

func main() {
	var o options
	flag.StringVar(&o.kubeconfig, "kubeconfig", env("KUBECONFIG", ""), "kubeconfig file; empty means in-cluster config")
	flag.StringVar(&o.syncAddr, "sync-addr", env("SIGNALBOX_SYNC_ADDR", ":9470"), "listen address of the agent sync service")
	flag.StringVar(&o.inspectAddr, "inspect-addr", env("SIGNALBOX_INSPECT_ADDR", ":9471"), "listen address of the read-only inspection service")
	flag.StringVar(&o.metricsAddr, "metrics-addr", env("SIGNALBOX_METRICS_ADDR", ":9472"), "listen address of /metrics; empty disables")
	flag.StringVar(&o.proxyName, "proxy-name", env("SIGNALBOX_PROXY_NAME", ""), "service.kubernetes.io/service-proxy-name this proxy serves; empty serves unlabelled Services")
	flag.StringVar(&o.tlsCert, "tls-cert", "", "TLS certificate for both services")
	flag.StringVar(&o.tlsKey, "tls-key", "", "TLS key for both services")
	flag.StringVar(&o.audience, "token-audience", "signalbox", "audience agents' projected tokens must carry")
	flag.StringVar(&o.agentAccounts, "agent-service-accounts", "", "comma-separated usernames allowed to act as agents (e.g. system:serviceaccount:kube-system:signalbox-agent); empty allows any pod-bound token")
	flag.StringVar(&o.clusterCIDRs, "cluster-cidr", env("SIGNALBOX_CLUSTER_CIDR", ""), "comma-separated pod CIDRs, sent to agents for local-traffic detection")
	flag.StringVar(&o.nodePortAddrs, "nodeport-addresses", "", "comma-separated CIDRs NodePorts listen on; empty means all node addresses")
	flag.BoolVar(&o.masqueradeAll, "masquerade-all", false, "masquerade all traffic to Services")
	flag.BoolVar(&o.insecure, "insecure", false, "plaintext and no authentication (labs and tests only)")
	flag.StringVar(&o.logFormat, "log-format", "text", "text or json")
	flag.DurationVar(&o.drain, "drain-timeout", 10*time.Second, "how long shutdown waits for streams to close")
	flag.Parse()

	var handler slog.Handler = slog.NewTextHandler(os.Stderr, nil)
	if o.logFormat == "json" {
		handler = slog.NewJSONHandler(os.Stderr, nil)
	}
	log := slog.New(handler)
	slog.SetDefault(log)
	if err := run(o, log); err != nil {
		log.Error("control plane failed", "err", err)
		os.Exit(1)
	}
}

func run(o options, log *slog.Logger) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	cfg, err := restConfig(o.kubeconfig)
	if err != nil {
		return fmt.Errorf("kubernetes client config: %w (pass --kubeconfig outside a cluster)", err)
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	reg := prometheus.NewRegistry()
	c := cache.New(nodeview.Options{ProxyName: o.proxyName}, nodeview.Settings{
		ClusterCIDRs:      split(o.clusterCIDRs),
		MasqueradeAll:     o.masqueradeAll,
		NodePortAddresses: split(o.nodePortAddrs),
	})
	hcfg := hub.DefaultConfig
	hcfg.Logger = log
	h := hub.New(c, hcfg, hub.NewMetrics(reg))
	go h.Run(ctx)

	var serverOpts []grpc.ServerOption
	var authn auth.Authenticator
	if !o.insecure {
		if o.tlsCert == "" || o.tlsKey == "" {
			return errors.New("--tls-cert and --tls-key are required (or --insecure for a lab)")
		}
		cert, err := tls.LoadX509KeyPair(o.tlsCert, o.tlsKey)
		if err != nil {
			return err
		}
		serverOpts = append(serverOpts, grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})))
		tr := &auth.TokenReview{Client: client, Audiences: []string{o.audience}, Allowed: map[string]bool{}}
		for _, a := range split(o.agentAccounts) {
			tr.Allowed[a] = true
		}
		authn = tr
	}

	log.Info("watching the API", "host", cfg.Host)
	if err := watch.Start(ctx, client, h); err != nil {
		return err
	}
	log.Info("initial list loaded", "generation", c.Gen())

	syncSrv, syncHealth := server.NewGRPC(serverOpts...)
	pb.RegisterNodeSyncServiceServer(syncSrv, &server.Sync{Hub: h, Auth: authn, Logger: log})
	inspOpts := serverOpts
	if authn != nil {
		reader := &auth.Reader{Client: client}
		inspOpts = append(inspOpts, grpc.UnaryInterceptor(server.RequireToken(reader)), grpc.StreamInterceptor(server.RequireTokenStream(reader)))
	}
	inspSrv, inspHealth := server.NewGRPC(inspOpts...)
	pb.RegisterInspectionServiceServer(inspSrv, &server.Inspect{Hub: h})

	errc := make(chan error, 3)
	serve := func(s *grpc.Server, addr, what string) {
		lis, err := net.Listen("tcp", addr)
		if err != nil {
			errc <- fmt.Errorf("%s listen: %w", what, err)
			return
		}
		log.Info("serving", "service", what, "addr", lis.Addr().String())
		errc <- s.Serve(lis)
	}
	go serve(syncSrv, o.syncAddr, "sync")
	go serve(inspSrv, o.inspectAddr, "inspection")
	if o.metricsAddr != "" {
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		go func() { errc <- http.ListenAndServe(o.metricsAddr, mux) }()
	}
	syncHealth.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	inspHealth.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)

	select {
	case <-ctx.Done():
		log.Info("shutting down: draining agent streams (agents keep their rules)")
	case err := <-errc:
		return err
	}
	syncHealth.Shutdown()
	inspHealth.Shutdown()
	done := make(chan struct{})
	go func() {
		syncSrv.GracefulStop()
		inspSrv.GracefulStop()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(o.drain):
		// Streams never end on their own; closing them is safe because
		// agents fail static and reconnect to another replica.
		syncSrv.Stop()
		inspSrv.Stop()
	}
	return nil
}

func restConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig == "" {
		return rest.InClusterConfig()
	}
	return clientcmd.BuildConfigFromFlags("", kubeconfig)
}

func env(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

func split(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}
