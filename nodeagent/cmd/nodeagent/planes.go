package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"

	"github.com/signalbox/signalbox/nodeagent/dataplane"
	"github.com/signalbox/signalbox/nodeagent/dataplane/iptables"
	"github.com/signalbox/signalbox/nodeagent/dataplane/ipvs"
)

type planeOptions struct {
	logger *slog.Logger
	// nodePortAddresses overrides the table's NodeSettings when not empty.
	nodePortAddresses []string
	// iptablesBackend is "iptables-legacy", "iptables-nft" or "" to use
	// whichever the node's other components already use.
	iptablesBackend string
	masqueradeBit   int
	ipvsScheduler   string
}

// modes lists every mode the flag accepts, built into this binary or not,
// so an operator sees whether a mode is misspelt or just not built yet.
var modes = []string{"iptables", "ipvs", "nftables"}

// newPlane builds the data plane for mode. Building one changes nothing in
// the kernel.
func newPlane(ctx context.Context, mode string, o planeOptions) (dataplane.Plane, error) {
	switch mode {
	case "iptables":
		if o.masqueradeBit < 0 || o.masqueradeBit > 31 {
			return nil, fmt.Errorf("--iptables-masquerade-bit %d: want 0..31", o.masqueradeBit)
		}
		cfg := iptables.Config{
			Backend:        o.iptablesBackend,
			MasqueradeMark: 1 << o.masqueradeBit,
			Logger:         o.logger,
		}
		if len(o.nodePortAddresses) > 0 {
			cfg.NodePortAddresses = o.nodePortAddresses
		}
		return iptables.New(ctx, cfg)
	case "ipvs":
		return ipvs.New(ipvs.Config{
			Scheduler:     o.ipvsScheduler,
			IPTables:      o.iptablesBackend,
			MasqueradeBit: o.masqueradeBit,
		})
	case "nftables":
		return nil, fmt.Errorf("mode %q is not available in this build yet", mode)
	default:
		return nil, fmt.Errorf("unknown mode %q: want one of %v", mode, modes)
	}
}

// cleanupOtherModes removes what another mode left on this node, as
// kube-proxy does when its mode changes. The iptables plane's cleanup
// spares the IPVS plane's SBX-IPVS chains, so it is safe to run on every
// start in ipvs mode; the IPVS cleanup runs only when IPVS state exists,
// because opening IPVS loads the ip_vs module.
func cleanupOtherModes(ctx context.Context, mode string, log *slog.Logger) error {
	var errs []error
	if mode != "iptables" {
		p, err := iptables.New(ctx, iptables.Config{Logger: log})
		if err == nil {
			err = p.Cleanup(ctx)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("iptables mode cleanup: %w", err))
		}
	}
	if mode != "ipvs" && ipvsStatePresent() {
		log.Info("removing IPVS state left by a previous ipvs-mode agent")
		p, err := ipvs.New(ipvs.Config{})
		if err == nil {
			err = p.Cleanup(ctx)
			p.Close()
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("ipvs mode cleanup: %w", err))
		}
	}
	return errors.Join(errs...)
}

func ipvsStatePresent() bool {
	_, err := os.Stat("/sys/class/net/" + ipvs.DummyDevice)
	return err == nil
}
