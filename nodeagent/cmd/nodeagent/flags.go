package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"
)

type options struct {
	controlPlane      string
	nodeName          string
	tokenFile         string
	caFile            string
	serverName        string
	insecure          bool
	mode              string
	healthAddr        string
	metricsAddr       string
	resyncPeriod      time.Duration
	healthzTimeout    time.Duration
	cleanup           bool
	nodePortAddresses []string
	logFormat         string
	logLevel          string
	iptablesBackend   string
	masqueradeBit     int
	ipvsScheduler     string
}

// envPrefix: every flag falls back to SIGNALBOX_<FLAG_NAME> (dashes become
// underscores) when not given on the command line, so a DaemonSet can set
// either. --node-name also falls back to NODE_NAME, which the manifests
// fill from the downward API (spec.nodeName).
const envPrefix = "SIGNALBOX_"

func parseFlags(args []string, getenv func(string) string) (options, error) {
	var o options
	var nodePortAddresses string
	fs := flag.NewFlagSet("nodeagent", flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors are returned; -h prints below
	fs.StringVar(&o.controlPlane, "control-plane", "", "control plane address: host:port, unix:/path, or a gRPC target such as dns:///name:port")
	fs.StringVar(&o.nodeName, "node-name", "", "this node's name (default $NODE_NAME)")
	fs.StringVar(&o.tokenFile, "token-file", "/var/run/secrets/tokens/signalbox-token", "projected ServiceAccount token, re-read on every reconnect (with --insecure a missing file means no token)")
	fs.StringVar(&o.caFile, "ca-file", "", "CA bundle that signs the control plane's certificate (default: system roots)")
	fs.StringVar(&o.serverName, "server-name", "", "name to verify in the control plane's certificate (default: from the address)")
	fs.BoolVar(&o.insecure, "insecure", false, "plaintext stream, for the sealed lab and tests only")
	fs.StringVar(&o.mode, "mode", "iptables", "data plane: iptables, ipvs or nftables")
	fs.StringVar(&o.healthAddr, "health-addr", "0.0.0.0:10256", "address for /healthz and /livez; empty disables")
	fs.StringVar(&o.metricsAddr, "metrics-addr", "127.0.0.1:10249", "address for /metrics; empty disables")
	fs.DurationVar(&o.resyncPeriod, "resync-period", 60*time.Second, "how often to re-sync the held table into the kernel, repairing flushed rules; 0 disables")
	fs.DurationVar(&o.healthzTimeout, "healthz-timeout", 2*time.Minute, "a received change not programmed within this window makes /healthz fail")
	fs.BoolVar(&o.cleanup, "cleanup", false, "remove every kernel object the agent owns for --mode, then exit")
	fs.StringVar(&nodePortAddresses, "node-port-addresses", "", "comma-separated CIDRs whose node addresses serve health check node ports (default: from the control plane, else all)")
	fs.StringVar(&o.iptablesBackend, "iptables-backend", "", "iptables-legacy or iptables-nft; empty detects the one the node already uses")
	fs.StringVar(&o.ipvsScheduler, "ipvs-scheduler", "rr", "IPVS scheduler for --mode ipvs: rr, wrr, lc, wlc, lblc, lblcr, dh, sh, sed, nq, mh (what the kernel offers)")
	fs.IntVar(&o.masqueradeBit, "iptables-masquerade-bit", 14, "the fwmark bit that marks packets to masquerade, as kube-proxy's flag")
	fs.StringVar(&o.logFormat, "log-format", "json", "log format: json or text")
	fs.StringVar(&o.logLevel, "log-level", "info", "log level: debug, info, warn, error")

	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			var b strings.Builder
			fs.SetOutput(&b)
			fs.PrintDefaults()
			return o, fmt.Errorf("%w: usage of nodeagent:\n%s", flag.ErrHelp, b.String())
		}
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments: %v", fs.Args())
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var envErr error
	fs.VisitAll(func(f *flag.Flag) {
		if set[f.Name] {
			return
		}
		env := envPrefix + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		v := getenv(env)
		if v == "" && f.Name == "node-name" {
			v = getenv("NODE_NAME")
		}
		if v == "" {
			return
		}
		if err := fs.Set(f.Name, v); err != nil {
			envErr = errors.Join(envErr, fmt.Errorf("$%s: %w", env, err))
		}
	})
	if envErr != nil {
		return o, envErr
	}
	for _, c := range strings.Split(nodePortAddresses, ",") {
		if c = strings.TrimSpace(c); c != "" {
			o.nodePortAddresses = append(o.nodePortAddresses, c)
		}
	}
	if o.cleanup {
		return o, nil // cleanup needs only the mode
	}
	switch {
	case o.controlPlane == "":
		return o, errors.New("--control-plane is required")
	case o.nodeName == "":
		return o, errors.New("--node-name is required (or set NODE_NAME)")
	}
	return o, nil
}
