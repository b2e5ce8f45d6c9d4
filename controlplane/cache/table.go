package cache

import (
	"sort"
	"time"

	"github.com/signalbox/signalbox/controlplane/nodeview"
	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// SettingsName is the name of the per-node settings resource.
const SettingsName = "node/settings"

// Point is a table a node holds or should hold: a generation seen through
// the node's view. Held, when set, is an explicit table (name to hash) from
// an agent's hello, not derived from any generation.
type Point struct {
	Gen  uint64
	Node nodeview.Node
	Held map[string]string
}

// Current is the table node should have now.
func (c *Cache) Current(node string) Point {
	return Point{Gen: c.gen, Node: c.Node(node)}
}

// Change is the difference between two points of one node.
type Change struct {
	// Upserts are resources to send, with their shared encodings.
	Upserts []*pb.Resource
	Encoded []pb.Encoded
	// Removals are names to delete.
	Removals []string
	// Services are the keys of the Services touched, for convergence.
	Services []string
	// TriggerTime is the earliest EndpointSlice change trigger time among
	// the versions carried (zero when unknown), for network programming
	// latency.
	TriggerTime time.Time
}

// Empty reports whether the change carries nothing.
func (ch *Change) Empty() bool { return len(ch.Upserts) == 0 && len(ch.Removals) == 0 }

// Diff computes what moves a node from one point to another. Only Services
// changed between the generations are visited when both points are
// generations of the same node view; otherwise (a hello, a zone change) the
// whole table is compared.
func (c *Cache) Diff(from, to Point) Change {
	var ch Change
	if from.Held == nil && from.Node == to.Node && from.Gen <= to.Gen {
		for _, key := range c.changedBetween(from.Gen, to.Gen) {
			e := c.entries[key]
			if e == nil {
				continue // created and deleted between the two, then compacted
			}
			if addVariantDiff(&ch, e.at(from.Gen).variant(from.Node), e.at(to.Gen).variant(to.Node)) {
				ch.Services = append(ch.Services, key)
			}
		}
		ch.TriggerTime = c.earliestTrigger(ch.Services, from.Gen, to.Gen)
		return ch
	}
	held := from.Held
	if held == nil {
		held = c.hashes(from)
	}
	seen := make(map[string]bool, len(held))
	c.each(to, func(key string, r *pb.Resource, enc pb.Encoded) {
		seen[r.Name] = true
		if held[r.Name] != r.Hash {
			ch.Upserts = append(ch.Upserts, r)
			ch.Encoded = append(ch.Encoded, enc)
			if key != "" && (len(ch.Services) == 0 || ch.Services[len(ch.Services)-1] != key) {
				ch.Services = append(ch.Services, key)
			}
		}
	})
	for name := range held {
		if !seen[name] {
			ch.Removals = append(ch.Removals, name)
		}
	}
	sort.Strings(ch.Removals)
	return ch
}

// Snapshot is the whole table of a point, for a replace delta.
func (c *Cache) Snapshot(p Point) Change {
	n := len(c.entries) + 1
	ch := Change{Upserts: make([]*pb.Resource, 0, n), Encoded: make([]pb.Encoded, 0, n)}
	c.each(p, func(_ string, r *pb.Resource, enc pb.Encoded) {
		ch.Upserts = append(ch.Upserts, r)
		ch.Encoded = append(ch.Encoded, enc)
	})
	return ch
}

// Table returns the resources of a point sorted by name, for inspection.
func (c *Cache) Table(p Point) []*pb.Resource {
	var out []*pb.Resource
	c.each(p, func(_ string, r *pb.Resource, _ pb.Encoded) { out = append(out, r) })
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// ServiceResources returns the resources of one Service at a point.
func (c *Cache) ServiceResources(key string, p Point) []*pb.Resource {
	e := c.entries[key]
	if e == nil {
		return nil
	}
	if v := e.at(p.Gen).variant(p.Node); v != nil {
		return v.Resources
	}
	return nil
}

// LastChange is the generation at which a Service was last rebuilt.
func (c *Cache) LastChange(key string) uint64 {
	e := c.entries[key]
	if e == nil || len(e.versions) == 0 {
		return 0
	}
	return e.versions[len(e.versions)-1].gen
}

// ServiceKnown reports whether the Service is proxied now.
func (c *Cache) ServiceKnown(key string) bool {
	e := c.entries[key]
	return e != nil && e.at(c.gen) != nil && e.at(c.gen).view != nil
}

func (c *Cache) hashes(p Point) map[string]string {
	out := map[string]string{}
	c.each(p, func(_ string, r *pb.Resource, _ pb.Encoded) { out[r.Name] = r.Hash })
	return out
}

// each visits every resource of a point; key is "" for the settings.
func (c *Cache) each(p Point, fn func(key string, r *pb.Resource, enc pb.Encoded)) {
	s := c.settingsResource(p.Node)
	fn("", s, pb.EncodeResource(s))
	for _, k := range c.sortedKeys() {
		v := c.entries[k].at(p.Gen).variant(p.Node)
		if v == nil {
			continue
		}
		for i, r := range v.Resources {
			fn(k, r, v.Encoded[i])
		}
	}
}

func (c *Cache) settingsResource(n nodeview.Node) *pb.Resource {
	return nodeview.NodeSettings(n, c.settings)
}

// changedBetween lists Service keys rebuilt in (from, to], deduplicated.
func (c *Cache) changedBetween(from, to uint64) []string {
	i := sort.Search(len(c.log), func(i int) bool { return c.log[i].gen > from })
	seen := map[string]bool{}
	var keys []string
	for ; i < len(c.log) && c.log[i].gen <= to; i++ {
		k := c.log[i].key
		if !seen[k] {
			seen[k] = true
			keys = append(keys, k)
		}
	}
	return keys
}

// addVariantDiff appends what turns a into b; it reports whether anything
// differed.
func addVariantDiff(ch *Change, a, b *Variant) bool {
	old := map[string]string{}
	if a != nil {
		for _, r := range a.Resources {
			old[r.Name] = r.Hash
		}
	}
	differs := false
	if b != nil {
		for i, r := range b.Resources {
			if h, ok := old[r.Name]; ok {
				delete(old, r.Name)
				if h == r.Hash {
					continue
				}
			}
			ch.Upserts = append(ch.Upserts, r)
			ch.Encoded = append(ch.Encoded, b.Encoded[i])
			differs = true
		}
	}
	names := make([]string, 0, len(old))
	for name := range old {
		names = append(names, name)
	}
	sort.Strings(names)
	ch.Removals = append(ch.Removals, names...)
	return differs || len(names) > 0
}

func (c *Cache) earliestTrigger(keys []string, from, to uint64) time.Time {
	var t time.Time
	for _, k := range keys {
		for _, v := range c.entries[k].versions {
			if v.gen > from && v.gen <= to && !v.trigger.IsZero() && (t.IsZero() || v.trigger.Before(t)) {
				t = v.trigger
			}
		}
	}
	return t
}
