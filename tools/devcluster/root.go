// Package devcluster runs a real kube-apiserver backed by a real etcd for
// tests, benchmarks and local development. There is no controller-manager:
// callers write EndpointSlices themselves, as the EndpointSlice controller
// would.
package devcluster

import (
	"os"
	"path/filepath"

	"github.com/signalbox/signalbox/tools/repo"
)

const (
	// KubeVersion is the Kubernetes release the binaries are built from. It
	// must match the k8s.io/kubernetes requirement in tools/k8sbuild/go.mod.
	KubeVersion = "v1.37.2"
)

// Root returns the repository root (see repo.Root).
func Root() (string, error) { return repo.Root() }

// CacheDir returns the git-ignored cache directory, <root>/.cache, or
// $SIGNALBOX_CACHE when set (CI can point it at a persisted volume).
func CacheDir() (string, error) {
	if c := os.Getenv("SIGNALBOX_CACHE"); c != "" {
		return filepath.Abs(c)
	}
	root, err := Root()
	if err != nil {
		return "", err
	}
	return filepath.Join(root, ".cache"), nil
}
