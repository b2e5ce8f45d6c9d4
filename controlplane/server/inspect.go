package server

import (
	"context"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/signalbox/signalbox/controlplane/hub"
	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// Inspect serves the read-only InspectionService.
type Inspect struct {
	pb.UnimplementedInspectionServiceServer
	Hub *hub.Hub
}

// ListNodes implements InspectionService.
func (s *Inspect) ListNodes(ctx context.Context, _ *pb.ListNodesRequest) (*pb.ListNodesResponse, error) {
	nodes, err := s.Hub.ListNodes(ctx)
	if err != nil {
		return nil, err
	}
	return &pb.ListNodesResponse{Nodes: nodes}, nil
}

// GetNodeTable implements InspectionService.
func (s *Inspect) GetNodeTable(ctx context.Context, req *pb.GetNodeTableRequest) (*pb.GetNodeTableResponse, error) {
	if req.GetNode() == "" {
		return nil, status.Error(codes.InvalidArgument, "node is required")
	}
	t, err := s.Hub.NodeTable(ctx, req.GetNode())
	if err != nil {
		return nil, status.Error(codes.NotFound, err.Error())
	}
	return t, nil
}

// WatchNodeDeltas implements InspectionService.
func (s *Inspect) WatchNodeDeltas(req *pb.WatchNodeDeltasRequest, stream grpc.ServerStreamingServer[pb.WatchNodeDeltasResponse]) error {
	if req.GetNode() == "" {
		return status.Error(codes.InvalidArgument, "node is required")
	}
	return s.Hub.Watch(stream.Context(), req.GetNode(), stream.Send)
}

// GetServiceConvergence implements InspectionService.
func (s *Inspect) GetServiceConvergence(ctx context.Context, req *pb.GetServiceConvergenceRequest) (*pb.GetServiceConvergenceResponse, error) {
	if req.GetNamespace() == "" || req.GetName() == "" {
		return nil, status.Error(codes.InvalidArgument, "namespace and name are required")
	}
	return s.Hub.Convergence(ctx, req.GetNamespace(), req.GetName())
}
