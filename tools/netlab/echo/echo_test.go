package echo

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"
)

// These tests use the root namespace's loopback only, no lab.

// capture wraps a dialer and remembers the local address of its connection,
// which is what the server must report as the source.
func capture(local *netip.AddrPort) DialFunc {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		var d net.Dialer
		c, err := d.DialContext(ctx, network, addr)
		if err == nil {
			*local = addrPort(c.LocalAddr())
		}
		return c, err
	}
}

func TestAskTCPAndUDP(t *testing.T) {
	s := NewServer("pod-a")
	defer s.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	s.ServeTCP(ln)
	pc, err := net.ListenPacket("udp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s.ServeUDP(pc)

	for _, network := range []string{"tcp", "udp"} {
		var local netip.AddrPort
		r, err := Ask(context.Background(), capture(&local), network, ln.Addr().String())
		if err != nil {
			t.Fatalf("%s: %v", network, err)
		}
		want := Reply{Pod: "pod-a", Source: local.String(), Port: port}
		if r != want {
			t.Errorf("%s: got %+v, want %+v", network, r, want)
		}
	}
}

func TestAskRefusedIsFast(t *testing.T) {
	// Bind a port, then free it: nothing listens there afterwards.
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := pc.LocalAddr().String()
	pc.Close()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	ln.Close()

	var d net.Dialer
	for _, network := range []string{"tcp", "udp"} {
		start := time.Now()
		_, err := Ask(context.Background(), d.DialContext, network, addr)
		if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("%s: got %v, want connection refused", network, err)
		}
		if el := time.Since(start); el > time.Second {
			t.Errorf("%s: refusal took %s", network, el)
		}
	}
}

func TestAskTimesOut(t *testing.T) {
	// A TCP listener nobody accepts from, and a UDP socket nobody reads:
	// the requests arrive and are never answered.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()

	var d net.Dialer
	for network, addr := range map[string]string{"tcp": ln.Addr().String(), "udp": pc.LocalAddr().String()} {
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		_, err := Ask(ctx, d.DialContext, network, addr)
		cancel()
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("%s: got %v, want a deadline error", network, err)
		}
	}
}

func TestCloseStopsServing(t *testing.T) {
	s := NewServer("x")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.ServeTCP(ln)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	var d net.Dialer
	if _, err := Ask(context.Background(), d.DialContext, "tcp", ln.Addr().String()); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("after Close: got %v, want connection refused", err)
	}
}
