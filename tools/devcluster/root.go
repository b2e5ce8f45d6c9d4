// Package devcluster runs a real kube-apiserver backed by a real etcd for
// tests, benchmarks and local development. There is no controller-manager:
// callers write EndpointSlices themselves, as the EndpointSlice controller
// would.
package devcluster

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

const (
	modulePath = "github.com/signalbox/signalbox"

	// KubeVersion is the Kubernetes release the binaries are built from. It
	// must match the k8s.io/kubernetes requirement in tools/k8sbuild/go.mod.
	KubeVersion = "v1.37.2"
)

// Root returns the repository root: $SIGNALBOX_ROOT when set, otherwise the
// nearest parent of the working directory whose go.mod declares the
// signalbox module. Tests run in their package directory and the CLI runs
// from anywhere inside the checkout, so walking up finds it in both cases.
func Root() (string, error) {
	if r := os.Getenv("SIGNALBOX_ROOT"); r != "" {
		return filepath.Abs(r)
	}
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if isSignalboxModule(filepath.Join(dir, "go.mod")) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no go.mod for module %s above the working directory; set SIGNALBOX_ROOT", modulePath)
		}
		dir = parent
	}
}

func isSignalboxModule(gomod string) bool {
	f, err := os.Open(gomod)
	if err != nil {
		return false
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) == 2 && fields[0] == "module" {
			return strings.Trim(fields[1], `"`) == modulePath
		}
	}
	return false
}

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
