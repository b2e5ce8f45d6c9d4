package integration

import (
	"context"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/signalbox/signalbox/controlplane/auth"
	"github.com/signalbox/signalbox/tools/devcluster/devclustertest"
)

// bearer sends a token on a plaintext test connection; real agents use TLS.
type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}
func (bearer) RequireTransportSecurity() bool { return false }

func TestAgentsMaySubscribeToTheirOwnNodeOnly(t *testing.T) {
	cs := devclustertest.Get(t).Client()
	ctx := context.Background()
	ns := "agentauth"
	mkNamespace(t, cs, ns)
	mkNode(t, cs, "au-a", "z1")
	mkNode(t, cs, "au-b", "z1")
	if _, err := cs.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "agent"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	pod, err := cs.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "agent-au-a"},
		Spec: corev1.PodSpec{ServiceAccountName: "agent", NodeName: "au-a", AutomountServiceAccountToken: ptr(false),
			Containers: []corev1.Container{{Name: "agent", Image: "signalbox/agent:dev"}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	tr, err := cs.CoreV1().ServiceAccounts(ns).CreateToken(ctx, "agent", &authnv1.TokenRequest{Spec: authnv1.TokenRequestSpec{
		Audiences:      []string{"signalbox"},
		BoundObjectRef: &authnv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID},
	}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	token := tr.Status.Token
	p := startPlaneAuth(t, cs, &auth.TokenReview{Client: cs, Audiences: []string{"signalbox"},
		Allowed: map[string]bool{"system:serviceaccount:" + ns + ":agent": true}})

	own := connectErr(t, p, "au-a", grpc.WithPerRPCCredentials(bearer(token)))
	if d, err := own.Next(ctxT(t, 10*time.Second)); err != nil || !d.GetReplace() {
		t.Fatalf("the agent of au-a with its own token: delta %v, err %v", d, err)
	}
	cases := []struct {
		name, node string
		opts       []grpc.DialOption
		code       codes.Code
	}{
		{"another node's table", "au-b", []grpc.DialOption{grpc.WithPerRPCCredentials(bearer(token))}, codes.PermissionDenied},
		{"no token", "au-a", nil, codes.Unauthenticated},
		{"a forged token", "au-a", []grpc.DialOption{grpc.WithPerRPCCredentials(bearer("not-a-token"))}, codes.Unauthenticated},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			a := connectErr(t, p, c.node, c.opts...)
			_, err := a.Next(ctxT(t, 10*time.Second))
			if status.Code(err) != c.code {
				t.Fatalf("got %v, want code %v", err, c.code)
			}
		})
	}
}
