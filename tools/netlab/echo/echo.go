// Package echo is the lab's echo server and its client. Every TCP connection
// and every UDP datagram gets one JSON line naming the answering pod and the
// client's address as the pod saw it, so a test can tell which endpoint
// served it and whether the source address was translated on the way.
package echo

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// DefaultTimeout bounds Ask when its context has no deadline: long enough
// for a loaded 2-core machine, short enough that a dropped packet fails a
// test quickly.
const DefaultTimeout = 3 * time.Second

// Reply is what the server answers.
type Reply struct {
	Pod    string `json:"pod"`
	Source string `json:"source"` // client address:port as the server saw it
	Port   int    `json:"port"`   // the server port that answered (tells target ports apart)
}

// Server answers on any number of listeners until Close.
type Server struct {
	name string

	mu      sync.Mutex
	closers []io.Closer
	wg      sync.WaitGroup
}

// NewServer returns a server that answers with the given pod name.
func NewServer(name string) *Server { return &Server{name: name} }

// ServeTCP answers every connection on l, in the background. The server
// owns l from now on.
func (s *Server) ServeTCP(l net.Listener) {
	s.track(l)
	s.wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return // closed (or broken: Ask then reports the failure)
			}
			s.wg.Go(func() {
				defer c.Close()
				_ = c.SetWriteDeadline(time.Now().Add(DefaultTimeout))
				_, _ = c.Write(s.reply(c.RemoteAddr(), c.LocalAddr()))
			})
		}
	})
}

// ServeUDP answers every datagram on pc, in the background. The server owns
// pc from now on.
func (s *Server) ServeUDP(pc net.PacketConn) {
	s.track(pc)
	s.wg.Go(func() {
		buf := make([]byte, 64<<10)
		for {
			_, from, err := pc.ReadFrom(buf)
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				continue // e.g. ECONNREFUSED left over from an earlier reply
			}
			_, _ = pc.WriteTo(s.reply(from, pc.LocalAddr()), from)
		}
	})
}

// Close stops all listeners and waits for the serving goroutines.
func (s *Server) Close() error {
	s.mu.Lock()
	closers := s.closers
	s.closers = nil
	s.mu.Unlock()
	var errs []error
	for _, c := range closers {
		errs = append(errs, c.Close())
	}
	s.wg.Wait()
	return errors.Join(errs...)
}

func (s *Server) track(c io.Closer) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closers = append(s.closers, c)
}

func (s *Server) reply(remote, local net.Addr) []byte {
	b, _ := json.Marshal(Reply{
		Pod:    s.name,
		Source: addrPort(remote).String(),
		Port:   int(addrPort(local).Port()),
	})
	return append(b, '\n')
}

// addrPort unmaps IPv4 clients of dual-stack sockets (::ffff:198.18.1.10),
// so the reported source reads as the client's own address.
func addrPort(a net.Addr) netip.AddrPort {
	var ap netip.AddrPort
	switch a := a.(type) {
	case *net.TCPAddr:
		ap = a.AddrPort()
	case *net.UDPAddr:
		ap = a.AddrPort()
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// DialFunc matches net.Dialer.DialContext and netlab's Host.Dial.
type DialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

// Ask sends one request (a TCP connection or a UDP datagram) to an echo
// server and returns its reply. A rejected request fails fast with an error
// that matches syscall.ECONNREFUSED under errors.Is; an unanswered one fails
// at the context's deadline (DefaultTimeout if it has none) with an error
// that matches os.ErrDeadlineExceeded or context.DeadlineExceeded.
func Ask(ctx context.Context, dial DialFunc, network, addr string) (Reply, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultTimeout)
		defer cancel()
	}
	deadline, _ := ctx.Deadline()
	budget := time.Until(deadline).Round(time.Millisecond)
	fail := func(err error) (Reply, error) {
		if errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, context.DeadlineExceeded) {
			return Reply{}, fmt.Errorf("echo %s %s: no reply within %s: %w", network, addr, budget, err)
		}
		return Reply{}, fmt.Errorf("echo %s %s: %w", network, addr, err)
	}

	c, err := dial(ctx, network, addr)
	if err != nil {
		return fail(err)
	}
	defer c.Close()
	if err := c.SetDeadline(deadline); err != nil {
		return fail(err)
	}
	var line []byte
	if _, isUDP := c.(net.PacketConn); isUDP {
		if _, err := c.Write([]byte("?\n")); err != nil {
			return fail(err)
		}
		buf := make([]byte, 64<<10)
		n, err := c.Read(buf)
		if err != nil {
			return fail(err)
		}
		line = buf[:n]
	} else {
		line, err = bufio.NewReader(c).ReadBytes('\n')
		if err != nil {
			return fail(err)
		}
	}
	var r Reply
	if err := json.Unmarshal(line, &r); err != nil {
		return fail(fmt.Errorf("bad reply %q: %w", line, err))
	}
	return r, nil
}

// ParsePorts parses a comma-separated port list such as "8080,9090".
func ParsePorts(s string) ([]int, error) {
	var ports []int
	for _, f := range strings.Split(s, ",") {
		p, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || p < 1 || p > 65535 {
			return nil, fmt.Errorf("bad port %q in %q", f, s)
		}
		ports = append(ports, p)
	}
	return ports, nil
}
