package cache

import (
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/signalbox/signalbox/controlplane/nodeview"
)

func svc(name, ip string, local bool) *corev1.Service {
	s := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name},
		Spec: corev1.ServiceSpec{
			Type: corev1.ServiceTypeClusterIP, ClusterIP: ip, ClusterIPs: []string{ip},
			IPFamilies: []corev1.IPFamily{corev1.IPv4Protocol},
			Ports:      []corev1.ServicePort{{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP, TargetPort: intstr.FromInt32(8080), NodePort: 30080}},
		},
	}
	if local {
		s.Spec.Type = corev1.ServiceTypeNodePort
		s.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
	}
	return s
}

type ep struct{ ip, node string }

func slice(svcName, name string, port int32, eps ...ep) *discoveryv1.EndpointSlice {
	s := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "ns", Name: name, Labels: map[string]string{discoveryv1.LabelServiceName: svcName}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr(port), Protocol: ptr(corev1.ProtocolTCP)}},
	}
	for _, e := range eps {
		d := discoveryv1.Endpoint{Addresses: []string{e.ip}, Conditions: discoveryv1.EndpointConditions{Ready: ptr(true)}}
		if e.node != "" {
			d.NodeName = ptr(e.node)
		}
		s.Endpoints = append(s.Endpoints, d)
	}
	return s
}

func ptr[T any](v T) *T { return &v }

func TestMalformedObjectsAreSkippedOneByOne(t *testing.T) {
	c := New(nodeview.Options{}, nodeview.Settings{})
	c.SetService(svc("web", "198.18.128.1", false))
	c.SetSlice(slice("web", "good", 8080, ep{ip: "198.18.16.1"}, ep{ip: "198.18.16.2"}))
	c.SetSlice(slice("web", "bad-ip", 8080, ep{ip: "not-an-ip"}, ep{ip: "198.18.16.3"}))
	c.SetSlice(slice("web", "bad-port", 70000, ep{ip: "198.18.16.4"}))
	c.SetSlice(slice("web", "v6-in-v4", 8080, ep{ip: "2001:2::5"}))
	c.SetSlice(slice("web", "dup", 8080, ep{ip: "198.18.16.1"}))
	_, problems := c.Flush()
	var text []string
	for _, p := range problems {
		text = append(text, p.String())
	}
	joined := strings.Join(text, "\n")
	for _, want := range []string{"bad-ip", "bad-port", "v6-in-v4", "dup"} {
		if !strings.Contains(joined, want) {
			t.Errorf("no problem reported for slice %s; problems:\n%s", want, joined)
		}
	}
	res := c.ServiceResources("ns/web", c.Current("n1"))
	if len(res) != 1 {
		t.Fatalf("want the web resource despite bad slices, got %d", len(res))
	}
	var got []string
	for _, e := range res[0].GetServicePort().GetClusterEndpoints() {
		got = append(got, e.GetIp())
	}
	if strings.Join(got, ",") != "198.18.16.1,198.18.16.2,198.18.16.3" {
		t.Fatalf("endpoints = %v, want the three good ones", got)
	}
}

func TestNodesThatSeeAServiceAlikeShareBytes(t *testing.T) {
	c := New(nodeview.Options{}, nodeview.Settings{})
	c.SetService(svc("web", "198.18.128.1", false))
	c.SetSlice(slice("web", "web-1", 8080, ep{ip: "198.18.16.1", node: "n1"}))
	c.SetService(svc("loc", "198.18.128.2", true))
	c.SetSlice(slice("loc", "loc-1", 8080, ep{ip: "198.18.16.2", node: "n1"}))
	c.Flush()
	snap := map[string]Change{}
	for _, n := range []string{"n1", "n2", "n3"} {
		snap[n] = c.Snapshot(c.Current(n))
	}
	enc := func(n, name string) []byte {
		for i, r := range snap[n].Upserts {
			if r.Name == name {
				return snap[n].Encoded[i]
			}
		}
		t.Fatalf("%s has no %s", n, name)
		return nil
	}
	same := func(a, b []byte) bool { return &a[0] == &b[0] }
	if !same(enc("n1", "svc/v4/ns/web/http"), enc("n3", "svc/v4/ns/web/http")) {
		t.Error("a Cluster-policy Service must be encoded once and shared by every node")
	}
	if !same(enc("n2", "svc/v4/ns/loc/http"), enc("n3", "svc/v4/ns/loc/http")) {
		t.Error("nodes without local endpoints must share one encoding of an ETP Local Service")
	}
	if same(enc("n1", "svc/v4/ns/loc/http"), enc("n2", "svc/v4/ns/loc/http")) {
		t.Error("the node with the local endpoint must get its own variant")
	}
}

func TestDiffVisitsOnlyChangedServicesAndSurvivesCompaction(t *testing.T) {
	c := New(nodeview.Options{}, nodeview.Settings{})
	c.SetService(svc("a", "198.18.128.1", false))
	c.SetService(svc("b", "198.18.128.2", false))
	c.Flush()
	from := c.Current("n1")
	c.SetSlice(slice("a", "a-1", 8080, ep{ip: "198.18.16.1"}))
	c.Flush()
	c.DeleteService("ns", "b")
	c.Flush()
	c.Compact(from.Gen)
	ch := c.Diff(from, c.Current("n1"))
	if len(ch.Upserts) != 1 || ch.Upserts[0].Name != "svc/v4/ns/a/http" || len(ch.Removals) != 1 || ch.Removals[0] != "svc/v4/ns/b/http" {
		t.Fatalf("diff = %v upserts %v removals", len(ch.Upserts), ch.Removals)
	}
	c.Compact(c.Gen())
	if len(c.log) != 0 {
		t.Fatalf("compaction to the current generation must empty the log, %d left", len(c.log))
	}
	if _, ok := c.entries["ns/b"]; ok {
		t.Fatal("a deleted Service's history must go once no node needs it")
	}
}
