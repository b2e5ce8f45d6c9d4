package e2e

import (
	"context"
	"fmt"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/signalbox/signalbox/nodeagent/e2e/labenv"
	"github.com/signalbox/signalbox/tools/netlab"
)

// ModeEnv selects the agents' data plane: "iptables" (default) or "ipvs".
const ModeEnv = "SIGNALBOX_E2E_MODE"

// env is shared by every test of the binary: building it (apiserver,
// control plane, three agents) costs far more than any one test, so tests
// share it and keep apart by namespace and Service name.
var env *labenv.Env

// startTimeout covers a cold build of kube-apiserver (about 5 minutes on 2
// cores), the two signalbox binaries and the start of everything.
const startTimeout = 20 * time.Minute

func TestMain(m *testing.M) {
	// Never a skip: a suite that silently does not run is not a pass.
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "e2e: these tests need root (network namespaces, iptables, etcd, kube-apiserver); CI runs them as root")
		os.Exit(1)
	}
	mode := os.Getenv(ModeEnv)
	if mode == "" {
		mode = "iptables"
	}
	site, err := selectSite()
	if err != nil {
		fmt.Fprintf(os.Stderr, "e2e: %v\n", err)
		os.Exit(1)
	}
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	e, err := labenv.Start(ctx, labenv.Options{
		LabName: "e2e" + mode,
		Mode:    mode,
		Site:    site,
		Log:     os.Stderr,
	})
	cancel()
	if err != nil {
		fmt.Fprintf(os.Stderr, "e2e: cannot start the environment (mode %s): %v\n", mode, err)
		os.Exit(1)
	}
	env = e
	code := m.Run()
	if code != 0 {
		fmt.Fprintf(os.Stderr, "e2e: failures; logs of every process are in %s\n", env.LogDir)
	}
	if err := env.Close(); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: teardown: %v\n", err)
		if code == 0 {
			code = 1
		}
	}
	if code == 0 {
		os.RemoveAll(env.LogDir) // logs matter only when something failed
	}
	os.Exit(code)
}

// selectSite picks where the apiserver and the control plane run: in the
// lab's control namespace (default), or on the host of the VM this binary
// runs in (nodeagent/e2e/vm starts them and sets the environment).
func selectSite() (labenv.Site, error) {
	switch site := os.Getenv(labenv.SiteEnv); site {
	case "", "lab":
		return &labenv.LabSite{}, nil
	case "vm":
		s := &labenv.VMSite{Gateway: os.Getenv(labenv.GatewayEnv), Kubeconfig: os.Getenv(labenv.KubeconfigEnv)}
		if s.Gateway == "" || s.Kubeconfig == "" {
			return nil, fmt.Errorf("$%s=vm needs $%s and $%s", labenv.SiteEnv, labenv.GatewayEnv, labenv.KubeconfigEnv)
		}
		return s, nil
	default:
		return nil, fmt.Errorf("$%s=%q: want lab or vm", labenv.SiteEnv, site)
	}
}

// Lab hosts by name.
func pod(name string) *netlab.Host  { return mustHost(env.Lab.Pod(name), "pod", name) }
func node(name string) *netlab.Host { return mustHost(env.Lab.Node(name), "node", name) }
func client() *netlab.Host          { return env.Lab.Client() }

func mustHost(h *netlab.Host, kind, name string) *netlab.Host {
	if h == nil {
		panic(fmt.Sprintf("no lab %s %q", kind, name))
	}
	return h
}

func pods(names ...string) []*netlab.Host {
	out := make([]*netlab.Host, len(names))
	for i, n := range names {
		out[i] = pod(n)
	}
	return out
}

func allPods() []*netlab.Host { return env.Lab.Pods() }

func podNames(hosts []*netlab.Host) []string {
	var names []string
	for _, h := range hosts {
		names = append(names, h.Name)
	}
	slices.Sort(names)
	return names
}

func podIPs(hosts []*netlab.Host) []string {
	var ips []string
	for _, h := range hosts {
		ips = append(ips, h.IPv4.String())
	}
	slices.Sort(ips)
	return ips
}

// testContext bounds one test.
func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// newNamespace gives the test its own namespace; at the end it deletes the
// test's Services and slices (nothing else would) and, if the test failed,
// logs the tail of every process's log.
func newNamespace(t *testing.T, prefix string) string {
	t.Helper()
	ctx := testContext(t)
	ns, err := env.CreateNamespace(ctx, prefix)
	if err != nil {
		t.Fatalf("create namespace: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("process logs (all in %s):\n%s", env.LogDir, env.Report(25))
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := env.DeleteServices(ctx, ns); err != nil {
			t.Errorf("cleanup of namespace %s: %v", ns, err)
		}
	})
	return ns
}
