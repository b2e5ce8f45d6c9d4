// Package cache is the control plane's cluster model: Services,
// EndpointSlices and Nodes in, per-node tables out. It is pure (no I/O, no
// clock, no goroutines) and not safe for concurrent use: one goroutine owns
// it, as etcd's raft owns its log.
//
// Every Flush that changes something starts a new generation. A node's
// table is never stored per node: it is derived from the generation's
// Service versions, and the resources nodes see alike (same variant) are
// built and marshalled once and shared by every node. History is kept only
// back to the oldest generation a node has acknowledged, so a delta is the
// difference between two generations, computed per changed Service.
package cache

import (
	"sort"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/signalbox/signalbox/controlplane/nodeview"
	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// Problem is a bad object skipped while building tables.
type Problem = nodeview.Problem

// Cache holds the model and its generations.
type Cache struct {
	opts     nodeview.Options
	settings nodeview.Settings

	services map[string]*corev1.Service
	slices   map[string]map[string]*discoveryv1.EndpointSlice // service key -> slice name -> slice
	owner    map[string]string                                // "ns/slice" -> service key
	nodes    map[string]nodeview.Node

	gen     uint64
	dirty   map[string]bool
	trigger map[string]time.Time // service key -> earliest pending slice trigger time
	entries map[string]*entry    // service key -> versions
	keys    []string             // sorted keys of entries; nil when stale
	log     []change             // ascending by gen
}

type change struct {
	gen uint64
	key string
}

// entry is the version history of one Service, oldest first.
type entry struct {
	versions []*version
}

// version is one Service as built at a generation; view is nil when the
// Service is absent or not proxied at that generation.
type version struct {
	gen      uint64
	view     *nodeview.Service
	variants map[string]*Variant
	trigger  time.Time
}

// Variant is the resources one class of nodes gets for a Service, encoded
// once.
type Variant struct {
	Resources []*pb.Resource
	Encoded   []pb.Encoded
}

// New returns an empty cache at generation 0.
func New(opts nodeview.Options, settings nodeview.Settings) *Cache {
	return &Cache{
		opts:     opts,
		settings: settings,
		services: map[string]*corev1.Service{},
		slices:   map[string]map[string]*discoveryv1.EndpointSlice{},
		owner:    map[string]string{},
		nodes:    map[string]nodeview.Node{},
		dirty:    map[string]bool{},
		trigger:  map[string]time.Time{},
		entries:  map[string]*entry{},
	}
}

// Gen is the current generation.
func (c *Cache) Gen() uint64 { return c.gen }

// Dirty reports whether events are waiting for a Flush.
func (c *Cache) Dirty() bool { return len(c.dirty) > 0 }

// SetService records a Service add or update.
func (c *Cache) SetService(svc *corev1.Service) {
	key := svc.Namespace + "/" + svc.Name
	c.services[key] = svc
	c.dirty[key] = true
}

// DeleteService records a Service deletion.
func (c *Cache) DeleteService(namespace, name string) {
	key := namespace + "/" + name
	delete(c.services, key)
	c.dirty[key] = true
}

// SliceServiceKey is the Service an EndpointSlice belongs to, "" if none.
func SliceServiceKey(s *discoveryv1.EndpointSlice) string {
	name := s.Labels[discoveryv1.LabelServiceName]
	if name == "" {
		return ""
	}
	return s.Namespace + "/" + name
}

// SetSlice records an EndpointSlice add or update. A slice that moved to
// another Service (its label changed) is removed from the old one.
func (c *Cache) SetSlice(s *discoveryv1.EndpointSlice) {
	c.DeleteSlice(s.Namespace, s.Name)
	key := SliceServiceKey(s)
	if key == "" {
		return
	}
	if c.slices[key] == nil {
		c.slices[key] = map[string]*discoveryv1.EndpointSlice{}
	}
	c.slices[key][s.Name] = s
	c.owner[s.Namespace+"/"+s.Name] = key
	c.dirty[key] = true
	if t, err := time.Parse(time.RFC3339, s.Annotations[corev1.EndpointsLastChangeTriggerTime]); err == nil {
		if old, ok := c.trigger[key]; !ok || t.Before(old) {
			c.trigger[key] = t
		}
	}
}

// DeleteSlice records an EndpointSlice deletion.
func (c *Cache) DeleteSlice(namespace, name string) {
	id := namespace + "/" + name
	key, ok := c.owner[id]
	if !ok {
		return
	}
	delete(c.owner, id)
	if m := c.slices[key]; m != nil {
		delete(m, name)
		if len(m) == 0 {
			delete(c.slices, key)
		}
	}
	c.dirty[key] = true
}

// SetNode records a Node add or update. It reports whether the node's view
// (zone) changed, which changes every table of that node.
func (c *Cache) SetNode(n nodeview.Node) bool {
	old, ok := c.nodes[n.Name]
	c.nodes[n.Name] = n
	return !ok || old != n
}

// DeleteNode forgets a Node.
func (c *Cache) DeleteNode(name string) { delete(c.nodes, name) }

// Node returns what the cache knows of a node; an unknown node has only its
// name (no zone), which still gives it correct local endpoints.
func (c *Cache) Node(name string) nodeview.Node {
	if n, ok := c.nodes[name]; ok {
		return n
	}
	return nodeview.Node{Name: name}
}

// Flush builds every dirty Service. It returns the Service keys rebuilt
// (empty when nothing was dirty, and then the generation stays) and the
// problems found in the objects built. A rebuild that changes nothing for a
// node costs that node nothing: its delta is empty and is never sent.
func (c *Cache) Flush() (changed []string, problems []Problem) {
	if len(c.dirty) == 0 {
		return nil, nil
	}
	keys := make([]string, 0, len(c.dirty))
	for k := range c.dirty {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	c.dirty = map[string]bool{}
	next := c.gen + 1
	for _, key := range keys {
		var view *nodeview.Service
		if svc := c.services[key]; svc != nil {
			var probs []Problem
			view, probs = nodeview.Build(svc, c.sliceList(key), c.opts)
			problems = append(problems, probs...)
		}
		e := c.entries[key]
		if e == nil {
			if view == nil {
				continue
			}
			e = &entry{}
			c.entries[key] = e
			c.keys = nil
		}
		e.versions = append(e.versions, &version{gen: next, view: view, variants: map[string]*Variant{}, trigger: c.trigger[key]})
		delete(c.trigger, key)
		c.log = append(c.log, change{gen: next, key: key})
		changed = append(changed, key)
	}
	if len(changed) > 0 {
		c.gen = next
	}
	return changed, problems
}

func (c *Cache) sliceList(key string) []*discoveryv1.EndpointSlice {
	m := c.slices[key]
	out := make([]*discoveryv1.EndpointSlice, 0, len(m))
	for _, s := range m {
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Compact drops history older than gen, the oldest generation any node
// still acknowledges (or will be diffed from). Callers pass the minimum over
// sessions; with no sessions, the current generation.
func (c *Cache) Compact(gen uint64) {
	i := 0
	for i < len(c.log) && c.log[i].gen <= gen {
		key := c.log[i].key
		if e := c.entries[key]; e != nil {
			e.compact(gen)
			if len(e.versions) == 1 && e.versions[0].view == nil {
				delete(c.entries, key)
				c.keys = nil
			}
		}
		i++
	}
	c.log = append(c.log[:0:0], c.log[i:]...)
}

// compact keeps the newest version at or before gen and everything after.
func (e *entry) compact(gen uint64) {
	keep := 0
	for i, v := range e.versions {
		if v.gen <= gen {
			keep = i
		}
	}
	e.versions = e.versions[keep:]
}

// at returns the version in force at gen, nil if none.
func (e *entry) at(gen uint64) *version {
	var found *version
	for _, v := range e.versions {
		if v.gen > gen {
			break
		}
		found = v
	}
	return found
}

// variant returns the memoized resources of a version for a node.
func (v *version) variant(n nodeview.Node) *Variant {
	if v == nil || v.view == nil {
		return nil
	}
	k := v.view.VariantKey(n)
	if vr, ok := v.variants[k]; ok {
		return vr
	}
	res := v.view.Resources(n)
	vr := &Variant{Resources: res, Encoded: make([]pb.Encoded, len(res))}
	for i, r := range res {
		vr.Encoded[i] = pb.EncodeResource(r)
	}
	v.variants[k] = vr
	return vr
}

// sortedKeys returns the Service keys in order, sorted once per change of
// the key set rather than once per node table.
func (c *Cache) sortedKeys() []string {
	if c.keys == nil {
		c.keys = make([]string, 0, len(c.entries))
		for k := range c.entries {
			c.keys = append(c.keys, k)
		}
		sort.Strings(c.keys)
	}
	return c.keys
}
