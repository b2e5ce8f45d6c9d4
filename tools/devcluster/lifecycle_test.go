package devcluster_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/signalbox/signalbox/tools/devcluster"
	authenticationv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// startExtra starts a second cluster next to the shared one. The cleanup
// stops it even when the test fails half-way.
func startExtra(t *testing.T, opts devcluster.Options) *devcluster.Cluster {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var log bytes.Buffer
	opts.Log = &log
	c, err := devcluster.Start(ctx, opts)
	if err != nil {
		t.Fatalf("Start: %v\nprogress:\n%s", err, log.String())
	}
	t.Cleanup(func() { c.Stop() })
	return c
}

// gone reports whether no process (not even a zombie) has this PID.
func gone(pid int) bool {
	_, err := os.Stat(fmt.Sprintf("/proc/%d", pid))
	return os.IsNotExist(err)
}

func TestStopLeavesNoProcess(t *testing.T) {
	viewer := devcluster.StaticToken{Token: devcluster.NewToken(), User: "viewer", Groups: []string{"signalbox:viewers"}}
	c := startExtra(t, devcluster.Options{Name: "test-stop", Tokens: []devcluster.StaticToken{viewer}})
	checkStaticToken(t, c, viewer)
	pids := c.PIDs()
	if len(pids) != 2 || pids["etcd"] == 0 || pids["kube-apiserver"] == 0 {
		t.Fatalf("PIDs() = %v, want etcd and kube-apiserver", pids)
	}
	for name, pid := range pids {
		if gone(pid) {
			t.Fatalf("%s (pid %d) is not running before Stop", name, pid)
		}
	}
	if _, err := c.Client().CoreV1().Namespaces().List(context.Background(), metav1.ListOptions{}); err != nil {
		t.Fatalf("cluster does not answer before Stop: %v", err)
	}
	if err := c.Stop(); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	for name, pid := range pids {
		if !gone(pid) {
			t.Errorf("%s (pid %d) still exists after Stop", name, pid)
		}
	}
	if _, err := os.Stat(c.Dir); !os.IsNotExist(err) {
		t.Errorf("state dir %s still exists after Stop (err %v)", c.Dir, err)
	}
	if err := c.Stop(); err != nil {
		t.Errorf("second Stop: %v", err)
	}
}

// A test binary killed before Stop leaves its pids file behind; the next
// Start under the same name must stop what it recorded.
func TestStartCleansUpAfterDeadOwner(t *testing.T) {
	old := startExtra(t, devcluster.Options{Name: "test-stale"})
	oldPIDs := old.PIDs()

	// Pretend the owner died: rewrite the owner line with a PID that has
	// exited (a short-lived child we reaped).
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	pidsPath := filepath.Join(old.Dir, "pids")
	data, err := os.ReadFile(pidsPath)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.SplitN(string(data), "\n", 2)
	forged := fmt.Sprintf("owner %d 1\n%s", dead.Process.Pid, lines[1])
	if err := os.WriteFile(pidsPath, []byte(forged), 0o644); err != nil {
		t.Fatal(err)
	}

	startExtra(t, devcluster.Options{Name: "test-stale"})
	for name, pid := range oldPIDs {
		// The old processes are our children: once killed they are
		// reaped by Cluster's waiter, so they vanish shortly after.
		deadline := time.Now().Add(5 * time.Second)
		for !gone(pid) && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
		if !gone(pid) {
			t.Errorf("stale %s (pid %d) survived the next Start", name, pid)
		}
	}
	if _, err := os.Stat(old.Dir); !os.IsNotExist(err) {
		t.Errorf("stale state dir %s was not removed", old.Dir)
	}
}

// A caller-chosen Dir (the CLI's "dev") belongs to one cluster: starting
// again over it replaces what runs there, and StopDir stops a cluster this
// process did not start (as `devcluster down` does).
func TestFixedDirRestartAndStopDir(t *testing.T) {
	dir := t.TempDir()
	first := startExtra(t, devcluster.Options{Name: "test-dir", Dir: dir, Detach: true})
	firstPIDs := first.PIDs()
	running, err := devcluster.RunningPIDs(dir)
	if err != nil || len(running) != 2 {
		t.Fatalf("RunningPIDs = %v, %v; want both processes", running, err)
	}

	second := startExtra(t, devcluster.Options{Name: "test-dir", Dir: dir, Detach: true})
	for name, pid := range firstPIDs {
		if second.PIDs()[name] == pid {
			t.Fatalf("%s kept pid %d across restart", name, pid)
		}
	}
	// Stopping the replaced cluster must not touch its successor.
	if err := first.Stop(); err != nil {
		t.Fatalf("Stop of the replaced cluster: %v", err)
	}
	running, err = devcluster.RunningPIDs(dir)
	if err != nil || running["etcd"] != second.PIDs()["etcd"] || running["kube-apiserver"] != second.PIDs()["kube-apiserver"] {
		t.Fatalf("RunningPIDs after restart = %v, %v; want %v", running, err, second.PIDs())
	}
	if _, err := second.Client().CoreV1().Namespaces().List(context.Background(), metav1.ListOptions{}); err != nil {
		t.Fatalf("restarted cluster does not answer: %v", err)
	}

	if err := devcluster.StopDir(dir, nil); err != nil {
		t.Fatalf("StopDir: %v", err)
	}
	if running, _ := devcluster.RunningPIDs(dir); len(running) != 0 {
		t.Errorf("RunningPIDs after StopDir = %v, want none", running)
	}
	if _, err := os.Stat(filepath.Join(dir, "kube-apiserver.log")); err != nil {
		t.Errorf("a caller-chosen dir must keep its logs: %v", err)
	}
}

// checkStaticToken asks the apiserver who the extra token's bearer is.
func checkStaticToken(t *testing.T, c *devcluster.Cluster, tok devcluster.StaticToken) {
	t.Helper()
	cfg := c.RESTConfig()
	cfg.BearerToken = tok.Token
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	r, err := cs.AuthenticationV1().SelfSubjectReviews().Create(context.Background(), &authenticationv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("SelfSubjectReview with the %s token: %v", tok.User, err)
	}
	if u := r.Status.UserInfo; u.Username != tok.User || !slices.Contains(u.Groups, tok.Groups[0]) {
		t.Errorf("static token authenticates as %q %v, want %q in %s", u.Username, u.Groups, tok.User, tok.Groups[0])
	}
}
