package agent

import (
	"context"
	"errors"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/signalbox/signalbox/nodeagent/dataplane"
	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// After a start the agent holds nothing, so its hello is empty; the first
// snapshot goes through Sync (removing what a previous process left), and
// later deltas through Apply.
func TestFirstDeltaSyncsThenApplies(t *testing.T) {
	fake := dataplane.NewFake()
	stale := svc("left-over", 1)
	if _, err := fake.Sync(context.Background(), pb.Table{stale.Name: stale}); err != nil {
		t.Fatal(err)
	}
	cs, addr, _ := serve(t, "127.0.0.1:0")
	r := startAgent(t, addr, fake, nil, nil)

	hello := recv(t, cs.hellos, "hello")
	if hello.GetNodeName() != "node-a" || hello.GetAgentVersion() != "v0.0.0-test" || hello.GetMode() != "fake" {
		t.Errorf("hello = %v", hello)
	}
	if len(hello.GetResourceVersions()) != 0 {
		t.Errorf("hello after start holds %v, want nothing", hello.GetResourceVersions())
	}
	if tok := recv(t, cs.tokens, "token"); tok != "Bearer token-1" {
		t.Errorf("authorization = %q", tok)
	}

	a, b, c := svc("a", 80), svc("b", 80), svc("c", 80)
	ack := cs.deliver(t, &pb.Delta{Sequence: 1, Replace: true, Upserts: []*pb.Resource{a, b},
		TriggerTime: timestamppb.New(time.Now().Add(-2 * time.Second))})
	if ack.GetError() != nil {
		t.Fatalf("snapshot NACKed: %v", ack.GetError())
	}
	h := ack.GetHealth()
	if h.GetBackend() != "fake" || h.GetAgentVersion() != "v0.0.0-test" || h.GetResources() != 2 ||
		h.GetRules() != 2 || !h.GetHealthy() || h.GetLastSyncTime() == nil {
		t.Errorf("health on ack = %v", h)
	}
	if got := names(fake.Table()); !slices.Equal(got, []string{a.Name, b.Name}) {
		t.Errorf("plane holds %v after snapshot, want stale rule gone", got)
	}
	if applies, syncs, _ := fake.Counts(); applies != 0 || syncs != 2 {
		t.Errorf("after snapshot applies=%d syncs=%d, want 0 and 2 (1 seeded + 1 restart reconciliation)", applies, syncs)
	}

	ack = cs.deliver(t, &pb.Delta{Sequence: 2, Upserts: []*pb.Resource{c}, Removals: []string{a.Name}})
	if ack.GetError() != nil {
		t.Fatalf("delta 2 NACKed: %v", ack.GetError())
	}
	if got := names(fake.Table()); !slices.Equal(got, []string{b.Name, c.Name}) {
		t.Errorf("plane holds %v, want b and c", got)
	}
	if applies, syncs, _ := fake.Counts(); applies != 1 || syncs != 2 {
		t.Errorf("after delta 2 applies=%d syncs=%d, want 1 and 2", applies, syncs)
	}
	if !maps.Equal(r.agent.Core().Hashes(), pb.Table{b.Name: b, c.Name: c}.Hashes()) {
		t.Errorf("held = %v", r.agent.Core().Hashes())
	}
	for name, want := range map[string]float64{
		"signalbox_agent_deltas_applied_total":                2,
		"kubeproxy_sync_full_proxy_rules_duration_seconds":    1,
		"kubeproxy_sync_partial_proxy_rules_duration_seconds": 1,
		"kubeproxy_sync_proxy_rules_duration_seconds":         2,
		"kubeproxy_network_programming_duration_seconds":      1,
		"signalbox_agent_stream_connected":                    1,
		"signalbox_agent_nacks_total":                         0,
	} {
		if got := counter(t, r.metrics, name); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
}

// A structurally bad delta is rejected before the plane sees it.
func TestBadDeltaIsNackedAndPlaneUnchanged(t *testing.T) {
	fake := dataplane.NewFake()
	cs, addr, _ := serve(t, "127.0.0.1:0")
	r := startAgent(t, addr, fake, nil, nil)
	recv(t, cs.hellos, "hello")
	a, b := svc("a", 80), svc("b", 80)
	if ack := cs.deliver(t, &pb.Delta{Sequence: 1, Replace: true, Upserts: []*pb.Resource{a}}); ack.GetError() != nil {
		t.Fatalf("snapshot NACKed: %v", ack.GetError())
	}
	applies, syncs, _ := fake.Counts()

	ack := cs.deliver(t, &pb.Delta{Sequence: 2, Upserts: []*pb.Resource{b, svc("b", 81)}})
	e := ack.GetError()
	if e == nil {
		t.Fatal("duplicate upsert was ACKed")
	}
	if !strings.Contains(e.GetMessage(), "upserted twice") || !slices.Equal(e.GetResources(), []string{b.Name}) {
		t.Errorf("error detail = %v", e)
	}
	if ack.GetHealth().GetBackend() != "fake" {
		t.Errorf("NACK carries no health: %v", ack.GetHealth())
	}
	if a2, s2, _ := fake.Counts(); a2 != applies || s2 != syncs {
		t.Errorf("plane touched by a bad delta: applies %d->%d syncs %d->%d", applies, a2, syncs, s2)
	}
	if got := names(fake.Table()); !slices.Equal(got, []string{a.Name}) {
		t.Errorf("plane holds %v", got)
	}
	if got := counter(t, r.metrics, "signalbox_agent_nacks_total"); got != 1 {
		t.Errorf("nacks = %v", got)
	}
	// The stream survives a NACK: the next delta is applied.
	if ack := cs.deliver(t, &pb.Delta{Sequence: 3, Upserts: []*pb.Resource{b}}); ack.GetError() != nil {
		t.Errorf("delta after NACK: %v", ack.GetError())
	}
}

type planeErr struct{ names []string }

func (e planeErr) Error() string       { return "iptables-restore: line 7 failed" }
func (e planeErr) Resources() []string { return e.names }

// A plane failure keeps the previous rules and the held table, so the next
// delta is computed and applied on top of what the kernel really has.
func TestPlaneFailureNacksAndKeepsHeld(t *testing.T) {
	fake := dataplane.NewFake()
	cs, addr, _ := serve(t, "127.0.0.1:0")
	r := startAgent(t, addr, fake, nil, nil)
	recv(t, cs.hellos, "hello")
	a, b, c := svc("a", 80), svc("b", 80), svc("c", 80)
	if ack := cs.deliver(t, &pb.Delta{Sequence: 1, Replace: true, Upserts: []*pb.Resource{a}}); ack.GetError() != nil {
		t.Fatalf("snapshot NACKed: %v", ack.GetError())
	}

	fake.FailNext(planeErr{names: []string{b.Name}})
	ack := cs.deliver(t, &pb.Delta{Sequence: 2, Upserts: []*pb.Resource{b}})
	if e := ack.GetError(); e == nil || !strings.Contains(e.GetMessage(), "line 7") ||
		!slices.Equal(e.GetResources(), []string{b.Name}) {
		t.Fatalf("plane failure answered with %v", ack)
	}
	if h := ack.GetHealth(); h.GetErrors() != 1 || !strings.Contains(h.GetLastError(), "line 7") || h.GetResources() != 1 {
		t.Errorf("health after failure = %v", h)
	}
	if !maps.Equal(r.agent.Core().Hashes(), pb.Table{a.Name: a}.Hashes()) {
		t.Errorf("held changed on failure: %v", r.agent.Core().Hashes())
	}

	// The fake checks that prev matches what it holds, so this fails if
	// the agent had moved held to include b.
	if ack := cs.deliver(t, &pb.Delta{Sequence: 3, Upserts: []*pb.Resource{c}}); ack.GetError() != nil {
		t.Fatalf("delta after failure NACKed: %v", ack.GetError())
	}
	if got := names(fake.Table()); !slices.Equal(got, []string{a.Name, c.Name}) {
		t.Errorf("plane holds %v, want a and c", got)
	}
	if got := counter(t, r.metrics, "signalbox_agent_sync_failures_total"); got != 1 {
		t.Errorf("sync failures = %v", got)
	}
}

// The first snapshot's Sync failing must not let the next delta skip the
// restart reconciliation.
func TestFailedFirstSyncIsRetriedAsSync(t *testing.T) {
	fake := dataplane.NewFake()
	cs, addr, _ := serve(t, "127.0.0.1:0")
	startAgent(t, addr, fake, nil, nil)
	recv(t, cs.hellos, "hello")
	a := svc("a", 80)
	fake.FailNext(errors.New("boom"))
	if ack := cs.deliver(t, &pb.Delta{Sequence: 1, Replace: true, Upserts: []*pb.Resource{a}}); ack.GetError() == nil {
		t.Fatal("failed snapshot was ACKed")
	}
	if ack := cs.deliver(t, &pb.Delta{Sequence: 2, Replace: true, Upserts: []*pb.Resource{a}}); ack.GetError() != nil {
		t.Fatalf("second snapshot NACKed: %v", ack.GetError())
	}
	if applies, syncs, _ := fake.Counts(); applies != 0 || syncs != 1 {
		t.Errorf("applies=%d syncs=%d, want the retry to be a Sync", applies, syncs)
	}
}

// Losing the control plane leaves the kernel alone; the agent comes back
// with growing, jittered delays, a freshly read token and its held hashes.
func TestReconnectFailsStaticAndResumes(t *testing.T) {
	fake := dataplane.NewFake()
	cs, addr, stop := serve(t, "127.0.0.1:0")
	delays := make(chan time.Duration)
	release := make(chan struct{})
	r := startAgent(t, addr, fake, func(c *Config) {
		c.BackoffInitial, c.BackoffMax = 4*time.Millisecond, time.Second
	}, func(a *Agent) {
		a.wait = func(ctx context.Context, d time.Duration) error {
			select {
			case delays <- d:
			case <-ctx.Done():
				return ctx.Err()
			}
			select {
			case <-release:
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	})
	recv(t, cs.hellos, "first hello")
	recv(t, cs.tokens, "first token")
	a, b, c := svc("a", 80), svc("b", 80), svc("c", 80)
	if ack := cs.deliver(t, &pb.Delta{Sequence: 1, Replace: true, Upserts: []*pb.Resource{a, b}}); ack.GetError() != nil {
		t.Fatalf("snapshot NACKed: %v", ack.GetError())
	}
	before := fake.Table()
	applies, syncs, cleanups := fake.Counts()
	writeFile(t, r.token, "token-2") // the kubelet rotated it

	stop()
	// Three failed attempts: the stream end, then two refused dials.
	var got []time.Duration
	for i := range 3 {
		got = append(got, recv(t, delays, "backoff delay"))
		if i < 2 {
			release <- struct{}{}
		}
	}
	for i, d := range got {
		lo := (4 * time.Millisecond << i) / 2
		if d < lo || d >= 2*lo {
			t.Errorf("delay %d = %v, want in [%v, %v)", i, d, lo, 2*lo)
		}
	}
	if got := counter(t, r.metrics, "signalbox_agent_stream_connected"); got != 0 {
		t.Errorf("stream_connected = %v while the server is down", got)
	}

	cs2, _, _ := serve(t, addr)
	release <- struct{}{}
	hello := recv(t, cs2.hellos, "hello after reconnect")
	if want := (pb.Table{a.Name: a, b.Name: b}).Hashes(); !maps.Equal(hello.GetResourceVersions(), want) {
		t.Errorf("resume hello holds %v, want %v", hello.GetResourceVersions(), want)
	}
	if tok := recv(t, cs2.tokens, "token after reconnect"); tok != "Bearer token-2" {
		t.Errorf("authorization after rotation = %q", tok)
	}
	if a2, s2, c2 := fake.Counts(); a2 != applies || s2 != syncs || c2 != cleanups {
		t.Errorf("plane touched while disconnected: %d/%d/%d -> %d/%d/%d", applies, syncs, cleanups, a2, s2, c2)
	}
	if !maps.Equal(fake.Table().Hashes(), before.Hashes()) {
		t.Errorf("plane table changed while disconnected")
	}
	if got := counter(t, r.metrics, "signalbox_agent_reconnects_total"); got != 3 {
		t.Errorf("reconnects = %v, want 3", got)
	}

	// A resumed stream is not a restart: the next delta is incremental.
	if ack := cs2.deliver(t, &pb.Delta{Sequence: 1, Upserts: []*pb.Resource{c}}); ack.GetError() != nil {
		t.Fatalf("delta after resume NACKed: %v", ack.GetError())
	}
	if a2, s2, _ := fake.Counts(); a2 != applies+1 || s2 != syncs {
		t.Errorf("after resume applies=%d syncs=%d, want %d and %d", a2, s2, applies+1, syncs)
	}
}

// Shutdown closes the stream and leaves every rule in place.
func TestShutdownLeavesRules(t *testing.T) {
	fake := dataplane.NewFake()
	cs, addr, _ := serve(t, "127.0.0.1:0")
	r := startAgent(t, addr, fake, nil, nil)
	recv(t, cs.hellos, "hello")
	a := svc("a", 80)
	cs.deliver(t, &pb.Delta{Sequence: 1, Replace: true, Upserts: []*pb.Resource{a}})
	applies, syncs, _ := fake.Counts()

	r.stop()
	recv(t, cs.ended, "server to see the stream end")
	if a2, s2, c2 := fake.Counts(); a2 != applies || s2 != syncs || c2 != 0 {
		t.Errorf("plane touched on shutdown: applies=%d syncs=%d cleanups=%d", a2, s2, c2)
	}
	if got := names(fake.Table()); !slices.Equal(got, []string{a.Name}) {
		t.Errorf("plane holds %v after shutdown", got)
	}
}

// watchedPlane reports every Sync so a test can wait for the periodic one.
type watchedPlane struct {
	*dataplane.Fake
	synced chan pb.Table
}

func (p watchedPlane) Sync(ctx context.Context, t pb.Table) (dataplane.Result, error) {
	res, err := p.Fake.Sync(ctx, t)
	p.synced <- t
	return res, err
}

func TestPeriodicSyncRestoresFlushedRules(t *testing.T) {
	plane := watchedPlane{Fake: dataplane.NewFake(), synced: make(chan pb.Table, 8)}
	ticks := make(chan time.Time)
	cs, addr, _ := serve(t, "127.0.0.1:0")
	r := startAgent(t, addr, plane, nil, func(a *Agent) { a.resyncC = ticks })
	recv(t, cs.hellos, "hello")

	// Before any table is held there is nothing to restore. The second
	// tick is taken only once the first one has been handled.
	ticks <- time.Now()
	ticks <- time.Now()
	if _, syncs, _ := plane.Counts(); syncs != 0 {
		t.Fatalf("periodic sync ran with no table held")
	}

	a := svc("a", 80)
	cs.deliver(t, &pb.Delta{Sequence: 1, Replace: true, Upserts: []*pb.Resource{a}})
	recv(t, plane.synced, "snapshot sync")
	if err := plane.Cleanup(context.Background()); err != nil { // someone flushed our rules
		t.Fatal(err)
	}
	ticks <- time.Now()
	restored := recv(t, plane.synced, "periodic sync")
	if !maps.Equal(restored.Hashes(), pb.Table{a.Name: a}.Hashes()) {
		t.Errorf("periodic sync wrote %v", names(restored))
	}
	if got := names(plane.Table()); !slices.Equal(got, []string{a.Name}) {
		t.Errorf("plane holds %v after periodic sync", got)
	}
	ticks <- time.Now() // the previous tick's bookkeeping is done once this is taken
	recv(t, plane.synced, "second periodic sync")
	if got := counter(t, r.metrics, "signalbox_agent_periodic_syncs_total"); got < 1 {
		t.Errorf("periodic syncs = %v", got)
	}
}

func TestHealthReportOnTimer(t *testing.T) {
	cs, addr, _ := serve(t, "127.0.0.1:0")
	startAgent(t, addr, dataplane.NewFake(), func(c *Config) { c.HealthPeriod = 5 * time.Millisecond }, nil)
	recv(t, cs.hellos, "hello")
	h := recv(t, cs.healths, "health report")
	if h.GetBackend() != "fake" || h.GetAgentVersion() != "v0.0.0-test" || !h.GetHealthy() || h.GetResources() != 0 {
		t.Errorf("health report = %v", h)
	}
}

// The span for a delta joins the trace the control plane started.
func TestApplySpanJoinsDeltaTrace(t *testing.T) {
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	cs, addr, _ := serve(t, "127.0.0.1:0")
	startAgent(t, addr, dataplane.NewFake(), func(c *Config) { c.TracerProvider = tp }, nil)
	recv(t, cs.hellos, "hello")
	const traceID, parentID = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
	cs.deliver(t, &pb.Delta{Sequence: 1, Replace: true, Upserts: []*pb.Resource{svc("a", 80)},
		TraceContext: map[string]string{"traceparent": "00-" + traceID + "-" + parentID + "-01"}})
	spans := rec.Ended()
	if len(spans) != 1 {
		t.Fatalf("ended spans = %d, want 1", len(spans))
	}
	s := spans[0]
	if s.Name() != "apply delta" || s.SpanContext().TraceID().String() != traceID ||
		s.Parent().SpanID().String() != parentID || !s.Parent().IsRemote() {
		t.Errorf("span %q trace %s parent %s", s.Name(), s.SpanContext().TraceID(), s.Parent().SpanID())
	}
}

func TestNewRejectsIncompleteConfig(t *testing.T) {
	good := Config{Address: "127.0.0.1:1", NodeName: "n", Plane: dataplane.NewFake(), Insecure: true}
	for name, mutate := range map[string]func(*Config){
		"no plane":   func(c *Config) { c.Plane = nil },
		"no address": func(c *Config) { c.Address = "" },
		"no node":    func(c *Config) { c.NodeName = "" },
		"bad CA":     func(c *Config) { c.Insecure, c.CAFile = false, "/nonexistent/ca.pem" },
	} {
		c := good
		mutate(&c)
		if _, err := New(c); err == nil {
			t.Errorf("%s: New accepted it", name)
		}
	}
	if _, err := New(good); err != nil {
		t.Errorf("good config: %v", err)
	}
}

// In plaintext mode a missing token file means no token, so lab agents run
// with the DaemonSet's default --token-file.
func TestPlaintextWithoutTokenFile(t *testing.T) {
	cs, addr, _ := serve(t, "127.0.0.1:0")
	startAgent(t, addr, dataplane.NewFake(), func(c *Config) { c.TokenFile = "/nonexistent/token" }, nil)
	recv(t, cs.hellos, "hello")
	if tok := recv(t, cs.tokens, "token"); tok != "" {
		t.Errorf("authorization = %q, want none", tok)
	}
}
