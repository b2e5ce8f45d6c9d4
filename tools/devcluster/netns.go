package devcluster

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"

	"golang.org/x/sys/unix"
)

// DialFunc dials like net.Dialer.DialContext.
type DialFunc func(ctx context.Context, network, address string) (net.Conn, error)

// NetNSDialer returns a dialer whose sockets are created inside the named
// network namespace (/run/netns/NAME). A socket keeps the namespace it was
// created in, so the connection then works from any thread. This is how
// code in the root namespace reaches an apiserver living in a lab namespace
// without the root namespace ever holding a route to a lab address.
//
// Host names are resolved in the root namespace (from files only when they
// are literals or in /etc/hosts); use IP addresses.
func NetNSDialer(name string) DialFunc {
	return func(ctx context.Context, network, address string) (net.Conn, error) {
		type result struct {
			conn net.Conn
			err  error
		}
		ch := make(chan result, 1)
		go func() {
			c, err := dialInNetNS(ctx, name, network, address)
			ch <- result{c, err}
		}()
		r := <-ch
		return r.conn, r.err
	}
}

// dialInNetNS must run on its own goroutine: it switches its OS thread into
// the namespace and, if switching back fails, leaves the thread locked so
// that Go discards it when the goroutine exits instead of reusing a thread
// stuck in the wrong namespace.
func dialInNetNS(ctx context.Context, name, network, address string) (net.Conn, error) {
	runtime.LockOSThread()
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		return nil, err
	}
	defer orig.Close()
	target, err := os.Open(filepath.Join("/run/netns", name))
	if err != nil {
		runtime.UnlockOSThread()
		return nil, fmt.Errorf("network namespace %q: %w", name, err)
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return nil, fmt.Errorf("setns %q: %w", name, err)
	}
	// FallbackDelay < 0 disables Happy Eyeballs, which would dial from other
	// goroutines (other threads, other namespace); dialing serially keeps
	// every socket() call on this locked thread.
	d := net.Dialer{FallbackDelay: -1}
	conn, dialErr := d.DialContext(ctx, network, address)
	if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
		// Stay locked: the thread dies with this goroutine.
		if conn != nil {
			conn.Close()
		}
		return nil, fmt.Errorf("returning from network namespace %q: %w", name, err)
	}
	runtime.UnlockOSThread()
	return conn, dialErr
}

// freePorts returns n distinct TCP ports that were free on addr a moment
// ago. Holding all listeners until the end keeps the n ports distinct; a
// parallel process may still grab one before our child binds it, which
// Start handles by retrying with new ports.
func freePorts(addr string, n int) ([]int, error) {
	var ports []int
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", net.JoinHostPort(addr, "0"))
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}
