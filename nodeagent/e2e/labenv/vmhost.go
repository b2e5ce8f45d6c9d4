package labenv

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/signalbox/signalbox/tools/devcluster"
	"github.com/signalbox/signalbox/tools/netlab"
)

// VMHost is the host half of a VM run: the dev cluster and the control
// plane on the host's loopback, and the gateway the VM's one forwarded port
// leads to. Nothing here addresses the lab: the host only ever talks to
// 127.0.0.1.
type VMHost struct {
	Cluster *devcluster.Cluster
	// Gateway listens on 127.0.0.1; give its port to vmtest.Options.HostPort.
	Gateway net.Listener
	// ControlPlaneLog is the control plane's log file.
	ControlPlaneLog string

	argv    []string
	targets map[string]string

	mu    sync.Mutex
	cp    *exec.Cmd
	cpEnd chan struct{}
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

// StartVMHost starts the dev cluster and the control plane on loopback and
// opens the gateway. Close it.
func StartVMHost(ctx context.Context, bins Binaries, logDir string, log io.Writer) (_ *VMHost, err error) {
	h := &VMHost{conns: map[net.Conn]struct{}{}, ControlPlaneLog: filepath.Join(logDir, "controlplane.log")}
	defer func() {
		if err != nil {
			h.Close()
		}
	}()
	h.Cluster, err = devcluster.Start(ctx, devcluster.Options{
		Name:        "e2e-vm",
		BindAddress: "127.0.0.1",
		ServiceCIDR: netlab.ServiceCIDR4.String(),
		Log:         log,
	})
	if err != nil {
		return h, fmt.Errorf("dev cluster: %w", err)
	}
	ports, err := freePorts(3)
	if err != nil {
		return h, err
	}
	sync, inspect, metrics := ports[0], ports[1], ports[2]
	h.targets = map[string]string{
		HeaderAPIServer: strings.TrimPrefix(h.Cluster.Host, "https://"),
		HeaderSync:      sync,
		HeaderInspect:   inspect,
	}
	h.argv = []string{bins.ControlPlane,
		"--kubeconfig=" + h.Cluster.Kubeconfig,
		"--insecure",
		"--sync-addr=" + sync,
		"--inspect-addr=" + inspect,
		"--metrics-addr=" + metrics,
		"--cluster-cidr=" + netlab.ClusterCIDR4.String(),
	}
	if err := h.StartControlPlane(); err != nil {
		return h, err
	}
	if h.Gateway, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
		return h, err
	}
	fmt.Fprintf(log, "labenv: VM gateway on %s -> %v\n", h.Gateway.Addr(), h.targets)
	h.wg.Add(1)
	go h.serve()
	return h, nil
}

// Port is the gateway's port.
func (h *VMHost) Port() int { return h.Gateway.Addr().(*net.TCPAddr).Port }

func freePorts(n int) ([]string, error) {
	var out []string
	var lns []net.Listener
	defer func() {
		for _, l := range lns {
			l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		lns = append(lns, l)
		out = append(out, l.Addr().String())
	}
	return out, nil
}

func (h *VMHost) serve() {
	defer h.wg.Done()
	for {
		c, err := h.Gateway.Accept()
		if err != nil {
			return
		}
		h.wg.Add(1)
		go func() {
			defer h.wg.Done()
			h.handle(c)
		}()
	}
}

func (h *VMHost) track(c net.Conn, add bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if add {
		h.conns[c] = struct{}{}
	} else {
		delete(h.conns, c)
	}
}

// handle reads the header and splices to the named loopback target, or
// runs the named command. Anything else is refused.
func (h *VMHost) handle(c net.Conn) {
	h.track(c, true)
	defer h.track(c, false)
	c.SetReadDeadline(time.Now().Add(time.Minute))
	br := bufio.NewReader(c)
	line, err := br.ReadString('\n')
	if err != nil {
		c.Close()
		return
	}
	c.SetReadDeadline(time.Time{})
	what := strings.TrimSpace(line)
	switch what {
	case CommandKillControlPlane, CommandStartControlPlane:
		run := h.KillControlPlane
		if what == CommandStartControlPlane {
			run = h.StartControlPlane
		}
		if err := run(); err != nil {
			fmt.Fprintf(c, "error: %v\n", strings.ReplaceAll(err.Error(), "\n", " "))
		} else {
			io.WriteString(c, "ok\n")
		}
		c.Close()
		return
	}
	addr, ok := h.targets[what]
	if !ok {
		c.Close()
		return
	}
	up, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		c.Close()
		return
	}
	h.track(up, true)
	defer h.track(up, false)
	// Bytes the reader buffered past the header belong to the target.
	if n := br.Buffered(); n > 0 {
		b, _ := br.Peek(n)
		if _, err := up.Write(b); err != nil {
			up.Close()
			c.Close()
			return
		}
	}
	Splice(c, up)
}

// StartControlPlane starts the control plane unless it runs.
func (h *VMHost) StartControlPlane() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.cp != nil {
		select {
		case <-h.cpEnd:
		default:
			return nil
		}
	}
	f, err := os.OpenFile(h.ControlPlaneLog, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	fmt.Fprintf(f, "### %s: %s\n", time.Now().Format(time.RFC3339Nano), strings.Join(h.argv, " "))
	cmd := exec.Command(h.argv[0], h.argv[1:]...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return err
	}
	end := make(chan struct{})
	go func() { cmd.Wait(); close(end) }()
	h.cp, h.cpEnd = cmd, end
	return nil
}

// KillControlPlane SIGKILLs the control plane (only the pid it started,
// while unreaped) and waits until it is reaped.
func (h *VMHost) KillControlPlane() error { return h.stopControlPlane(syscall.SIGKILL) }

func (h *VMHost) stopControlPlane(sig syscall.Signal) error {
	h.mu.Lock()
	cmd, end := h.cp, h.cpEnd
	h.mu.Unlock()
	if cmd == nil {
		return nil
	}
	select {
	case <-end:
		return nil
	default:
	}
	if err := cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return err
	}
	select {
	case <-end:
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		<-end
	}
	return nil
}

// Close stops the gateway, the control plane and the dev cluster.
func (h *VMHost) Close() error {
	var errs []error
	if h.Gateway != nil {
		h.Gateway.Close()
	}
	h.mu.Lock()
	for c := range h.conns {
		c.Close()
	}
	h.mu.Unlock()
	h.wg.Wait()
	errs = append(errs, h.stopControlPlane(syscall.SIGTERM))
	if h.Cluster != nil {
		errs = append(errs, h.Cluster.Stop())
	}
	return errors.Join(errs...)
}
