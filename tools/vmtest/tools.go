package vmtest

import (
	"context"
	"debug/elf"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
)

// busyboxPath must be a static busybox: the initramfs has no libc.
const busyboxPath = "/bin/busybox"

// toolPackages maps each program that vmtest needs to its Debian package.
// ipvsadm, ipset and iptables are run inside the VM, but from the shared
// host root, so they must be installed on the host.
var toolPackages = map[string]string{
	"qemu-system-x86_64": "qemu-system-x86",
	"busybox":            "busybox-static",
	"ipvsadm":            "ipvsadm",
	"ipset":              "ipset",
	"iptables":           "iptables",
	"depmod":             "kmod",
	"dpkg":               "dpkg",
	"xz":                 "xz-utils",
	"apt-get":            "apt",
}

var (
	toolsMu    sync.Mutex
	toolsReady = map[string]bool{}
)

// EnsureTools installs, with apt-get, whatever vmtest needs and is missing.
func EnsureTools(ctx context.Context, logf Logf) error {
	names := make([]string, 0, len(toolPackages))
	for n := range toolPackages {
		names = append(names, n)
	}
	sort.Strings(names)
	return ensureTools(ctx, logf, names...)
}

func ensureTools(ctx context.Context, logf Logf, names ...string) error {
	toolsMu.Lock()
	defer toolsMu.Unlock()
	missing := missingPackages(names)
	if len(missing) == 0 {
		return nil
	}
	cache, err := CacheDir()
	if err != nil {
		return err
	}
	// apt has its own lock, but fails instead of waiting on it.
	unlock, err := lockFile(filepath.Join(cache, "apt.lock"))
	if err != nil {
		return err
	}
	defer unlock()
	if missing = missingPackages(names); len(missing) > 0 {
		logf.printf("vmtest: installing missing packages: %s", strings.Join(missing, " "))
		if err := run(ctx, logf, "", "apt-get", "update"); err != nil {
			return err
		}
		if err := run(ctx, logf, "", "apt-get", append([]string{"install", "-y"}, missing...)...); err != nil {
			return err
		}
		if still := missingPackages(names); len(still) > 0 {
			return fmt.Errorf("vmtest: still missing after apt-get install: %s", strings.Join(still, " "))
		}
	}
	for _, n := range names {
		toolsReady[n] = true
	}
	return nil
}

func missingPackages(names []string) []string {
	seen := map[string]bool{}
	var missing []string
	for _, n := range names {
		pkg, ok := toolPackages[n]
		if !ok {
			panic("vmtest: unknown tool " + n)
		}
		if toolsReady[n] || seen[pkg] || toolPresent(n) {
			continue
		}
		seen[pkg] = true
		missing = append(missing, pkg)
	}
	return missing
}

func toolPresent(name string) bool {
	if name == "busybox" {
		return isStaticELF(busyboxPath)
	}
	if _, err := exec.LookPath(name); err == nil {
		return true
	}
	// Sessions without /usr/sbin in PATH still have the tools.
	for _, dir := range []string{"/usr/sbin", "/sbin"} {
		if st, err := os.Stat(filepath.Join(dir, name)); err == nil && st.Mode()&0o111 != 0 {
			return true
		}
	}
	return false
}

func isStaticELF(path string) bool {
	f, err := elf.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return false
		}
	}
	return true
}
