package devcluster_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"syscall"
	"testing"

	"github.com/signalbox/signalbox/tools/devcluster"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// The lab runs the apiserver inside a namespace; the test driver in the
// root namespace reaches it only through sockets made in that namespace.
func TestClusterInNetNS(t *testing.T) {
	ns := fmt.Sprintf("sb-devcluster-%d", os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", ns, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "delete", ns).CombinedOutput(); err != nil {
			t.Errorf("ip netns delete %s: %v: %s", ns, err, out)
		}
	})

	c := startExtra(t, devcluster.Options{Name: "test-netns", NetNS: ns})
	if want := fmt.Sprintf("https://127.0.0.1:%d", devcluster.NetNSAPIServerPort); c.Host != want {
		t.Errorf("Host = %s, want %s", c.Host, want)
	}
	nsIno, err := os.Stat("/run/netns/" + ns)
	if err != nil {
		t.Fatal(err)
	}
	for name, pid := range c.PIDs() {
		target, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", pid))
		if err != nil {
			t.Fatal(err)
		}
		// /proc/PID/ns/net reads "net:[INODE]"; the bind mount in
		// /run/netns has that same inode.
		if want := fmt.Sprintf("net:[%d]", inode(nsIno)); target != want {
			t.Errorf("%s runs in %s, want %s (%s)", name, target, want, ns)
		}
	}
	list, err := c.Client().CoreV1().Namespaces().List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatalf("list namespaces through the netns dialer: %v", err)
	}
	if len(list.Items) == 0 {
		t.Error("no namespaces listed")
	}
}

func inode(fi os.FileInfo) uint64 { return fi.Sys().(*syscall.Stat_t).Ino }
