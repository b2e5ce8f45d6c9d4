package repo

import (
	"os"
	"path/filepath"
	"testing"
)

func TestRootFindsTheMainModuleNotANestedOne(t *testing.T) {
	t.Setenv("SIGNALBOX_ROOT", "")
	root, err := Root()
	if err != nil {
		t.Fatal(err)
	}
	wd, _ := os.Getwd() // tools/repo, two levels below the root
	if want := filepath.Dir(filepath.Dir(wd)); root != want {
		t.Errorf("Root() = %s, want %s", root, want)
	}
	nested, err := os.ReadFile(filepath.Join(root, "tools", "k8sbuild", "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	if declares(nested) {
		t.Error("tools/k8sbuild/go.mod mistaken for the main module")
	}
	t.Setenv("SIGNALBOX_ROOT", "/somewhere")
	if r, _ := Root(); r != "/somewhere" {
		t.Errorf("SIGNALBOX_ROOT ignored: %s", r)
	}
}
