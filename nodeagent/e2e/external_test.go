package e2e

import (
	"net/netip"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/signalbox/signalbox/nodeagent/e2e/labenv"
	"github.com/signalbox/signalbox/tools/netlab"
)

// External addresses, from netlab's external range. Each test routes the
// range to the node it wants the "load balancer" to deliver to.
var (
	lbIP       = netip.MustParseAddr("198.18.200.10")
	externalIP = netip.MustParseAddr("198.18.200.20")
	lbLocalIP  = netip.MustParseAddr("198.18.200.30")
)

// NodePort answers the external client on every node, spreading over all
// endpoints and masquerading (externalTrafficPolicy Cluster).
func TestNodePortFromExternalClient(t *testing.T) {
	ns := newNamespace(t, "nodeport")
	svc := createService(t, service(ns, "np", func(s *corev1.Service) { s.Spec.Type = corev1.ServiceTypeNodePort }))
	if svc.Spec.Ports[0].NodePort == 0 {
		t.Fatal("apiserver allocated no node port")
	}
	setEndpoints(t, svc, labenv.Ready(allPods()...))
	waitTables(t, ns, "np", clusterEndpoints(allPods()...))
	for _, n := range env.Lab.Nodes() {
		addr := nodePortAddr(svc, n)
		waitServes(t, client(), "tcp", addr, allPods())
		replies := expectPods(t, client(), "tcp", addr, 60, allPods())
		expectSources(t, "client -> "+n.Name+" NodePort", replies, nodeAddrs(n)...)
	}
}

// A LoadBalancer ingress IP and an externalIP answer the external client
// through the node the "load balancer" delivers to.
func TestLoadBalancerAndExternalIPFromExternalClient(t *testing.T) {
	ns := newNamespace(t, "lb")
	svc := createService(t, service(ns, "lb", func(s *corev1.Service) {
		s.Spec.Type = corev1.ServiceTypeLoadBalancer
		s.Spec.ExternalIPs = []string{externalIP.String()}
	}))
	setIngress(t, svc, lbIP)
	setEndpoints(t, svc, labenv.Ready(allPods()...))
	via := node("node1")
	routeExternal(t, via)
	waitTables(t, ns, "lb", clusterEndpoints(allPods()...))
	for _, ip := range []netip.Addr{lbIP, externalIP} {
		addr := hostPort(ip.String(), servicePort)
		waitServes(t, client(), "tcp", addr, allPods())
		replies := expectPods(t, client(), "tcp", addr, 60, allPods())
		expectSources(t, "client -> "+addr, replies, nodeAddrs(via)...)
	}
}

// setIngress publishes a load balancer address in the Service status, as
// a cloud controller would.
func setIngress(t *testing.T, svc *corev1.Service, ip netip.Addr) {
	t.Helper()
	ctx := testContext(t)
	cur, err := env.Kube.CoreV1().Services(svc.Namespace).Get(ctx, svc.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cur.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{{IP: ip.String()}}
	out, err := env.Kube.CoreV1().Services(svc.Namespace).UpdateStatus(ctx, cur, metav1.UpdateOptions{})
	if err != nil {
		t.Fatalf("set load balancer ingress of %s: %v", svc.Name, err)
	}
	*svc = *out
}

// routeExternal makes the lab deliver the external range to node n.
func routeExternal(t *testing.T, n *netlab.Host) {
	t.Helper()
	if err := env.Lab.RouteVia(testContext(t), netlab.ExternalNet4, n.Name); err != nil {
		t.Fatal(err)
	}
}
