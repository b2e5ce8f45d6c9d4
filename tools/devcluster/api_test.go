package devcluster_test

import (
	"context"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/signalbox/signalbox/tools/devcluster"
	"github.com/signalbox/signalbox/tools/devcluster/devclustertest"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"
)

func TestMain(m *testing.M) { devclustertest.Main(m) }

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// newNamespace creates a uniquely named namespace: the cluster is shared by
// the whole test binary and namespaces never finish deleting without
// kube-controller-manager.
func newNamespace(ctx context.Context, t *testing.T, cs kubernetes.Interface) string {
	t.Helper()
	ns, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{
		ObjectMeta: metav1.ObjectMeta{GenerateName: "devcluster-test-"},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create namespace: %v", err)
	}
	return ns.Name
}

func TestServiceAndEndpointSliceRoundTrip(t *testing.T) {
	c := devclustertest.Get(t)
	cs := c.Client()
	ctx := testContext(t)
	ns := newNamespace(ctx, t, cs)

	svc, err := cs.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: corev1.ServiceSpec{
			Type:           corev1.ServiceTypeClusterIP,
			IPFamilyPolicy: ptr.To(corev1.IPFamilyPolicyRequireDualStack),
			Selector:       map[string]string{"app": "web"},
			Ports: []corev1.ServicePort{{
				Name: "http", Protocol: corev1.ProtocolTCP, Port: 80, TargetPort: intstr.FromInt32(8080),
			}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create service: %v", err)
	}
	// The apiserver allocates one ClusterIP per family from our ranges.
	if len(svc.Spec.ClusterIPs) != 2 {
		t.Fatalf("ClusterIPs = %v, want one IPv4 and one IPv6", svc.Spec.ClusterIPs)
	}
	for i, s := range svc.Spec.ClusterIPs {
		ip, err := netip.ParseAddr(s)
		if err != nil {
			t.Fatalf("ClusterIPs[%d] = %q: %v", i, s, err)
		}
		if !c.ServiceCIDRs[i].Contains(ip) {
			t.Errorf("ClusterIPs[%d] = %s, not in %s", i, ip, c.ServiceCIDRs[i])
		}
	}
	if got := svc.Spec.IPFamilies; !slices.Equal(got, []corev1.IPFamily{corev1.IPv4Protocol, corev1.IPv6Protocol}) {
		t.Errorf("IPFamilies = %v", got)
	}

	_, err = cs.DiscoveryV1().EndpointSlices(ns).Create(ctx, &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Name: "web-abc",
			Labels: map[string]string{
				discoveryv1.LabelServiceName: "web",
				discoveryv1.LabelManagedBy:   "signalbox-tests",
			},
		},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints: []discoveryv1.Endpoint{
			{
				Addresses:  []string{"198.18.1.10"},
				Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true), Serving: ptr.To(true), Terminating: ptr.To(false)},
				NodeName:   ptr.To("node-a"),
				Zone:       ptr.To("zone-1"),
				Hints:      &discoveryv1.EndpointHints{ForZones: []discoveryv1.ForZone{{Name: "zone-1"}}},
			},
			{
				Addresses:  []string{"198.18.1.11"},
				Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(false), Serving: ptr.To(true), Terminating: ptr.To(true)},
				NodeName:   ptr.To("node-b"),
			},
		},
		Ports: []discoveryv1.EndpointPort{{Name: ptr.To("http"), Protocol: ptr.To(corev1.ProtocolTCP), Port: ptr.To[int32](8080)}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create endpointslice: %v", err)
	}

	gotSvc, err := cs.CoreV1().Services(ns).Get(ctx, "web", metav1.GetOptions{})
	if err != nil {
		t.Fatalf("get service: %v", err)
	}
	if !slices.Equal(gotSvc.Spec.ClusterIPs, svc.Spec.ClusterIPs) || gotSvc.Spec.Ports[0].TargetPort.IntVal != 8080 || gotSvc.Spec.Ports[0].Port != 80 {
		t.Errorf("service read back differs: %+v", gotSvc.Spec)
	}

	// Read the slice the way the control plane will: by service label.
	list, err := cs.DiscoveryV1().EndpointSlices(ns).List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=web"})
	if err != nil {
		t.Fatalf("list endpointslices: %v", err)
	}
	if len(list.Items) != 1 {
		t.Fatalf("got %d slices, want 1", len(list.Items))
	}
	es := list.Items[0]
	if es.AddressType != discoveryv1.AddressTypeIPv4 || len(es.Endpoints) != 2 || len(es.Ports) != 1 {
		t.Fatalf("slice read back differs: %+v", es)
	}
	e0, e1 := es.Endpoints[0], es.Endpoints[1]
	if e0.Addresses[0] != "198.18.1.10" || !*e0.Conditions.Ready || *e0.NodeName != "node-a" || *e0.Zone != "zone-1" || e0.Hints.ForZones[0].Name != "zone-1" {
		t.Errorf("endpoint 0 = %+v", e0)
	}
	if e1.Addresses[0] != "198.18.1.11" || *e1.Conditions.Ready || !*e1.Conditions.Serving || !*e1.Conditions.Terminating {
		t.Errorf("endpoint 1 = %+v", e1)
	}
	if *es.Ports[0].Name != "http" || *es.Ports[0].Port != 8080 || *es.Ports[0].Protocol != corev1.ProtocolTCP {
		t.Errorf("port = %+v", es.Ports[0])
	}

	// The apiserver validates slices; a bad one must be refused, or the
	// control plane's tests against it would prove less than they claim.
	bad := es.DeepCopy()
	bad.ObjectMeta = metav1.ObjectMeta{Name: "web-bad", Labels: es.Labels}
	bad.Endpoints[0].Addresses = []string{"2001:2::1"}
	if _, err := cs.DiscoveryV1().EndpointSlices(ns).Create(ctx, bad, metav1.CreateOptions{}); err == nil {
		t.Error("an IPv6 address in an IPv4 slice was accepted")
	}
}

func TestTokenRequestAndReview(t *testing.T) {
	c := devclustertest.Get(t)
	cs := c.Client()
	ctx := testContext(t)
	ns := newNamespace(ctx, t, cs)

	if _, err := cs.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{
		ObjectMeta: metav1.ObjectMeta{Name: "agent"},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create service account: %v", err)
	}
	tr, err := cs.CoreV1().ServiceAccounts(ns).CreateToken(ctx, "agent", &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{
			Audiences:         []string{devcluster.ServiceAccountIssuer},
			ExpirationSeconds: ptr.To[int64](600),
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("TokenRequest: %v", err)
	}
	if tr.Status.Token == "" {
		t.Fatal("TokenRequest returned an empty token")
	}

	review := func(token string) authenticationv1.TokenReviewStatus {
		t.Helper()
		r, err := cs.AuthenticationV1().TokenReviews().Create(ctx, &authenticationv1.TokenReview{
			Spec: authenticationv1.TokenReviewSpec{Token: token},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("TokenReview: %v", err)
		}
		return r.Status
	}
	st := review(tr.Status.Token)
	if !st.Authenticated {
		t.Fatalf("token not authenticated: %q", st.Error)
	}
	if want := "system:serviceaccount:" + ns + ":agent"; st.User.Username != want {
		t.Errorf("username = %q, want %q", st.User.Username, want)
	}
	if !slices.Contains(st.User.Groups, "system:serviceaccounts:"+ns) {
		t.Errorf("groups = %v, want system:serviceaccounts:%s", st.User.Groups, ns)
	}
	if !slices.Contains(st.Audiences, devcluster.ServiceAccountIssuer) {
		t.Errorf("audiences = %v", st.Audiences)
	}

	// The same check must be able to say no.
	if st := review(tr.Status.Token[:len(tr.Status.Token)-4] + "AAAA"); st.Authenticated {
		t.Errorf("a token with a forged signature was authenticated as %q", st.User.Username)
	}
	if err := cs.CoreV1().ServiceAccounts(ns).Delete(ctx, "agent", metav1.DeleteOptions{}); err != nil {
		t.Fatalf("delete service account: %v", err)
	}
	// The apiserver caches successful token authentications for 10s, so
	// the deletion takes effect after that, not at once.
	deadline := time.Now().Add(30 * time.Second)
	for review(tr.Status.Token).Authenticated {
		if time.Now().After(deadline) {
			t.Fatal("token of a deleted service account still authenticates after 30s")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Agents will present pod-bound projected tokens; the control plane reads
// the node from the token's extra info. Check this apiserver provides it.
func TestPodBoundTokenCarriesNodeName(t *testing.T) {
	c := devclustertest.Get(t)
	cs := c.Client()
	ctx := testContext(t)
	ns := newNamespace(ctx, t, cs)

	node, err := cs.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{GenerateName: "node-"}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create node: %v", err)
	}
	if _, err := cs.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "agent"}}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create service account: %v", err)
	}
	pod, err := cs.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "agent-1"},
		Spec: corev1.PodSpec{
			ServiceAccountName:           "agent",
			AutomountServiceAccountToken: ptr.To(false),
			NodeName:                     node.Name,
			Containers:                   []corev1.Container{{Name: "agent", Image: "signalbox/agent:dev"}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create pod: %v", err)
	}
	tr, err := cs.CoreV1().ServiceAccounts(ns).CreateToken(ctx, "agent", &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{
			Audiences:      []string{devcluster.ServiceAccountIssuer},
			BoundObjectRef: &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("TokenRequest bound to pod: %v", err)
	}
	r, err := cs.AuthenticationV1().TokenReviews().Create(ctx, &authenticationv1.TokenReview{
		Spec: authenticationv1.TokenReviewSpec{Token: tr.Status.Token},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("TokenReview: %v", err)
	}
	if !r.Status.Authenticated {
		t.Fatalf("pod-bound token not authenticated: %q", r.Status.Error)
	}
	if got := r.Status.User.Extra["authentication.kubernetes.io/node-name"]; !slices.Equal(got, authenticationv1.ExtraValue{node.Name}) {
		t.Errorf("node-name extra = %v, want [%s] (all extra: %v)", got, node.Name, r.Status.User.Extra)
	}
	if got := r.Status.User.Extra["authentication.kubernetes.io/pod-name"]; !slices.Equal(got, authenticationv1.ExtraValue{pod.Name}) {
		t.Errorf("pod-name extra = %v, want [%s]", got, pod.Name)
	}
}
