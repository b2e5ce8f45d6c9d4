package agent

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/signalbox/signalbox/nodeagent/dataplane"
	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// selfSigned returns a certificate for "localhost" that is its own CA.
func selfSigned(t *testing.T) (tls.Certificate, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "signalbox-test"},
		DNSNames:              []string{"localhost"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key},
		pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// The production path: TLS verified against a CA file, the token as a
// bearer credential, and every connection made by the supplied dialer (as
// a network-namespace-aware dialer would).
func TestTLSTokenAndCustomDialer(t *testing.T) {
	cert, caPEM := selfSigned(t)
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	writeFile(t, caFile, string(caPEM))
	cs, addr, _ := serve(t, "127.0.0.1:0",
		grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})))

	dialed := make(chan string, 4)
	dial := func(ctx context.Context, network, address string) (net.Conn, error) {
		dialed <- network + " " + address
		return (&net.Dialer{}).DialContext(ctx, network, address)
	}
	startAgent(t, addr, dataplane.NewFake(), func(c *Config) {
		c.Insecure, c.CAFile, c.ServerName, c.Dial = false, caFile, "localhost", dial
	}, nil)

	if got := recv(t, dialed, "dial"); got != "tcp "+addr {
		t.Errorf("dialer called with %q, want %q", got, "tcp "+addr)
	}
	recv(t, cs.hellos, "hello over TLS")
	if tok := recv(t, cs.tokens, "token"); tok != "Bearer token-1" {
		t.Errorf("authorization = %q", tok)
	}
	if ack := cs.deliver(t, &pb.Delta{Sequence: 1, Replace: true, Upserts: []*pb.Resource{svc("a", 80)}}); ack.GetError() != nil {
		t.Errorf("NACK over TLS: %v", ack.GetError())
	}
}

// A server whose certificate the CA did not sign is never talked to.
func TestTLSRejectsUnknownServer(t *testing.T) {
	cert, _ := selfSigned(t)
	_, otherCA := selfSigned(t)
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	writeFile(t, caFile, string(otherCA))
	cs, addr, _ := serve(t, "127.0.0.1:0",
		grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})))
	delays := make(chan time.Duration, 1)
	startAgent(t, addr, dataplane.NewFake(), func(c *Config) {
		c.Insecure, c.CAFile, c.ServerName = false, caFile, "localhost"
	}, func(a *Agent) {
		a.wait = func(ctx context.Context, d time.Duration) error {
			select {
			case delays <- d:
			default:
			}
			<-ctx.Done()
			return ctx.Err()
		}
	})
	recv(t, delays, "a failed attempt")
	select {
	case h := <-cs.hellos:
		t.Errorf("server with an untrusted certificate received %v", h)
	default:
	}
}
