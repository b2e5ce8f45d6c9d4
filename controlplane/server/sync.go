// Package server is the thin gRPC layer over the hub: node sync streams
// and the read-only inspection API.
package server

import (
	"errors"
	"io"
	"log/slog"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/signalbox/signalbox/controlplane/auth"
	"github.com/signalbox/signalbox/controlplane/hub"
	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// Sync serves NodeSyncService.
type Sync struct {
	pb.UnimplementedNodeSyncServiceServer
	Hub *hub.Hub
	// Auth, when nil, trusts the node name in the hello (lab and tests
	// only; the binary refuses to run so without --insecure).
	Auth   auth.Authenticator
	Logger *slog.Logger
}

// Sync implements the stream: hello, then deltas out and answers in.
func (s *Sync) Sync(stream grpc.BidiStreamingServer[pb.SyncRequest, pb.SyncResponse]) error {
	ctx := stream.Context()
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	hello := first.GetHello()
	if hello == nil || hello.GetNodeName() == "" {
		return status.Error(codes.InvalidArgument, "the first message must be a Hello with a node name")
	}
	if s.Auth != nil {
		token, err := auth.BearerToken(ctx)
		if err != nil {
			return status.Error(codes.Unauthenticated, err.Error())
		}
		node, err := s.Auth.Authenticate(ctx, token)
		if err != nil {
			return status.Error(codes.Unauthenticated, err.Error())
		}
		if node != hello.GetNodeName() {
			return status.Errorf(codes.PermissionDenied, "credentials are for node %q, hello names %q: an agent may subscribe to its own node only", node, hello.GetNodeName())
		}
	}
	conn, err := s.Hub.Connect(ctx, hello)
	if err != nil {
		return err
	}
	defer s.Hub.Disconnect(conn)

	recvErr := make(chan error, 1)
	go func() { recvErr <- s.receive(stream, conn) }()
	for {
		select {
		case frame := <-conn.Send:
			// SendMsg with a pre-encoded frame: the server's codec passes
			// the bytes through (see signalboxv1.Codec).
			if err := stream.SendMsg(frame); err != nil {
				return err
			}
		case err := <-recvErr:
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		case <-conn.Done:
			return status.Error(codes.Aborted, "replaced by a newer stream for the same node")
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (s *Sync) receive(stream grpc.BidiStreamingServer[pb.SyncRequest, pb.SyncResponse], conn *hub.Conn) error {
	for {
		req, err := stream.Recv()
		if err != nil {
			return err
		}
		switch {
		case req.GetAck() != nil:
			s.Hub.Ack(conn, req.GetAck())
		case req.GetHealth() != nil:
			s.Hub.Health(conn, req.GetHealth())
		case req.GetHello() != nil:
			return status.Error(codes.InvalidArgument, "a second Hello on one stream")
		}
	}
}
