package labenv

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"

	"github.com/signalbox/signalbox/tools/devcluster"
)

// BinDirEnv names a directory holding prebuilt controlplane and nodeagent
// binaries. A VM runs Go code about 48 times slower than the host and sees
// the host's root read-only, so there the binaries are built beforehand on
// the host and only picked up.
const BinDirEnv = "SIGNALBOX_E2E_BIN"

// Binaries are the paths of the two signalbox binaries.
type Binaries struct {
	ControlPlane string
	NodeAgent    string
}

var packages = map[string]string{
	"controlplane": "./controlplane/cmd/controlplane",
	"nodeagent":    "./nodeagent/cmd/nodeagent",
}

// Build compiles both binaries into <cache>/e2e/bin (or returns the ones in
// $SIGNALBOX_E2E_BIN). Each is built under a temporary name and renamed into
// place, so a demo still running the previous build is not disturbed (an
// executable being run cannot be overwritten in place).
func Build(ctx context.Context, log io.Writer) (Binaries, error) {
	if dir := os.Getenv(BinDirEnv); dir != "" {
		b := Binaries{ControlPlane: filepath.Join(dir, "controlplane"), NodeAgent: filepath.Join(dir, "nodeagent")}
		for _, p := range []string{b.ControlPlane, b.NodeAgent} {
			if fi, err := os.Stat(p); err != nil || fi.Mode()&0o111 == 0 {
				return b, fmt.Errorf("$%s=%s: no executable %s", BinDirEnv, dir, filepath.Base(p))
			}
		}
		return b, nil
	}
	root, err := devcluster.Root()
	if err != nil {
		return Binaries{}, err
	}
	cache, err := devcluster.CacheDir()
	if err != nil {
		return Binaries{}, err
	}
	dir := filepath.Join(cache, "e2e", "bin")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return Binaries{}, err
	}
	out := map[string]string{}
	for name, pkg := range packages {
		path := filepath.Join(dir, name)
		tmp := fmt.Sprintf("%s.tmp-%d", path, os.Getpid())
		fmt.Fprintf(log, "labenv: go build %s\n", pkg)
		cmd := exec.CommandContext(ctx, "go", "build", "-o", tmp, pkg)
		cmd.Dir = root
		cmd.Stdout = log
		cmd.Stderr = log
		if err := cmd.Run(); err != nil {
			os.Remove(tmp)
			return Binaries{}, fmt.Errorf("go build %s: %w", pkg, err)
		}
		if err := os.Rename(tmp, path); err != nil {
			return Binaries{}, err
		}
		out[name] = path
	}
	return Binaries{ControlPlane: out["controlplane"], NodeAgent: out["nodeagent"]}, nil
}
