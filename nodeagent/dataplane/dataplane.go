// Package dataplane is the small interface between the agent core and the
// kernel programmers (iptables, IPVS, nftables). A plane renders decided
// tables; it never re-derives policy.
package dataplane

import (
	"context"
	"time"

	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// Plane programs one node's kernel from its table.
type Plane interface {
	// Name is the backend as reported in health, e.g. "iptables-legacy".
	Name() string
	// Apply moves the kernel from prev (what the plane last applied) to
	// next in one transaction. On error the kernel still holds prev.
	Apply(ctx context.Context, prev, next pb.Table) (Result, error)
	// Sync makes the kernel hold exactly t, removing stale objects the plane
	// owns: used for the first snapshot after a start and by the periodic
	// check that repairs rules someone else flushed.
	Sync(ctx context.Context, t pb.Table) (Result, error)
	// Cleanup removes everything the plane owns (the --cleanup mode, and a
	// switch from another mode). It is never called on disconnect or
	// shutdown: the agent fails static.
	Cleanup(ctx context.Context) error
}

// Result describes one transaction.
type Result struct {
	// Rules is the number of kernel objects the plane owns afterwards.
	Rules int
	// Duration of the transaction.
	Duration time.Duration
	// ConntrackCleaned counts stale conntrack entries deleted.
	ConntrackCleaned int
}
