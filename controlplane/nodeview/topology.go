package nodeview

import (
	"slices"

	corev1 "k8s.io/api/core/v1"

	signalboxv1 "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// portView is one Service port in one IP family: everything that does not
// depend on the node, parsed once by Build.
type portView struct {
	resourceName              string
	namespace, name, portName string
	family                    signalboxv1.IPFamily
	protocol                  signalboxv1.Protocol
	k8sProtocol               corev1.Protocol
	clusterIP                 string
	port, nodePort            int32
	externalIPs               []string
	ingress                   []lbIngress
	sourceRanges              []string
	affinity                  int32
	hcNodePort                int32

	itpLocal bool
	// etpLocal is externalTrafficPolicy Local in effect for this port: set
	// on the Service and the port is externally accessible.
	etpLocal bool
	// extAccessible: the port has a NodePort, externalIPs or VIP-mode load
	// balancer IPs in this family (upstream's ExternallyAccessible).
	extAccessible bool
	// localMatters marks endpoints' locality in the output; only set when
	// the Service has a Local policy, so other Services stay shared.
	localMatters bool

	endpoints  []endpoint // sorted by IP, then port
	localReady map[string]int32
}

// usesCluster and usesLocal are upstream's UsesClusterEndpoints and
// UsesLocalEndpoints: external traffic needs Cluster endpoints even under
// externalTrafficPolicy Local, for short-circuiting traffic from pods.
func (p *portView) usesCluster() bool { return !p.itpLocal || p.extAccessible }
func (p *portView) usesLocal() bool   { return p.itpLocal || p.etpLocal }

type topologyMode int

const (
	topologyNone topologyMode = iota
	topologySameNode
	topologySameZone
)

// topologyMode follows upstream's topologyModeFromHints: node hints win when
// every ready endpoint has one and one names this node; else zone hints, on
// the same terms for the node's zone; else none. Hints that do not cover
// every ready endpoint are ignored rather than half-applied.
func (p *portView) topologyMode(n Node) topologyMode {
	anyReady := false
	allNode, forNode := true, false
	allZone, forZone := true, false
	for i := range p.endpoints {
		e := &p.endpoints[i]
		if !e.ready {
			continue
		}
		anyReady = true
		if len(e.nodeHints) == 0 {
			allNode = false
		} else if slices.Contains(e.nodeHints, n.Name) {
			forNode = true
		}
		if len(e.zoneHints) == 0 {
			allZone = false
		} else if slices.Contains(e.zoneHints, n.Zone) {
			forZone = true
		}
	}
	switch {
	case !anyReady:
		return topologyNone
	case allNode && forNode:
		return topologySameNode
	case allZone && forZone:
		return topologySameZone
	}
	return topologyNone
}

func (m topologyMode) allows(e *endpoint, n Node) bool {
	switch m {
	case topologySameNode:
		return slices.Contains(e.nodeHints, n.Name)
	case topologySameZone:
		return slices.Contains(e.zoneHints, n.Zone)
	}
	return true
}

// addTopologyKeys records the nodes and zones whose topology mode can
// differ from the default: those named by hints that cover every ready
// endpoint. Any other node ends in mode none, whoever it is.
func (p *portView) addTopologyKeys(nodeKeys, zoneKeys map[string]bool) {
	if !p.usesCluster() {
		return
	}
	allNode, allZone, anyReady := true, true, false
	for i := range p.endpoints {
		e := &p.endpoints[i]
		if e.ready {
			anyReady = true
			allNode = allNode && len(e.nodeHints) > 0
			allZone = allZone && len(e.zoneHints) > 0
		}
	}
	if !anyReady {
		return
	}
	for i := range p.endpoints {
		e := &p.endpoints[i]
		if !e.ready {
			continue
		}
		if allNode {
			for _, h := range e.nodeHints {
				nodeKeys[h] = true
			}
		}
		if allZone {
			for _, h := range e.zoneHints {
				zoneKeys[h] = true
			}
		}
	}
}

// pick is an endpoint chosen for the node; fallback marks the
// serving-and-terminating fallback.
type pick struct {
	e        *endpoint
	fallback bool
}

func isLocal(e *endpoint, n Node) bool { return n.Name != "" && e.node == n.Name }

// categorize follows upstream's CategorizeEndpoints. It returns the
// endpoints for Cluster policy (topology-filtered ready ones, else every
// serving-and-terminating one) and for Local policy (the node's ready ones,
// else its serving-and-terminating ones), each only when the port uses that
// policy, and whether the Service has a usable endpoint anywhere.
func (p *portView) categorize(n Node) (cluster, local []pick, hasAny bool) {
	if p.usesCluster() {
		mode := p.topologyMode(n)
		for i := range p.endpoints {
			if e := &p.endpoints[i]; e.ready && mode.allows(e, n) {
				cluster = append(cluster, pick{e: e})
			}
		}
		// Topology was only applied if it left a ready endpoint, so an
		// empty list means nothing is ready anywhere.
		if len(cluster) == 0 {
			for i := range p.endpoints {
				if e := &p.endpoints[i]; e.fallback() {
					cluster = append(cluster, pick{e: e, fallback: true})
				}
			}
		}
		hasAny = len(cluster) > 0
	}
	if !p.usesLocal() {
		return cluster, nil, hasAny
	}
	for i := range p.endpoints {
		if e := &p.endpoints[i]; e.ready && isLocal(e, n) {
			local = append(local, pick{e: e})
		}
	}
	if len(local) == 0 {
		for i := range p.endpoints {
			if e := &p.endpoints[i]; e.fallback() && isLocal(e, n) {
				local = append(local, pick{e: e, fallback: true})
			}
		}
	}
	if !hasAny {
		hasAny = slices.ContainsFunc(p.endpoints, func(e endpoint) bool { return e.usable() })
	}
	return cluster, local, hasAny
}

// render decides the node's view of the port, the way upstream's iptables
// proxier wires its chains: internal traffic uses the Local endpoints under
// internalTrafficPolicy Local, external traffic the Local endpoints under
// externalTrafficPolicy Local, and Cluster endpoints otherwise. With no
// usable endpoint anywhere traffic is rejected; with some, but none for this
// node's Local policy, it is dropped.
func (p *portView) render(n Node) *signalboxv1.ServicePort {
	cluster, local, hasAny := p.categorize(n)
	sp := &signalboxv1.ServicePort{
		Namespace:                p.namespace,
		Name:                     p.name,
		PortName:                 p.portName,
		Family:                   p.family,
		Protocol:                 p.protocol,
		ClusterIp:                p.clusterIP,
		Port:                     p.port,
		NodePort:                 p.nodePort,
		ExternalIps:              slices.Clone(p.externalIPs),
		LoadBalancerIngress:      p.renderIngress(),
		LoadBalancerSourceRanges: slices.Clone(p.sourceRanges),
		AffinityTimeoutSeconds:   p.affinity,
		InternalPolicyLocal:      p.itpLocal,
	}
	internal := cluster
	if p.itpLocal {
		internal = local
	}
	sp.ClusterEndpoints = p.renderEndpoints(internal, n)
	sp.ClusterNoEndpoints = noEndpointsAction(len(internal), hasAny)
	// Without an external destination there is no external traffic to
	// decide about; leaving the fields empty keeps such ports shared.
	if p.extAccessible {
		external := cluster
		if p.etpLocal {
			external = local
		}
		sp.ExternalEndpoints = p.renderEndpoints(external, n)
		sp.ExternalNoEndpoints = noEndpointsAction(len(external), hasAny)
		sp.ExternalPolicyLocal = p.etpLocal
		sp.MasqueradeExternal = !p.etpLocal
		// Pods and the node reach external destinations as if from outside
		// and back in, subject to neither traffic policy: upstream jumps to
		// its Cluster-policy chain. Only internalTrafficPolicy Local makes
		// that differ from the internal endpoints.
		if p.etpLocal && p.itpLocal && !samePicks(cluster, internal) {
			sp.ShortCircuitEndpoints = p.renderEndpoints(cluster, n)
		}
	}
	if p.hcNodePort != 0 {
		sp.HealthCheckNodePort = p.hcNodePort
		sp.LocalReadyEndpoints = p.localReady[n.Name]
	}
	return sp
}

// samePicks reports whether two pick lists render the same endpoints.
func samePicks(x, y []pick) bool {
	return slices.EqualFunc(x, y, func(a, b pick) bool { return a.e == b.e && a.fallback == b.fallback })
}

func noEndpointsAction(n int, hasAny bool) signalboxv1.NoEndpointsAction {
	switch {
	case n > 0:
		return signalboxv1.NoEndpointsAction_NO_ENDPOINTS_ACTION_UNSPECIFIED
	case hasAny:
		return signalboxv1.NoEndpointsAction_NO_ENDPOINTS_ACTION_DROP
	}
	return signalboxv1.NoEndpointsAction_NO_ENDPOINTS_ACTION_REJECT
}

func (p *portView) renderEndpoints(picks []pick, n Node) []*signalboxv1.Endpoint {
	if len(picks) == 0 {
		return nil
	}
	out := make([]*signalboxv1.Endpoint, len(picks))
	for i, pk := range picks {
		out[i] = &signalboxv1.Endpoint{
			Ip:          pk.e.ip,
			Port:        pk.e.port,
			Terminating: pk.fallback,
			Local:       p.localMatters && isLocal(pk.e, n),
		}
	}
	return out
}

func (p *portView) renderIngress() []*signalboxv1.LoadBalancerIngress {
	if len(p.ingress) == 0 {
		return nil
	}
	out := make([]*signalboxv1.LoadBalancerIngress, len(p.ingress))
	for i, ing := range p.ingress {
		out[i] = &signalboxv1.LoadBalancerIngress{Ip: ing.addr.String(), Proxy: ing.proxy}
	}
	return out
}
