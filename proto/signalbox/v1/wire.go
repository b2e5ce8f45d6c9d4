package signalboxv1

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"maps"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Table is a node's table: resource name to resource. Resources are
// immutable once built; tables share them freely.
type Table map[string]*Resource

var deterministic = proto.MarshalOptions{Deterministic: true}

// bodyMessage returns the message held in the resource's oneof body.
func bodyMessage(r *Resource) (proto.Message, error) {
	switch b := r.GetBody().(type) {
	case *Resource_ServicePort:
		return b.ServicePort, nil
	case *Resource_NodeSettings:
		return b.NodeSettings, nil
	default:
		return nil, fmt.Errorf("resource %q has no body", r.GetName())
	}
}

// Hash computes the content hash of a resource's body. Deterministic
// marshalling makes it equal on every control-plane replica, which is what
// lets any replica resume any agent.
func Hash(r *Resource) (string, error) {
	m, err := bodyMessage(r)
	if err != nil {
		return "", err
	}
	b, err := deterministic.Marshal(m)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:12]), nil
}

// NewServicePortResource builds a hashed ServicePort resource.
func NewServicePortResource(name string, sp *ServicePort) *Resource {
	r := &Resource{Name: name, Body: &Resource_ServicePort{ServicePort: sp}}
	r.Hash, _ = Hash(r) // cannot fail: the body is set
	return r
}

// NewNodeSettingsResource builds a hashed NodeSettings resource.
func NewNodeSettingsResource(name string, ns *NodeSettings) *Resource {
	r := &Resource{Name: name, Body: &Resource_NodeSettings{NodeSettings: ns}}
	r.Hash, _ = Hash(r)
	return r
}

// Hashes returns the name to hash map of a table, as sent in a Hello.
func (t Table) Hashes() map[string]string {
	out := make(map[string]string, len(t))
	for name, r := range t {
		out[name] = r.GetHash()
	}
	return out
}

// Apply returns the table that results from applying d to t, leaving t
// untouched so a caller can keep it when the data plane rejects the result.
// A structurally invalid delta is an error and changes nothing.
func (t Table) Apply(d *Delta) (Table, error) {
	next := make(Table, len(t)+len(d.GetUpserts()))
	if !d.GetReplace() {
		maps.Copy(next, t)
	}
	seen := make(map[string]bool, len(d.GetUpserts()))
	for _, r := range d.GetUpserts() {
		if r.GetName() == "" {
			return nil, fmt.Errorf("delta %d: upsert without a name", d.GetSequence())
		}
		if seen[r.GetName()] {
			return nil, fmt.Errorf("delta %d: resource %q upserted twice", d.GetSequence(), r.GetName())
		}
		seen[r.GetName()] = true
		if _, err := bodyMessage(r); err != nil {
			return nil, fmt.Errorf("delta %d: %w", d.GetSequence(), err)
		}
		next[r.GetName()] = r
	}
	for _, name := range d.GetRemovals() {
		if seen[name] {
			return nil, fmt.Errorf("delta %d: resource %q both upserted and removed", d.GetSequence(), name)
		}
		delete(next, name)
	}
	return next, nil
}

// Encoded is a message already in wire form. The control plane marshals a
// resource once and splices its bytes into every delta that carries it, so
// 5,000 streams do not re-encode the same Service 5,000 times.
type Encoded []byte

// EncodeResource marshals a resource once for sharing.
func EncodeResource(r *Resource) Encoded {
	b, _ := deterministic.Marshal(r) // a built resource always marshals
	return b
}

// DeltaFrame assembles the wire form of a SyncResponse carrying a Delta from
// pre-encoded resources. The result decodes as an ordinary SyncResponse.
type DeltaFrame struct {
	Sequence     uint64
	Upserts      []Encoded
	Removals     []string
	Replace      bool
	TraceContext map[string]string
	TriggerTime  *timestamppb.Timestamp
}

// Field numbers of Delta and SyncResponse, kept in one place so a change to
// the .proto that moves them fails TestDeltaFrameMatchesProto.
const (
	fieldResponseDelta = 1
	fieldSequence      = 1
	fieldUpserts       = 2
	fieldRemovals      = 3
	fieldReplace       = 4
	fieldTraceContext  = 5
	fieldTriggerTime   = 6
	fieldMapKey        = 1
	fieldMapValue      = 2
)

// Marshal returns the SyncResponse bytes. It sizes the buffer first: a
// snapshot of 10,000 Services is megabytes, and growing it by appending
// would copy it several times per node.
func (f *DeltaFrame) Marshal() []byte {
	var tt []byte
	if f.TriggerTime != nil {
		tt, _ = deterministic.Marshal(f.TriggerTime)
	}
	size := 0
	if f.Sequence != 0 {
		size += protowire.SizeTag(fieldSequence) + protowire.SizeVarint(f.Sequence)
	}
	for _, u := range f.Upserts {
		size += protowire.SizeTag(fieldUpserts) + protowire.SizeBytes(len(u))
	}
	for _, name := range f.Removals {
		size += protowire.SizeTag(fieldRemovals) + protowire.SizeBytes(len(name))
	}
	if f.Replace {
		size += protowire.SizeTag(fieldReplace) + 1
	}
	entry := func(k, v string) int {
		return protowire.SizeTag(fieldMapKey) + protowire.SizeBytes(len(k)) + protowire.SizeTag(fieldMapValue) + protowire.SizeBytes(len(v))
	}
	for k, v := range f.TraceContext {
		size += protowire.SizeTag(fieldTraceContext) + protowire.SizeBytes(entry(k, v))
	}
	if tt != nil {
		size += protowire.SizeTag(fieldTriggerTime) + protowire.SizeBytes(len(tt))
	}

	d := make([]byte, 0, protowire.SizeTag(fieldResponseDelta)+protowire.SizeBytes(size))
	d = protowire.AppendTag(d, fieldResponseDelta, protowire.BytesType)
	d = protowire.AppendVarint(d, uint64(size))
	if f.Sequence != 0 {
		d = protowire.AppendTag(d, fieldSequence, protowire.VarintType)
		d = protowire.AppendVarint(d, f.Sequence)
	}
	for _, u := range f.Upserts {
		d = protowire.AppendTag(d, fieldUpserts, protowire.BytesType)
		d = protowire.AppendBytes(d, u)
	}
	for _, name := range f.Removals {
		d = protowire.AppendTag(d, fieldRemovals, protowire.BytesType)
		d = protowire.AppendString(d, name)
	}
	if f.Replace {
		d = protowire.AppendTag(d, fieldReplace, protowire.VarintType)
		d = protowire.AppendVarint(d, 1)
	}
	for k, v := range f.TraceContext {
		d = protowire.AppendTag(d, fieldTraceContext, protowire.BytesType)
		d = protowire.AppendVarint(d, uint64(entry(k, v)))
		d = protowire.AppendTag(d, fieldMapKey, protowire.BytesType)
		d = protowire.AppendString(d, k)
		d = protowire.AppendTag(d, fieldMapValue, protowire.BytesType)
		d = protowire.AppendString(d, v)
	}
	if tt != nil {
		d = protowire.AppendTag(d, fieldTriggerTime, protowire.BytesType)
		d = protowire.AppendBytes(d, tt)
	}
	return d
}
