// Command ipvsprobe checks, inside a vmtest VM, that the kernel and tools
// the IPVS and iptables data planes need all work: a dummy kube-ipvs0 with
// a service address, an IPVS service programmed over netlink and read back,
// ipvsadm, ipset, and kube-proxy style rules through both iptables backends.
// With -dial it instead checks the VM's one network path to the host.
// It exits 0 only if every check passed.
package main

import (
	"bufio"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"github.com/moby/ipvs"
	"github.com/vishvananda/netlink"
)

const (
	vip      = "198.18.128.10"
	realIP   = "198.18.129.20"
	realPort = 8080
)

var failed bool

func check(ok bool, format string, args ...any) {
	status := "ok  "
	if !ok {
		status, failed = "FAIL", true
	}
	fmt.Printf("ipvsprobe: %s %s\n", status, fmt.Sprintf(format, args...))
}

func main() {
	dial := flag.String("dial", "", "instead of the IPVS checks, say hello to the host server at this address")
	blocked := flag.String("blocked", "", "with -dial: an address that must NOT be reachable")
	flag.Parse()
	// It rewires the kernel's network state, so it must never run on a host.
	if os.Getenv("SIGNALBOX_IN_VM") != "1" {
		fmt.Fprintln(os.Stderr, "ipvsprobe: refusing to run outside a vmtest VM (SIGNALBOX_IN_VM is not 1); use vmtest.Run")
		os.Exit(2)
	}
	if *dial != "" {
		probeNetwork(*dial, *blocked)
	} else {
		probeIPVS()
		probeTools()
	}
	if failed {
		fmt.Println("ipvsprobe: some checks FAILED")
		os.Exit(1)
	}
	fmt.Println("ipvsprobe: all checks passed")
}

func probeIPVS() {
	dummy := &netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Name: "kube-ipvs0"}}
	err := netlink.LinkAdd(dummy)
	check(err == nil, "create dummy kube-ipvs0: %v", err)
	link, err := netlink.LinkByName("kube-ipvs0")
	check(err == nil && link.Type() == "dummy", "kube-ipvs0 is a dummy: %v", err)
	if err != nil {
		return
	}
	addr, _ := netlink.ParseAddr(vip + "/32")
	err = netlink.AddrAdd(link, addr)
	check(err == nil, "add %s/32 to kube-ipvs0: %v", vip, err)
	addrs, err := netlink.AddrList(link, netlink.FAMILY_V4)
	check(err == nil && len(addrs) == 1 && addrs[0].IP.String() == vip, "kube-ipvs0 addresses %v: %v", addrs, err)

	h, err := ipvs.New("")
	check(err == nil, "open IPVS netlink: %v", err)
	if err != nil {
		return
	}
	defer h.Close()
	svc := &ipvs.Service{Address: net.ParseIP(vip), Protocol: syscall.IPPROTO_TCP, Port: 80,
		SchedName: "rr", AddressFamily: syscall.AF_INET, Netmask: 0xffffffff}
	err = h.NewService(svc)
	check(err == nil, "add IPVS service %s:80 TCP rr: %v", vip, err)
	dst := &ipvs.Destination{Address: net.ParseIP(realIP), Port: realPort, Weight: 1,
		ConnectionFlags: ipvs.ConnectionFlagMasq, AddressFamily: syscall.AF_INET}
	err = h.NewDestination(svc, dst)
	check(err == nil, "add real server %s:%d: %v", realIP, realPort, err)

	svcs, err := h.GetServices()
	check(err == nil && len(svcs) == 1, "list IPVS services: %d, %v", len(svcs), err)
	if len(svcs) != 1 {
		return
	}
	got := svcs[0]
	check(got.Address.Equal(net.ParseIP(vip)) && got.Port == 80 && got.Protocol == syscall.IPPROTO_TCP && got.SchedName == "rr",
		"service read back: %s:%d proto %d sched %s", got.Address, got.Port, got.Protocol, got.SchedName)
	dsts, err := h.GetDestinations(got)
	check(err == nil && len(dsts) == 1 && dsts[0].Address.Equal(net.ParseIP(realIP)) && dsts[0].Port == realPort && dsts[0].Weight == 1,
		"real servers read back: %d, %v", len(dsts), err)
}

// probeTools runs the command-line tools kube-proxy's modes depend on.
func probeTools() {
	out := runTool("ipvsadm", "-Ln")
	check(strings.Contains(out, "TCP  "+vip+":80 rr") && strings.Contains(out, fmt.Sprintf("-> %s:%d", realIP, realPort)),
		"ipvsadm -Ln shows the service and its real server")

	runTool("ipset", "create", "x", "hash:ip,port,ip")
	runTool("ipset", "add", "x", realIP+",tcp:8080,"+realIP)
	out = runTool("ipset", "list", "x")
	check(strings.Contains(out, "Type: hash:ip,port,ip") && strings.Contains(out, realIP+",tcp:8080,"+realIP), "ipset x holds the hairpin entry")

	for _, ipt := range []string{"iptables-legacy", "iptables-nft"} {
		chain := "SBX-PROBE"
		rules := [][]string{
			{"-t", "nat", "-N", chain},
			{"-t", "nat", "-A", chain, "-p", "tcp", "-m", "comment", "--comment", "probe", "-m", "multiport", "--dports", "80,443",
				"-m", "statistic", "--mode", "random", "--probability", "0.5", "-j", "DNAT", "--to-destination", fmt.Sprintf("%s:%d", realIP, realPort)},
			{"-t", "nat", "-A", "PREROUTING", "-m", "addrtype", "--dst-type", "LOCAL", "-j", chain},
			{"-t", "nat", "-A", "OUTPUT", "-m", "conntrack", "--ctstate", "NEW", "-m", "recent", "--name", "probe", "--set",
				"-j", "MARK", "--set-xmark", "0x4000/0x4000"},
			{"-t", "nat", "-A", "POSTROUTING", "-m", "mark", "--mark", "0x4000/0x4000", "-m", "set", "--match-set", "x", "dst,dst,src", "-j", "MASQUERADE"},
			{"-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "9", "-j", "REJECT", "--reject-with", "tcp-reset"},
			{"-t", "mangle", "-A", "PREROUTING", "-j", "MARK", "--set-mark", "1"},
		}
		for _, r := range rules {
			runTool(ipt, r...)
		}
		out := runTool(ipt, "-t", "nat", "-S")
		check(strings.Count(out, "\n-A ") >= 4, "%s: kube-proxy style nat rules listed back", ipt)
		ip6t := strings.Replace(ipt, "iptables", "ip6tables", 1)
		runTool(ip6t, "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "9", "-j", "REJECT")
		runTool(ip6t, "-t", "nat", "-A", "POSTROUTING", "-j", "MASQUERADE")
	}
}

// runTool runs a command, records a check on its exit status, and returns its output.
func runTool(name string, args ...string) string {
	out, err := exec.Command(name, args...).CombinedOutput()
	check(err == nil, "%s %s: %v", name, strings.Join(args, " "), err)
	if err != nil || name == "ipvsadm" {
		fmt.Print(string(out))
	}
	return string(out)
}

// probeNetwork checks the VM's restricted network: the host server is
// reachable at addr, and nothing else is.
func probeNetwork(addr, blocked string) {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	check(err == nil, "dial host server at %s: %v", addr, err)
	if err == nil {
		fmt.Fprintln(c, "hello from the VM")
		reply, err := bufio.NewReader(c).ReadString('\n')
		check(err == nil, "reply from host server: %q, %v", strings.TrimSpace(reply), err)
		c.Close()
	}
	if blocked != "" {
		c, err := net.DialTimeout("tcp", blocked, 3*time.Second)
		check(err != nil, "%s unreachable: %v", blocked, err)
		if err == nil {
			c.Close()
		}
	}
}
