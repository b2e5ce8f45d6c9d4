package nodeview

import (
	"cmp"
	"net/netip"
	"slices"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
)

// endpoint is one parsed endpoint address for one port.
type endpoint struct {
	addr netip.Addr
	ip   string // addr in canonical form, kept to render cheaply
	port int32
	// node is the endpoint's nodeName ("" when unknown: never local).
	node                        string
	ready, serving, terminating bool
	// zoneHints and nodeHints are sorted and nil when the endpoint has none.
	zoneHints, nodeHints []string
	// from names the slice it came from, for duplicate reports.
	from string
}

// usable is upstream's test for "can serve at all": ready, or the
// serving-and-terminating fallback.
func (e *endpoint) usable() bool { return e.ready || e.fallback() }

func (e *endpoint) fallback() bool { return e.serving && e.terminating }

// portKey is upstream's per-Service endpoint key: EndpointSlice ports are
// matched to Service ports by name and protocol. The EndpointSlice
// controller has already resolved the Service's targetPort into the slice
// port of the same name, so named target ports arrive resolved per slice.
type portKey struct {
	name     string
	protocol corev1.Protocol
}

// familyData holds one IP family of a Service while it is built.
type familyData struct {
	index int
	ports []*portView
	// byPort holds every slice port's endpoints, deduplicated by IP:port,
	// including ports the Service does not have: upstream's health check
	// counts those too.
	byPort map[portKey]map[netip.AddrPort]*endpoint
	// localReady is what upstream's health check server reports per node:
	// distinct IPs of ready endpoints on the node, over all ports.
	localReady map[string]int32
}

func newFamilyData(index int) *familyData {
	return &familyData{index: index, byPort: map[portKey]map[netip.AddrPort]*endpoint{}}
}

// parseSlices adds the endpoints of every slice to its family.
func (b *builder) parseSlices(fams []*familyData, in []*discoveryv1.EndpointSlice, opts Options) {
	byType := map[discoveryv1.AddressType]*familyData{}
	for _, f := range fams {
		byType[families[f.index].addressType] = f
	}
	// Sorting makes "first one wins" among duplicates deterministic.
	sorted := slices.Clone(in)
	sorted = slices.DeleteFunc(sorted, func(s *discoveryv1.EndpointSlice) bool { return s == nil })
	if len(sorted) < len(in) {
		b.problem("EndpointSlice <nil>", "nil EndpointSlice; skipped")
	}
	slices.SortFunc(sorted, func(x, y *discoveryv1.EndpointSlice) int {
		return cmp.Or(cmp.Compare(x.Namespace, y.Namespace), cmp.Compare(x.Name, y.Name))
	})
	for _, s := range sorted {
		obj := "EndpointSlice " + s.Namespace + "/" + s.Name
		if !sliceSelected(s.Labels, opts) {
			continue
		}
		if owner := s.Labels[discoveryv1.LabelServiceName]; s.Namespace != b.svc.Namespace || owner != b.svc.Name {
			b.problem(obj, "labelled for Service %s/%s, not %s/%s; skipped", s.Namespace, owner, b.svc.Namespace, b.svc.Name)
			continue
		}
		switch s.AddressType {
		case discoveryv1.AddressTypeIPv4, discoveryv1.AddressTypeIPv6:
		case discoveryv1.AddressTypeFQDN:
			continue // kube-proxy never uses FQDN slices
		default:
			b.problem(obj, "unknown addressType %q; skipped", s.AddressType)
			continue
		}
		f := byType[s.AddressType]
		if f == nil {
			continue // the Service does not have this family
		}
		b.addSlice(f, s, obj)
	}
	for _, f := range fams {
		f.countLocalReady()
	}
}

// sliceSelected mirrors the label selector of upstream's informers, which
// never deliver slices labelled headless or for another proxy (slices carry
// their Service's labels). A named proxy also takes unlabelled slices, so
// slices written by hand still count.
func sliceSelected(labels map[string]string, opts Options) bool {
	if _, ok := labels[corev1.IsHeadlessService]; ok {
		return false
	}
	v, ok := labels[labelServiceProxyName]
	return !ok || (opts.ProxyName != "" && v == opts.ProxyName)
}

type slicePort struct {
	key  portKey
	port int32
}

func (b *builder) addSlice(f *familyData, s *discoveryv1.EndpointSlice, obj string) {
	var ports []slicePort
	for i, p := range s.Ports {
		switch {
		case p.Name == nil:
			b.problem(obj, "ports[%d] has no name; skipped", i)
		case p.Port == nil || *p.Port == 0:
			b.problem(obj, "ports[%d] %q has no port number; skipped", i, *p.Name)
		case *p.Port < 0 || *p.Port > 65535:
			b.problem(obj, "ports[%d] %q: port %d out of range; skipped", i, *p.Name, *p.Port)
		default:
			proto := corev1.ProtocolTCP // the apiserver's default
			if p.Protocol != nil {
				proto = *p.Protocol
			}
			ports = append(ports, slicePort{portKey{*p.Name, proto}, *p.Port})
		}
	}
	for i := range s.Endpoints {
		ep, ok := b.parseEndpoint(f, &s.Endpoints[i], i, obj)
		if !ok {
			continue
		}
		for _, sp := range ports {
			e := ep
			e.port = sp.port
			b.addEndpoint(f, sp.key, &e)
		}
	}
}

func (b *builder) parseEndpoint(f *familyData, in *discoveryv1.Endpoint, i int, obj string) (endpoint, bool) {
	if len(in.Addresses) == 0 {
		b.problem(obj, "endpoints[%d] has no address; skipped", i)
		return endpoint{}, false
	}
	// Upstream uses the first address only; the API allows just one.
	raw := in.Addresses[0]
	a, ok := parseIP(raw)
	if !ok {
		b.problem(obj, "endpoints[%d] address %q is not an IP; skipped", i, raw)
		return endpoint{}, false
	}
	if familyIndex(a) != f.index {
		b.problem(obj, "endpoints[%d] address %q is not %s; skipped", i, raw, families[f.index].addressType)
		return endpoint{}, false
	}
	c := in.Conditions
	e := endpoint{
		addr:        a,
		ip:          a.String(),
		ready:       c.Ready == nil || *c.Ready,
		serving:     c.Serving == nil || *c.Serving,
		terminating: c.Terminating != nil && *c.Terminating,
		from:        obj,
	}
	if in.NodeName != nil {
		e.node = *in.NodeName
	}
	if h := in.Hints; h != nil {
		for _, z := range h.ForZones {
			e.zoneHints = append(e.zoneHints, z.Name)
		}
		for _, n := range h.ForNodes {
			e.nodeHints = append(e.nodeHints, n.Name)
		}
		slices.Sort(e.zoneHints)
		e.zoneHints = slices.Compact(e.zoneHints)
		slices.Sort(e.nodeHints)
		e.nodeHints = slices.Compact(e.nodeHints)
	}
	return e, true
}

// addEndpoint deduplicates by IP:port. Upstream keeps a non-terminating
// endpoint over a terminating one (a pod IP reused before the old pod is
// gone); otherwise its choice depends on map order, so we keep the first
// in slice-name order.
func (b *builder) addEndpoint(f *familyData, key portKey, e *endpoint) {
	set := f.byPort[key]
	if set == nil {
		set = map[netip.AddrPort]*endpoint{}
		f.byPort[key] = set
	}
	ap := netip.AddrPortFrom(e.addr, uint16(e.port))
	old, dup := set[ap]
	if !dup {
		set[ap] = e
		return
	}
	b.problem(e.from, "duplicate endpoint %s for port %q (also in %s); one kept", ap, key.name, old.from)
	if old.terminating && !e.terminating {
		set[ap] = e
	}
}

func (f *familyData) countLocalReady() {
	ips := map[string]map[netip.Addr]bool{}
	for _, set := range f.byPort {
		for _, e := range set {
			if !e.ready || e.node == "" {
				continue
			}
			if ips[e.node] == nil {
				ips[e.node] = map[netip.Addr]bool{}
			}
			ips[e.node][e.addr] = true
		}
	}
	f.localReady = make(map[string]int32, len(ips))
	for node, set := range ips {
		f.localReady[node] = int32(len(set))
	}
}

// sortedEndpoints returns a port's endpoints ordered by IP, then port.
func (f *familyData) sortedEndpoints(key portKey) []endpoint {
	set := f.byPort[key]
	out := make([]endpoint, 0, len(set))
	for _, e := range set {
		out = append(out, *e)
	}
	slices.SortFunc(out, func(x, y endpoint) int {
		return cmp.Or(x.addr.Compare(y.addr), cmp.Compare(x.port, y.port))
	})
	return out
}

// addLocalKeys marks nodes hosting usable endpoints (on any port, since the
// health check count spans them all) as needing their own variant.
func (f *familyData) addLocalKeys(nodeKeys map[string]bool) {
	for _, set := range f.byPort {
		for _, e := range set {
			if e.node != "" && e.usable() {
				nodeKeys[e.node] = true
			}
		}
	}
}
