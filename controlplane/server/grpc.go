package server

import (
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection"

	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// NewGRPC builds a gRPC server with the signalbox codec (pre-encoded
// frames pass through), reflection and grpc.health.v1, so grpcurl can list,
// describe and call everything.
func NewGRPC(opts ...grpc.ServerOption) (*grpc.Server, *health.Server) {
	opts = append(opts, grpc.ForceServerCodec(pb.Codec{}))
	s := grpc.NewServer(opts...)
	hs := health.NewServer()
	healthpb.RegisterHealthServer(s, hs)
	reflection.Register(s)
	return s, hs
}
