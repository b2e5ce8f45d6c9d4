package vmtest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
)

// BuildTestBinary compiles the tests of pkg (an import path, or a path
// relative to the repo root such as ./nodeagent/ipvs) with `go test -c`
// into <root>/.cache/vmtest/bin/, where the VM can see it, and returns the
// binary's path. Run it in the VM with e.g. []string{path, "-test.v"};
// tests that need the VM can require os.Getenv(vmtest.InVMEnv) == "1".
// Extra go flags (e.g. "-tags", "vm" for tests that only make sense in the
// VM's kernel) go before the package.
func BuildTestBinary(ctx context.Context, pkg string, flags ...string) (string, error) {
	return build(ctx, pkg, ".test", append([]string{"test", "-c"}, flags...)...)
}

// BuildProgram compiles the main package pkg with `go build` into
// <root>/.cache/vmtest/bin/ and returns the binary's path.
func BuildProgram(ctx context.Context, pkg string) (string, error) {
	return build(ctx, pkg, "", "build")
}

var unsafeNameChars = regexp.MustCompile(`[^A-Za-z0-9_.-]+`)

func build(ctx context.Context, pkg, suffix string, goArgs ...string) (string, error) {
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	cache, err := CacheDir()
	if err != nil {
		return "", err
	}
	bin := filepath.Join(cache, "bin")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		return "", err
	}
	// The whole package path goes into the name, so that two packages
	// with the same last element do not overwrite each other.
	name := strings.Trim(unsafeNameChars.ReplaceAllString(strings.TrimPrefix(pkg, modulePath), "_"), "._")
	if name == "" {
		name = "root"
	}
	out := filepath.Join(bin, name+suffix)
	// Build beside the target and rename, so that a concurrent run of the
	// same binary never sees a half-written file.
	tmp := fmt.Sprintf("%s.tmp%d", out, os.Getpid())
	args := append(append([]string{}, goArgs...), "-o", tmp, pkg)
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = root
	if b, err := cmd.CombinedOutput(); err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("vmtest: go %s: %w\n%s", strings.Join(args, " "), err, b)
	}
	if _, err := os.Stat(tmp); err != nil {
		// go test -c writes nothing for a package without tests.
		return "", fmt.Errorf("vmtest: go %s produced no binary (does %s have tests?)", strings.Join(args, " "), pkg)
	}
	return out, os.Rename(tmp, out)
}
