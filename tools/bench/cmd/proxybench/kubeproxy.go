package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/signalbox/signalbox/tools/devcluster"
)

const (
	nodeName    = "bench-node"
	nodeIP      = "198.18.0.2" // the node namespace's veth
	gwIP        = "198.18.0.1" // its peer, in a second namespace
	clusterCIDR = "198.18.16.0/20"
	serviceCIDR = "198.18.128.0/17" // room for 30,000 Services
	metricsAddr = "127.0.0.1:10249"
	benchNS     = "bench"
)

// runKubeProxy starts the apiserver and kube-proxy in one fresh node
// namespace, creates the objects, and measures kube-proxy.
func (w *world) runKubeProxy(ctx context.Context) (result, error) {
	var r result
	logf("kube-proxy: building or finding kube-proxy %s", devcluster.KubeVersion)
	kpBin, err := devcluster.Ensure(ctx, os.Stdout, devcluster.KubeProxy)
	if err != nil {
		return r, err
	}
	ns, cleanup, err := nodeNetns(ctx, "kp")
	if err != nil {
		return r, err
	}
	defer cleanup()
	logf("kube-proxy: starting etcd + kube-apiserver in netns %s", ns)
	c, err := devcluster.Start(ctx, devcluster.Options{Name: "proxybench", NetNS: ns, BindAddress: "127.0.0.1", ServiceCIDR: serviceCIDR})
	if err != nil {
		return r, err
	}
	defer c.Stop()
	cfg := c.RESTConfig()
	cfg.QPS, cfg.Burst = 2000, 4000
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return r, err
	}
	if err := w.createObjects(ctx, client); err != nil {
		return r, err
	}

	wrap, err := backendPath(w.o.backend)
	if err != nil {
		return r, err
	}
	defer os.RemoveAll(wrap)
	// Outside the cluster's directory, which Stop removes.
	logPath := filepath.Join(os.TempDir(), fmt.Sprintf("proxybench-kube-proxy-%d.log", os.Getpid()))
	logFile, err := os.Create(logPath)
	if err != nil {
		return r, err
	}
	defer logFile.Close()
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", ns, kpBin,
		"--kubeconfig="+c.Kubeconfig, "--hostname-override="+nodeName, "--proxy-mode=iptables",
		"--cluster-cidr="+clusterCIDR, "--metrics-bind-address="+metricsAddr,
		"--healthz-bind-address=127.0.0.1:10256", "--conntrack-max-per-core=0",
		"--conntrack-tcp-timeout-established=0", "--conntrack-tcp-timeout-close-wait=0", "--v=2")
	cmd.Env = append(os.Environ(), "PATH="+wrap+":"+os.Getenv("PATH"))
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	logf("kube-proxy: starting (log %s)", logPath)
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return r, err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
		killOrphans(ns, c.PIDs())
	}()
	httpc := &http.Client{Transport: &http.Transport{DialContext: devcluster.NetNSDialer(ns)}, Timeout: 10 * time.Second}
	scrape := func() (metrics, error) { return scrapeMetrics(ctx, httpc) }

	// Full sync: the first sync after kube-proxy's informers have synced
	// sees every object.
	logf("kube-proxy: waiting for its full sync")
	m, err := waitMetrics(ctx, exited, scrape, w.o.timeout, func(m metrics) bool { return m.fullCount >= 1 }, func(m metrics) string {
		return fmt.Sprintf("%s elapsed, %d syncs so far", time.Since(start).Round(time.Second), int(m.count))
	})
	if err != nil {
		if ctx.Err() == nil && time.Since(start) >= w.o.timeout {
			r.timedOut = w.o.timeout
		}
		return r, fmt.Errorf("%w (see %s)", err, logPath)
	}
	r.full = secs(m.fullSum / m.fullCount)
	logf("kube-proxy: full sync took %s (by its metric; %s after start)", fmtDur(r.full), time.Since(start).Round(time.Millisecond))
	// Let any follow-up sync (node event, ...) settle.
	base, err := settle(ctx, scrape)
	if err != nil {
		return r, err
	}
	for i, upd := range w.updates {
		logf("kube-proxy: one-endpoint change %d/%d", i+1, len(w.updates))
		got, err := client.DiscoveryV1().EndpointSlices(benchNS).Update(ctx, upd, metav1.UpdateOptions{})
		if err != nil {
			return r, err
		}
		w.updates[i] = got
		if i+1 < len(w.updates) {
			w.updates[i+1].ResourceVersion = got.ResourceVersion
		}
		m, err := waitMetrics(ctx, exited, scrape, 2*time.Minute, func(m metrics) bool { return m.count > base.count }, nil)
		if err != nil {
			return r, err
		}
		// Give a second sync (if any) its chance to finish, then read.
		if m, err = settle(ctx, scrape); err != nil {
			return r, err
		}
		if m.partialCount > base.partialCount {
			d := secs((m.partialSum - base.partialSum) / (m.partialCount - base.partialCount))
			r.partial = append(r.partial, d)
			logf("kube-proxy: partial sync took %s", fmtDur(d))
		} else {
			d := secs((m.fullSum - base.fullSum) / (m.fullCount - base.fullCount))
			r.partial = append(r.partial, d)
			logf("kube-proxy: change caused a FULL sync (%s)", fmtDur(d))
		}
		base = m
	}
	if r.rules, err = ruleCount(ctx, ns, w.o.backend); err != nil {
		return r, err
	}
	r.rssKB = rssKB(cmd.Process.Pid)
	logf("kube-proxy: %s iptables rules, RSS %d MiB", commas(r.rules), r.rssKB/1024)
	return r, nil
}

// createObjects creates the Node, the Services (the apiserver allocates
// their ClusterIPs) and one EndpointSlice per Service, keeping the objects
// the apiserver returns for the signalbox side.
func (w *world) createObjects(ctx context.Context, client kubernetes.Interface) error {
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: nodeName},
		Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: nodeIP}}}}
	created, err := client.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
	if err != nil {
		return err
	}
	created.Status = node.Status
	if _, err := client.CoreV1().Nodes().UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
		return err
	}
	if _, err := client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: benchNS}}, metav1.CreateOptions{}); err != nil {
		return err
	}
	n := w.o.services
	svcs := make([]*corev1.Service, n)
	slices := make([]*discoveryv1.EndpointSlice, n)
	err = parallel(ctx, n, "Services", func(i int) error {
		s, err := client.CoreV1().Services(benchNS).Create(ctx, w.service(i), metav1.CreateOptions{})
		svcs[i] = s
		return err
	})
	if err != nil {
		return err
	}
	err = parallel(ctx, n, "EndpointSlices", func(i int) error {
		s, err := client.DiscoveryV1().EndpointSlices(benchNS).Create(ctx, w.slice(i, ""), metav1.CreateOptions{})
		slices[i] = s
		return err
	})
	if err != nil {
		return err
	}
	// Only complete sets: on failure the signalbox side synthesizes.
	w.svcs, w.slices = svcs, slices
	w.planUpdates()
	return nil
}

// parallel runs fn for 0..n-1 on a few workers, printing progress.
func parallel(ctx context.Context, n int, what string, fn func(i int) error) error {
	logf("creating %s %s...", commas(n), what)
	var next, done atomic.Int64
	var firstErr error
	var once sync.Once
	var wg sync.WaitGroup
	stop := make(chan struct{})
	go func() {
		t := time.NewTicker(3 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				logf("creating %s %s... %s/%s", commas(n), what, commas(int(done.Load())), commas(n))
			}
		}
	}()
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n || ctx.Err() != nil {
					return
				}
				if err := fn(i); err != nil {
					once.Do(func() { firstErr = fmt.Errorf("%s %d: %w", what, i, err) })
					return
				}
				done.Add(1)
			}
		}()
	}
	wg.Wait()
	close(stop)
	if firstErr == nil {
		firstErr = ctx.Err()
	}
	if firstErr == nil {
		logf("creating %s %s... %s/%s done", commas(n), what, commas(n), commas(n))
	}
	return firstErr
}

type metrics struct {
	fullSum, fullCount, partialSum, partialCount, sum, count float64
}

func scrapeMetrics(ctx context.Context, c *http.Client) (metrics, error) {
	var m metrics
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+metricsAddr+"/metrics", nil)
	if err != nil {
		return m, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return m, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return m, err
	}
	fields := map[string]*float64{
		"kubeproxy_sync_full_proxy_rules_duration_seconds_sum":      &m.fullSum,
		"kubeproxy_sync_full_proxy_rules_duration_seconds_count":    &m.fullCount,
		"kubeproxy_sync_partial_proxy_rules_duration_seconds_sum":   &m.partialSum,
		"kubeproxy_sync_partial_proxy_rules_duration_seconds_count": &m.partialCount,
		"kubeproxy_sync_proxy_rules_duration_seconds_sum":           &m.sum,
		"kubeproxy_sync_proxy_rules_duration_seconds_count":         &m.count,
	}
	sc := bufio.NewScanner(bytes.NewReader(body))
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") {
			continue
		}
		name, rest, _ := strings.Cut(line, " ")
		name, _, _ = strings.Cut(name, "{") // sum over labels (ip_family)
		if p := fields[name]; p != nil {
			v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
			if err == nil {
				*p += v
			}
		}
	}
	return m, nil
}

// waitMetrics polls until ok, kube-proxy exits, or the timeout passes.
func waitMetrics(ctx context.Context, exited <-chan error, scrape func() (metrics, error), timeout time.Duration,
	ok func(metrics) bool, progress func(metrics) string) (metrics, error) {
	deadline := time.Now().Add(timeout)
	lastLog := time.Now()
	for {
		m, err := scrape()
		if err == nil && ok(m) {
			return m, nil
		}
		if time.Now().After(deadline) {
			return m, fmt.Errorf("kube-proxy did not finish within %s (last scrape error: %v)", timeout, err)
		}
		if progress != nil && time.Since(lastLog) > 10*time.Second {
			logf("kube-proxy: still waiting: %s", progress(m))
			lastLog = time.Now()
		}
		select {
		case <-ctx.Done():
			return m, ctx.Err()
		case err := <-exited:
			return m, fmt.Errorf("kube-proxy exited: %v", err)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// settle waits until the sync count has not moved for 2 seconds.
func settle(ctx context.Context, scrape func() (metrics, error)) (metrics, error) {
	m, err := scrape()
	if err != nil {
		return m, err
	}
	for stable := time.Now(); time.Since(stable) < 2*time.Second; {
		select {
		case <-ctx.Done():
			return m, ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
		n, err := scrape()
		if err != nil {
			return m, err
		}
		if n.count != m.count {
			stable = time.Now()
		}
		m = n
	}
	return m, nil
}

func secs(f float64) time.Duration { return time.Duration(f * float64(time.Second)) }

// backendPath returns a directory holding iptables, iptables-save,
// iptables-restore (and ip6tables*) for the chosen backend, to put first
// in kube-proxy's PATH: the host's alternatives stay untouched.
func backendPath(backend string) (string, error) {
	dir, err := os.MkdirTemp("", "proxybench-path-")
	if err != nil {
		return "", err
	}
	multi := "/usr/sbin/xtables-legacy-multi"
	if backend == "nft" {
		multi = "/usr/sbin/xtables-nft-multi"
	}
	for _, p := range []string{"iptables", "ip6tables"} {
		for _, suffix := range []string{"", "-save", "-restore"} {
			if err := os.Symlink(multi, filepath.Join(dir, p+suffix)); err != nil {
				return dir, err
			}
		}
	}
	return dir, nil
}

// ruleCount is the number of rule lines (-A) iptables-save prints in the
// namespace for the backend.
func ruleCount(ctx context.Context, ns, backend string) (int, error) {
	out, err := exec.CommandContext(ctx, "ip", "netns", "exec", ns, "iptables-"+backend+"-save").Output()
	if err != nil {
		return 0, fmt.Errorf("iptables-%s-save in %s: %w", backend, ns, err)
	}
	return bytes.Count(out, []byte("\n-A ")), nil
}

// rssKB reads VmRSS of a process, in KiB (0 if unknown).
func rssKB(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			return n
		}
	}
	return 0
}

// killOrphans kills what kube-proxy left running in our node namespace
// (an iptables-restore still at work when we gave up on it), sparing the
// cluster's own processes, which Stop ends.
func killOrphans(ns string, keep map[string]int) {
	out, err := exec.Command("ip", "netns", "pids", ns).Output()
	if err != nil {
		return
	}
	skip := map[int]bool{}
	for _, pid := range keep {
		skip[pid] = true
	}
	for _, f := range strings.Fields(string(out)) {
		pid, err := strconv.Atoi(f)
		if err != nil || skip[pid] {
			continue
		}
		logf("kube-proxy: killing leftover process %d in %s", pid, ns)
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}
