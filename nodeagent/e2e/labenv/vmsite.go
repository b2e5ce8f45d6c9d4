package labenv

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/signalbox/signalbox/tools/netlab"
)

// A VM run (see nodeagent/e2e/vm) keeps the apiserver and the control plane
// on the host, where Go code runs about 48 times faster than under TCG. The
// VM reaches the host through exactly one forwarded port: every connection
// to it starts with a one-line header naming what it wants. The host side
// (HostGateway) splices the named targets to fixed loopback addresses and
// accepts nothing else.
const (
	HeaderAPIServer = "apiserver"
	HeaderSync      = "sync"
	HeaderInspect   = "inspect"
	// Commands, answered with "ok\n" or "error: ...\n": the fail-static
	// tests kill and restart the control plane, which runs on the host.
	CommandKillControlPlane  = "controlplane-kill"
	CommandStartControlPlane = "controlplane-start"
)

// Environment of a test binary run in the VM.
const (
	// SiteEnv selects the Site: "lab" (default) or "vm".
	SiteEnv = "SIGNALBOX_E2E_SITE"
	// KubeconfigEnv is the host's admin kubeconfig (on the shared root);
	// its server is a host loopback address, reached through the gateway.
	KubeconfigEnv = "SIGNALBOX_E2E_KUBECONFIG"
	// GatewayEnv is the address the VM dials to reach the host gateway.
	GatewayEnv = "SIGNALBOX_E2E_GATEWAY"
)

// VMSite is the Site of a test driver running inside the VM. Agents in
// node namespaces cannot reach the gateway address (it exists only in the
// VM's root namespace), so a relay listens in the lab's control namespace
// at the usual control plane address and forwards each agent connection
// through a socket opened in the VM's root namespace.
type VMSite struct {
	Gateway    string // host:port the VM dials (vmtest.GuestServerAddr)
	Kubeconfig string

	lab   *netlab.Lab
	relay net.Listener
	wg    sync.WaitGroup
	mu    sync.Mutex
	conns map[net.Conn]struct{}
}

// DialGateway opens a connection to the host gateway and asks for target.
func DialGateway(ctx context.Context, gateway, target string) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", gateway)
	if err != nil {
		return nil, err
	}
	if _, err := io.WriteString(c, target+"\n"); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// Start implements Site: it starts nothing on the host (the host test did)
// and opens the relay for the agents.
func (s *VMSite) Start(ctx context.Context, lab *netlab.Lab, _ Binaries, _ string, log io.Writer) error {
	if s.Gateway == "" || s.Kubeconfig == "" {
		return errors.New("labenv: VMSite needs Gateway and Kubeconfig")
	}
	s.lab = lab
	s.conns = map[net.Conn]struct{}{}
	ctl := lab.Control()
	ln, err := ctl.Listen("tcp", netip.AddrPortFrom(ctl.IPv4, SyncPort).String())
	if err != nil {
		return fmt.Errorf("relay listener in %s: %w", ctl.NetNS, err)
	}
	s.relay = ln
	fmt.Fprintf(log, "labenv: relaying agents from %s to the host control plane via %s\n", ln.Addr(), s.Gateway)
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				s.relayConn(c)
			}()
		}
	}()
	return nil
}

func (s *VMSite) track(c net.Conn, add bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if add {
		s.conns[c] = struct{}{}
	} else {
		delete(s.conns, c)
	}
}

func (s *VMSite) relayConn(agent net.Conn) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	up, err := DialGateway(ctx, s.Gateway, HeaderSync)
	cancel()
	if err != nil {
		agent.Close()
		return
	}
	s.track(agent, true)
	s.track(up, true)
	defer s.track(agent, false)
	defer s.track(up, false)
	Splice(agent, up)
}

// Splice copies both ways until either side ends, then closes both.
func Splice(a, b net.Conn) {
	done := make(chan struct{}, 2)
	cp := func(dst, src net.Conn) {
		io.Copy(dst, src)
		done <- struct{}{}
	}
	go cp(a, b)
	go cp(b, a)
	<-done
	a.Close()
	b.Close()
	<-done
}

// Kube implements Site: the host's admin client, dialing through the gateway.
func (s *VMSite) Kube() kubernetes.Interface {
	cfg, err := clientcmd.BuildConfigFromFlags("", s.Kubeconfig)
	if err != nil {
		panic(fmt.Sprintf("labenv: kubeconfig %s: %v", s.Kubeconfig, err))
	}
	cfg.Dial = func(ctx context.Context, _, _ string) (net.Conn, error) {
		return DialGateway(ctx, s.Gateway, HeaderAPIServer)
	}
	// TCG is slow: leave client-go room.
	cfg.Timeout = time.Minute
	cfg.QPS, cfg.Burst = 100, 200
	cfg.WarningHandler = rest.NoWarnings{}
	return kubernetes.NewForConfigOrDie(cfg)
}

// AgentAddress implements Site: the relay in the control namespace.
func (s *VMSite) AgentAddress() string {
	return netip.AddrPortFrom(s.lab.Control().IPv4, SyncPort).String()
}

// DialInspect implements Site.
func (s *VMSite) DialInspect(ctx context.Context) (net.Conn, error) {
	return DialGateway(ctx, s.Gateway, HeaderInspect)
}

func (s *VMSite) command(cmd string) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := DialGateway(ctx, s.Gateway, cmd)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(time.Minute))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return fmt.Errorf("%s: no answer from the host: %w", cmd, err)
	}
	if line = strings.TrimSpace(line); line != "ok" {
		return fmt.Errorf("%s on the host: %s", cmd, line)
	}
	return nil
}

// KillControlPlane implements Site. Relayed agent connections end as the
// control plane's do, so agents see the crash as they would on a host.
func (s *VMSite) KillControlPlane() error {
	if err := s.command(CommandKillControlPlane); err != nil {
		return err
	}
	s.mu.Lock()
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	return nil
}

// StartControlPlane implements Site.
func (s *VMSite) StartControlPlane() error { return s.command(CommandStartControlPlane) }

// Processes implements Site: the site's processes run on the host, whose
// test reports their logs.
func (s *VMSite) Processes() []*Process { return nil }

// Close implements Site.
func (s *VMSite) Close() error {
	if s.relay != nil {
		s.relay.Close()
	}
	s.mu.Lock()
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	// No wait for the relay goroutines: a connection still being dialled
	// ends on its own when the host side goes away.
	return nil
}
