package devcluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// Tool names a binary the dev cluster needs.
type Tool string

const (
	APIServer Tool = "kube-apiserver"
	KubeProxy Tool = "kube-proxy"
	Etcd      Tool = "etcd"
)

// Binaries holds absolute paths of the binaries.
type Binaries struct {
	APIServer string
	KubeProxy string
	Etcd      string
}

// EnsureBinaries makes sure kube-apiserver, kube-proxy and etcd exist,
// building or installing what is missing, and returns their paths.
func EnsureBinaries(ctx context.Context, log io.Writer) (Binaries, error) {
	var b Binaries
	var err error
	if b.Etcd, err = Ensure(ctx, log, Etcd); err != nil {
		return b, err
	}
	if b.APIServer, err = Ensure(ctx, log, APIServer); err != nil {
		return b, err
	}
	if b.KubeProxy, err = Ensure(ctx, log, KubeProxy); err != nil {
		return b, err
	}
	return b, nil
}

// Ensure returns the path of one tool, building it (kube-apiserver,
// kube-proxy) from the k8s.io/kubernetes module in tools/k8sbuild or
// installing it (etcd, from Debian's etcd-server package) when missing.
// Built binaries are cached in <cache>/bin/<KubeVersion>/.
func Ensure(ctx context.Context, log io.Writer, tool Tool) (string, error) {
	if log == nil {
		log = io.Discard
	}
	switch tool {
	case Etcd:
		return ensureEtcd(ctx, log)
	case APIServer, KubeProxy:
		return ensureKubeBinary(ctx, log, tool)
	default:
		return "", fmt.Errorf("unknown tool %q", tool)
	}
}

// BinDir is where built Kubernetes binaries are cached, keyed by version so
// that bumping KubeVersion never reuses an old build.
func BinDir() (string, error) {
	cache, err := CacheDir()
	if err != nil {
		return "", err
	}
	return filepath.Join(cache, "bin", KubeVersion), nil
}

func ensureKubeBinary(ctx context.Context, log io.Writer, tool Tool) (string, error) {
	dir, err := BinDir()
	if err != nil {
		return "", err
	}
	path := filepath.Join(dir, string(tool))
	if isExecutable(path) {
		return path, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	// Parallel test binaries all find the binary missing on a cold cache;
	// the lock makes one of them build while the others wait for it.
	unlock, err := lockFile(ctx, filepath.Join(dir, ".build.lock"), log)
	if err != nil {
		return "", err
	}
	defer unlock()
	if isExecutable(path) {
		return path, nil
	}
	if err := buildKubeBinary(ctx, log, tool, path); err != nil {
		return "", err
	}
	return path, nil
}

func buildKubeBinary(ctx context.Context, log io.Writer, tool Tool, path string) error {
	root, err := Root()
	if err != nil {
		return err
	}
	goTool, err := exec.LookPath("go")
	if err != nil {
		return fmt.Errorf("building %s needs the go command in PATH: %w", tool, err)
	}
	fmt.Fprintf(log, "building %s %s from k8s.io/kubernetes (about 5 minutes cold on 2 cores)...\n", tool, KubeVersion)
	start := time.Now()

	// Build under a temporary name and rename it into place, so a killed
	// build never leaves a half-written binary behind that looks cached.
	tmp := fmt.Sprintf("%s.tmp-%d", path, os.Getpid())
	defer os.Remove(tmp)
	// Leftovers of builders killed outright; we hold the lock, so none of
	// them is still writing.
	if old, _ := filepath.Glob(path + ".tmp-*"); len(old) > 0 {
		for _, f := range old {
			os.Remove(f)
		}
	}
	// Without these the binaries report v0.0.0-master; with them /version
	// and the user agent say which release we test against.
	minor := strings.Split(strings.TrimPrefix(KubeVersion, "v"), ".")[1]
	var ldflags []string
	for _, pkg := range []string{"k8s.io/component-base/version", "k8s.io/client-go/pkg/version"} {
		ldflags = append(ldflags,
			"-X", pkg+".gitVersion="+KubeVersion,
			"-X", pkg+".gitMajor=1",
			"-X", pkg+".gitMinor="+minor,
			"-X", pkg+".gitTreeState=clean")
	}
	cmd := exec.CommandContext(ctx, goTool, "build", "-o", tmp,
		"-ldflags", strings.Join(ldflags, " "),
		"k8s.io/kubernetes/cmd/"+string(tool))
	cmd.Dir = filepath.Join(root, "tools", "k8sbuild")
	// tools/k8sbuild is its own module; a go.work at the root must not
	// pull it into the main module's build list.
	cmd.Env = append(os.Environ(), "GOWORK=off")
	cmd.Stdout = log
	cmd.Stderr = log
	// Cancelling must stop the compiler processes too, not only go itself.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }

	done := make(chan struct{})
	go progress(log, tool, start, done)
	err = cmd.Run()
	close(done)
	if ctx.Err() != nil {
		return fmt.Errorf("building %s interrupted: %w", tool, ctx.Err())
	}
	if err != nil {
		return fmt.Errorf("go build %s in %s: %w", tool, cmd.Dir, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	fmt.Fprintf(log, "built %s in %s: %s\n", tool, time.Since(start).Round(time.Second), path)
	return nil
}

// progress prints a line every minute so a cold build does not look hung.
func progress(log io.Writer, tool Tool, start time.Time, done <-chan struct{}) {
	t := time.NewTicker(time.Minute)
	defer t.Stop()
	for {
		select {
		case <-done:
			return
		case <-t.C:
			fmt.Fprintf(log, "still building %s (%s so far)...\n", tool, time.Since(start).Round(time.Second))
		}
	}
}

func ensureEtcd(ctx context.Context, log io.Writer) (string, error) {
	if p, err := findEtcd(); err == nil {
		return p, nil
	}
	dir, err := BinDir()
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	// dpkg takes its own lock and fails rather than waits; serialize here.
	unlock, err := lockFile(ctx, filepath.Join(dir, ".apt.lock"), log)
	if err != nil {
		return "", err
	}
	defer unlock()
	if p, err := findEtcd(); err == nil {
		return p, nil
	}
	install := []string{"apt-get", "install", "-y", "etcd-server"}
	if err := runLogged(ctx, log, install...); err != nil {
		// A fresh image has no package lists yet.
		if err := runLogged(ctx, log, "apt-get", "update"); err != nil {
			return "", err
		}
		if err := runLogged(ctx, log, install...); err != nil {
			return "", err
		}
	}
	return findEtcd()
}

func findEtcd() (string, error) {
	if p, err := exec.LookPath("etcd"); err == nil {
		return filepath.Abs(p)
	}
	// Test binaries may run with a PATH without /usr/bin entries.
	if isExecutable("/usr/bin/etcd") {
		return "/usr/bin/etcd", nil
	}
	return "", errors.New("etcd not found")
}

func runLogged(ctx context.Context, log io.Writer, args ...string) error {
	fmt.Fprintf(log, "etcd is missing; running: %s\n", strings.Join(args, " "))
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	cmd.Stdout = log
	cmd.Stderr = log
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s: %w", strings.Join(args, " "), err)
	}
	return nil
}

func isExecutable(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0
}

// lockFile takes an exclusive flock on path, polling so that ctx can cancel
// the wait, and returns the function that releases it.
func lockFile(ctx context.Context, path string, log io.Writer) (func(), error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	told := false
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("flock %s: %w", path, err)
		}
		if !told {
			fmt.Fprintf(log, "waiting for another process holding %s...\n", path)
			told = true
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}
