package hub

import (
	"context"
	"sort"

	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// ListNodes returns every node's status, sorted by name.
func (h *Hub) ListNodes(ctx context.Context) ([]*pb.NodeStatus, error) {
	var out []*pb.NodeStatus
	err := h.Query(ctx, func() {
		for _, n := range h.nodes {
			if n.hello == nil {
				continue // only watched, never connected
			}
			out = append(out, h.status(n))
		}
	})
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, err
}

// NodeTable returns a node's status, desired table and acknowledged hashes.
func (h *Hub) NodeTable(ctx context.Context, node string) (*pb.GetNodeTableResponse, error) {
	var out *pb.GetNodeTableResponse
	var qerr error
	err := h.Query(ctx, func() {
		n := h.nodes[node]
		if n == nil || n.hello == nil {
			qerr = errUnknownNode(node)
			return
		}
		out = &pb.GetNodeTableResponse{
			Status:  h.status(n),
			Desired: h.cache.Table(h.cache.Current(node)),
			Acked:   map[string]string{},
		}
		if n.conn != nil {
			acked := n.conn.sess.Status().Acked
			if acked.Held != nil {
				out.Acked = acked.Held
			} else {
				for _, r := range h.cache.Table(acked) {
					out.Acked[r.Name] = r.Hash
				}
			}
		}
	})
	if err != nil {
		return nil, err
	}
	return out, qerr
}

// Convergence splits nodes by whether they acknowledged a Service's
// current version.
func (h *Hub) Convergence(ctx context.Context, namespace, name string) (*pb.GetServiceConvergenceResponse, error) {
	key := namespace + "/" + name
	out := &pb.GetServiceConvergenceResponse{}
	err := h.Query(ctx, func() {
		last := h.cache.LastChange(key)
		for _, n := range h.nodes {
			if n.hello == nil {
				continue
			}
			if n.conn == nil {
				out.Pending = append(out.Pending, n.name)
				continue
			}
			st := n.conn.sess.Status()
			cur := h.cache.Current(n.name)
			switch {
			case st.Degraded && contains(st.NackServices, key):
				out.Rejected = append(out.Rejected, &pb.NodeRejection{Node: n.name, Error: st.LastNack})
			case st.Acked.Held == nil && st.Acked.Gen >= last && st.Acked.Node == cur.Node:
				out.Converged = append(out.Converged, n.name)
			default:
				out.Pending = append(out.Pending, n.name)
			}
		}
	})
	sort.Strings(out.Converged)
	sort.Strings(out.Pending)
	sort.Slice(out.Rejected, func(i, j int) bool { return out.Rejected[i].Node < out.Rejected[j].Node })
	return out, err
}

func (h *Hub) status(n *nodeRecord) *pb.NodeStatus {
	s := &pb.NodeStatus{
		Name:         n.name,
		Connected:    n.conn != nil,
		Health:       n.health,
		Mode:         n.hello.GetMode(),
		AgentVersion: n.hello.GetAgentVersion(),
		LastNack:     n.lastNack,
	}
	if !n.nackTime.IsZero() {
		s.LastNackTime = timestamppb.New(n.nackTime)
	}
	cur := h.cache.Current(n.name)
	if n.conn != nil {
		st := n.conn.sess.Status()
		s.AckedSequence = st.AckedSeq
		s.InFlightSequence = st.InFlightSeq
		s.Degraded = st.Degraded
		ch := h.cache.Diff(st.Acked, cur)
		s.PendingChanges = int64(len(ch.Upserts) + len(ch.Removals))
		if !st.PendingSince.IsZero() {
			s.Lag = durationpb.New(h.now().Sub(st.PendingSince))
		}
	}
	return s
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}
