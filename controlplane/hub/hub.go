// Package hub owns the cache and every node's session on one goroutine and
// connects them to the outside: informer events come in, deltas go out to
// streams, answers come back. Everything that touches the cache or a
// session runs as a closure on that goroutine, so the pure cores need no
// locks.
package hub

import (
	"context"
	"log/slog"
	"time"

	"github.com/signalbox/signalbox/controlplane/cache"
	"github.com/signalbox/signalbox/controlplane/session"
	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// Config tunes the hub.
type Config struct {
	// Quiet is how long events must pause before a flush, so a burst (a
	// rolling update) becomes one generation.
	Quiet time.Duration
	// MaxDelay bounds how long any event waits for a flush.
	MaxDelay time.Duration
	// Session tunes NACK backoff.
	Session session.Config
	// Logger for events; nil means slog.Default().
	Logger *slog.Logger
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// DefaultConfig is what the control plane runs with.
var DefaultConfig = Config{Quiet: 20 * time.Millisecond, MaxDelay: 200 * time.Millisecond, Session: session.DefaultConfig}

// Hub is the control plane's core loop.
type Hub struct {
	cfg     Config
	log     *slog.Logger
	now     func() time.Time
	cache   *cache.Cache
	in      chan func()
	nodes   map[string]*nodeRecord
	nextID  uint64
	metrics *Metrics

	firstDirty, lastDirty time.Time
	flushTimer            *time.Timer
	wakeTimer             *time.Timer
	trace                 map[string]string
}

// nodeRecord outlives streams: inspection shows disconnected nodes too.
type nodeRecord struct {
	name     string
	conn     *Conn
	hello    *pb.Hello
	health   *pb.HealthReport
	lastNack *pb.ErrorDetail
	nackTime time.Time
	watchers map[chan *pb.WatchNodeDeltasResponse]bool
}

// Conn is one agent stream as the hub sees it.
type Conn struct {
	id   uint64
	node string
	sess *session.Session
	// Send carries frames to the stream's sender; it holds at most one
	// because only one delta is ever in flight.
	Send chan pb.Frame
	// Done is closed when the hub drops the connection (a newer stream for
	// the same node replaced it).
	Done chan struct{}
}

// New returns a hub around a cache. Run must be called.
func New(c *cache.Cache, cfg Config, m *Metrics) *Hub {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if m == nil {
		m = NewMetrics(nil)
	}
	h := &Hub{
		cfg: cfg, log: cfg.Logger, now: cfg.Now, cache: c,
		in:         make(chan func(), 1024),
		nodes:      map[string]*nodeRecord{},
		metrics:    m,
		flushTimer: stoppedTimer(),
		wakeTimer:  stoppedTimer(),
	}
	return h
}

func stoppedTimer() *time.Timer {
	t := time.NewTimer(time.Hour)
	t.Stop()
	return t
}

// Run processes events until ctx ends.
func (h *Hub) Run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case f := <-h.in:
			f()
			h.armFlush()
		case <-h.flushTimer.C:
			h.flushDue()
		case <-h.wakeTimer.C:
			h.pumpAll()
		}
	}
}

// Do runs f on the hub goroutine, without waiting.
func (h *Hub) Do(f func()) { h.in <- f }

// Query runs f on the hub goroutine and waits for it.
func (h *Hub) Query(ctx context.Context, f func()) error {
	done := make(chan struct{})
	select {
	case h.in <- func() { f(); close(done) }:
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Cache gives closures run by Do access to the cache.
func (h *Hub) Cache() *cache.Cache { return h.cache }

// MarkDirty tells the hub an event changed the cache (call from Do).
func (h *Hub) MarkDirty() {
	now := h.now()
	if h.firstDirty.IsZero() {
		h.firstDirty = now
	}
	h.lastDirty = now
}

func (h *Hub) armFlush() {
	if !h.cache.Dirty() || h.firstDirty.IsZero() {
		return
	}
	d := FlushAt(h.firstDirty, h.lastDirty, h.cfg.Quiet, h.cfg.MaxDelay).Sub(h.now())
	h.flushTimer.Reset(max(d, 0))
}

// FlushAt is when a burst of events that started at first and last grew at
// last is flushed: after a quiet pause, but never later than maxDelay after
// the first event.
func FlushAt(first, last time.Time, quiet, maxDelay time.Duration) time.Time {
	t := last.Add(quiet)
	if limit := first.Add(maxDelay); t.After(limit) {
		return limit
	}
	return t
}

func (h *Hub) flushDue() {
	if h.firstDirty.IsZero() {
		return
	}
	if h.now().Before(FlushAt(h.firstDirty, h.lastDirty, h.cfg.Quiet, h.cfg.MaxDelay)) {
		h.armFlush()
		return
	}
	h.Flush()
}

// Flush builds dirty Services now and sends the resulting deltas.
func (h *Hub) Flush() {
	h.firstDirty, h.lastDirty = time.Time{}, time.Time{}
	start := h.now()
	changed, problems := h.cache.Flush()
	for _, p := range problems {
		h.log.Warn("skipped bad object", "object", p.Object, "reason", p.Reason)
		h.metrics.Skipped.Inc()
	}
	if len(changed) == 0 {
		return
	}
	h.metrics.Generation.Set(float64(h.cache.Gen()))
	h.log.Debug("flushed", "generation", h.cache.Gen(), "services", len(changed), "took", h.now().Sub(start))
	h.trace = startFlushTrace(changed, h.cache.Gen())
	h.pumpAll()
	h.compact()
}

func (h *Hub) compact() {
	gen, any := h.cache.Gen(), false
	for _, n := range h.nodes {
		if n.conn == nil {
			continue
		}
		if g, ok := n.conn.sess.MinGen(); ok && (!any || g < gen) {
			gen, any = g, true
		}
	}
	h.cache.Compact(gen)
}

// pumpAll offers every idle session its next delta and re-arms the
// backoff wake-up.
func (h *Hub) pumpAll() {
	var wake time.Time
	for _, n := range h.nodes {
		if n.conn == nil {
			continue
		}
		h.pump(n)
		if w := n.conn.sess.Wake(); !w.IsZero() && (wake.IsZero() || w.Before(wake)) {
			wake = w
		}
	}
	if !wake.IsZero() {
		h.wakeTimer.Reset(max(wake.Sub(h.now()), time.Millisecond))
	}
}

func (h *Hub) pump(n *nodeRecord) {
	out := n.conn.sess.Next(h.cache, h.now(), h.trace)
	if out == nil {
		return
	}
	select {
	case n.conn.Send <- out.Frame:
	default:
		// Cannot happen while the one-in-flight rule holds; dropping would
		// stall the node, so say so loudly.
		h.log.Error("stream send queue full; delta dropped", "node", n.name, "sequence", out.Delta.Sequence)
		return
	}
	h.metrics.DeltasSent.Inc()
	h.metrics.BytesSent.Add(float64(len(out.Frame)))
	h.publish(n, &pb.WatchNodeDeltasResponse{Event: &pb.WatchNodeDeltasResponse_Sent{Sent: out.Delta}})
}
