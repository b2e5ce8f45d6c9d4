package iptables

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/vishvananda/netns"

	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// inNetns moves the calling goroutine, locked to its OS thread, into a
// fresh network namespace for the rest of the test. The thread is never
// unlocked: when the goroutine ends, Go discards the thread, so nothing
// else ever runs in the test namespace and the test never runs in the
// root one. Everything a test does to iptables happens on this goroutine.
func inNetns(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this test needs root: it creates network namespaces and programs iptables inside them")
	}
	runtime.LockOSThread()
	root, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	name := fmt.Sprintf("sbx-ipt-%d-%08x", os.Getpid(), rand.Uint32())
	ns, err := netns.NewNamed(name) // creates it and moves this thread in
	if err != nil {
		root.Close()
		t.Fatalf("create netns %s: %v", name, err)
	}
	t.Cleanup(func() {
		ns.Close()
		root.Close()
		if err := netns.DeleteNamed(name); err != nil {
			t.Errorf("delete netns %s: %v", name, err)
		}
	})
	cur, err := netns.Get()
	if err != nil || cur.Equal(root) {
		t.Fatalf("still in the root network namespace (%v): refusing to touch iptables", err)
	}
	cur.Close()
}

var backends = []string{BackendLegacy, BackendNFT}

// newPlane builds a plane in the current (test) namespace.
func newPlane(t testing.TB, backend string, cfg Config) *Plane {
	t.Helper()
	cfg.Backend = backend
	p, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}

func mustRun(t testing.TB, stdin string, name string, args ...string) string {
	t.Helper()
	var in []byte
	if stdin != "" {
		in = []byte(stdin)
	}
	out, err := run(context.Background(), in, name, args...)
	if err != nil {
		t.Fatal(err)
	}
	return string(out)
}

// cleanSave is iptables-save without comments and counters, for exact
// before/after comparisons.
func cleanSave(t testing.TB, cmds commands) string {
	t.Helper()
	var b strings.Builder
	for _, l := range strings.Split(mustRun(t, "", cmds.save), "\n") {
		if strings.HasPrefix(l, "#") || l == "" {
			continue
		}
		if strings.HasPrefix(l, ":") {
			if i := strings.LastIndex(l, " ["); i > 0 {
				l = l[:i]
			}
		}
		b.WriteString(l + "\n")
	}
	return b.String()
}

// state maps "table chain" to its rules: the SBX chains, and the rules of
// other chains that jump into SBX chains (under "table CHAIN").
type state map[string][]string

// isTop reports whether a "table chain" key is a dispatch chain.
func isTop(key string) bool {
	table, chain, _ := strings.Cut(key, " ")
	return isDispatch(table, chain)
}

func (s state) normalized() state {
	out := state{}
	for k, v := range s {
		v = slices.Clone(v)
		if isTop(k) || !strings.HasPrefix(k[strings.Index(k, " ")+1:], "SBX-") {
			sort.Strings(v)
		}
		out[k] = v
	}
	return out
}

func parseState(text string, sbxOnly bool) state {
	s := state{}
	table := ""
	for _, l := range strings.Split(text, "\n") {
		switch {
		case strings.HasPrefix(l, "*"):
			table = l[1:]
		case strings.HasPrefix(l, ":SBX-"):
			s[table+" "+strings.Fields(l[1:])[0]] = []string{}
		case strings.HasPrefix(l, "-A "):
			chain := ruleChain(l)
			if strings.HasPrefix(chain, "SBX-") || (!sbxOnly && strings.HasPrefix(ruleTarget(l), "SBX-")) {
				s[table+" "+chain] = append(s[table+" "+chain], l)
			}
		case strings.HasPrefix(l, "-X "):
			delete(s, table+" "+l[3:])
		}
	}
	return s
}

func kernelState(t testing.TB, cmds commands) state {
	return parseState(cleanSave(t, cmds), false)
}

// wantState is what a full render of tbl puts into the kernel, jumps from
// the built-in chains included.
func wantState(t testing.TB, tbl pb.Table, cfg Config, fam family) state {
	t.Helper()
	plan, err := Render(nil, tbl, cfg)
	if err != nil {
		t.Fatal(err)
	}
	s := parseState(string(plan.family(fam).Restore()), true)
	for _, j := range jumps {
		key := j.table + " " + j.chain
		s[key] = append(s[key], j.saveLine())
	}
	return s
}

func diffStates(got, want state) string {
	got, want = got.normalized(), want.normalized()
	var keys []string
	for k := range got {
		keys = append(keys, k)
	}
	for k := range want {
		if _, ok := got[k]; !ok {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		g, gok := got[k]
		w, wok := want[k]
		switch {
		case !gok:
			fmt.Fprintf(&b, "missing chain %s\n", k)
		case !wok:
			fmt.Fprintf(&b, "unexpected chain %s: %v\n", k, g)
		case !slices.Equal(g, w):
			fmt.Fprintf(&b, "chain %s:\n  got  %q\n  want %q\n", k, g, w)
		}
	}
	return b.String()
}
