// Command vmrun runs one command in a vmtest VM, for debugging:
//
//	go run ./tools/vmtest/cmd/vmrun [-port N] [-dir D] [-timeout T] -- cmd args...
//
// It prints the console live and exits with the command's exit code.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/signalbox/signalbox/tools/vmtest"
)

func main() {
	port := flag.Int("port", 0, "host port on 127.0.0.1 that the guest reaches at "+vmtest.GuestServerAddr+" (0: no network)")
	dir := flag.String("dir", "", "working directory inside the VM (default: the current one)")
	mem := flag.String("m", "2048M", "memory")
	cpus := flag.Int("smp", 2, "vCPUs")
	timeout := flag.Duration("timeout", 10*time.Minute, "timeout for boot and command")
	quiet := flag.Bool("q", false, "print only the command's output, not the console")
	verbose := flag.Bool("v", false, "boot without quiet, to see the kernel's messages")
	flag.Parse()
	if flag.NArg() == 0 {
		fmt.Fprintln(os.Stderr, "usage: vmrun [flags] -- cmd args...")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	opts := vmtest.Options{Memory: *mem, CPUs: *cpus, Dir: *dir, Timeout: *timeout, HostPort: *port, Logf: log.Printf, Verbose: *verbose}
	if !*quiet {
		opts.Stdout = os.Stderr
	}
	res, err := vmtest.Run(ctx, opts, flag.Args())
	if err != nil {
		log.Fatal(err)
	}
	if *quiet {
		fmt.Print(res.Output)
	}
	log.Printf("vmrun: exit code %d, boot %s, total %s", res.ExitCode, res.BootTime.Round(time.Millisecond), res.Duration.Round(time.Millisecond))
	os.Exit(res.ExitCode)
}
