package labenv

import (
	"bufio"
	"context"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// The gateway splices a named target to its loopback address, bytes sent
// right behind the header included, and refuses any other name. Loopback
// only: no lab, no root needed.
func TestGatewaySplicesOnlyKnownTargets(t *testing.T) {
	echo, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer echo.Close()
	go func() {
		for {
			c, err := echo.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	gw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h := &VMHost{Gateway: gw, targets: map[string]string{HeaderSync: echo.Addr().String()}, conns: map[net.Conn]struct{}{}}
	h.wg.Add(1)
	go h.serve()
	defer h.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := net.Dial("tcp", gw.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	// Header and payload in one write: the gateway must not lose what it
	// buffered past the header.
	if _, err := io.WriteString(c, HeaderSync+"\nhello\n"); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || line != "hello\n" {
		t.Fatalf("through the gateway: %q, %v; want the echo of hello", line, err)
	}

	for _, bad := range []string{"etcd", HeaderAPIServer, "127.0.0.1:22", ""} {
		c, err := DialGateway(ctx, gw.Addr().String(), bad)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, "hello\n")
		b, err := io.ReadAll(c)
		c.Close()
		if err != nil || len(b) != 0 {
			t.Errorf("header %q: read %q, %v; want the connection closed unanswered", bad, b, err)
		}
	}
	if !strings.HasPrefix(gw.Addr().String(), "127.0.0.1:") {
		t.Errorf("gateway listens on %s, want loopback", gw.Addr())
	}
}
