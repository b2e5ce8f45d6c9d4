// Package nodeview is the pure core of the control plane: it turns one
// Service and its EndpointSlices into the resources a given node needs,
// deciding every policy question the way upstream kube-proxy 1.37 does
// (traffic policies, topology hints, terminating fallback, no-endpoint
// actions). It does no I/O, keeps no clock and starts no goroutines; bad
// input is reported as Problems, never as a panic.
//
// The work is split so that the expensive part is done once per Service
// change (Build) and the per-node part is cheap and shareable: nodes with
// equal VariantKey get byte-identical resources, so a cache computes and
// marshals them once.
package nodeview

import (
	"cmp"
	"slices"
	"strings"
	"unicode/utf8"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	signalboxv1 "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// Options configure how Services are selected.
type Options struct {
	// ProxyName is this proxy's value for the
	// service.kubernetes.io/service-proxy-name label. Empty means the default
	// proxy, which skips every Service carrying that label; a non-empty name
	// takes only the Services labelled with it.
	ProxyName string
}

// Node is what the view needs to know about the receiving node.
type Node struct {
	Name string
	// Zone is the node's topology.kubernetes.io/zone label.
	Zone string
}

// Problem is one bad object, endpoint or port that was skipped. The rest of
// the Service is still served.
type Problem struct {
	// Object names the offending object, e.g. "EndpointSlice default/web-abc".
	Object string
	Reason string
}

func (p Problem) String() string { return p.Object + ": " + p.Reason }

// Settings are the node-wide settings carried in the node/settings resource.
type Settings struct {
	ClusterCIDRs      []string
	MasqueradeAll     bool
	NodePortAddresses []string
}

// NodeSettingsName is the resource name of a node's settings.
const NodeSettingsName = "node/settings"

// Family tags used in resource names.
const (
	FamilyV4 = "v4"
	FamilyV6 = "v6"
)

// Variant key prefixes: a node key can never equal a zone key or the
// shared empty key, whatever the names.
const (
	nodeKeyPrefix = "node/"
	zoneKeyPrefix = "zone/"
)

// Service is one parsed Service with its endpoints, ready to be rendered for
// any node. It is immutable after Build and safe for concurrent use.
type Service struct {
	namespace, name string
	// ports holds one entry per Service port per IP family, sorted by
	// resource name.
	ports []*portView
	// nodeKeys are the nodes whose resources may differ from those of
	// other nodes in their zone: nodes hosting usable endpoints when a
	// Local policy is in effect, and nodes named by usable node hints.
	nodeKeys map[string]bool
	// zoneKeys are the zones named by usable zone hints.
	zoneKeys map[string]bool
}

// Build parses a Service and its EndpointSlices. It returns nil (and no
// Problem) when this proxy does not handle the Service at all, and nil with
// a Problem when the Service cannot be named in a resource. The slices
// must be those labelled kubernetes.io/service-name with the Service's name
// in its namespace; others are reported and ignored.
func Build(svc *corev1.Service, endpointSlices []*discoveryv1.EndpointSlice, opts Options) (*Service, []Problem) {
	if svc == nil || !proxied(svc, opts) {
		return nil, nil
	}
	b := &builder{svc: svc, obj: "Service " + svc.Namespace + "/" + svc.Name}
	// Protobuf strings must be UTF-8; the apiserver guarantees it, other
	// sources may not, and a resource that fails to marshal has no hash.
	if !utf8.ValidString(svc.Namespace) || !utf8.ValidString(svc.Name) {
		b.problem(strings.ToValidUTF8(b.obj, "?"), "name is not valid UTF-8; Service skipped")
		return nil, b.problems
	}
	fams := b.parseService()
	b.parseSlices(fams, endpointSlices, opts)

	s := &Service{
		namespace: svc.Namespace,
		name:      svc.Name,
		nodeKeys:  map[string]bool{},
		zoneKeys:  map[string]bool{},
	}
	for _, f := range fams {
		for _, p := range f.ports {
			p.endpoints = f.sortedEndpoints(portKey{p.portName, p.k8sProtocol})
			p.localReady = f.localReady
			p.addTopologyKeys(s.nodeKeys, s.zoneKeys)
			s.ports = append(s.ports, p)
		}
		if b.localMatters {
			f.addLocalKeys(s.nodeKeys)
		}
	}
	slices.SortFunc(s.ports, func(x, y *portView) int { return cmp.Compare(x.resourceName, y.resourceName) })
	return s, b.problems
}

// Key is "namespace/name".
func (s *Service) Key() string {
	if s == nil {
		return ""
	}
	return s.namespace + "/" + s.name
}

// VariantKey groups nodes: nodes with equal keys get identical resources.
// Nodes of a Service without Local policies or usable topology hints all
// share the empty key.
func (s *Service) VariantKey(n Node) string {
	if s == nil {
		return ""
	}
	if s.nodeKeys[n.Name] {
		return nodeKeyPrefix + n.Name
	}
	if s.zoneKeys[n.Zone] {
		return zoneKeyPrefix + n.Zone
	}
	return ""
}

// Resources returns the node's resources for this Service, sorted by name
// and hashed. Each call builds fresh resources that share nothing with
// the Service or with earlier calls.
func (s *Service) Resources(n Node) []*signalboxv1.Resource {
	if s == nil {
		return nil
	}
	out := make([]*signalboxv1.Resource, 0, len(s.ports))
	for _, p := range s.ports {
		out = append(out, signalboxv1.NewServicePortResource(p.resourceName, p.render(n)))
	}
	return out
}

// NodeSettings builds the node/settings resource.
func NodeSettings(n Node, set Settings) *signalboxv1.Resource {
	return signalboxv1.NewNodeSettingsResource(NodeSettingsName, &signalboxv1.NodeSettings{
		ClusterCidrs:      slices.Clone(set.ClusterCIDRs),
		MasqueradeAll:     set.MasqueradeAll,
		NodePortAddresses: slices.Clone(set.NodePortAddresses),
		NodeName:          n.Name,
		Zone:              n.Zone,
	})
}

// ResourceName names a Service port resource:
// "svc/<v4|v6>/<namespace>/<name>/<portName>", with "_" for an empty port
// name ("_" is not a valid port name, so it cannot collide). family is
// "v4" or "v6"; the Kubernetes spellings "IPv4" and "IPv6" are accepted too.
func ResourceName(family, namespace, name, portName string) string {
	switch family {
	case string(corev1.IPv4Protocol):
		family = FamilyV4
	case string(corev1.IPv6Protocol):
		family = FamilyV6
	}
	if portName == "" {
		portName = "_"
	}
	return "svc/" + family + "/" + namespace + "/" + name + "/" + portName
}

// labelServiceProxyName is upstream's well-known label (pkg/proxy/apis).
const labelServiceProxyName = "service.kubernetes.io/service-proxy-name"

// proxied applies upstream's Service selection: kube-proxy's informers drop
// Services carrying the service-proxy-name label (unless, for us, it names
// this proxy) or the headless label, and its change tracker skips
// ExternalName and clusterIP-less Services.
func proxied(svc *corev1.Service, opts Options) bool {
	v, named := svc.Labels[labelServiceProxyName]
	if opts.ProxyName == "" && named || opts.ProxyName != "" && (!named || v != opts.ProxyName) {
		return false
	}
	if _, ok := svc.Labels[corev1.IsHeadlessService]; ok {
		return false
	}
	if svc.Spec.Type == corev1.ServiceTypeExternalName {
		return false
	}
	return svc.Spec.ClusterIP != "" && svc.Spec.ClusterIP != corev1.ClusterIPNone
}
