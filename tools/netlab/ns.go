package netlab

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"syscall"
)

const (
	nsPrefix = "sbx-"
	netnsDir = "/run/netns"
	// lockFile serialises guard-route changes with namespace creation across
	// processes: several test packages build labs at the same time, and one
	// of them must not drop the guard while another is creating namespaces.
	lockFile = "/run/signalbox-netlab.lock"
)

// guards are unreachable routes in the root namespace. While a lab exists,
// a root-namespace packet to a lab address must die here instead of following
// the default route off the machine.
var guards = []guardRoute{
	{family: "-4", prefix: LabRange4.String()},
	{family: "-6", prefix: LabRange6.String()},
}

type guardRoute struct{ family, prefix string }

// run executes a command (iproute2, mostly) and folds its output into the
// error, because "exit status 2" alone says nothing.
func run(ctx context.Context, name string, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// withLock holds the cross-process lab lock while fn runs.
func withLock(fn func() error) error {
	f, err := os.OpenFile(lockFile, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return fmt.Errorf("netlab: lock: %w", err)
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		return fmt.Errorf("netlab: lock: %w", err)
	}
	defer syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
	return fn()
}

func addGuards(ctx context.Context) error {
	for _, g := range guards {
		if _, err := run(ctx, "ip", g.family, "route", "replace", "unreachable", g.prefix); err != nil {
			return fmt.Errorf("netlab: guard route: %w", err)
		}
	}
	return nil
}

// dropGuardsIfIdle removes the guard routes once no lab namespace of any lab
// (ours or another process's) remains. Call with the lock held.
func dropGuardsIfIdle(ctx context.Context) error {
	left, err := listNamespaces(nsPrefix)
	if err != nil || len(left) > 0 {
		return err
	}
	var errs []error
	for _, g := range guards {
		out, err := run(ctx, "ip", g.family, "route", "del", "unreachable", g.prefix)
		if err != nil && !strings.Contains(out, "No such process") {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// listNamespaces returns the named network namespaces starting with prefix.
func listNamespaces(prefix string) ([]string, error) {
	entries, err := os.ReadDir(netnsDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var names []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), prefix) {
			names = append(names, e.Name())
		}
	}
	sort.Strings(names)
	return names, nil
}

// ownedNS is a namespace this process created. The open handle pins the
// namespace, so its inode number cannot be recycled for a namespace that a
// newer lab of the same name creates; comparing inodes then tells whether
// the name still refers to ours.
type ownedNS struct {
	name   string
	handle *os.File
}

func ownNamespace(name string) (ownedNS, error) {
	f, err := os.Open(netnsDir + "/" + name)
	return ownedNS{name: name, handle: f}, err
}

// stillOurs reports whether the name still refers to the namespace we made.
func (o ownedNS) stillOurs() bool {
	var named, held syscall.Stat_t
	if syscall.Stat(netnsDir+"/"+o.name, &named) != nil || syscall.Fstat(int(o.handle.Fd()), &held) != nil {
		return false
	}
	return named.Dev == held.Dev && named.Ino == held.Ino
}

// removeNamespace kills whatever runs inside the namespace (agents,
// kube-proxy, sleeps left by a killed test run: all of them were started in
// a lab namespace, so they belong to a lab) and deletes it.
func removeNamespace(ctx context.Context, name string) error {
	out, err := run(ctx, "ip", "netns", "pids", name)
	if err != nil {
		return err
	}
	self := os.Getpid()
	for _, f := range strings.Fields(out) {
		pid, err := strconv.Atoi(f)
		// Our own process shows up when one of its threads is switched
		// into the namespace (Host.Do); never kill ourselves.
		if err != nil || pid == self {
			continue
		}
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
			return fmt.Errorf("netlab: kill %d in %s: %w", pid, name, err)
		}
	}
	_, err = run(ctx, "ip", "netns", "delete", name)
	return err
}

// Cleanup removes every namespace of lab name (for example one left by a
// killed run) and, if no lab remains at all, the root namespace's guard routes.
func Cleanup(ctx context.Context, name string) error {
	if err := checkName("lab", name, false); err != nil {
		return err
	}
	if err := removeStale(ctx, name); err != nil {
		return err
	}
	return withLock(func() error { return dropGuardsIfIdle(ctx) })
}

func removeStale(ctx context.Context, name string) error {
	names, err := listNamespaces(nsPrefix + name + "-")
	if err != nil {
		return err
	}
	var errs []error
	for _, ns := range names {
		errs = append(errs, removeNamespace(ctx, ns))
	}
	return errors.Join(errs...)
}

// List returns the names of the labs that have namespaces on this machine.
func List() ([]string, error) {
	names, err := listNamespaces(nsPrefix)
	if err != nil {
		return nil, err
	}
	var labs []string
	seen := map[string]bool{}
	for _, ns := range names {
		// Lab names contain no '-', so the first one ends the lab name.
		lab, _, _ := strings.Cut(strings.TrimPrefix(ns, nsPrefix), "-")
		if !seen[lab] {
			seen[lab] = true
			labs = append(labs, lab)
		}
	}
	return labs, nil
}
