// Package labenv builds the whole signalbox system for end-to-end tests and
// the demo: a sealed network lab (nodes, pods with echo servers, an external
// client), a real kube-apiserver, the control plane and one node agent per
// node namespace, each a real process programming a real kernel.
//
// Everything that talks to lab addresses runs inside a lab namespace or uses
// a socket created inside one; the root namespace never addresses the lab.
// Needs root.
package labenv

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"k8s.io/client-go/kubernetes"

	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
	"github.com/signalbox/signalbox/tools/netlab"
)

// Modes the agent supports.
var Modes = []string{"iptables", "ipvs"}

// Options configure Start.
type Options struct {
	// LabName keys the lab's namespaces; each concurrent user needs its own.
	LabName string
	// Nodes default to DefaultNodes.
	Nodes []netlab.NodeConfig
	// Mode is the agents' data plane; default "iptables".
	Mode string
	// Site runs the apiserver and control plane; default a LabSite.
	Site Site
	// AgentArgs are extra flags for every agent.
	AgentArgs []string
	// LogDir receives every process's log; default a fresh temp directory.
	LogDir string
	// Log receives progress lines; default discarded.
	Log io.Writer
}

// DefaultNodes is the test topology: two nodes in zone-a, one in zone-b,
// two pods on each, so that locality and zone tests have a "here", a
// "same zone elsewhere" and an "other zone".
func DefaultNodes() []netlab.NodeConfig {
	var nodes []netlab.NodeConfig
	for i, zone := range []string{"zone-a", "zone-a", "zone-b"} {
		n := fmt.Sprintf("node%d", i+1)
		nodes = append(nodes, netlab.NodeConfig{Name: n, Zone: zone, Pods: []netlab.PodConfig{
			{Name: fmt.Sprintf("pod%da", i+1)}, {Name: fmt.Sprintf("pod%db", i+1)},
		}})
	}
	return nodes
}

// Env is a running system. Close it.
type Env struct {
	Lab     *netlab.Lab
	Site    Site
	Kube    kubernetes.Interface
	Inspect pb.InspectionServiceClient
	Mode    string
	LogDir  string
	Bins    Binaries

	opts        Options
	log         io.Writer
	agents      map[string]*Process
	inspectConn *grpc.ClientConn
	cpDown      bool
}

// Start builds the binaries and the system, and returns once every agent
// has connected and acknowledged its first table. On error nothing is left
// running.
func Start(ctx context.Context, opts Options) (_ *Env, err error) {
	if opts.Mode == "" {
		opts.Mode = "iptables"
	}
	if !slices.Contains(Modes, opts.Mode) {
		return nil, fmt.Errorf("labenv: unknown mode %q (want one of %v)", opts.Mode, Modes)
	}
	if len(opts.Nodes) == 0 {
		opts.Nodes = DefaultNodes()
	}
	if opts.Site == nil {
		opts.Site = &LabSite{}
	}
	if opts.Log == nil {
		opts.Log = io.Discard
	}
	e := &Env{Site: opts.Site, Mode: opts.Mode, LogDir: opts.LogDir, opts: opts, log: opts.Log, agents: map[string]*Process{}}
	defer func() {
		if err != nil {
			err = errors.Join(err, e.Close())
			err = fmt.Errorf("%w\n%s", err, e.Report(30))
		}
	}()
	if e.LogDir == "" {
		if e.LogDir, err = os.MkdirTemp("", "signalbox-"+opts.LabName+"-"); err != nil {
			return e, err
		}
	}
	e.logf("logs go to %s", e.LogDir)
	if e.Bins, err = Build(ctx, e.log); err != nil {
		return e, err
	}
	e.logf("building the network lab %q (%d nodes)", opts.LabName, len(opts.Nodes))
	if e.Lab, err = netlab.New(ctx, netlab.Config{Name: opts.LabName, Nodes: opts.Nodes}); err != nil {
		return e, err
	}
	e.logf("starting the apiserver and the control plane")
	if err = e.Site.Start(ctx, e.Lab, e.Bins, e.LogDir, e.log); err != nil {
		return e, err
	}
	e.Kube = e.Site.Kube()
	e.inspectConn, err = grpc.NewClient("passthrough:///inspection",
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return e.Site.DialInspect(ctx) }))
	if err != nil {
		return e, err
	}
	e.Inspect = pb.NewInspectionServiceClient(e.inspectConn)
	e.logf("creating Node objects")
	if err = e.createNodes(ctx); err != nil {
		return e, err
	}
	if err = e.WaitControlPlane(ctx); err != nil {
		return e, err
	}
	for _, n := range e.Lab.Nodes() {
		if err = e.StartAgent(n.Name); err != nil {
			return e, err
		}
	}
	e.logf("waiting for %d agents (%s mode) to connect and sync", len(e.agents), e.Mode)
	if err = e.WaitSynced(ctx, 2*time.Minute); err != nil {
		return e, err
	}
	return e, nil
}

func (e *Env) logf(format string, args ...any) {
	fmt.Fprintf(e.log, "labenv: "+format+"\n", args...)
}

// Agent returns the agent process of a node.
func (e *Env) Agent(node string) *Process {
	if p := e.agents[node]; p != nil {
		return p
	}
	h := e.Lab.Node(node)
	if h == nil {
		return nil
	}
	p := &Process{
		Name: "nodeagent-" + node,
		Host: h,
		Argv: append([]string{e.Bins.NodeAgent,
			"--control-plane=" + e.Site.AgentAddress(),
			"--node-name=" + node,
			"--insecure",
			"--mode=" + e.Mode,
		}, e.opts.AgentArgs...),
		LogPath: filepath.Join(e.LogDir, "nodeagent-"+node+".log"),
	}
	e.agents[node] = p
	return p
}

// StartAgent starts (or restarts) a node's agent.
func (e *Env) StartAgent(node string) error {
	p := e.Agent(node)
	if p == nil {
		return fmt.Errorf("labenv: no node %q", node)
	}
	return p.Start()
}

// KillControlPlane SIGKILLs the control plane, as a crash would.
func (e *Env) KillControlPlane() error {
	e.cpDown = true
	return e.Site.KillControlPlane()
}

// ControlPlaneDown reports whether KillControlPlane was not yet followed
// by StartControlPlane.
func (e *Env) ControlPlaneDown() bool { return e.cpDown }

// StartControlPlane starts the control plane again and waits until it
// answers.
func (e *Env) StartControlPlane(ctx context.Context) error {
	if err := e.Site.StartControlPlane(); err != nil {
		return err
	}
	e.cpDown = false
	return e.WaitControlPlane(ctx)
}

// WaitControlPlane waits until the inspection API answers, failing early
// if the control plane exits.
func (e *Env) WaitControlPlane(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	var last error
	for {
		cctx, ccancel := context.WithTimeout(ctx, 2*time.Second)
		_, last = e.Inspect.ListNodes(cctx, &pb.ListNodesRequest{})
		ccancel()
		if last == nil {
			return nil
		}
		for _, p := range e.siteProcesses() {
			if exited, err := p.Exited(); exited {
				return fmt.Errorf("%s exited (%v) before answering:\n%s", p.Name, err, p.Tail(20))
			}
		}
		if err := pause(ctx, 100*time.Millisecond); err != nil {
			return fmt.Errorf("control plane not answering: %w (last: %v)", err, last)
		}
	}
}

// WaitSynced waits until every lab node has a connected agent that has
// acknowledged everything it should hold and rejected nothing.
func (e *Env) WaitSynced(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	last := "no answer yet"
	for {
		problems, err := e.syncProblems(ctx)
		switch {
		case err != nil:
			last = err.Error()
		case len(problems) == 0:
			return nil
		default:
			last = strings.Join(problems, "; ")
		}
		for _, p := range e.agents {
			if exited, err := p.Exited(); exited {
				return fmt.Errorf("%s exited (%v):\n%s", p.Name, err, p.Tail(20))
			}
		}
		if err := pause(ctx, 100*time.Millisecond); err != nil {
			return fmt.Errorf("agents not in sync after %s: %s", timeout, last)
		}
	}
}

func (e *Env) syncProblems(ctx context.Context) ([]string, error) {
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	resp, err := e.Inspect.ListNodes(cctx, &pb.ListNodesRequest{})
	if err != nil {
		return nil, err
	}
	byName := map[string]*pb.NodeStatus{}
	for _, n := range resp.GetNodes() {
		byName[n.GetName()] = n
	}
	var problems []string
	for _, h := range e.Lab.Nodes() {
		n := byName[h.Name]
		switch {
		case n == nil:
			problems = append(problems, h.Name+": never connected")
		case !n.GetConnected():
			problems = append(problems, h.Name+": disconnected")
		case n.GetDegraded():
			problems = append(problems, fmt.Sprintf("%s: rejected a delta: %s", h.Name, n.GetLastNack().GetMessage()))
		case n.GetInFlightSequence() != 0 || n.GetPendingChanges() != 0:
			problems = append(problems, fmt.Sprintf("%s: %d changes pending", h.Name, n.GetPendingChanges()))
		}
	}
	return problems, nil
}

// Report lists every process's log with its last n lines, for failures.
func (e *Env) Report(n int) string {
	var b strings.Builder
	procs := slices.Clone(e.siteProcesses())
	for _, h := range e.nodes() {
		if p := e.agents[h]; p != nil {
			procs = append(procs, p)
		}
	}
	for _, p := range procs {
		fmt.Fprintf(&b, "--- %s (%s), last %d lines ---\n%s\n", p.Name, p.LogPath, n, p.Tail(n))
	}
	return b.String()
}

func (e *Env) siteProcesses() []*Process {
	if e.Site == nil {
		return nil
	}
	var out []*Process
	for _, p := range e.Site.Processes() {
		if p != nil {
			out = append(out, p)
		}
	}
	return out
}

func (e *Env) nodes() []string {
	var names []string
	for name := range e.agents {
		names = append(names, name)
	}
	slices.Sort(names)
	return names
}

// Close stops the agents, the control plane and the apiserver, then
// removes the lab. Logs stay in LogDir.
func (e *Env) Close() error {
	var errs []error
	for _, name := range e.nodes() {
		errs = append(errs, e.agents[name].Stop(10*time.Second))
	}
	if e.inspectConn != nil {
		errs = append(errs, e.inspectConn.Close())
	}
	if e.Site != nil {
		errs = append(errs, e.Site.Close())
	}
	if e.Lab != nil {
		errs = append(errs, e.Lab.Close())
	}
	return errors.Join(errs...)
}

// pause waits d or until ctx ends.
func pause(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
