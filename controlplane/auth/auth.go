// Package auth maps an agent's bearer token to the node it may subscribe
// to.
package auth

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"google.golang.org/grpc/metadata"
	authnv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// NodeNameExtra is the user-info extra key the apiserver fills from a
// pod-bound ServiceAccount token's node claim.
const NodeNameExtra = "authentication.kubernetes.io/node-name"

// Authenticator returns the node a token belongs to.
type Authenticator interface {
	Authenticate(ctx context.Context, token string) (node string, err error)
}

// ErrNoToken means the request carried no bearer token.
var ErrNoToken = errors.New("no bearer token: start the agent with --token-file pointing at a projected ServiceAccount token")

// BearerToken extracts the token from gRPC metadata.
func BearerToken(ctx context.Context) (string, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	for _, v := range md.Get("authorization") {
		if t, ok := strings.CutPrefix(v, "Bearer "); ok && t != "" {
			return t, nil
		}
	}
	return "", ErrNoToken
}

// TokenReview authenticates with the apiserver's TokenReview API.
type TokenReview struct {
	Client    kubernetes.Interface
	Audiences []string
	// Allowed, when set, restricts which service accounts may act as
	// agents (e.g. "system:serviceaccount:kube-system:signalbox-agent").
	Allowed map[string]bool
}

// Authenticate implements Authenticator.
func (a *TokenReview) Authenticate(ctx context.Context, token string) (string, error) {
	tr, err := a.Client.AuthenticationV1().TokenReviews().Create(ctx, &authnv1.TokenReview{
		Spec: authnv1.TokenReviewSpec{Token: token, Audiences: a.Audiences},
	}, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("token review: %w", err)
	}
	if !tr.Status.Authenticated {
		return "", fmt.Errorf("token rejected: %s", tr.Status.Error)
	}
	user := tr.Status.User.Username
	if len(a.Allowed) > 0 && !a.Allowed[user] {
		return "", fmt.Errorf("%s is not an agent service account", user)
	}
	nodes := tr.Status.User.Extra[NodeNameExtra]
	if len(nodes) != 1 || nodes[0] == "" {
		return "", fmt.Errorf("token of %s carries no node name: use a projected token of a pod scheduled to its node", user)
	}
	return nodes[0], nil
}

// Reader authenticates inspection callers: any identity the apiserver
// authenticates may read the (read-only) inspection API.
type Reader struct {
	Client kubernetes.Interface
}

// Authenticate implements Authenticator; it returns the username.
func (r *Reader) Authenticate(ctx context.Context, token string) (string, error) {
	tr, err := r.Client.AuthenticationV1().TokenReviews().Create(ctx, &authnv1.TokenReview{
		Spec: authnv1.TokenReviewSpec{Token: token},
	}, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("token review: %w", err)
	}
	if !tr.Status.Authenticated {
		return "", fmt.Errorf("token rejected: %s", tr.Status.Error)
	}
	return tr.Status.User.Username, nil
}
