// Command demo runs signalbox end to end on this machine (needs root): a
// network lab with three nodes and their pods, a real kube-apiserver, the
// control plane and one node agent per node; it applies the example
// Services of deploy/examples, shows who answers them from outside and
// inside the cluster, and keeps running, inspectable with grpcurl, until
// Ctrl-C tears it all down.
//
//	make demo   (or: go run ./tools/demo [--mode iptables] [--inspect-listen 127.0.0.1:9471])
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/signalbox/signalbox/nodeagent/e2e/labenv"
	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
	"github.com/signalbox/signalbox/tools/devcluster"
	"github.com/signalbox/signalbox/tools/netlab"
)

const labName = "demo"

type options struct {
	examples, inspectListen, mode string
}

func main() {
	var o options
	flag.StringVar(&o.examples, "examples", "deploy/examples", "directory of example Services (relative paths start at the repository root)")
	flag.StringVar(&o.inspectListen, "inspect-listen", "127.0.0.1:9471", "loopback address that forwards to the control plane's inspection API")
	flag.StringVar(&o.mode, "mode", "iptables", "the agents' data plane")
	flag.Parse()
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func run(o options) error {
	if os.Geteuid() != 0 {
		return errors.New("needs root: it creates network namespaces and programs their kernels")
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	// Ctrl-C also ends a pager or tee reading our output; the teardown
	// must still run, so a write to a closed pipe may fail but not kill us.
	signal.Ignore(syscall.SIGPIPE)

	root, err := devcluster.Root()
	if err != nil {
		return err
	}
	dir := o.examples
	if !filepath.IsAbs(dir) {
		dir = filepath.Join(root, dir)
	}
	examples, err := loadExamples(dir)
	if err != nil {
		return err
	}
	// Only loopback: the forward exists for this machine's grpcurl.
	if host, _, err := net.SplitHostPort(o.inspectListen); err != nil || !net.ParseIP(host).IsLoopback() {
		return fmt.Errorf("--inspect-listen %q: want a loopback address and port", o.inspectListen)
	}
	ln, err := net.Listen("tcp", o.inspectListen)
	if err != nil {
		return fmt.Errorf("inspection forward: %w", err)
	}
	defer ln.Close()

	step("1. Building the binaries, the network lab, the dev cluster, the control plane and %d agents", len(demoNodes()))
	env, err := labenv.Start(ctx, labenv.Options{LabName: labName, Nodes: demoNodes(), Mode: o.mode, Log: os.Stdout})
	if err != nil {
		return err
	}
	defer func() {
		step("Tearing down: agents, control plane, apiserver, lab")
		if err := env.Close(); err != nil {
			fmt.Fprintln(os.Stderr, "demo: teardown:", err)
		}
		fmt.Printf("Logs kept in %s\n", env.LogDir)
	}()
	printTopology(env)

	step("2. Applying %d example Services from %s (the demo writes their EndpointSlices: no controllers run)", len(examples), dir)
	var services []applied
	routed := false
	for _, want := range examples {
		svc, backends, err := apply(ctx, env, want)
		if err != nil {
			return err
		}
		services = append(services, applied{svc, backends})
		fmt.Printf("   %s/%s: %s, ClusterIP %s, endpoints %v\n", svc.Namespace, svc.Name, svc.Spec.Type, svc.Spec.ClusterIP, names(backends))
		if !routed && (len(svc.Status.LoadBalancer.Ingress) > 0 || len(svc.Spec.ExternalIPs) > 0) {
			// The "load balancer": the lab delivers the external range to node1.
			if err := env.Lab.RouteVia(ctx, netlab.ExternalNet4, "node1"); err != nil {
				return err
			}
			fmt.Printf("   the lab routes %s to node1, as a load balancer would\n", netlab.ExternalNet4)
			routed = true
		}
	}

	step("3. Waiting until every agent has applied every Service (the inspection API tells)")
	start := time.Now()
	for _, a := range services {
		err := env.WaitTables(ctx, time.Minute, a.svc.Namespace, a.svc.Name, func(_ string, sps []*pb.ServicePort) error {
			if len(sps) == 0 || len(sps[0].GetClusterEndpoints()) != len(a.backends) {
				return errors.New("not all endpoints in the table yet")
			}
			return nil
		})
		if err != nil {
			return err
		}
	}
	fmt.Printf("   every Service live on all %d nodes after %s\n", len(env.Lab.Nodes()), time.Since(start).Round(time.Millisecond))

	step("4. Asking every Service, from the external client and from a pod (6 requests each)")
	for _, a := range services {
		showService(ctx, env, a)
	}

	go forward(ctx, ln, env.Site.DialInspect)
	step("5. Running. Inspect it from this machine:")
	printCommands(env, root, o.inspectListen, services)
	fmt.Println("\nPress Ctrl-C to tear everything down.")
	<-ctx.Done()
	return nil
}

type applied struct {
	svc      *corev1.Service
	backends []*netlab.Host
}

func step(format string, args ...any) {
	fmt.Printf("\n== "+format+"\n", args...)
}

func printTopology(env *labenv.Env) {
	fmt.Printf("   control plane + apiserver: %s (namespace %s)\n", env.Lab.Control().IPv4, env.Lab.Control().NetNS)
	fmt.Printf("   external client:           %s (namespace %s)\n", env.Lab.Client().IPv4, env.Lab.Client().NetNS)
	for _, n := range env.Lab.Nodes() {
		var pods []string
		for _, p := range env.Lab.Pods() {
			if p.Node == n.Name {
				pods = append(pods, fmt.Sprintf("%s %s (app=%s)", p.Name, p.IPv4, podLabels(p)["app"]))
			}
		}
		fmt.Printf("   %s %s %s, agent pid %d: pods %v\n", n.Name, n.Zone, n.IPv4, env.Agent(n.Name).PID(), pods)
	}
}

func names(hosts []*netlab.Host) []string {
	var out []string
	for _, h := range hosts {
		out = append(out, h.Name)
	}
	return out
}
