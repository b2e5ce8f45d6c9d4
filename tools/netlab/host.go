package netlab

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"runtime"

	"golang.org/x/sys/unix"
)

// Host is one namespace of the lab: the router, the control host, the
// external client, a node or a pod.
type Host struct {
	Name  string // node or pod name; "router", "control", "client" otherwise
	NetNS string // named network namespace (/run/netns/<NetNS>)
	IPv4  netip.Addr
	IPv6  netip.Addr // zero unless the lab is dual-stack

	// Nodes only.
	Zone     string
	PodCIDR  netip.Prefix // IPv4 pod subnet
	PodCIDR6 netip.Prefix // IPv6 pod subnet; zero unless dual-stack

	// Pods only.
	Node      string // the node the pod is attached to
	EchoPorts []int  // echo server ports, TCP and UDP each
}

// Addrs returns the host's addresses, IPv4 first.
func (h *Host) Addrs() []netip.Addr {
	if h.IPv6.IsValid() {
		return []netip.Addr{h.IPv4, h.IPv6}
	}
	return []netip.Addr{h.IPv4}
}

// Do runs fn on an OS thread switched into the host's namespace. fn must not
// start goroutines that expect to be inside it: they run on other threads.
// Sockets fn creates stay in the namespace for their whole life.
func (h *Host) Do(fn func() error) error {
	return doInNetNS(h.NetNS, fn)
}

func doInNetNS(name string, fn func() error) error {
	target, err := unix.Open(netnsDir+"/"+name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("netlab: open netns %s: %w", name, err)
	}
	defer unix.Close(target)

	// A fresh goroutine owns the switched thread: if switching back fails,
	// it exits still locked and the runtime discards the tainted thread
	// instead of handing it to unrelated code.
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			done <- fmt.Errorf("netlab: open own netns: %w", err)
			return
		}
		defer unix.Close(orig)
		if err := unix.Setns(target, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			done <- fmt.Errorf("netlab: enter netns %s: %w", name, err)
			return
		}
		fnErr := fn()
		if err := unix.Setns(orig, unix.CLONE_NEWNET); err != nil {
			done <- fmt.Errorf("netlab: leave netns %s: %w", name, err)
			return
		}
		runtime.UnlockOSThread()
		done <- fnErr
	}()
	return <-done
}

// ipLiteral refuses host names: resolving one could run on other threads
// (outside the namespace) and dual-stack fallback would dial from there.
func ipLiteral(network, addr string) error {
	switch network {
	case "tcp", "tcp4", "tcp6", "udp", "udp4", "udp6":
	default:
		return fmt.Errorf("netlab: network %q not supported (tcp or udp)", network)
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("netlab: %q: %w", addr, err)
	}
	if host == "" {
		return nil
	}
	if _, err := netip.ParseAddr(host); err != nil {
		return fmt.Errorf("netlab: %q: want an IP address, not a host name", addr)
	}
	return nil
}

// Dial connects from inside the host's namespace. Its signature fits
// net.Dialer.DialContext, so it plugs into gRPC (WithContextDialer) and
// client-go (rest.Config.Dial). addr must be an IP literal and port.
func (h *Host) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	if err := ipLiteral(network, addr); err != nil {
		return nil, err
	}
	var c net.Conn
	err := h.Do(func() error {
		var d net.Dialer
		var err error
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// Listen opens a stream listener inside the host's namespace.
func (h *Host) Listen(network, addr string) (net.Listener, error) {
	if err := ipLiteral(network, addr); err != nil {
		return nil, err
	}
	var l net.Listener
	err := h.Do(func() error {
		var err error
		l, err = net.Listen(network, addr)
		return err
	})
	return l, err
}

// ListenPacket opens a datagram socket inside the host's namespace.
func (h *Host) ListenPacket(network, addr string) (net.PacketConn, error) {
	if err := ipLiteral(network, addr); err != nil {
		return nil, err
	}
	var pc net.PacketConn
	err := h.Do(func() error {
		var err error
		pc, err = net.ListenPacket(network, addr)
		return err
	})
	return pc, err
}

// Command prepares a process that runs inside the host's namespace (via
// `ip netns exec`, which execs in place: the process's pid is the command's).
func (h *Host) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", h.NetNS, name}, args...)...)
}
