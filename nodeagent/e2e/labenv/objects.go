package labenv

import (
	"context"
	"errors"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/signalbox/signalbox/tools/netlab"
)

// No scheduler, kubelet or EndpointSlice controller runs: the environment
// writes Nodes and EndpointSlices itself, the way those components would.

// ManagedBy marks the EndpointSlices written here.
const ManagedBy = "labenv.signalbox.io"

// createNodes registers one Node per lab node, with its zone label and
// address, as a kubelet would.
func (e *Env) createNodes(ctx context.Context) error {
	for _, h := range e.Lab.Nodes() {
		n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{
			Name: h.Name,
			Labels: map[string]string{
				corev1.LabelHostname:     h.Name,
				corev1.LabelTopologyZone: h.Zone,
				corev1.LabelOSStable:     "linux",
				"signalbox.io/lab-netns": h.NetNS,
			},
		}}
		created, err := e.Kube.CoreV1().Nodes().Create(ctx, n, metav1.CreateOptions{})
		if err != nil {
			return fmt.Errorf("create node %s: %w", h.Name, err)
		}
		created.Status.Addresses = []corev1.NodeAddress{
			{Type: corev1.NodeInternalIP, Address: h.IPv4.String()},
			{Type: corev1.NodeHostName, Address: h.Name},
		}
		created.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue}}
		if _, err := e.Kube.CoreV1().Nodes().UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
			return fmt.Errorf("node %s status: %w", h.Name, err)
		}
	}
	return nil
}

// Endpoint is one lab pod as an EndpointSlice endpoint. The zero
// conditions mean ready and serving.
type Endpoint struct {
	Pod         *netlab.Host
	NotReady    bool
	NotServing  bool
	Terminating bool
	// ZoneHints become hints.forZones; nil writes no hints.
	ZoneHints []string
}

// Ready returns ready endpoints for pods.
func Ready(pods ...*netlab.Host) []Endpoint {
	eps := make([]Endpoint, len(pods))
	for i, p := range pods {
		eps[i] = Endpoint{Pod: p}
	}
	return eps
}

// Slice returns the EndpointSlice the EndpointSlice controller would write
// for svc with these endpoints: one slice port per Service port (numeric
// target ports), each endpoint with its node name and zone.
func (e *Env) Slice(svc *corev1.Service, name string, eps []Endpoint) *discoveryv1.EndpointSlice {
	s := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: svc.Namespace,
			Name:      name,
			Labels: map[string]string{
				discoveryv1.LabelServiceName: svc.Name,
				discoveryv1.LabelManagedBy:   ManagedBy,
			},
			// Feeds the agents' network programming latency metric.
			Annotations: map[string]string{
				corev1.EndpointsLastChangeTriggerTime: time.Now().UTC().Format(time.RFC3339Nano),
			},
		},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   []discoveryv1.Endpoint{},
	}
	for _, p := range svc.Spec.Ports {
		target := p.TargetPort.IntVal
		if target == 0 {
			target = p.Port
		}
		s.Ports = append(s.Ports, discoveryv1.EndpointPort{
			Name: ptr.To(p.Name), Protocol: ptr.To(p.Protocol), Port: ptr.To(target),
		})
	}
	for _, ep := range eps {
		d := discoveryv1.Endpoint{
			Addresses: []string{ep.Pod.IPv4.String()},
			Conditions: discoveryv1.EndpointConditions{
				Ready:       ptr.To(!ep.NotReady && !ep.Terminating),
				Serving:     ptr.To(!ep.NotServing),
				Terminating: ptr.To(ep.Terminating),
			},
			NodeName:  ptr.To(ep.Pod.Node),
			TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: svc.Namespace, Name: ep.Pod.Name},
		}
		if n := e.Lab.Node(ep.Pod.Node); n != nil && n.Zone != "" {
			d.Zone = ptr.To(n.Zone)
		}
		if ep.ZoneHints != nil {
			d.Hints = &discoveryv1.EndpointHints{}
			for _, z := range ep.ZoneHints {
				d.Hints.ForZones = append(d.Hints.ForZones, discoveryv1.ForZone{Name: z})
			}
		}
		s.Endpoints = append(s.Endpoints, d)
	}
	return s
}

// ApplySlice creates the slice or replaces the existing one of that name.
func (e *Env) ApplySlice(ctx context.Context, s *discoveryv1.EndpointSlice) error {
	api := e.Kube.DiscoveryV1().EndpointSlices(s.Namespace)
	_, err := api.Create(ctx, s, metav1.CreateOptions{})
	if !apierrors.IsAlreadyExists(err) {
		return err
	}
	cur, err := api.Get(ctx, s.Name, metav1.GetOptions{})
	if err != nil {
		return err
	}
	s.ResourceVersion = cur.ResourceVersion
	_, err = api.Update(ctx, s, metav1.UpdateOptions{})
	return err
}

// CreateNamespace creates a uniquely named namespace. Namespaces never
// finish deleting without kube-controller-manager, so fresh names keep
// users of one apiserver apart.
func (e *Env) CreateNamespace(ctx context.Context, prefix string) (string, error) {
	ns, err := e.Kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{
		ObjectMeta: metav1.ObjectMeta{GenerateName: prefix + "-"},
	}, metav1.CreateOptions{})
	if err != nil {
		return "", err
	}
	return ns.Name, nil
}

// DeleteServices deletes every Service and EndpointSlice in namespace ns.
// Without the namespace and garbage collection controllers nothing else
// would, and the control plane would keep serving them.
func (e *Env) DeleteServices(ctx context.Context, ns string) error {
	var errs []error
	svcs, err := e.Kube.CoreV1().Services(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	for _, s := range svcs.Items {
		err := e.Kube.CoreV1().Services(ns).Delete(ctx, s.Name, metav1.DeleteOptions{})
		if err != nil && !apierrors.IsNotFound(err) {
			errs = append(errs, err)
		}
	}
	err = e.Kube.DiscoveryV1().EndpointSlices(ns).DeleteCollection(ctx, metav1.DeleteOptions{}, metav1.ListOptions{})
	return errors.Join(append(errs, err)...)
}
