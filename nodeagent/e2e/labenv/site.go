package labenv

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"path/filepath"
	"strconv"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/signalbox/signalbox/tools/devcluster"
	"github.com/signalbox/signalbox/tools/netlab"
)

// Site is where the apiserver and the control plane run and how the test
// driver and the agents reach them. LabSite runs both inside the lab's
// control namespace; a VM run keeps them on the host, reachable through a
// single forwarded port, and plugs in here without the tests changing.
type Site interface {
	// Start brings up the apiserver and the control plane for lab and
	// returns once both answer.
	Start(ctx context.Context, lab *netlab.Lab, bins Binaries, logDir string, log io.Writer) error
	// Kube is an admin client of the apiserver, usable from the driver.
	Kube() kubernetes.Interface
	// AgentAddress is the control plane address agents dial from their
	// node namespaces (--control-plane).
	AgentAddress() string
	// DialInspect opens a connection to the inspection API from the
	// driver's (root) namespace without it addressing the lab.
	DialInspect(ctx context.Context) (net.Conn, error)
	// KillControlPlane SIGKILLs the control plane, as a crash would.
	KillControlPlane() error
	// StartControlPlane starts it again with the same settings.
	StartControlPlane() error
	// Processes lists what the site runs, for log reports.
	Processes() []*Process
	// Close stops everything the site started.
	Close() error
}

// Well-known control plane ports (the binary's defaults).
const (
	SyncPort    = 9470
	InspectPort = 9471
	MetricsPort = 9472
)

// LabSite runs etcd, kube-apiserver and the control plane in the lab's
// control namespace: agents reach the control plane over the lab's node
// network, the driver through sockets created inside that namespace.
type LabSite struct {
	// ControlPlaneArgs are extra control plane flags.
	ControlPlaneArgs []string

	lab     *netlab.Lab
	cluster *devcluster.Cluster
	cp      *Process
}

// Start implements Site.
func (s *LabSite) Start(ctx context.Context, lab *netlab.Lab, bins Binaries, logDir string, log io.Writer) error {
	s.lab = lab
	ctl := lab.Control()
	c, err := devcluster.Start(ctx, devcluster.Options{
		Name:        "labenv-" + lab.Name(),
		NetNS:       ctl.NetNS,
		BindAddress: ctl.IPv4.String(),
		ServiceCIDR: netlab.ServiceCIDR4.String(),
		Log:         log,
	})
	if err != nil {
		return fmt.Errorf("dev cluster: %w", err)
	}
	s.cluster = c
	addr := func(port int) string { return netip.AddrPortFrom(ctl.IPv4, uint16(port)).String() }
	s.cp = &Process{
		Name: "controlplane",
		Host: ctl,
		Argv: append([]string{bins.ControlPlane,
			"--kubeconfig=" + c.Kubeconfig,
			"--insecure",
			"--sync-addr=" + addr(SyncPort),
			"--inspect-addr=" + addr(InspectPort),
			"--metrics-addr=" + addr(MetricsPort),
			"--cluster-cidr=" + netlab.ClusterCIDR4.String(),
		}, s.ControlPlaneArgs...),
		LogPath: filepath.Join(logDir, "controlplane.log"),
	}
	fmt.Fprintf(log, "labenv: starting the control plane in %s (log %s)\n", ctl.NetNS, s.cp.LogPath)
	return s.StartControlPlane()
}

// Kube implements Site. Deprecation warnings (externalIPs) are expected
// here and would only clutter test and demo output.
func (s *LabSite) Kube() kubernetes.Interface {
	cfg := s.cluster.RESTConfig()
	cfg.WarningHandler = rest.NoWarnings{}
	return kubernetes.NewForConfigOrDie(cfg)
}

// Cluster returns the dev cluster (kubeconfig, state directory).
func (s *LabSite) Cluster() *devcluster.Cluster { return s.cluster }

// AgentAddress implements Site.
func (s *LabSite) AgentAddress() string {
	return netip.AddrPortFrom(s.lab.Control().IPv4, SyncPort).String()
}

// DialInspect implements Site.
func (s *LabSite) DialInspect(ctx context.Context) (net.Conn, error) {
	ctl := s.lab.Control()
	return ctl.Dial(ctx, "tcp", net.JoinHostPort(ctl.IPv4.String(), strconv.Itoa(InspectPort)))
}

// KillControlPlane implements Site.
func (s *LabSite) KillControlPlane() error { return s.cp.Kill() }

// StartControlPlane implements Site.
func (s *LabSite) StartControlPlane() error { return s.cp.Start() }

// Processes implements Site.
func (s *LabSite) Processes() []*Process { return []*Process{s.cp} }

// Close implements Site.
func (s *LabSite) Close() error {
	var errs []error
	if s.cp != nil {
		errs = append(errs, s.cp.Stop(10*time.Second))
	}
	if s.cluster != nil {
		errs = append(errs, s.cluster.Stop())
	}
	return errors.Join(errs...)
}
