package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/signalbox/signalbox/nodeagent/e2e/labenv"
	"github.com/signalbox/signalbox/tools/netlab"
)

const requests = 6

// showService asks the Service every way it can be reached and prints who
// answered and what source address the pod saw.
func showService(ctx context.Context, env *labenv.Env, a applied) {
	svc := a.svc
	p := svc.Spec.Ports[0]
	network := strings.ToLower(string(p.Protocol))
	fmt.Printf("\n   %s/%s  (%s, %s port %d, endpoints %v)\n", svc.Namespace, svc.Name, svc.Spec.Type, network, p.Port, names(a.backends))

	// From a pod that does not back the Service, so it is not a hairpin.
	pods := env.Lab.Pods()
	from := pods[len(pods)-1]
	for _, pod := range slices.Backward(pods) {
		if !slices.Contains(a.backends, pod) {
			from = pod
			break
		}
	}
	probe(ctx, env, from, network, addrPort(svc.Spec.ClusterIP, p.Port), "ClusterIP")

	local := svc.Spec.ExternalTrafficPolicy == corev1.ServiceExternalTrafficPolicyLocal
	if p.NodePort != 0 {
		for _, n := range env.Lab.Nodes() {
			note := ""
			if local && !hasPodOn(a.backends, n) {
				note = "externalTrafficPolicy Local, no pod on " + n.Name + ": dropped"
			}
			probe(ctx, env, env.Lab.Client(), network, addrPort(n.IPv4.String(), p.NodePort), "NodePort on "+n.Name, note)
		}
	}
	for _, ing := range svc.Status.LoadBalancer.Ingress {
		probe(ctx, env, env.Lab.Client(), network, addrPort(ing.IP, p.Port), "load balancer IP")
	}
	for _, ip := range svc.Spec.ExternalIPs {
		probe(ctx, env, env.Lab.Client(), network, addrPort(ip, p.Port), "external IP")
	}
	if svc.Spec.Type == corev1.ServiceTypeClusterIP {
		fmt.Println("     (a ClusterIP is for pods and nodes only: the external client has no way in)")
	}
	if hc := svc.Spec.HealthCheckNodePort; hc != 0 {
		for _, n := range env.Lab.Nodes() {
			healthCheck(ctx, env, n, hc)
		}
	}
}

// probe sends a few requests and prints one summary line.
func probe(ctx context.Context, env *labenv.Env, from *netlab.Host, network, addr, what string, notes ...string) {
	counts := map[string]int{}
	var sources []string
	var failure error
	for range requests {
		actx, cancel := context.WithTimeout(ctx, time.Second)
		r, err := env.Lab.Ask(actx, from, network, addr)
		cancel()
		if err != nil {
			failure = err
			break // a dropped request costs a whole timeout; one says enough
		}
		counts[r.Pod]++
		if src, err := netip.ParseAddrPort(r.Source); err == nil && !slices.Contains(sources, src.Addr().String()) {
			sources = append(sources, src.Addr().String())
		}
	}
	fmt.Printf("     %-7s -> %-21s %-17s ", from.Name, addr, what)
	if len(counts) == 0 {
		fmt.Printf("no answer: %v", failure)
	} else {
		var by []string
		for pod, n := range counts {
			by = append(by, fmt.Sprintf("%s x%d", pod, n))
		}
		slices.Sort(by)
		fmt.Printf("answered by %s; pod saw source %s", strings.Join(by, ", "), strings.Join(sources, ", "))
		if failure != nil {
			fmt.Printf("; then failed: %v", failure)
		}
	}
	for _, n := range notes {
		if n != "" {
			fmt.Printf("  [%s]", n)
		}
	}
	fmt.Println()
}

// healthCheck GETs a node's health check node port from the external
// client, as a load balancer would.
func healthCheck(ctx context.Context, env *labenv.Env, n *netlab.Host, port int32) {
	hc := &http.Client{Timeout: time.Second, Transport: &http.Transport{DialContext: env.Lab.Client().Dial, DisableKeepAlives: true}}
	url := "http://" + addrPort(n.IPv4.String(), port) + "/"
	fmt.Printf("     %-7s -> %-21s %-17s ", "client", strings.TrimPrefix(url, "http://"), "health check")
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	resp, err := hc.Do(req)
	if err != nil {
		fmt.Printf("error: %v\n", err)
		return
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	var hs struct {
		LocalEndpoints int `json:"localEndpoints"`
	}
	_ = json.Unmarshal(body, &hs)
	fmt.Printf("%s, localEndpoints %d\n", resp.Status, hs.LocalEndpoints)
}

func hasPodOn(pods []*netlab.Host, n *netlab.Host) bool {
	return slices.ContainsFunc(pods, func(p *netlab.Host) bool { return p.Node == n.Name })
}

func addrPort(ip string, port int32) string {
	a, err := netip.ParseAddr(ip)
	if err != nil {
		return ip
	}
	return netip.AddrPortFrom(a, uint16(port)).String()
}

// printCommands shows how to look inside while the demo runs. Everything
// listed either goes through the loopback forward or runs inside a lab
// namespace.
func printCommands(env *labenv.Env, root, listen string, services []applied) {
	grpcurl := filepath.Join(root, ".cache", "bin", "grpcurl")
	if _, err := os.Stat(grpcurl); err != nil {
		fmt.Printf("   (grpcurl is not built yet: run `make tools`, it lands in %s)\n", grpcurl)
	}
	call := func(data, method string) {
		d := ""
		if data != "" {
			d = " -d '" + data + "'"
		}
		fmt.Printf("     %s -plaintext%s %s %s\n", grpcurl, d, listen, method)
	}
	svc := services[0].svc
	fmt.Println("   the control plane's inspection API (forwarded from " + listen + "):")
	call("", "list")
	call("", "describe signalbox.v1.InspectionService")
	call("", "signalbox.v1.InspectionService/ListNodes")
	call(`{"node":"node1"}`, "signalbox.v1.InspectionService/GetNodeTable")
	call(fmt.Sprintf(`{"namespace":%q,"name":%q}`, svc.Namespace, svc.Name), "signalbox.v1.InspectionService/GetServiceConvergence")
	call(`{"node":"node2"}`, "signalbox.v1.InspectionService/WatchNodeDeltas")
	fmt.Println("   the rules an agent wrote, and a request of your own:")
	fmt.Printf("     ip netns exec %s iptables-save -t nat | grep SBX\n", env.Lab.Node("node1").NetNS)
	for _, a := range services {
		if p := a.svc.Spec.Ports[0]; p.NodePort != 0 {
			fmt.Printf("     go run ./tools/netlab/cmd/netlab ask --name %s --from client %s %s\n",
				labName, strings.ToLower(string(p.Protocol)), addrPort(env.Lab.Node("node1").IPv4.String(), p.NodePort))
			break
		}
	}
	if site, ok := env.Site.(*labenv.LabSite); ok && hasKubectl() {
		fmt.Println("   the apiserver (its address exists only inside the control namespace):")
		fmt.Printf("     ip netns exec %s kubectl --kubeconfig %s get services,endpointslices -A\n", env.Lab.Control().NetNS, site.Cluster().Kubeconfig)
	}
	fmt.Printf("   process logs: %s\n", env.LogDir)
}

func hasKubectl() bool {
	_, err := exec.LookPath("kubectl")
	return err == nil
}
