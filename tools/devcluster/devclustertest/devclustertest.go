// Package devclustertest gives each test binary one real kube-apiserver +
// etcd, started in TestMain and shared by its tests:
//
//	func TestMain(m *testing.M) { devclustertest.Main(m) }
//
//	func TestX(t *testing.T) {
//		c := devclustertest.Get(t)
//		cs := c.Client()
//		...
//	}
//
// Tests share the cluster, so they should create their objects in their own
// namespace (GenerateName). Namespaces never finish deleting here: the
// namespace controller lives in kube-controller-manager, which we do not run.
package devclustertest

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/signalbox/signalbox/tools/devcluster"
)

// startTimeout covers a cold build of kube-apiserver (about 5 minutes on 2
// cores) plus its start.
const startTimeout = 20 * time.Minute

var cluster *devcluster.Cluster

// Main starts the cluster, runs the tests, stops the cluster and exits with
// the tests' code. It fails, and never skips, when not root or when the
// cluster cannot start: a test that silently does not run is not a pass.
func Main(m *testing.M) {
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "devclustertest: these tests must run as root (etcd, kube-apiserver, network namespaces); CI runs them as root")
		os.Exit(1)
	}
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	c, err := devcluster.Start(ctx, devcluster.Options{Name: "test", Log: os.Stderr})
	cancel()
	if err != nil {
		fmt.Fprintf(os.Stderr, "devclustertest: cannot start the dev cluster: %v\n", err)
		os.Exit(1)
	}
	cluster = c
	code := m.Run()
	if err := c.Stop(); err != nil {
		fmt.Fprintf(os.Stderr, "devclustertest: stopping the dev cluster: %v\n", err)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

// Get returns the test binary's cluster.
func Get(t testing.TB) *devcluster.Cluster {
	t.Helper()
	if cluster == nil {
		t.Fatal("devclustertest.Get: no cluster; call devclustertest.Main(m) from TestMain")
	}
	return cluster
}
