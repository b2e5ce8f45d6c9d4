// Package vmtest boots Debian's 6.1 kernel under qemu (TCG) with the host
// root shared read-only and runs one command inside it. It exists because
// the development hosts' own kernel has no IPVS and no dummy device, so the
// IPVS data plane can only be tested in a kernel we bring ourselves.
//
// Typical use from a host-side test:
//
//	bin, err := vmtest.BuildTestBinary(ctx, "./nodeagent/ipvs")
//	res, err := vmtest.Run(ctx, vmtest.Options{}, []string{bin, "-test.v"})
//	// res.ExitCode, res.Output
//
// Inside the VM, SIGNALBOX_IN_VM=1 (InVMEnv); tests that need the VM's
// kernel check it. The root file system is the host's, read-only; /tmp,
// /run and /dev/shm are empty tmpfs, so binaries and inputs for the VM
// belong under <repo>/.cache/vmtest. Network is off unless Options.HostPort
// is set; then the guest (GuestAddr) reaches exactly one host port on
// 127.0.0.1 by dialing GuestServerAddr, and nothing else.
package vmtest

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"

	"github.com/signalbox/signalbox/tools/repo"
)

// Logf receives progress messages; t.Logf and log.Printf both fit.
type Logf func(format string, args ...any)

func (l Logf) printf(format string, args ...any) {
	if l != nil {
		l(format, args...)
	}
}

// Kernel is an unpacked kernel package in the cache.
type Kernel struct {
	Release string // e.g. "6.1.0-56-amd64": the name under lib/modules
	Dir     string // root of the unpacked package
	Image   string // uncompressed vmlinux, booted through its PVH entry point
}

// ModulesDir is lib/modules/<release> of the unpacked package, with a
// modules.dep made by depmod.
func (k Kernel) ModulesDir() string {
	return filepath.Join(k.Dir, "lib", "modules", k.Release)
}

const modulePath = repo.ModulePath

// RepoRoot is the checkout's root (see repo.Root).
func RepoRoot() (string, error) { return repo.Root() }

// CacheDir is <repo root>/.cache/vmtest (git-ignored). Everything the VM
// must see lives here rather than in /tmp, because the VM's /tmp is its own.
func CacheDir() (string, error) {
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	dir := filepath.Join(root, ".cache", "vmtest")
	return dir, os.MkdirAll(dir, 0o755)
}

// lockFile takes an exclusive flock so that parallel test processes do not
// download or unpack into the same place at once.
func lockFile(path string) (unlock func(), err error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("vmtest: lock %s: %w", path, err)
	}
	return func() { f.Close() }, nil
}

// Only the plain amd64 flavour: -cloud lacks the netfilter modules we need,
// -rt is a different kernel, and -dbg/-unsigned are not bootable images.
var kernelPkgRE = regexp.MustCompile(`^linux-image-(6\.1\.0-([0-9]+)-amd64)$`)

func abiNumber(release string) int {
	m := kernelPkgRE.FindStringSubmatch("linux-image-" + release)
	if m == nil {
		return -1
	}
	n, _ := strconv.Atoi(m[2])
	return n
}

// EnsureKernel returns the newest cached kernel, or downloads the newest
// linux-image-6.1.0-*-amd64 that apt offers and unpacks it into the cache.
// A cached kernel is used as is, without asking apt, so that repeated runs
// are offline and identical.
func EnsureKernel(ctx context.Context, logf Logf) (Kernel, error) {
	cache, err := CacheDir()
	if err != nil {
		return Kernel{}, err
	}
	unlock, err := lockFile(filepath.Join(cache, "kernel.lock"))
	if err != nil {
		return Kernel{}, err
	}
	defer unlock()

	if k, ok := newestCachedKernel(cache); ok {
		return k, nil
	}
	if err := ensureTools(ctx, logf, "dpkg", "apt-get", "depmod"); err != nil {
		return Kernel{}, err
	}
	release, err := newestKernelRelease(ctx, logf)
	if err != nil {
		return Kernel{}, err
	}
	final := filepath.Join(cache, "kernel-"+release)
	work := final + ".tmp"
	// A previous run may have died half way; we hold the lock, so it is ours to clear.
	if err := os.RemoveAll(work); err != nil {
		return Kernel{}, err
	}
	dl := filepath.Join(work, "download")
	unpacked := filepath.Join(work, "root")
	if err := os.MkdirAll(dl, 0o755); err != nil {
		return Kernel{}, err
	}
	pkg := "linux-image-" + release
	if err := run(ctx, logf, dl, "apt-get", "download", pkg); err != nil {
		return Kernel{}, err
	}
	debs, _ := filepath.Glob(filepath.Join(dl, pkg+"_*.deb"))
	if len(debs) != 1 {
		return Kernel{}, fmt.Errorf("vmtest: expected one %s .deb in %s, found %d", pkg, dl, len(debs))
	}
	if err := run(ctx, logf, "", "dpkg", "-x", debs[0], unpacked); err != nil {
		return Kernel{}, err
	}
	if err := run(ctx, logf, "", "depmod", "-b", unpacked, release); err != nil {
		return Kernel{}, err
	}
	boot := filepath.Join(unpacked, "boot")
	if err := extractVmlinux(ctx, logf, filepath.Join(boot, "vmlinuz-"+release), filepath.Join(boot, "vmlinux-"+release)); err != nil {
		return Kernel{}, err
	}
	// Rename last, so that a kernel-* directory in the cache is always complete.
	if err := os.Rename(unpacked, final); err != nil {
		return Kernel{}, err
	}
	os.RemoveAll(work)
	k, err := kernelAt(final, release)
	if err != nil {
		return Kernel{}, err
	}
	logf.printf("vmtest: kernel %s ready in %s", release, final)
	return k, nil
}

func kernelAt(dir, release string) (Kernel, error) {
	k := Kernel{Release: release, Dir: dir, Image: filepath.Join(dir, "boot", "vmlinux-"+release)}
	for _, p := range []string{k.Image, filepath.Join(k.ModulesDir(), "modules.dep")} {
		if _, err := os.Stat(p); err != nil {
			return Kernel{}, fmt.Errorf("vmtest: unpacked kernel incomplete: %w", err)
		}
	}
	return k, nil
}

func newestCachedKernel(cache string) (Kernel, bool) {
	dirs, _ := filepath.Glob(filepath.Join(cache, "kernel-*"))
	best, bestN := Kernel{}, -1
	for _, d := range dirs {
		release := strings.TrimPrefix(filepath.Base(d), "kernel-")
		n := abiNumber(release)
		if n <= bestN {
			continue
		}
		if k, err := kernelAt(d, release); err == nil {
			best, bestN = k, n
		}
	}
	return best, bestN >= 0
}

// newestKernelRelease asks apt for the highest-numbered plain amd64 6.1
// kernel that has an installable candidate, running apt-get update once if
// the package lists know none (as on a fresh machine).
func newestKernelRelease(ctx context.Context, logf Logf) (string, error) {
	for attempt := 0; attempt < 2; attempt++ {
		if attempt == 1 {
			if err := run(ctx, logf, "", "apt-get", "update"); err != nil {
				return "", err
			}
		}
		out, err := exec.CommandContext(ctx, "apt-cache", "pkgnames", "linux-image-6.1.0-").Output()
		if err != nil {
			return "", fmt.Errorf("vmtest: apt-cache pkgnames: %w", err)
		}
		var releases []string
		for _, name := range strings.Fields(string(out)) {
			if m := kernelPkgRE.FindStringSubmatch(name); m != nil {
				releases = append(releases, m[1])
			}
		}
		sort.Slice(releases, func(i, j int) bool { return abiNumber(releases[i]) > abiNumber(releases[j]) })
		for _, r := range releases {
			pol, err := exec.CommandContext(ctx, "apt-cache", "policy", "linux-image-"+r).Output()
			if err == nil && bytes.Contains(pol, []byte("Candidate:")) && !bytes.Contains(pol, []byte("Candidate: (none)")) {
				logf.printf("vmtest: newest kernel package available: linux-image-%s", r)
				return r, nil
			}
		}
	}
	return "", fmt.Errorf("vmtest: apt offers no linux-image-6.1.0-*-amd64 package (is this Debian 12 with bookworm sources?)")
}

// extractVmlinux unpacks the ELF kernel from a bzImage. Under TCG the
// kernel's own xz decompressor takes about 3 s of a 7 s boot; qemu boots the
// ELF directly through its PVH note, so we decompress once, natively.
func extractVmlinux(ctx context.Context, logf Logf, bzImage, out string) error {
	b, err := os.ReadFile(bzImage)
	if err != nil {
		return err
	}
	// x86 boot protocol: setup_sects at 0x1f1, then payload_offset and
	// payload_length (relative to the protected-mode code) at 0x248.
	if len(b) < 0x250 || string(b[0x202:0x206]) != "HdrS" {
		return fmt.Errorf("vmtest: %s is not a bzImage", bzImage)
	}
	setupSects := int(b[0x1f1])
	if setupSects == 0 {
		setupSects = 4
	}
	start := (setupSects+1)*512 + int(binary.LittleEndian.Uint32(b[0x248:]))
	end := start + int(binary.LittleEndian.Uint32(b[0x24c:]))
	if end > len(b) || !bytes.HasPrefix(b[start:end], []byte("\xfd7zXZ\x00")) {
		return fmt.Errorf("vmtest: %s: payload is not xz (this code expects Debian's CONFIG_KERNEL_XZ)", bzImage)
	}
	if err := ensureTools(ctx, logf, "xz"); err != nil {
		return err
	}
	logf.printf("vmtest: $ xz -dc --single-stream < payload of %s > %s", bzImage, out)
	cmd := exec.CommandContext(ctx, "xz", "-dc", "--single-stream")
	cmd.Stdin = bytes.NewReader(b[start:end])
	elfBytes, err := cmd.Output()
	if err != nil {
		return fmt.Errorf("vmtest: xz -d of the kernel payload: %w", err)
	}
	if !bytes.HasPrefix(elfBytes, []byte("\x7fELF")) {
		return fmt.Errorf("vmtest: %s: payload is not an ELF kernel", bzImage)
	}
	return os.WriteFile(out, elfBytes, 0o644)
}

// run runs a command, telling logf what it does, and returns its output in
// the error when it fails.
func run(ctx context.Context, logf Logf, dir, name string, args ...string) error {
	logf.printf("vmtest: $ %s %s", name, strings.Join(args, " "))
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("vmtest: %s %s: %w\n%s", name, strings.Join(args, " "), err, tail(string(out), 30))
	}
	return nil
}

func tail(s string, lines int) string {
	l := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(l) > lines {
		l = l[len(l)-lines:]
	}
	return strings.Join(l, "\n")
}
