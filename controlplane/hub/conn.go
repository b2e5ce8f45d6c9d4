package hub

import (
	"context"
	"fmt"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/signalbox/signalbox/controlplane/session"
	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// Connect registers an agent stream after its hello. A newer stream for
// the same node replaces an older one, whose Done channel closes.
func (h *Hub) Connect(ctx context.Context, hello *pb.Hello) (*Conn, error) {
	var c *Conn
	err := h.Query(ctx, func() {
		n := h.record(hello.GetNodeName())
		if n.conn != nil {
			h.log.Info("agent stream replaced by a newer one", "node", n.name)
			close(n.conn.Done)
			h.metrics.Connected.Dec()
		}
		h.nextID++
		c = &Conn{
			id:   h.nextID,
			node: n.name,
			sess: session.New(n.name, hello, h.cfg.Session),
			Send: make(chan pb.Frame, 1),
			Done: make(chan struct{}),
		}
		n.conn, n.hello = c, hello
		h.metrics.Connected.Inc()
		h.log.Info("agent connected", "node", n.name, "version", hello.GetAgentVersion(),
			"mode", hello.GetMode(), "held", len(hello.GetResourceVersions()))
		h.pump(n)
		h.armWake(n)
	})
	return c, err
}

// Disconnect forgets a stream; the node keeps its rules (fail static) and
// its record stays for inspection.
func (h *Hub) Disconnect(c *Conn) {
	h.Do(func() {
		n := h.nodes[c.node]
		if n == nil || n.conn != c {
			return
		}
		n.conn = nil
		h.metrics.Connected.Dec()
		h.log.Info("agent disconnected", "node", c.node)
	})
}

// Ack hands an agent's answer to its session and sends the next delta.
func (h *Hub) Ack(c *Conn, a *pb.Ack) {
	h.Do(func() {
		n := h.nodes[c.node]
		if n == nil || n.conn != c {
			return
		}
		if a.GetHealth() != nil {
			n.health = a.GetHealth()
		}
		if err := c.sess.Ack(a, h.now()); err != nil {
			h.log.Warn("unexpected answer", "node", c.node, "err", err)
			return
		}
		if a.GetError() != nil {
			n.lastNack, n.nackTime = a.GetError(), h.now()
			h.metrics.Nacks.Inc()
			h.log.Warn("agent rejected delta", "node", c.node, "sequence", a.GetSequence(),
				"error", a.GetError().GetMessage(), "resources", a.GetError().GetResources())
		} else {
			h.metrics.Acks.Inc()
		}
		h.publish(n, &pb.WatchNodeDeltasResponse{Event: &pb.WatchNodeDeltasResponse_Ack{Ack: a}})
		h.pump(n)
		h.armWake(n)
	})
}

// Health records a periodic health report.
func (h *Hub) Health(c *Conn, r *pb.HealthReport) {
	h.Do(func() {
		if n := h.nodes[c.node]; n != nil && n.conn == c {
			n.health = r
		}
	})
}

func (h *Hub) armWake(n *nodeRecord) {
	if n.conn == nil {
		return
	}
	if w := n.conn.sess.Wake(); !w.IsZero() {
		h.wakeTimer.Reset(max(w.Sub(h.now()), time.Millisecond))
	}
}

func (h *Hub) record(name string) *nodeRecord {
	n := h.nodes[name]
	if n == nil {
		n = &nodeRecord{name: name, watchers: map[chan *pb.WatchNodeDeltasResponse]bool{}}
		h.nodes[name] = n
	}
	return n
}

// Watch streams one node's deltas and answers until ctx ends. Events are
// dropped for a watcher too slow to keep up rather than stall the hub.
func (h *Hub) Watch(ctx context.Context, node string, fn func(*pb.WatchNodeDeltasResponse) error) error {
	ch := make(chan *pb.WatchNodeDeltasResponse, 256)
	if err := h.Query(ctx, func() { h.record(node).watchers[ch] = true }); err != nil {
		return err
	}
	defer h.Do(func() { delete(h.record(node).watchers, ch) })
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev := <-ch:
			if err := fn(ev); err != nil {
				return err
			}
		}
	}
}

func (h *Hub) publish(n *nodeRecord, ev *pb.WatchNodeDeltasResponse) {
	if len(n.watchers) == 0 {
		return
	}
	ev.Time = timestamppb.New(h.now())
	for ch := range n.watchers {
		select {
		case ch <- ev:
		default:
			h.log.Warn("inspection watcher too slow; event dropped", "node", n.name)
		}
	}
}

// errUnknownNode is returned for inspection of a node never seen.
func errUnknownNode(name string) error { return fmt.Errorf("node %q has never connected", name) }

// Watchers counts open inspection watches of a node.
func (h *Hub) Watchers(node string) int {
	n := 0
	_ = h.Query(context.Background(), func() {
		if r := h.nodes[node]; r != nil {
			n = len(r.watchers)
		}
	})
	return n
}
