package signalboxv1

import (
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

func sp(name string, port int32) *Resource {
	return NewServicePortResource(name, &ServicePort{Namespace: "ns", Name: name, Port: port, Family: IPFamily_IP_FAMILY_IPV4})
}

func TestHashIsContentAddressed(t *testing.T) {
	a, b, c := sp("a", 80), sp("a", 80), sp("a", 81)
	if a.Hash == "" || a.Hash != b.Hash {
		t.Fatalf("equal bodies must hash equal: %q %q", a.Hash, b.Hash)
	}
	if a.Hash == c.Hash {
		t.Fatalf("different bodies must hash differently")
	}
	if _, err := Hash(&Resource{Name: "x"}); err == nil {
		t.Fatalf("a resource without body must not hash")
	}
}

func TestDeltaFrameMatchesProto(t *testing.T) {
	r1, r2 := sp("a", 80), sp("b", 90)
	f := DeltaFrame{
		Sequence:     7,
		Upserts:      []Encoded{EncodeResource(r1), EncodeResource(r2)},
		Removals:     []string{"c", "d"},
		Replace:      true,
		TraceContext: map[string]string{"traceparent": "00-abc-def-01"},
		TriggerTime:  timestamppb.New(timestamppb.Now().AsTime()),
	}
	var got SyncResponse
	if err := proto.Unmarshal(f.Marshal(), &got); err != nil {
		t.Fatal(err)
	}
	want := &SyncResponse{Delta: &Delta{
		Sequence: 7, Upserts: []*Resource{r1, r2}, Removals: []string{"c", "d"}, Replace: true,
		TraceContext: f.TraceContext, TriggerTime: f.TriggerTime,
	}}
	if !proto.Equal(&got, want) {
		t.Fatalf("frame decodes to\n%v\nwant\n%v", &got, want)
	}
}

func TestTableApply(t *testing.T) {
	base := Table{"a": sp("a", 80), "b": sp("b", 80)}
	tests := []struct {
		name    string
		delta   *Delta
		want    []string
		wantErr bool
	}{
		{"upsert and remove", &Delta{Upserts: []*Resource{sp("c", 1)}, Removals: []string{"a"}}, []string{"b", "c"}, false},
		{"replace drops unlisted", &Delta{Replace: true, Upserts: []*Resource{sp("c", 1)}}, []string{"c"}, false},
		{"duplicate upsert", &Delta{Upserts: []*Resource{sp("c", 1), sp("c", 2)}}, nil, true},
		{"upsert and remove same", &Delta{Upserts: []*Resource{sp("c", 1)}, Removals: []string{"c"}}, nil, true},
		{"no body", &Delta{Upserts: []*Resource{{Name: "x"}}}, nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := base.Apply(tt.delta)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tt.wantErr)
			}
			if len(base) != 2 {
				t.Fatalf("Apply changed its receiver")
			}
			if tt.wantErr {
				return
			}
			if len(got) != len(tt.want) {
				t.Fatalf("got %d resources, want %v", len(got), tt.want)
			}
			for _, n := range tt.want {
				if got[n] == nil {
					t.Fatalf("missing %q", n)
				}
			}
		})
	}
}
