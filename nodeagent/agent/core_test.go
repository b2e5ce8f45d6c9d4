package agent

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/signalbox/signalbox/nodeagent/dataplane"
	"github.com/signalbox/signalbox/nodeagent/healthcheck"
	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// Rule programming is stale once a received change has not been applied
// within the window; applying it makes the agent healthy again.
func TestHealthGoesStaleWhileAChangeIsPending(t *testing.T) {
	now := time.Unix(1_000_000, 0)
	clock := func() time.Time { return now }
	fake := dataplane.NewFake()
	a, err := New(Config{
		Address: "127.0.0.1:1", NodeName: "n", Plane: fake, Insecure: true,
		Now: clock, Health: healthcheck.NewTracker(time.Minute, clock),
	})
	if err != nil {
		t.Fatal(err)
	}
	core := a.Core()
	ctx := context.Background()

	if !core.Health().GetHealthy() {
		t.Fatal("a fresh agent must be healthy")
	}
	fake.FailNext(errors.New("boom"))
	if ack := core.HandleDelta(ctx, &pb.Delta{Sequence: 1, Replace: true, Upserts: []*pb.Resource{svc("a", 1)}}); ack.GetError() == nil {
		t.Fatal("failure was ACKed")
	}
	now = now.Add(59 * time.Second)
	if !core.Health().GetHealthy() {
		t.Error("unhealthy before the window elapsed")
	}
	now = now.Add(2 * time.Second)
	h := core.Health()
	if h.GetHealthy() {
		t.Error("healthy although a change has waited longer than the window")
	}
	if h.GetLastSyncTime() != nil {
		t.Errorf("last sync time set without any successful sync: %v", h.GetLastSyncTime())
	}
	if ack := core.HandleDelta(ctx, &pb.Delta{Sequence: 2, Replace: true, Upserts: []*pb.Resource{svc("a", 1)}}); ack.GetError() != nil {
		t.Fatal(ack.GetError())
	}
	h = core.Health()
	if !h.GetHealthy() || !h.GetLastSyncTime().AsTime().Equal(now) {
		t.Errorf("after success: %v", h)
	}
}

func TestOffenders(t *testing.T) {
	a, b := svc("a", 1), svc("b", 1)
	noBody := &pb.Resource{Name: "x"}
	for _, tc := range []struct {
		name string
		d    *pb.Delta
		want []string
	}{
		{"valid", &pb.Delta{Upserts: []*pb.Resource{a, b}, Removals: []string{"c"}}, nil},
		{"duplicate", &pb.Delta{Upserts: []*pb.Resource{a, b, a}}, []string{a.Name}},
		{"no body", &pb.Delta{Upserts: []*pb.Resource{noBody}}, []string{"x"}},
		{"upserted and removed", &pb.Delta{Upserts: []*pb.Resource{b}, Removals: []string{b.Name}}, []string{b.Name}},
	} {
		if got := offenders(tc.d); !slices.Equal(got, tc.want) {
			t.Errorf("%s: offenders = %v, want %v", tc.name, got, tc.want)
		}
		if _, err := (pb.Table{}).Apply(tc.d); (err != nil) != (tc.want != nil) {
			t.Errorf("%s: Table.Apply error %v disagrees with offenders %v", tc.name, err, tc.want)
		}
	}
}

func TestBackoffGrowsCapsAndResets(t *testing.T) {
	for _, tc := range []struct {
		rand float64
		want []time.Duration
	}{
		// The low edge of the jitter: half of 100, 200, 400, 800, then capped.
		{0, []time.Duration{50, 100, 200, 400, 500, 500}},
		// The high edge stays below the full delay.
		{0.999, []time.Duration{99, 199, 399, 799, 999, 999}},
	} {
		b := newBackoff(100*time.Millisecond, time.Second)
		b.rand = func() float64 { return tc.rand }
		for i, want := range tc.want {
			if got := b.next().Truncate(time.Millisecond); got != want*time.Millisecond {
				t.Errorf("rand=%v step %d: %v, want %v", tc.rand, i, got, want*time.Millisecond)
			}
		}
		b.reset()
		if got := b.next().Truncate(time.Millisecond); got != tc.want[0]*time.Millisecond {
			t.Errorf("rand=%v after reset: %v, want %v", tc.rand, got, tc.want[0]*time.Millisecond)
		}
	}
}

func TestTarget(t *testing.T) {
	for in, want := range map[string]string{
		"198.18.0.5:9000":        "passthrough:///198.18.0.5:9000",
		"cp.signalbox.svc:9000":  "passthrough:///cp.signalbox.svc:9000",
		"unix:/run/sb.sock":      "passthrough:///unix:/run/sb.sock",
		"dns:///cp.example:9000": "dns:///cp.example:9000",
	} {
		if got := target(in); got != want {
			t.Errorf("target(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestTokenFile(t *testing.T) {
	dir := t.TempDir()
	empty, good := dir+"/empty", dir+"/good"
	writeFile(t, empty, "\n")
	writeFile(t, good, "abc\n")
	for _, tc := range []struct {
		tf      tokenFile
		want    string
		wantErr bool
	}{
		{tokenFile{path: good}, "Bearer abc", false},
		{tokenFile{path: good, plaintext: true}, "Bearer abc", false},
		{tokenFile{path: dir + "/missing"}, "", true}, // TLS: wait for the kubelet
		{tokenFile{path: dir + "/missing", plaintext: true}, "", false},
		{tokenFile{path: empty}, "", true},
	} {
		md, err := tc.tf.GetRequestMetadata(context.Background())
		if (err != nil) != tc.wantErr || md["authorization"] != tc.want {
			t.Errorf("%+v: %v, %v", tc.tf, md, err)
		}
	}
}
