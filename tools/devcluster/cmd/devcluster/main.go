// Command devcluster runs a persistent local kube-apiserver + etcd for
// development, and builds the upstream Kubernetes binaries the tests use.
//
//	devcluster up                 start the "dev" cluster (detached)
//	devcluster down               stop it; no process is left
//	devcluster status             show its processes and /readyz
//	devcluster build              build/cache kube-apiserver (and find etcd)
//	devcluster build --kube-proxy build/cache kube-proxy
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/signalbox/signalbox/tools/devcluster"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

const usage = `usage: devcluster <command>

commands:
  up                  start the persistent "dev" cluster in <root>/.cache/devcluster/dev
                      (empty etcd on every start; it outlives this command)
  down                stop it
  status              show whether it runs and answers /readyz (exit 1 when not)
  build [--kube-proxy]
                      build and cache kube-apiserver (or, with --kube-proxy,
                      kube-proxy) ` + devcluster.KubeVersion + ` in <root>/.cache/bin
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch os.Args[1] {
	case "up":
		err = up(ctx)
	case "down":
		err = down()
	case "status":
		var ok bool
		ok, err = status(ctx)
		if err == nil && !ok {
			stop()
			os.Exit(1)
		}
	case "build":
		err = build(ctx, os.Args[2:])
	case "-h", "--help", "help":
		fmt.Print(usage)
	default:
		fmt.Fprintf(os.Stderr, "devcluster: unknown command %q\n\n%s", os.Args[1], usage)
		stop()
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "devcluster: %v\n", err)
		stop()
		os.Exit(1)
	}
}

func devDir() (string, error) {
	cache, err := devcluster.CacheDir()
	if err != nil {
		return "", err
	}
	return filepath.Join(cache, "devcluster", "dev"), nil
}

func up(ctx context.Context) error {
	dir, err := devDir()
	if err != nil {
		return err
	}
	running, err := devcluster.RunningPIDs(dir)
	if err != nil {
		return err
	}
	kubeconfig := filepath.Join(dir, "kubeconfig")
	if len(running) == 2 {
		fmt.Printf("dev cluster is already up (etcd pid %d, kube-apiserver pid %d)\n",
			running[string(devcluster.Etcd)], running[string(devcluster.APIServer)])
		printHint(kubeconfig, serverOf(kubeconfig))
		return nil
	}
	start := time.Now()
	// Start stops a half-alive leftover recorded in dir before starting.
	c, err := devcluster.Start(ctx, devcluster.Options{
		Name:   "dev",
		Dir:    dir,
		Log:    os.Stdout,
		Detach: true,
	})
	if err != nil {
		return err
	}
	fmt.Printf("dev cluster up in %s (etcd pid %d, kube-apiserver pid %d)\n",
		time.Since(start).Round(100*time.Millisecond), c.PIDs()["etcd"], c.PIDs()["kube-apiserver"])
	printHint(c.Kubeconfig, c.Host)
	return nil
}

func printHint(kubeconfig, server string) {
	fmt.Printf("  server:     %s\n", server)
	fmt.Printf("  kubeconfig: %s\n", kubeconfig)
	fmt.Printf("  use it:     export KUBECONFIG=%s\n", kubeconfig)
	fmt.Printf("  stop it:    make devcluster-down\n")
}

func serverOf(kubeconfig string) string {
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return "(unknown: " + err.Error() + ")"
	}
	return cfg.Host
}

func down() error {
	dir, err := devDir()
	if err != nil {
		return err
	}
	running, err := devcluster.RunningPIDs(dir)
	if err != nil {
		return err
	}
	if len(running) == 0 {
		fmt.Println("dev cluster is not running")
		return nil
	}
	if err := devcluster.StopDir(dir, os.Stdout); err != nil {
		return err
	}
	if err := os.Remove(filepath.Join(dir, "pids")); err != nil && !os.IsNotExist(err) {
		return err
	}
	fmt.Println("dev cluster is down")
	return nil
}

func status(ctx context.Context) (bool, error) {
	dir, err := devDir()
	if err != nil {
		return false, err
	}
	running, err := devcluster.RunningPIDs(dir)
	if err != nil {
		return false, err
	}
	for _, name := range []devcluster.Tool{devcluster.Etcd, devcluster.APIServer} {
		if pid, ok := running[string(name)]; ok {
			fmt.Printf("%-15s running, pid %d\n", name, pid)
		} else {
			fmt.Printf("%-15s not running\n", name)
		}
	}
	switch len(running) {
	case 0:
		fmt.Println("dev cluster is down (start it with: make devcluster)")
		return false, nil
	case 1:
		fmt.Println("dev cluster is broken: one process died (make devcluster restarts it)")
		return false, nil
	}
	kubeconfig := filepath.Join(dir, "kubeconfig")
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return false, err
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return false, err
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	body, err := cs.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
	if err != nil {
		fmt.Printf("%-15s not ready: %v %s\n", "/readyz", err, body)
		return false, nil
	}
	fmt.Printf("%-15s %s\n", "/readyz", body)
	printHint(kubeconfig, cfg.Host)
	return true, nil
}

func build(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("build", flag.ContinueOnError)
	kubeProxy := fs.Bool("kube-proxy", false, "build kube-proxy instead of kube-apiserver")
	if err := fs.Parse(args); err != nil {
		return err
	}
	tools := []devcluster.Tool{devcluster.APIServer, devcluster.Etcd}
	if *kubeProxy {
		tools = []devcluster.Tool{devcluster.KubeProxy}
	}
	for _, t := range tools {
		path, err := devcluster.Ensure(ctx, os.Stdout, t)
		if err != nil {
			return err
		}
		fmt.Printf("%s: %s\n", t, path)
	}
	return nil
}
