// Package testagent is a minimal node agent for tests and the fleet
// simulator: it speaks the sync protocol, holds its table in memory and
// ACKs or NACKs on command. It programs nothing.
package testagent

import (
	"context"
	"fmt"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// Agent is one connected test agent.
type Agent struct {
	Node   string
	conn   *grpc.ClientConn
	stream grpc.BidiStreamingClient[pb.SyncRequest, pb.SyncResponse]
	cancel context.CancelFunc
	table  pb.Table
}

// Connect dials target and says hello holding table (nil: nothing).
// Extra dial options (a netns dialer, credentials) come last and win.
func Connect(ctx context.Context, target, node string, table pb.Table, opts ...grpc.DialOption) (*Agent, error) {
	opts = append([]grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}, opts...)
	conn, err := grpc.NewClient(target, opts...)
	if err != nil {
		return nil, err
	}
	sctx, cancel := context.WithCancel(context.Background())
	stream, err := pb.NewNodeSyncServiceClient(conn).Sync(sctx)
	if err != nil {
		cancel()
		conn.Close()
		return nil, err
	}
	if table == nil {
		table = pb.Table{}
	}
	a := &Agent{Node: node, conn: conn, stream: stream, cancel: cancel, table: table}
	hello := &pb.Hello{NodeName: node, AgentVersion: "testagent", Mode: "fake", ResourceVersions: table.Hashes()}
	if err := stream.Send(&pb.SyncRequest{Kind: &pb.SyncRequest_Hello{Hello: hello}}); err != nil {
		a.Close()
		return nil, err
	}
	return a, nil
}

// Next waits for the next delta.
func (a *Agent) Next(ctx context.Context) (*pb.Delta, error) {
	type result struct {
		resp *pb.SyncResponse
		err  error
	}
	ch := make(chan result, 1)
	go func() {
		r, err := a.stream.Recv()
		ch <- result{r, err}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			return nil, r.err
		}
		return r.resp.GetDelta(), nil
	case <-ctx.Done():
		return nil, fmt.Errorf("node %s: no delta: %w", a.Node, ctx.Err())
	}
}

// Ack applies d to the held table and acknowledges it.
func (a *Agent) Ack(d *pb.Delta) error {
	next, err := a.table.Apply(d)
	if err != nil {
		return a.Nack(d, err.Error())
	}
	a.table = next
	return a.stream.Send(&pb.SyncRequest{Kind: &pb.SyncRequest_Ack{Ack: &pb.Ack{
		Sequence: d.GetSequence(),
		Health:   &pb.HealthReport{Backend: "fake", AgentVersion: "testagent", Resources: int64(len(next)), Healthy: true},
	}}})
}

// Nack rejects d, keeping the held table.
func (a *Agent) Nack(d *pb.Delta, msg string, resources ...string) error {
	return a.stream.Send(&pb.SyncRequest{Kind: &pb.SyncRequest_Ack{Ack: &pb.Ack{
		Sequence: d.GetSequence(),
		Error:    &pb.ErrorDetail{Message: msg, Resources: resources},
		Health:   &pb.HealthReport{Backend: "fake", AgentVersion: "testagent", Resources: int64(len(a.table)), Healthy: false, LastError: msg},
	}}})
}

// NextAck waits for a delta, acknowledges it and returns it.
func (a *Agent) NextAck(ctx context.Context) (*pb.Delta, error) {
	d, err := a.Next(ctx)
	if err != nil {
		return nil, err
	}
	return d, a.Ack(d)
}

// Table is the held table.
func (a *Agent) Table() pb.Table { return a.table }

// Close ends the stream; the held table stays readable.
func (a *Agent) Close() {
	a.cancel()
	a.conn.Close()
}
