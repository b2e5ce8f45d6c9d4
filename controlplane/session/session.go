// Package session is the per-node state machine of the delta protocol. Like
// etcd's raft it does no I/O, reads no clock and starts no goroutine: the
// caller asks Next for the delta to send (if any) and reports answers with
// Ack, passing the current time to both.
//
// Rules (DESIGN.md "The protocol"): one delta in flight; changes coalesce
// while the node is busy, because the next delta is always computed from
// what the node last ACKed to what it should have now; a NACK keeps the
// acknowledged table, records the error and backs off, and the same delta is
// not resent until its backoff has passed.
package session

import (
	"fmt"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/signalbox/signalbox/controlplane/cache"
	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// Config tunes the NACK backoff.
type Config struct {
	// MinBackoff is the wait after a NACK before a changed table is tried.
	MinBackoff time.Duration
	// MaxBackoff caps the doubling wait before an unchanged table is retried.
	MaxBackoff time.Duration
}

// DefaultConfig is what the control plane uses.
var DefaultConfig = Config{MinBackoff: time.Second, MaxBackoff: 5 * time.Minute}

// Session is one connected agent's protocol state.
type Session struct {
	node     string
	cfg      Config
	seq      uint64
	acked    cache.Point
	snapshot bool // the agent holds nothing: the first delta replaces
	inflight *Inflight

	backoff      time.Duration
	retryAt      time.Time // unchanged target: no resend before this
	changedAt    time.Time // changed target: no send before this
	nackedTarget *cache.Point
	lastNack     *pb.ErrorDetail
	lastNackTime time.Time
	nackServices []string
	ackedSeq     uint64
	pendingSince time.Time
}

// Inflight is the delta awaiting an answer.
type Inflight struct {
	Seq      uint64
	Target   cache.Point
	Services []string
	Sent     time.Time
	Replace  bool
}

// Outgoing is a delta to send.
type Outgoing struct {
	// Frame is the SyncResponse in wire form.
	Frame pb.Frame
	// Delta describes it for logs and inspection (resources shared, not
	// copied).
	Delta *pb.Delta
	// Services touched.
	Services []string
}

// New starts a session from an agent's hello: the resources it says it
// holds are the acknowledged table.
func New(node string, hello *pb.Hello, cfg Config) *Session {
	held := hello.GetResourceVersions()
	if held == nil {
		held = map[string]string{}
	}
	return &Session{
		node:     node,
		cfg:      cfg,
		acked:    cache.Point{Held: held},
		snapshot: len(held) == 0,
	}
}

// Node is the session's node name.
func (s *Session) Node() string { return s.node }

// Next returns the delta to send now, or nil when there is nothing to send
// or the session must wait (a delta in flight, a backoff). An empty
// difference advances the acknowledged point without sending anything.
func (s *Session) Next(c *cache.Cache, now time.Time, trace map[string]string) *Outgoing {
	if s.inflight != nil {
		return nil
	}
	target := c.Current(s.node)
	if s.lastNack != nil && s.nackedTarget != nil {
		if samePoint(*s.nackedTarget, target) && now.Before(s.retryAt) {
			return nil
		}
		if now.Before(s.changedAt) {
			return nil
		}
	}
	var ch cache.Change
	if s.snapshot {
		ch = c.Snapshot(target)
	} else {
		ch = c.Diff(s.acked, target)
		if ch.Empty() {
			s.acked = target
			s.pendingSince = time.Time{}
			return nil
		}
	}
	if s.pendingSince.IsZero() {
		s.pendingSince = now
	}
	s.seq++
	frame := pb.DeltaFrame{
		Sequence:     s.seq,
		Upserts:      ch.Encoded,
		Removals:     ch.Removals,
		Replace:      s.snapshot,
		TraceContext: trace,
	}
	if !ch.TriggerTime.IsZero() {
		frame.TriggerTime = timestamppb.New(ch.TriggerTime)
	}
	s.inflight = &Inflight{Seq: s.seq, Target: target, Services: ch.Services, Sent: now, Replace: s.snapshot}
	return &Outgoing{
		Frame: frame.Marshal(),
		Delta: &pb.Delta{
			Sequence: s.seq, Upserts: ch.Upserts, Removals: ch.Removals, Replace: s.snapshot,
			TraceContext: trace, TriggerTime: frame.TriggerTime,
		},
		Services: ch.Services,
	}
}

// Ack applies the agent's answer to the delta in flight.
func (s *Session) Ack(a *pb.Ack, now time.Time) error {
	if s.inflight == nil || a.GetSequence() != s.inflight.Seq {
		return fmt.Errorf("node %s answered sequence %d, expected %v", s.node, a.GetSequence(), s.inflightSeq())
	}
	in := s.inflight
	s.inflight = nil
	s.ackedSeq = in.Seq
	if a.GetError() == nil {
		s.acked = in.Target
		s.snapshot = false
		s.backoff = 0
		s.lastNack = nil
		s.nackedTarget = nil
		s.pendingSince = time.Time{}
		return nil
	}
	if s.backoff == 0 {
		s.backoff = s.cfg.MinBackoff
	} else {
		s.backoff = min(2*s.backoff, s.cfg.MaxBackoff)
	}
	t := in.Target
	s.nackedTarget = &t
	s.lastNack = a.GetError()
	s.lastNackTime = now
	s.nackServices = in.Services
	s.retryAt = now.Add(s.backoff)
	s.changedAt = now.Add(s.cfg.MinBackoff)
	return nil
}

// Wake is when a waiting session may have something to send again (zero
// when it is not waiting on a backoff).
func (s *Session) Wake() time.Time {
	if s.lastNack == nil || s.inflight != nil {
		return time.Time{}
	}
	return s.changedAt
}

// RetryAt is when an unchanged rejected table is tried again.
func (s *Session) RetryAt() time.Time { return s.retryAt }

// MinGen is the oldest generation this session may still diff from; the
// cache keeps history back to it. ok is false when the session pins none.
func (s *Session) MinGen() (gen uint64, ok bool) {
	if s.acked.Held == nil {
		gen, ok = s.acked.Gen, true
	}
	if s.inflight != nil && (!ok || s.inflight.Target.Gen < gen) {
		gen, ok = s.inflight.Target.Gen, true
	}
	return gen, ok
}

// Status is a snapshot of the session for inspection.
type Status struct {
	AckedSeq     uint64
	InFlightSeq  uint64
	Acked        cache.Point
	LastNack     *pb.ErrorDetail
	LastNackTime time.Time
	NackServices []string
	Degraded     bool
	PendingSince time.Time
}

// Status returns the session's state.
func (s *Session) Status() Status {
	return Status{
		AckedSeq:     s.ackedSeq,
		InFlightSeq:  s.inflightSeq(),
		Acked:        s.acked,
		LastNack:     s.lastNack,
		LastNackTime: s.lastNackTime,
		NackServices: s.nackServices,
		Degraded:     s.lastNack != nil,
		PendingSince: s.pendingSince,
	}
}

func (s *Session) inflightSeq() uint64 {
	if s.inflight == nil {
		return 0
	}
	return s.inflight.Seq
}

func samePoint(a, b cache.Point) bool {
	return a.Held == nil && b.Held == nil && a.Gen == b.Gen && a.Node == b.Node
}
