package devcluster

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

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
