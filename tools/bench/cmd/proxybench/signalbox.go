package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"syscall"
	"time"

	"google.golang.org/protobuf/encoding/protodelim"

	"github.com/signalbox/signalbox/controlplane/cache"
	"github.com/signalbox/signalbox/controlplane/nodeview"
	"github.com/signalbox/signalbox/nodeagent/dataplane/iptables"
	pb "github.com/signalbox/signalbox/proto/signalbox/v1"
)

// helperArg makes the binary act as the agent-side helper: it runs inside
// the node namespace (via `ip netns exec`), so the plane and its RSS are
// measured in a process of their own, like an agent holding its table.
const helperArg = "__signalbox-helper"

const fullReps = 3

type helperResult struct {
	Full      []time.Duration
	Updates   []time.Duration
	RSSKB     int
	RSSBaseKB int
}

// runSignalbox computes the node's table with the control plane's cache
// from the same objects, then times the plane in a fresh node namespace.
func (w *world) runSignalbox(ctx context.Context) (result, error) {
	var r result
	logf("signalbox: computing the table with controlplane/cache")
	start := time.Now()
	c := cache.New(nodeview.Options{}, nodeview.Settings{ClusterCIDRs: []string{clusterCIDR}})
	c.SetNode(nodeview.Node{Name: nodeName})
	for _, s := range w.svcs {
		c.SetService(s)
	}
	for _, s := range w.slices {
		c.SetSlice(s)
	}
	if _, problems := c.Flush(); len(problems) > 0 {
		return r, fmt.Errorf("cache: %d problems, first: %v", len(problems), problems[0])
	}
	p := c.Current(nodeName)
	deltas := []*pb.Delta{{Upserts: c.Table(p)}}
	for _, u := range w.updates {
		c.SetSlice(u)
		c.Flush()
		next := c.Current(nodeName)
		ch := c.Diff(p, next)
		if ch.Empty() {
			return r, fmt.Errorf("cache: the endpoint change produced an empty delta")
		}
		deltas = append(deltas, &pb.Delta{Upserts: ch.Upserts, Removals: ch.Removals})
		p = next
	}
	logf("signalbox: %s resources in the node's table (computed in %s)", commas(len(deltas[0].Upserts)), time.Since(start).Round(time.Millisecond))

	dir, err := os.MkdirTemp("", "proxybench-")
	if err != nil {
		return r, err
	}
	defer os.RemoveAll(dir)
	file := filepath.Join(dir, "deltas.bin")
	if err := writeDeltas(file, deltas); err != nil {
		return r, err
	}
	ns, cleanup, err := nodeNetns(ctx, "sbx")
	if err != nil {
		return r, err
	}
	defer cleanup()
	self, err := os.Executable()
	if err != nil {
		return r, err
	}
	logf("signalbox: %d full syncs + %d one-endpoint updates in netns %s", fullReps, len(w.updates), ns)
	var root syscall.Stat_t
	if err := syscall.Stat("/proc/self/ns/net", &root); err != nil {
		return r, err
	}
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", ns, self, helperArg, "-backend", w.o.backend, "-file", file,
		"-root-netns", fmt.Sprintf("%d:%d", root.Dev, root.Ino))
	cmd.Stderr = os.Stdout
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := cmd.Output()
	if err != nil {
		return r, fmt.Errorf("helper: %w", err)
	}
	var hr helperResult
	if err := json.Unmarshal(out, &hr); err != nil {
		return r, fmt.Errorf("helper output %q: %w", out, err)
	}
	r.full = median(hr.Full)
	r.partial = hr.Updates
	r.rssKB = hr.RSSKB
	r.note = fmt.Sprintf("signalbox full sync: median of %d into an empty kernel %v; RSS is the agent-like helper process holding the table (%d MiB before loading it)",
		len(hr.Full), roundAll(hr.Full), hr.RSSBaseKB/1024)
	if r.rules, err = ruleCount(ctx, ns, w.o.backend); err != nil {
		return r, err
	}
	logf("signalbox: full %s, updates %v, %s rules, RSS %d MiB", fmtDur(r.full), roundAll(r.partial), commas(r.rules), r.rssKB/1024)
	return r, nil
}

func roundAll(d []time.Duration) []time.Duration {
	out := make([]time.Duration, len(d))
	for i, x := range d {
		out[i] = x.Round(100 * time.Microsecond)
	}
	return out
}

func writeDeltas(path string, deltas []*pb.Delta) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	bw := bufio.NewWriter(f)
	for _, d := range deltas {
		if _, err := protodelim.MarshalTo(bw, d); err != nil {
			f.Close()
			return err
		}
	}
	if err := bw.Flush(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// helperMain runs in the node namespace: Sync the full table (after a
// Cleanup each time), then Apply each delta in turn, timing each.
func helperMain(args []string) error {
	fs := flag.NewFlagSet(helperArg, flag.ContinueOnError)
	backend := fs.String("backend", "legacy", "")
	file := fs.String("file", "", "")
	rootNS := fs.String("root-netns", "", "dev:inode of the caller's network namespace")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if err := notRootNetns(*rootNS); err != nil {
		return err
	}
	ctx := context.Background()
	var hr helperResult
	hr.RSSBaseKB = rssKB(os.Getpid())
	f, err := os.Open(*file)
	if err != nil {
		return err
	}
	br := bufio.NewReader(f)
	var deltas []*pb.Delta
	for {
		d := &pb.Delta{}
		if err := protodelim.UnmarshalFrom(br, d); err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			return err
		}
		deltas = append(deltas, d)
	}
	f.Close()
	if len(deltas) == 0 {
		return fmt.Errorf("no table in %s", *file)
	}
	table := pb.Table{}
	for _, r := range deltas[0].Upserts {
		table[r.Name] = r
	}
	plane, err := iptables.New(ctx, iptables.Config{
		Backend:  "iptables-" + *backend,
		Families: []pb.IPFamily{pb.IPFamily_IP_FAMILY_IPV4},
		Logger:   slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		return err
	}
	defer plane.Close()
	for i := range fullReps {
		if i > 0 {
			if err := plane.Cleanup(ctx); err != nil {
				return err
			}
		}
		start := time.Now()
		if _, err := plane.Sync(ctx, table); err != nil {
			return err
		}
		hr.Full = append(hr.Full, time.Since(start))
	}
	cur := table
	for _, d := range deltas[1:] {
		next := maps.Clone(cur)
		for _, r := range d.Upserts {
			next[r.Name] = r
		}
		for _, n := range d.Removals {
			delete(next, n)
		}
		start := time.Now()
		if _, err := plane.Apply(ctx, cur, next); err != nil {
			return err
		}
		hr.Updates = append(hr.Updates, time.Since(start))
		cur = next
	}
	hr.RSSKB = rssKB(os.Getpid())
	sort.Slice(hr.Full, func(i, j int) bool { return hr.Full[i] < hr.Full[j] })
	return json.NewEncoder(os.Stdout).Encode(hr)
}

// notRootNetns refuses to program iptables in the caller's (root) network
// namespace, given as dev:inode.
func notRootNetns(root string) error {
	var self syscall.Stat_t
	if err := syscall.Stat("/proc/self/ns/net", &self); err != nil {
		return err
	}
	if root == "" || root == fmt.Sprintf("%d:%d", self.Dev, self.Ino) {
		return fmt.Errorf("refusing to run in the caller's network namespace")
	}
	return nil
}
