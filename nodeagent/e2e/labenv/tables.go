package labenv

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
	"github.com/signalbox/signalbox/tools/netlab"
)

// ServiceTable returns the resources of Service ns/name the control plane
// wants on a node, and whether the node's agent has acknowledged exactly
// those (an acknowledgement means the kernel holds them).
func (e *Env) ServiceTable(ctx context.Context, node, ns, name string) ([]*pb.ServicePort, bool, error) {
	resp, err := e.Inspect.GetNodeTable(ctx, &pb.GetNodeTableRequest{Node: node})
	if err != nil {
		return nil, false, err
	}
	var sps []*pb.ServicePort
	acked := true
	for _, r := range resp.GetDesired() {
		sp := r.GetServicePort()
		if sp.GetNamespace() != ns || sp.GetName() != name {
			continue
		}
		sps = append(sps, sp)
		acked = acked && resp.GetAcked()[r.GetName()] == r.GetHash()
	}
	// A resource the agent still holds but should not (a removal not yet
	// acknowledged). Names read svc/<family>/<namespace>/<name>/<port>.
	for held := range resp.GetAcked() {
		f := strings.Split(held, "/")
		if len(f) == 5 && f[0] == "svc" && f[2] == ns && f[3] == name &&
			!slices.ContainsFunc(resp.GetDesired(), func(r *pb.Resource) bool { return r.GetName() == held }) {
			acked = false
		}
	}
	return sps, acked, nil
}

// WaitTables waits until, on each of the nodes (every lab node when none
// are given), Service ns/name's resources satisfy check and the agent has
// acknowledged them. Checking the content, not just the acknowledgement,
// keeps a caller from mistaking the state before the control plane saw a
// change for the state after it.
func (e *Env) WaitTables(ctx context.Context, timeout time.Duration, ns, name string, check func(node string, sps []*pb.ServicePort) error, nodes ...*netlab.Host) error {
	if len(nodes) == 0 {
		nodes = e.Lab.Nodes()
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		err := e.tablesOK(ctx, ns, name, check, nodes)
		if err == nil {
			return nil
		}
		if pause(ctx, 100*time.Millisecond) != nil {
			return fmt.Errorf("tables of %s/%s not applied within %s: %w", ns, name, timeout, err)
		}
	}
}

func (e *Env) tablesOK(ctx context.Context, ns, name string, check func(string, []*pb.ServicePort) error, nodes []*netlab.Host) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	for _, n := range nodes {
		sps, acked, err := e.ServiceTable(ctx, n.Name, ns, name)
		if err != nil {
			return fmt.Errorf("%s: %w", n.Name, err)
		}
		if err := check(n.Name, sps); err != nil {
			return fmt.Errorf("%s: %w", n.Name, err)
		}
		if !acked {
			return fmt.Errorf("%s: not acknowledged yet", n.Name)
		}
	}
	return nil
}
