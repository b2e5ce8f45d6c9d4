// Command proxybench runs upstream kube-proxy (iptables mode) and
// signalbox's iptables data plane side by side, on the same machine and the
// same iptables backend, at the same scale, each in a fresh network
// namespace, and prints a comparison table.
//
//	go run ./tools/bench/cmd/proxybench [--backend legacy|nft] [--services N] [--endpoints M]
//
// It needs root: it creates network namespaces (named sbx-bench-*) and
// programs iptables only inside them. Lab addresses are in 198.18.0.0/15.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"
	"time"
)

type options struct {
	backend   string
	services  int
	endpoints int
	reps      int
	timeout   time.Duration
	skipKP    bool
}

// result is what one side measured.
type result struct {
	full    time.Duration   // full sync
	partial []time.Duration // one-endpoint updates
	rules   int             // iptables-save lines (nat + filter)
	rssKB   int             // VmRSS after the updates
	note    string
	// timedOut is set when the full sync did not finish in that long.
	timedOut time.Duration
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == helperArg {
		if err := helperMain(os.Args[2:]); err != nil {
			fmt.Fprintln(os.Stderr, "helper:", err)
			os.Exit(1)
		}
		return
	}
	var o options
	flag.StringVar(&o.backend, "backend", "legacy", "iptables backend for both sides: legacy or nft")
	flag.IntVar(&o.services, "services", 10000, "number of Services")
	flag.IntVar(&o.endpoints, "endpoints", 10, "endpoints per Service (one EndpointSlice each)")
	flag.IntVar(&o.reps, "reps", 5, "one-endpoint updates to time on each side (median reported)")
	flag.DurationVar(&o.timeout, "kube-proxy-timeout", 10*time.Minute, "give up on kube-proxy's full sync after this long")
	flag.BoolVar(&o.skipKP, "skip-kube-proxy", false, "only measure signalbox")
	flag.Parse()
	if o.backend != "legacy" && o.backend != "nft" {
		fatalf("--backend must be legacy or nft")
	}
	if o.services < 1 || o.endpoints < 1 || o.services*o.endpoints > 1<<20 || o.services > 30000 {
		fatalf("--services must be 1..30000 and services×endpoints ≤ 1,048,576")
	}
	if os.Geteuid() != 0 {
		fatalf("proxybench needs root (network namespaces, iptables inside them)")
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, o); err != nil {
		fatalf("%v", err)
	}
}

func fatalf(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "proxybench: "+format+"\n", a...)
	os.Exit(1)
}

func logf(format string, a ...any) {
	fmt.Printf("%s  %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, a...))
}

func run(ctx context.Context, o options) error {
	logf("scale: %s Services × %d endpoints, backend iptables-%s", commas(o.services), o.endpoints, o.backend)
	w := newWorld(o)
	var kp, sb result
	var kpErr error
	if o.skipKP {
		kpErr = fmt.Errorf("skipped")
	} else {
		kp, kpErr = w.runKubeProxy(ctx)
		if kpErr != nil {
			logf("kube-proxy: %v", kpErr)
			if ctx.Err() != nil {
				return kpErr
			}
		}
	}
	if w.svcs == nil { // kube-proxy skipped or failed before creating objects
		w.synthesize()
	}
	sb, err := w.runSignalbox(ctx)
	if err != nil {
		return fmt.Errorf("signalbox: %w", err)
	}
	printTable(o, kp, kpErr, sb)
	return nil
}

func printTable(o options, kp result, kpErr error, sb result) {
	fmt.Println()
	fmt.Printf("%s Services × %d endpoints, iptables-%s, one-endpoint update median of %d\n\n",
		commas(o.services), o.endpoints, o.backend, o.reps)
	row := func(metric, a, b, ratio string) {
		fmt.Printf("| %-37s | %-14s | %-14s | %-8s |\n", metric, a, b, ratio)
	}
	row("metric", "kube-proxy", "signalbox", "ratio")
	fmt.Println("|" + strings.Repeat("-", 39) + "|" + strings.Repeat("-", 16) + "|" + strings.Repeat("-", 16) + "|" + strings.Repeat("-", 10) + "|")
	na := kpErr != nil
	dur := func(name string, a, b time.Duration) {
		if na || a == 0 {
			row(name, "n/a", fmtDur(b), "")
			return
		}
		row(name, fmtDur(a), fmtDur(b), fmt.Sprintf("%.3f", float64(b)/float64(a)))
	}
	if kp.timedOut > 0 {
		row("full sync", "> "+kp.timedOut.String(), fmtDur(sb.full), fmt.Sprintf("< %.4f", float64(sb.full)/float64(kp.timedOut)))
	} else {
		dur("full sync", kp.full, sb.full)
	}
	dur("one-endpoint update (median)", median(kp.partial), median(sb.partial))
	dur("one-endpoint update (max)", maxOf(kp.partial), maxOf(sb.partial))
	num := func(name string, a, b int, unit string) {
		if na || a == 0 {
			row(name, "n/a", fmt.Sprintf("%s%s", commas(b), unit), "")
			return
		}
		row(name, commas(a)+unit, commas(b)+unit, fmt.Sprintf("%.3f", float64(b)/float64(a)))
	}
	num("iptables rules (-A lines, all tables)", kp.rules, sb.rules, "")
	num("RSS", kp.rssKB/1024, sb.rssKB/1024, " MiB")
	if na {
		fmt.Printf("\nkube-proxy: %v\n", kpErr)
	}
	for _, n := range []string{kp.note, sb.note} {
		if n != "" {
			fmt.Println(n)
		}
	}
	fmt.Printf("ratio = signalbox / kube-proxy (target ≤ 0.5 for both sync times)\n")
}

func median(d []time.Duration) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

func maxOf(d []time.Duration) time.Duration {
	var m time.Duration
	for _, x := range d {
		m = max(m, x)
	}
	return m
}

func fmtDur(d time.Duration) string {
	switch {
	case d == 0:
		return "n/a"
	case d >= time.Second:
		return fmt.Sprintf("%.2f s", d.Seconds())
	default:
		return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond))
	}
}

func commas(n int) string {
	s := fmt.Sprint(n)
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}
