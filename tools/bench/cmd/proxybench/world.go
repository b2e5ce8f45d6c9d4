package main

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strings"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// world holds the objects both sides are given: the Services and slices as
// the apiserver returned them, and the successive versions of the one
// slice changed for the one-endpoint updates.
type world struct {
	o       options
	svcs    []*corev1.Service
	slices  []*discoveryv1.EndpointSlice
	updates []*discoveryv1.EndpointSlice
}

func newWorld(o options) *world { return &world{o: o} }

func svcName(i int) string { return fmt.Sprintf("svc-%05d", i) }

func (w *world) service(i int) *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: svcName(i), Namespace: benchNS},
		Spec: corev1.ServiceSpec{
			Type:  corev1.ServiceTypeClusterIP,
			Ports: []corev1.ServicePort{{Name: "http", Protocol: corev1.ProtocolTCP, Port: 80, TargetPort: intstr.FromInt32(8080)}},
		},
	}
}

// epAddr spreads endpoints over 198.19.0.0/16 (wrapping past 65,536:
// shared addresses between Services are fine for rule counts).
func epAddr(k int) string {
	k %= 1 << 16
	return fmt.Sprintf("198.19.%d.%d", k>>8, k&0xff)
}

func (w *world) slice(i int, first string) *discoveryv1.EndpointSlice {
	ready := true
	eps := make([]discoveryv1.Endpoint, w.o.endpoints)
	for j := range eps {
		a := epAddr(i*w.o.endpoints + j)
		if j == 0 && first != "" {
			a = first
		}
		eps[j] = discoveryv1.Endpoint{Addresses: []string{a}, Conditions: discoveryv1.EndpointConditions{Ready: &ready}}
	}
	name, proto, port := "http", corev1.ProtocolTCP, int32(8080)
	return &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: svcName(i) + "-1", Namespace: benchNS, Labels: map[string]string{
			discoveryv1.LabelServiceName: svcName(i),
			discoveryv1.LabelManagedBy:   "proxybench",
		}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   eps,
		Ports:       []discoveryv1.EndpointPort{{Name: &name, Protocol: &proto, Port: &port}},
	}
}

// planUpdates prepares the one-endpoint changes: endpoint 0 of the middle
// Service moves to a fresh address (198.18.8.x) each time.
func (w *world) planUpdates() {
	target := w.o.services / 2
	w.updates = nil
	for r := 0; r < w.o.reps; r++ {
		s := w.slice(target, fmt.Sprintf("198.18.8.%d", 1+r%250))
		s.ResourceVersion = w.slices[target].ResourceVersion
		s.UID = w.slices[target].UID
		w.updates = append(w.updates, s)
	}
}

// synthesize builds the objects without an apiserver (kube-proxy skipped):
// ClusterIPs allocated in order from the service range.
func (w *world) synthesize() {
	base := netip.MustParsePrefix(serviceCIDR).Addr()
	w.svcs = make([]*corev1.Service, w.o.services)
	w.slices = make([]*discoveryv1.EndpointSlice, w.o.services)
	for i := range w.svcs {
		s := w.service(i)
		ip := base
		for range i + 1 {
			ip = ip.Next()
		}
		s.Spec.ClusterIP, s.Spec.ClusterIPs = ip.String(), []string{ip.String()}
		s.Spec.IPFamilies = []corev1.IPFamily{corev1.IPv4Protocol}
		w.svcs[i] = s
		w.slices[i] = w.slice(i, "")
	}
	w.planUpdates()
}

// nodeNetns creates a fresh node namespace with lo up, IPv6 off (so that
// kube-proxy runs single-stack, like the IPv4-only signalbox side), and a
// veth to a second namespace that is its default gateway. Nothing is
// created or addressed in the root namespace: `ip -n` runs each command
// inside the namespace.
func nodeNetns(ctx context.Context, tag string) (string, func(), error) {
	ns := fmt.Sprintf("sbx-bench-%d-%s", os.Getpid(), tag)
	gw := ns + "-gw"
	cleanup := func() {
		for _, n := range []string{ns, gw} {
			_ = exec.Command("ip", "netns", "del", n).Run()
		}
	}
	steps := [][]string{
		{"netns", "add", ns},
		{"netns", "add", gw},
		{"-n", ns, "link", "set", "lo", "up"},
		{"-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", gw},
		{"-n", ns, "addr", "add", nodeIP + "/24", "dev", "eth0"},
		{"-n", gw, "addr", "add", gwIP + "/24", "dev", "eth0"},
		{"-n", ns, "link", "set", "eth0", "up"},
		{"-n", gw, "link", "set", "eth0", "up"},
		{"-n", gw, "link", "set", "lo", "up"},
		{"-n", ns, "route", "add", "default", "via", gwIP},
		{"netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"},
	}
	for _, s := range steps {
		if out, err := exec.CommandContext(ctx, "ip", s...).CombinedOutput(); err != nil {
			cleanup()
			return "", nil, fmt.Errorf("ip %s: %v: %s", strings.Join(s, " "), err, out)
		}
	}
	return ns, cleanup, nil
}
