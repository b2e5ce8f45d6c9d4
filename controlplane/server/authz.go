package server

import (
	"context"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/signalbox/signalbox/controlplane/auth"
)

func check(ctx context.Context, a auth.Authenticator) error {
	token, err := auth.BearerToken(ctx)
	if err != nil {
		return status.Error(codes.Unauthenticated, err.Error())
	}
	if _, err := a.Authenticate(ctx, token); err != nil {
		return status.Error(codes.Unauthenticated, err.Error())
	}
	return nil
}

// RequireToken guards unary inspection calls.
func RequireToken(a auth.Authenticator) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, next grpc.UnaryHandler) (any, error) {
		if err := check(ctx, a); err != nil {
			return nil, err
		}
		return next(ctx, req)
	}
}

// RequireTokenStream guards streaming inspection calls.
func RequireTokenStream(a auth.Authenticator) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, next grpc.StreamHandler) error {
		if err := check(ss.Context(), a); err != nil {
			return err
		}
		return next(srv, ss)
	}
}
