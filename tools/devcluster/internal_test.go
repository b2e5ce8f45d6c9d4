package devcluster

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestRootFindsModule(t *testing.T) {
	t.Setenv("SIGNALBOX_ROOT", "")
	root, err := Root()
	if err != nil {
		t.Fatal(err)
	}
	// Tests run in tools/devcluster, two levels below the root.
	wd, _ := os.Getwd()
	if want := filepath.Dir(filepath.Dir(wd)); root != want {
		t.Errorf("Root() = %s, want %s", root, want)
	}
	if !isSignalboxModule(filepath.Join(root, "go.mod")) {
		t.Errorf("%s/go.mod is not the signalbox module", root)
	}
	if isSignalboxModule(filepath.Join(root, "tools", "k8sbuild", "go.mod")) {
		t.Error("tools/k8sbuild/go.mod mistaken for the root module")
	}
}

func TestLockFileExcludes(t *testing.T) {
	path := filepath.Join(t.TempDir(), "lock")
	ctx := context.Background()
	unlock, err := lockFile(ctx, path, nil)
	if err != nil {
		t.Fatal(err)
	}
	var log strings.Builder
	short, cancel := context.WithTimeout(ctx, 700*time.Millisecond)
	defer cancel()
	if _, err := lockFile(short, path, &log); err == nil {
		t.Fatal("second lock acquired while the first is held")
	}
	if !strings.Contains(log.String(), "waiting for another process") {
		t.Errorf("waiting was not reported: %q", log.String())
	}
	unlock()
	unlock2, err := lockFile(ctx, path, nil)
	if err != nil {
		t.Fatalf("lock after release: %v", err)
	}
	unlock2()
}

func TestTokenFile(t *testing.T) {
	got, err := tokenFile([]StaticToken{
		{Token: "t1", User: "admin", Groups: []string{"system:masters"}},
		{Token: "t2", User: "bob", UID: "42", Groups: []string{"a", "b"}},
		{Token: "t3", User: "carol"},
	})
	if err != nil {
		t.Fatal(err)
	}
	want := "t1,admin,admin,\"system:masters\"\nt2,bob,42,\"a,b\"\nt3,carol,carol\n"
	if string(got) != want {
		t.Errorf("tokenFile =\n%s\nwant\n%s", got, want)
	}
	if _, err := tokenFile([]StaticToken{{Token: "a,b", User: "x"}}); err == nil {
		t.Error("a token with a comma was accepted")
	}
}
