// Command echoserver is the lab's echo server as a process, for namespaces
// that netlab does not run in-process (for example inside the VM runner):
//
//	ip netns exec sbx-vm-pod-a echoserver -name a -ports 8080,9090
//
// Every TCP connection and UDP datagram on each port gets one JSON line:
// {"pod":"a","source":"198.18.1.10:34567","port":8080}.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"strconv"
	"syscall"

	"github.com/signalbox/signalbox/tools/netlab/echo"
)

func main() {
	host, _ := os.Hostname()
	name := flag.String("name", host, "name to answer with (the pod name)")
	ports := flag.String("ports", "8080", "comma-separated ports, each served on TCP and UDP")
	address := flag.String("address", "", "IP address to bind (default: all)")
	flag.Parse()

	portList, err := echo.ParsePorts(*ports)
	if err != nil {
		log.Fatal(err)
	}
	s := echo.NewServer(*name)
	for _, p := range portList {
		addr := net.JoinHostPort(*address, strconv.Itoa(p))
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			log.Fatal(err)
		}
		s.ServeTCP(ln)
		pc, err := net.ListenPacket("udp", addr)
		if err != nil {
			log.Fatal(err)
		}
		s.ServeUDP(pc)
	}
	// Printed once every socket is open: a parent can wait for this line.
	fmt.Printf("echoserver %s listening on tcp+udp %s\n", *name, *ports)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	<-ctx.Done()
	if err := s.Close(); err != nil {
		log.Fatal(err)
	}
}
