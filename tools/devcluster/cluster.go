package devcluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
)

const (
	// DefaultServiceCIDR is a dual-stack service range taken from the
	// benchmarking blocks, like every lab address.
	DefaultServiceCIDR = "198.18.128.0/20,2001:2:0:ffff::/112"

	// ServiceAccountIssuer is the issuer (and the API audience) of the
	// service-account tokens the apiserver mints.
	ServiceAccountIssuer = "https://kubernetes.default.svc"

	// Fixed ports used inside a network namespace (Options.NetNS) when the
	// caller passes none: a fresh namespace has its own, empty port space,
	// and probing it for free ports would mean entering it just for that.
	NetNSEtcdPort      = 2379
	NetNSEtcdPeerPort  = 2380
	NetNSAPIServerPort = 6443

	stopTimeout = 15 * time.Second
)

// Options configures Start. The zero value starts a throwaway cluster on
// 127.0.0.1 with free ports in a fresh directory.
type Options struct {
	// Name groups state directories: <cache>/devcluster/<Name>/. Default
	// "test".
	Name string
	// Dir is the state directory (certificates, etcd data, logs, pids,
	// kubeconfig). Default: a fresh directory under <cache>/devcluster/<Name>/,
	// removed by Stop. A caller-chosen Dir belongs to one cluster at a time:
	// Start stops processes recorded there and wipes its etcd data; Stop
	// keeps it.
	Dir string
	// NetNS, when set, names a network namespace in /run/netns; etcd and
	// kube-apiserver then run in it (via `ip netns exec`) and listen on
	// BindAddress there. Reach the cluster with RESTConfig or DialContext,
	// which dial from inside the namespace; the kubeconfig file only works
	// inside it (`ip netns exec NS ...`).
	NetNS string
	// BindAddress is where etcd and kube-apiserver listen. Default 127.0.0.1.
	BindAddress string
	// Ports; 0 picks a free port on BindAddress, or the NetNS* defaults
	// above when NetNS is set.
	EtcdPort, EtcdPeerPort, APIServerPort int
	// ServiceCIDR is --service-cluster-ip-range. Default DefaultServiceCIDR.
	ServiceCIDR string
	// Tokens are extra --token-auth-file entries besides the admin token.
	Tokens []StaticToken
	// Log receives progress lines. Default: discarded.
	Log io.Writer
	// Detach starts the processes in their own session without Pdeathsig,
	// so they outlive the calling process (`devcluster up`).
	Detach bool
	// ReadyTimeout bounds the wait for /readyz. Default 3 minutes.
	ReadyTimeout time.Duration
	// APIServerArgs are appended to the kube-apiserver command line.
	APIServerArgs []string
}

// Cluster is a running etcd + kube-apiserver pair.
type Cluster struct {
	Name string
	Dir  string
	// Host is the apiserver URL, e.g. https://127.0.0.1:41235.
	Host string
	// Kubeconfig is <Dir>/kubeconfig with the admin token and the CA.
	Kubeconfig string
	// CAFile signs the serving certificate; CAKeyFile lets callers mint
	// more certificates from the same CA (it is also --client-ca-file).
	CAFile, CAKeyFile string
	// AdminToken authenticates as user "admin" in group system:masters.
	AdminToken string
	// EtcdURL is the etcd client URL.
	EtcdURL string
	NetNS   string
	// ServiceCIDRs are the service IP ranges, IPv4 first.
	ServiceCIDRs []netip.Prefix
	// ServiceAccountKeyFile is the PEM public key that verifies the
	// service-account tokens; ServiceAccountSigningKeyFile the private key
	// the apiserver signs them with (TokenRequest).
	ServiceAccountKeyFile, ServiceAccountSigningKeyFile string

	caPEM    []byte
	dial     DialFunc
	procs    []*proc
	spawner  *spawner
	ownsDir  bool
	stopOnce sync.Once
	stopErr  error
}

// errPortInUse marks a start that failed because a picked port was taken
// between probing and binding; Start retries with new ports.
var errPortInUse = errors.New("address already in use")

// Start builds or finds the binaries, starts etcd and kube-apiserver and
// waits until /readyz passes. On failure nothing keeps running, and the
// error carries the tail of the failing process's log.
func Start(ctx context.Context, opts Options) (*Cluster, error) {
	o := opts
	if o.Name == "" {
		o.Name = "test"
	}
	if strings.ContainsAny(o.Name, `/\`) || o.Name == "." || o.Name == ".." {
		return nil, fmt.Errorf("invalid cluster name %q", o.Name)
	}
	if o.BindAddress == "" {
		o.BindAddress = "127.0.0.1"
	}
	if net.ParseIP(o.BindAddress) == nil {
		return nil, fmt.Errorf("BindAddress %q is not an IP address", o.BindAddress)
	}
	if o.ServiceCIDR == "" {
		o.ServiceCIDR = DefaultServiceCIDR
	}
	if o.Log == nil {
		o.Log = io.Discard
	}
	if o.ReadyTimeout == 0 {
		o.ReadyTimeout = 3 * time.Minute
	}
	cidrs, err := parseCIDRs(o.ServiceCIDR)
	if err != nil {
		return nil, err
	}
	etcdBin, err := Ensure(ctx, o.Log, Etcd)
	if err != nil {
		return nil, err
	}
	apiBin, err := Ensure(ctx, o.Log, APIServer)
	if err != nil {
		return nil, err
	}
	dir, owns, err := prepareDir(o)
	if err != nil {
		return nil, err
	}
	if o.NetNS != "" {
		// A fresh namespace has loopback down; 127.0.0.1 would not work.
		if out, err := exec.CommandContext(ctx, ipTool(), "-n", o.NetNS, "link", "set", "lo", "up").CombinedOutput(); err != nil {
			return nil, fmt.Errorf("ip -n %s link set lo up: %v: %s", o.NetNS, err, out)
		}
	}
	pickPorts := o.NetNS == "" && (o.EtcdPort == 0 || o.EtcdPeerPort == 0 || o.APIServerPort == 0)
	for attempt := 1; ; attempt++ {
		c, err := startOnce(ctx, o, dir, cidrs, etcdBin, apiBin)
		if err == nil {
			c.ownsDir = owns
			return c, nil
		}
		if errors.Is(err, errPortInUse) && pickPorts && attempt < 3 {
			fmt.Fprintf(o.Log, "devcluster: %v; retrying with other ports\n", err)
			continue
		}
		return nil, fmt.Errorf("%w\n(state and logs kept in %s)", err, dir)
	}
}

func parseCIDRs(s string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, part := range strings.Split(s, ",") {
		p, err := netip.ParsePrefix(strings.TrimSpace(part))
		if err != nil {
			return nil, fmt.Errorf("ServiceCIDR: %w", err)
		}
		out = append(out, p.Masked())
	}
	return out, nil
}

// prepareDir returns the state directory and whether Stop should remove
// it. It first cleans up after test binaries that died without Stop.
func prepareDir(o Options) (string, bool, error) {
	if o.Dir != "" {
		dir, err := filepath.Abs(o.Dir)
		if err != nil {
			return "", false, err
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return "", false, err
		}
		// startOnce then wipes only the etcd data: never RemoveAll a
		// directory a caller chose.
		return dir, false, StopDir(dir, o.Log)
	}
	cache, err := CacheDir()
	if err != nil {
		return "", false, err
	}
	parent := filepath.Join(cache, "devcluster", o.Name)
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return "", false, err
	}
	sweepStale(parent, o.Log)
	dir, err := os.MkdirTemp(parent, "run-")
	return dir, true, err
}

// sweepStale stops and removes clusters under parent whose owning process
// is gone: a test binary killed before Stop, whose children escaped
// Pdeathsig. Detached clusters (owner 0) are never swept.
func sweepStale(parent string, log io.Writer) {
	entries, err := os.ReadDir(parent)
	if err != nil {
		return
	}
	for _, e := range entries {
		dir := filepath.Join(parent, e.Name())
		rec, err := readPIDs(dir)
		if err != nil || rec.ownerPID == 0 || ownerAlive(rec) {
			continue
		}
		fmt.Fprintf(log, "devcluster: cleaning up %s, left by dead process %d\n", dir, rec.ownerPID)
		if err := StopDir(dir, log); err != nil {
			fmt.Fprintf(log, "devcluster: %v\n", err)
			continue
		}
		os.RemoveAll(dir)
	}
}

func startOnce(ctx context.Context, o Options, dir string, cidrs []netip.Prefix, etcdBin, apiBin string) (_ *Cluster, err error) {
	etcdPort, peerPort, apiPort := o.EtcdPort, o.EtcdPeerPort, o.APIServerPort
	if o.NetNS != "" {
		etcdPort = orDefault(etcdPort, NetNSEtcdPort)
		peerPort = orDefault(peerPort, NetNSEtcdPeerPort)
		apiPort = orDefault(apiPort, NetNSAPIServerPort)
	} else {
		free, err := freePorts(o.BindAddress, 3)
		if err != nil {
			return nil, err
		}
		etcdPort = orDefault(etcdPort, free[0])
		peerPort = orDefault(peerPort, free[1])
		apiPort = orDefault(apiPort, free[2])
	}

	c := &Cluster{
		Name:         o.Name,
		Dir:          dir,
		Host:         "https://" + hostPort(o.BindAddress, apiPort),
		Kubeconfig:   filepath.Join(dir, "kubeconfig"),
		AdminToken:   NewToken(),
		EtcdURL:      "http://" + hostPort(o.BindAddress, etcdPort),
		NetNS:        o.NetNS,
		ServiceCIDRs: cidrs,
		spawner:      newSpawner(),
	}
	c.dial = (&net.Dialer{}).DialContext
	if o.NetNS != "" {
		c.dial = NetNSDialer(o.NetNS)
	}
	defer func() {
		if err != nil {
			c.stopProcs()
		}
	}()

	// A failed attempt may have initialized etcd with other peer URLs.
	if err := os.RemoveAll(filepath.Join(dir, "etcd")); err != nil {
		return nil, err
	}

	owner := pidRecord{}
	if !o.Detach {
		owner.ownerPID = os.Getpid()
		if owner.ownerStart, err = procStartTime(owner.ownerPID); err != nil {
			return nil, err
		}
	}
	// Recorded before any child exists, so a sweep never mistakes this
	// directory for an abandoned one.
	if err := writePIDs(dir, owner); err != nil {
		return nil, err
	}

	tokens := append([]StaticToken{{Token: c.AdminToken, User: "admin", UID: "admin", Groups: []string{"system:masters"}}}, o.Tokens...)
	pki, err := writePKI(dir, o.BindAddress, cidrs, tokens)
	if err != nil {
		return nil, err
	}
	c.CAFile, c.CAKeyFile, c.caPEM = pki.caCert, pki.caKey, pki.caPEM
	c.ServiceAccountKeyFile, c.ServiceAccountSigningKeyFile = pki.saPub, pki.saKey

	start := time.Now()
	peerURL := "http://" + hostPort(o.BindAddress, peerPort)
	etcdArgs := []string{etcdBin,
		"--name=devcluster",
		"--data-dir=" + filepath.Join(dir, "etcd"),
		"--listen-client-urls=" + c.EtcdURL,
		"--advertise-client-urls=" + c.EtcdURL,
		"--listen-peer-urls=" + peerURL,
		"--initial-advertise-peer-urls=" + peerURL,
		"--initial-cluster=devcluster=" + peerURL,
		"--initial-cluster-state=new",
		"--logger=zap",
		"--log-outputs=stderr",
	}
	fmt.Fprintf(o.Log, "devcluster: starting etcd on %s (log %s)\n", c.EtcdURL, filepath.Join(dir, "etcd.log"))
	if err := c.start(o, "etcd", etcdArgs, owner); err != nil {
		return nil, err
	}
	if err := c.waitHTTP(ctx, c.procs[0], c.EtcdURL+"/health", 30*time.Second); err != nil {
		return nil, err
	}

	apiArgs := []string{apiBin,
		"--etcd-servers=" + c.EtcdURL,
		"--bind-address=" + o.BindAddress,
		"--advertise-address=" + o.BindAddress,
		"--secure-port=" + strconv.Itoa(apiPort),
		"--cert-dir=" + filepath.Join(dir, "apiserver-certs"),
		"--tls-cert-file=" + pki.servingCert,
		"--tls-private-key-file=" + pki.servingKey,
		"--client-ca-file=" + pki.caCert,
		"--token-auth-file=" + pki.tokens,
		"--authorization-mode=RBAC",
		"--service-account-issuer=" + ServiceAccountIssuer,
		"--api-audiences=" + ServiceAccountIssuer,
		"--service-account-key-file=" + pki.saPub,
		"--service-account-signing-key-file=" + pki.saKey,
		"--service-cluster-ip-range=" + o.ServiceCIDR,
		// No kube-controller-manager and no real nodes: the lease
		// reconciler would publish an unreachable endpoint for the
		// "kubernetes" Service.
		"--endpoint-reconciler-type=none",
		"--allow-privileged=true",
		"--profiling=false",
	}
	apiArgs = append(apiArgs, o.APIServerArgs...)
	fmt.Fprintf(o.Log, "devcluster: starting kube-apiserver on %s (log %s)\n", c.Host, filepath.Join(dir, "kube-apiserver.log"))
	if err := c.start(o, "kube-apiserver", apiArgs, owner); err != nil {
		return nil, err
	}
	if err := c.waitHTTP(ctx, c.procs[1], c.Host+"/readyz", o.ReadyTimeout); err != nil {
		return nil, err
	}
	if err := c.writeKubeconfig(); err != nil {
		return nil, err
	}
	fmt.Fprintf(o.Log, "devcluster: ready in %s: KUBECONFIG=%s (server %s)\n",
		time.Since(start).Round(100*time.Millisecond), c.Kubeconfig, c.Host)
	return c, nil
}

func (c *Cluster) start(o Options, name string, argv []string, owner pidRecord) error {
	if o.NetNS != "" {
		argv = append([]string{ipTool(), "netns", "exec", o.NetNS}, argv...)
	}
	p, err := startProc(c.spawner, name, argv, filepath.Join(c.Dir, name+".log"), o.Detach)
	if err != nil {
		return err
	}
	c.procs = append(c.procs, p)
	rec := owner
	for _, p := range c.procs {
		rec.procs = append(rec.procs, namedPID{p.name, p.cmd.Process.Pid})
	}
	return writePIDs(c.Dir, rec)
}

// PIDs returns the process IDs of the cluster's processes by name.
func (c *Cluster) PIDs() map[string]int {
	out := map[string]int{}
	for _, p := range c.procs {
		out[p.name] = p.cmd.Process.Pid
	}
	return out
}

// Stop terminates kube-apiserver and etcd (SIGTERM, SIGKILL after a
// timeout), waits until both are reaped, and removes the state directory
// if Start created it. It is safe to call more than once.
func (c *Cluster) Stop() error {
	c.stopOnce.Do(func() {
		c.stopProcs()
		if c.ownsDir {
			c.stopErr = os.RemoveAll(c.Dir)
			return
		}
		// A later Start over the same Dir owns the pids file now.
		if rec, err := readPIDs(c.Dir); err == nil && c.recorded(rec) {
			c.stopErr = os.Remove(filepath.Join(c.Dir, pidsFile))
		}
	})
	return c.stopErr
}

func (c *Cluster) recorded(rec pidRecord) bool {
	if len(rec.procs) != len(c.procs) {
		return false
	}
	for i, p := range c.procs {
		if rec.procs[i].pid != p.cmd.Process.Pid {
			return false
		}
	}
	return true
}

func (c *Cluster) stopProcs() {
	// Reverse start order: the apiserver goes before its etcd.
	for i := len(c.procs) - 1; i >= 0; i-- {
		c.procs[i].stop(stopTimeout)
	}
	if c.spawner != nil {
		c.spawner.close()
		c.spawner = nil
	}
}

func orDefault(v, def int) int {
	if v != 0 {
		return v
	}
	return def
}

func hostPort(host string, port int) string {
	return net.JoinHostPort(host, strconv.Itoa(port))
}

func ipTool() string {
	if p, err := exec.LookPath("ip"); err == nil {
		return p
	}
	for _, p := range []string{"/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip"} {
		if isExecutable(p) {
			return p
		}
	}
	return "ip"
}
