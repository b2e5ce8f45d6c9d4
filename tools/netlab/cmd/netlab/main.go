// Command netlab builds, lists and removes network labs (needs root).
//
//	netlab up --name demo --nodes 3 --pods-per-node 2 [--ipv6] [--ports 8080,9090]
//	netlab ask --name demo --from client tcp 198.18.17.11:8080
//	netlab list
//	netlab down --name demo
//
// "up" prints the topology and keeps the lab (and its echo servers) until
// Ctrl-C or SIGTERM, then tears it down. "down" removes a lab left behind by
// a killed run.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"

	"github.com/signalbox/signalbox/tools/netlab"
	"github.com/signalbox/signalbox/tools/netlab/echo"
)

func usage() {
	fmt.Fprintln(os.Stderr, `usage:
  netlab up   --name NAME [--nodes N] [--pods-per-node M] [--ipv6] [--ports 8080,...]
  netlab ask  --name NAME --from HOST tcp|udp IP:PORT
  netlab list
  netlab down --name NAME`)
	os.Exit(2)
}

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	name := fs.String("name", "demo", "lab name (lowercase letters and digits)")
	var err error
	switch os.Args[1] {
	case "up":
		nodes := fs.Int("nodes", 3, "number of nodes")
		pods := fs.Int("pods-per-node", 2, "pods per node")
		ipv6 := fs.Bool("ipv6", false, "dual-stack")
		ports := fs.String("ports", strconv.Itoa(netlab.DefaultEchoPort), "echo ports of every pod")
		_ = fs.Parse(os.Args[2:])
		err = up(ctx, *name, *nodes, *pods, *ipv6, *ports)
	case "ask":
		from := fs.String("from", "client", "host to ask from: router, control, client, a node or a pod")
		_ = fs.Parse(os.Args[2:])
		if fs.NArg() != 2 {
			usage()
		}
		err = ask(ctx, *name, *from, fs.Arg(0), fs.Arg(1))
	case "list":
		_ = fs.Parse(os.Args[2:])
		var labs []string
		if labs, err = netlab.List(); err == nil && len(labs) > 0 {
			fmt.Println(strings.Join(labs, "\n"))
		}
	case "down":
		_ = fs.Parse(os.Args[2:])
		err = netlab.Cleanup(ctx, *name)
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "netlab:", strings.TrimPrefix(err.Error(), "netlab: "))
		os.Exit(1)
	}
}

func up(ctx context.Context, name string, nodes, podsPerNode int, ipv6 bool, ports string) error {
	portList, err := echo.ParsePorts(ports)
	if err != nil {
		return err
	}
	cfg := netlab.Config{Name: name, IPv6: ipv6}
	pod := 0
	for i := 1; i <= nodes; i++ {
		nc := netlab.NodeConfig{Name: fmt.Sprintf("node%d", i), Zone: fmt.Sprintf("zone-%c", 'a'+(i-1)%3)}
		for range podsPerNode {
			pod++
			nc.Pods = append(nc.Pods, netlab.PodConfig{Name: fmt.Sprintf("pod%d", pod), Ports: portList})
		}
		cfg.Nodes = append(cfg.Nodes, nc)
	}
	lab, err := netlab.New(ctx, cfg)
	if err != nil {
		return err
	}
	printTopology(lab)
	fmt.Printf("\nlab %q is up; Ctrl-C tears it down.\n", name)
	<-ctx.Done()
	fmt.Println("tearing down")
	return lab.Close()
}

func printTopology(lab *netlab.Lab) {
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "HOST\tNETNS\tIPV4\tIPV6\tNOTES")
	for _, h := range lab.Hosts() {
		var notes []string
		if h.PodCIDR.IsValid() {
			notes = append(notes, "zone "+h.Zone, "pods "+h.PodCIDR.String())
			if h.PodCIDR6.IsValid() {
				notes = append(notes, h.PodCIDR6.String())
			}
		}
		if h.Node != "" {
			notes = append(notes, "on "+h.Node, fmt.Sprintf("echo %v tcp+udp", h.EchoPorts))
		}
		v6 := "-"
		if h.IPv6.IsValid() {
			v6 = h.IPv6.String()
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", h.Name, h.NetNS, h.IPv4, v6, strings.Join(notes, ", "))
	}
	w.Flush()
}

// ask runs the echo client from a host of a running lab (possibly owned by
// another netlab process): only the namespace name is needed.
func ask(ctx context.Context, name, from, network, addr string) error {
	var host *netlab.Host
	for _, ns := range []string{"", "node-", "pod-"} {
		h := &netlab.Host{Name: from, NetNS: "sbx-" + name + "-" + ns + from}
		if _, err := os.Stat("/run/netns/" + h.NetNS); err == nil {
			host = h
			break
		}
	}
	if host == nil {
		return fmt.Errorf("lab %q has no host %q", name, from)
	}
	r, err := echo.Ask(ctx, host.Dial, network, addr)
	if err != nil {
		return err
	}
	fmt.Printf("pod %s answered on port %d, saw source %s\n", r.Pod, r.Port, r.Source)
	return nil
}
