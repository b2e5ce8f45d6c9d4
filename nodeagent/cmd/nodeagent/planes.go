package main

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/signalbox/signalbox/nodeagent/dataplane"
	"github.com/signalbox/signalbox/nodeagent/dataplane/iptables"
)

type planeOptions struct {
	logger *slog.Logger
	// nodePortAddresses overrides the table's NodeSettings when not empty.
	nodePortAddresses []string
	// iptablesBackend is "iptables-legacy", "iptables-nft" or "" to use
	// whichever the node's other components already use.
	iptablesBackend string
	masqueradeBit   int
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
	case "ipvs", "nftables":
		return nil, fmt.Errorf("mode %q is not available in this build yet", mode)
	default:
		return nil, fmt.Errorf("unknown mode %q: want one of %v", mode, modes)
	}
}
