// Package watch feeds the hub from one set of shared informers: one watch
// per resource type per control-plane process, however many agents there
// are.
package watch

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/signalbox/signalbox/controlplane/hub"
	"github.com/signalbox/signalbox/controlplane/nodeview"
)

// Start runs the informers until ctx ends and waits for their first list,
// so the hub's first flush holds the whole cluster rather than a partial
// table that would make agents remove rules.
func Start(ctx context.Context, client kubernetes.Interface, h *hub.Hub) error {
	// No periodic resync: the cache holds the objects, and a resync would
	// rebuild every Service for nothing.
	f := informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithTransform(trim))
	svc := f.Core().V1().Services().Informer()
	eps := f.Discovery().V1().EndpointSlices().Informer()
	nodes := f.Core().V1().Nodes().Informer()

	on := func(fn func(obj any)) func(obj any) {
		return func(obj any) { h.Do(func() { fn(obj); h.MarkDirty() }) }
	}
	c := h.Cache()
	var regs []cache.ResourceEventHandlerRegistration
	add := func(inf cache.SharedIndexInformer, hs cache.ResourceEventHandlerFuncs) error {
		r, err := inf.AddEventHandler(hs)
		regs = append(regs, r)
		return err
	}
	if err := add(svc, handlers(
		on(func(o any) { c.SetService(o.(*corev1.Service)) }),
		on(func(o any) {
			s := deleted(o).(*corev1.Service)
			c.DeleteService(s.Namespace, s.Name)
		}))); err != nil {
		return err
	}
	if err := add(eps, handlers(
		on(func(o any) { c.SetSlice(o.(*discoveryv1.EndpointSlice)) }),
		on(func(o any) {
			s := deleted(o).(*discoveryv1.EndpointSlice)
			c.DeleteSlice(s.Namespace, s.Name)
		}))); err != nil {
		return err
	}
	if err := add(nodes, handlers(
		on(func(o any) { c.SetNode(NodeView(o.(*corev1.Node))) }),
		on(func(o any) { c.DeleteNode(deleted(o).(*corev1.Node).Name) }))); err != nil {
		return err
	}
	f.Start(ctx.Done())
	synced := f.WaitForCacheSync(ctx.Done())
	for typ, ok := range synced {
		if !ok {
			return fmt.Errorf("informer for %v did not sync; check the apiserver address and RBAC (list/watch services, endpointslices, nodes)", typ)
		}
	}
	// The stores being synced is not enough: handlers run asynchronously,
	// and the first flush must follow every initial event.
	if !cache.WaitForCacheSync(ctx.Done(), regs[0].HasSynced, regs[1].HasSynced, regs[2].HasSynced) {
		return ctx.Err()
	}
	// Flush the initial list at once instead of after the debounce.
	return h.Query(ctx, h.Flush)
}

// NodeView is what tables need of a Node.
func NodeView(n *corev1.Node) nodeview.Node {
	return nodeview.Node{Name: n.Name, Zone: n.Labels[corev1.LabelTopologyZone]}
}

func handlers(set, del func(any)) cache.ResourceEventHandlerFuncs {
	return cache.ResourceEventHandlerFuncs{
		AddFunc: set,
		UpdateFunc: func(oldObj, newObj any) {
			if oldObj.(metav1.Object).GetResourceVersion() == newObj.(metav1.Object).GetResourceVersion() {
				return
			}
			set(newObj)
		},
		DeleteFunc: del,
	}
}

func deleted(obj any) any {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		return t.Obj
	}
	return obj
}

// keepAnnotations are the only annotations tables use.
var keepAnnotations = map[string]bool{corev1.EndpointsLastChangeTriggerTime: true}

// trim drops what tables never read, to bound memory at 100,000 endpoints.
func trim(obj any) (any, error) {
	m, ok := obj.(metav1.Object)
	if !ok {
		return obj, nil
	}
	m.SetManagedFields(nil)
	if a := m.GetAnnotations(); len(a) > 0 {
		kept := map[string]string{}
		for k, v := range a {
			if keepAnnotations[k] {
				kept[k] = v
			}
		}
		m.SetAnnotations(kept)
	}
	if n, ok := obj.(*corev1.Node); ok {
		// Only the name and labels matter; status (images, conditions) is
		// the bulk of a Node.
		n.Status = corev1.NodeStatus{}
		n.Spec = corev1.NodeSpec{PodCIDRs: n.Spec.PodCIDRs}
	}
	return obj, nil
}
