// Package repo finds the signalbox checkout, where caches and built tools
// live, from tests (run in their package directory) and commands (run from
// anywhere inside the checkout).
package repo

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// ModulePath is the main module's path.
const ModulePath = "github.com/signalbox/signalbox"

// Root is $SIGNALBOX_ROOT when set, otherwise the nearest parent of the
// working directory whose go.mod declares ModulePath.
func Root() (string, error) {
	if r := os.Getenv("SIGNALBOX_ROOT"); r != "" {
		return filepath.Abs(r)
	}
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if b, err := os.ReadFile(filepath.Join(dir, "go.mod")); err == nil && declares(b) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no go.mod for module %s above the working directory; run inside the checkout or set SIGNALBOX_ROOT", ModulePath)
		}
		dir = parent
	}
}

func declares(gomod []byte) bool {
	s := bufio.NewScanner(bytes.NewReader(gomod))
	for s.Scan() {
		f := strings.Fields(s.Text())
		if len(f) == 2 && f[0] == "module" {
			return strings.Trim(f[1], `"`) == ModulePath
		}
	}
	return false
}
