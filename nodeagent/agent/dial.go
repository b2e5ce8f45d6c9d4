package agent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"net"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"
)

// dialOptions builds the gRPC options for one connection. It runs for every
// connection so that a rotated CA bundle is picked up like the token.
func dialOptions(cfg *Config) ([]grpc.DialOption, error) {
	var opts []grpc.DialOption
	if cfg.Insecure {
		opts = append(opts, grpc.WithTransportCredentials(insecure.NewCredentials()))
	} else {
		tc := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: cfg.ServerName}
		if cfg.CAFile != "" {
			pem, err := os.ReadFile(cfg.CAFile)
			if err != nil {
				return nil, fmt.Errorf("agent: read CA file: %w", err)
			}
			tc.RootCAs = x509.NewCertPool()
			if !tc.RootCAs.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("agent: no certificate in CA file %s", cfg.CAFile)
			}
		}
		opts = append(opts, grpc.WithTransportCredentials(credentials.NewTLS(tc)))
	}
	if cfg.TokenFile != "" {
		opts = append(opts, grpc.WithPerRPCCredentials(tokenFile{path: cfg.TokenFile, plaintext: cfg.Insecure}))
	}
	dial := cfg.Dial
	opts = append(opts,
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			// "unix:/p" arrives verbatim through passthrough; "unix:///p"
			// arrives as "/p" after gRPC's own unix resolver.
			if path, ok := strings.CutPrefix(addr, "unix:"); ok {
				return dial(ctx, "unix", strings.TrimPrefix(path, "//"))
			}
			if strings.HasPrefix(addr, "/") {
				return dial(ctx, "unix", addr)
			}
			return dial(ctx, "tcp", addr)
		}),
		// An idle agent receives nothing for long stretches; pings detect a
		// control plane that vanished without closing the connection. Five
		// minutes is what a gRPC server accepts by default.
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 5 * time.Minute, Timeout: 20 * time.Second}),
	)
	return append(opts, cfg.DialOptions...), nil
}

// tokenFile is per-RPC credentials that read the bearer token from a file
// each time a stream opens. gRPC asks once per RPC and the agent opens one
// stream per connection, so every (re)connect presents the current token.
//
// In plaintext mode (the sealed lab, tests) a missing file means "no
// token", so a lab agent runs with the DaemonSet's default flags; with TLS
// a missing token is an error and the agent keeps retrying until the
// kubelet has projected it.
type tokenFile struct {
	path      string
	plaintext bool
}

func (t tokenFile) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	b, err := os.ReadFile(t.path)
	if t.plaintext && errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read token: %w", err)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return nil, errors.New("token file is empty")
	}
	return map[string]string{"authorization": "Bearer " + tok}, nil
}

// RequireTransportSecurity is false only in plaintext mode, which exists
// for tests and the sealed lab.
func (t tokenFile) RequireTransportSecurity() bool { return !t.plaintext }

// backoff yields exponentially growing delays with jitter, so that
// thousands of agents cut off by one control-plane restart do not all
// reconnect in the same instant.
type backoff struct {
	initial, max time.Duration
	cur          time.Duration
	rand         func() float64 // in [0,1)
}

func newBackoff(initial, maxDelay time.Duration) *backoff {
	return &backoff{initial: initial, max: maxDelay, rand: rand.Float64}
}

// next returns a delay in [cur/2, cur), where cur doubles from initial up
// to max on each call.
func (b *backoff) next() time.Duration {
	if b.cur == 0 {
		b.cur = b.initial
	} else {
		b.cur = min(b.cur*2, b.max)
	}
	half := b.cur / 2
	return half + time.Duration(b.rand()*float64(b.cur-half))
}

func (b *backoff) reset() { b.cur = 0 }
