package agent

import (
	"context"
	"errors"
	"log/slog"
	"slices"
	"sync"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/signalbox/signalbox/nodeagent/dataplane"
	"github.com/signalbox/signalbox/nodeagent/healthcheck"
	"github.com/signalbox/signalbox/nodeagent/metrics"
	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// ResourceError is an error a Plane may return to name the resources it
// could not program; the agent copies them into the NACK's error detail.
type ResourceError interface {
	error
	Resources() []string
}

// Core is the agent's apply loop without any I/O of its own: it turns a
// Delta into one data plane transaction and an Ack, and holds the table the
// kernel was last programmed with. The gRPC session and the tests drive it.
type Core struct {
	plane   dataplane.Plane
	version string
	tracker *healthcheck.Tracker
	metrics *metrics.Metrics
	tracer  trace.Tracer
	log     *slog.Logger
	onTable func(pb.Table)
	now     func() time.Time

	// opMu serialises transactions: a periodic check must not run between
	// a delta's read of held and its commit.
	opMu sync.Mutex

	mu       sync.Mutex // guards the fields below, read by health reports
	held     pb.Table   // what the kernel holds; nil until the first success
	needSync bool       // no successful Sync since start: stale kernel state may exist
	stats    stats
}

type stats struct {
	rules        int64
	lastDuration time.Duration
	lastTime     time.Time
	errors       int64
	lastError    string
	conntrack    int64
}

func newCore(cfg *Config) *Core {
	return &Core{
		plane:    cfg.Plane,
		version:  cfg.Version,
		tracker:  cfg.Health,
		metrics:  cfg.Metrics,
		tracer:   cfg.TracerProvider.Tracer("github.com/signalbox/signalbox/nodeagent/agent"),
		log:      cfg.Logger,
		onTable:  cfg.OnTable,
		now:      cfg.Now,
		needSync: true,
	}
}

// Hashes returns name to hash of the held table, for the Hello.
func (c *Core) Hashes() map[string]string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.held.Hashes()
}

// Held returns the table the kernel was last programmed with (nil before
// the first success). Resources are immutable; do not modify the map.
func (c *Core) Held() pb.Table {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.held
}

// HandleDelta applies d in one transaction and returns the Ack or NACK.
// The first delta after a start goes through Sync so that rules left by a
// previous process and absent from the snapshot are removed.
func (c *Core) HandleDelta(ctx context.Context, d *pb.Delta) *pb.Ack {
	ctx = propagation.TraceContext{}.Extract(ctx, propagation.MapCarrier(d.GetTraceContext()))
	ctx, span := c.tracer.Start(ctx, "apply delta", trace.WithAttributes(
		attribute.Int64("signalbox.delta.sequence", int64(d.GetSequence())),
		attribute.Int("signalbox.delta.upserts", len(d.GetUpserts())),
		attribute.Int("signalbox.delta.removals", len(d.GetRemovals())),
		attribute.Bool("signalbox.delta.replace", d.GetReplace()),
	))
	defer span.End()

	c.tracker.QueuedUpdate()
	c.metrics.LastQueuedTimestamp.Set(float64(c.now().UnixNano()) / 1e9)

	c.opMu.Lock()
	defer c.opMu.Unlock()
	c.mu.Lock()
	held, full := c.held, c.needSync
	c.mu.Unlock()

	next, err := held.Apply(d)
	if err != nil {
		return c.nack(span, d, err, offenders(d))
	}
	var res dataplane.Result
	if full {
		res, err = c.plane.Sync(ctx, next)
	} else {
		res, err = c.plane.Apply(ctx, held, next)
	}
	done := c.now()
	if err != nil {
		c.recordFailure(err)
		var re ResourceError
		var names []string
		if errors.As(err, &re) {
			names = re.Resources()
		}
		return c.nack(span, d, err, names)
	}

	c.mu.Lock()
	c.held, c.needSync = next, false
	c.recordSuccessLocked(res, done)
	c.mu.Unlock()
	c.tracker.Updated()
	c.metrics.ObserveSync(full, res.Duration, done)
	c.metrics.DeltasApplied.Inc()
	if tt := d.GetTriggerTime(); tt != nil {
		c.metrics.ObserveProgramming(tt.AsTime(), done)
	}
	span.SetAttributes(attribute.Bool("signalbox.full_sync", full), attribute.Int("signalbox.rules", res.Rules))
	c.log.Debug("applied delta", "sequence", d.GetSequence(), "full", full,
		"resources", len(next), "rules", res.Rules, "duration", res.Duration)
	if c.onTable != nil {
		c.onTable(next)
	}
	return &pb.Ack{Sequence: d.GetSequence(), Health: c.Health()}
}

func (c *Core) nack(span trace.Span, d *pb.Delta, err error, names []string) *pb.Ack {
	span.RecordError(err)
	span.SetStatus(codes.Error, err.Error())
	c.metrics.Nacks.Inc()
	c.log.Warn("rejected delta; previous rules stay", "sequence", d.GetSequence(), "err", err, "resources", names)
	return &pb.Ack{
		Sequence: d.GetSequence(),
		Error:    &pb.ErrorDetail{Message: err.Error(), Resources: names},
		Health:   c.Health(),
	}
}

// Resync re-programs the held table with a full Sync, restoring rules that
// something else removed. It does nothing until a table is held: before
// the first snapshot there is nothing correct to restore.
func (c *Core) Resync(ctx context.Context) (ran bool, res dataplane.Result, err error) {
	c.opMu.Lock()
	defer c.opMu.Unlock()
	c.mu.Lock()
	held := c.held
	c.mu.Unlock()
	if held == nil {
		return false, dataplane.Result{}, nil
	}
	res, err = c.plane.Sync(ctx, held)
	done := c.now()
	if err != nil {
		c.recordFailure(err)
		return true, res, err
	}
	c.mu.Lock()
	c.recordSuccessLocked(res, done)
	c.mu.Unlock()
	c.metrics.ObserveSync(true, res.Duration, done)
	c.metrics.PeriodicSyncs.Inc()
	return true, res, nil
}

func (c *Core) recordSuccessLocked(res dataplane.Result, done time.Time) {
	c.stats.rules = int64(res.Rules)
	c.stats.lastDuration = res.Duration
	c.stats.lastTime = done
	c.stats.conntrack += int64(res.ConntrackCleaned)
	c.metrics.ConntrackCleanups.Add(float64(res.ConntrackCleaned))
	c.metrics.Rules.WithLabelValues(c.plane.Name()).Set(float64(res.Rules))
}

func (c *Core) recordFailure(err error) {
	c.mu.Lock()
	c.stats.errors++
	c.stats.lastError = err.Error()
	c.mu.Unlock()
	c.metrics.SyncFailures.Inc()
}

// Health returns the report sent on every Ack and on the health timer.
func (c *Core) Health() *pb.HealthReport {
	healthy := c.tracker.Health().Healthy
	c.mu.Lock()
	defer c.mu.Unlock()
	h := &pb.HealthReport{
		Backend:           c.plane.Name(),
		AgentVersion:      c.version,
		Resources:         int64(len(c.held)),
		Rules:             c.stats.rules,
		LastSyncDuration:  durationpb.New(c.stats.lastDuration),
		Errors:            c.stats.errors,
		LastError:         c.stats.lastError,
		ConntrackCleanups: c.stats.conntrack,
		Healthy:           healthy,
	}
	if !c.stats.lastTime.IsZero() {
		h.LastSyncTime = timestamppb.New(c.stats.lastTime)
	}
	return h
}

// offenders names the resources that make a delta structurally invalid,
// mirroring the checks of Table.Apply, so a NACK points at them.
func offenders(d *pb.Delta) []string {
	var names []string
	seen := map[string]bool{}
	for _, r := range d.GetUpserts() {
		n := r.GetName()
		if seen[n] || r.GetBody() == nil {
			names = append(names, n)
		}
		seen[n] = true
	}
	for _, n := range d.GetRemovals() {
		if seen[n] {
			names = append(names, n)
		}
	}
	slices.Sort(names)
	return slices.Compact(names)
}
