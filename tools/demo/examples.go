package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/yaml"

	"github.com/signalbox/signalbox/nodeagent/e2e/labenv"
	"github.com/signalbox/signalbox/tools/netlab"
)

// demoNodes: web pods on every node, shop pods on node1 and node2 only, so
// the externalTrafficPolicy Local example has a node without local pods.
// A pod's app label is its name up to the dash.
func demoNodes() []netlab.NodeConfig {
	return []netlab.NodeConfig{
		{Name: "node1", Zone: "zone-a", Pods: []netlab.PodConfig{{Name: "web-1"}, {Name: "shop-1"}}},
		{Name: "node2", Zone: "zone-a", Pods: []netlab.PodConfig{{Name: "web-2"}, {Name: "shop-2"}}},
		{Name: "node3", Zone: "zone-b", Pods: []netlab.PodConfig{{Name: "web-3"}}},
	}
}

func podLabels(p *netlab.Host) labels.Set {
	app := p.Name
	for i := len(app) - 1; i >= 0; i-- {
		if app[i] == '-' {
			app = app[:i]
			break
		}
	}
	return labels.Set{"app": app}
}

// loadExamples reads every *.yaml in dir; each holds one Service.
func loadExamples(dir string) ([]*corev1.Service, error) {
	files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	if err != nil {
		return nil, err
	}
	if len(files) == 0 {
		return nil, fmt.Errorf("no *.yaml in %s", dir)
	}
	slices.Sort(files)
	var out []*corev1.Service
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		var svc corev1.Service
		if err := yaml.UnmarshalStrict(data, &svc); err != nil {
			return nil, fmt.Errorf("%s: %w", f, err)
		}
		if svc.Kind != "Service" || svc.Name == "" {
			return nil, fmt.Errorf("%s: want one Service with a name, got kind %q", f, svc.Kind)
		}
		if svc.Namespace == "" {
			svc.Namespace = metav1.NamespaceDefault
		}
		out = append(out, &svc)
	}
	return out, nil
}

// apply creates the Service, publishes its load balancer status (no cloud
// controller runs) and writes its EndpointSlice from the lab pods its
// selector matches (no EndpointSlice controller runs either). It returns
// the Service as stored, with its ClusterIP and node ports.
func apply(ctx context.Context, e *labenv.Env, want *corev1.Service) (*corev1.Service, []*netlab.Host, error) {
	api := e.Kube.CoreV1()
	_, err := api.Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: want.Namespace}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return nil, nil, err
	}
	status := want.Status
	svc, err := api.Services(want.Namespace).Create(ctx, want, metav1.CreateOptions{})
	if err != nil {
		return nil, nil, fmt.Errorf("create service %s/%s: %w", want.Namespace, want.Name, err)
	}
	if len(status.LoadBalancer.Ingress) > 0 {
		svc.Status = status
		if svc, err = api.Services(svc.Namespace).UpdateStatus(ctx, svc, metav1.UpdateOptions{}); err != nil {
			return nil, nil, fmt.Errorf("load balancer status of %s: %w", want.Name, err)
		}
	}
	var backends []*netlab.Host
	if len(svc.Spec.Selector) > 0 {
		sel := labels.SelectorFromSet(svc.Spec.Selector)
		for _, p := range e.Lab.Pods() {
			if sel.Matches(podLabels(p)) {
				backends = append(backends, p)
			}
		}
	}
	if err := e.ApplySlice(ctx, e.Slice(svc, svc.Name+"-demo", labenv.Ready(backends...))); err != nil {
		return nil, nil, fmt.Errorf("endpoint slice of %s: %w", svc.Name, err)
	}
	return svc, backends, nil
}
