//go:build vm

package e2e

import (
	"slices"
	"strings"
	"testing"

	"github.com/signalbox/signalbox/nodeagent/e2e/labenv"
)

// An agent restarted with another mode removes the other mode's state from
// its node (kube-proxy's --cleanup semantics) and programs its own:
// iptables -> ipvs -> iptables, with traffic checked after each switch.
//
// It needs a kernel with IPVS and the dummy device, which the host lacks,
// so it is built only with the "vm" tag: nodeagent/e2e/vm builds this
// package with it, runs it in the VM and requires this test to PASS.
func TestModeSwitch(t *testing.T) {
	ns := newNamespace(t, "modeswitch")
	svc := createService(t, service(ns, "switch"))
	backends := pods("pod1a", "pod3a")
	setEndpoints(t, svc, labenv.Ready(backends...))
	waitTables(t, ns, "switch", clusterEndpoints(backends...))
	addr := clusterAddr(svc)
	victim := node("node3")
	agent := env.Agent(victim.Name)
	t.Cleanup(func() {
		// Later tests expect the suite's mode everywhere.
		if err := switchMode(victim, env.Mode); err != nil {
			t.Errorf("restoring %s to %s mode: %v", victim.Name, env.Mode, err)
		}
	})

	for _, mode := range []string{"iptables", "ipvs", "iptables"} {
		t.Logf("restarting the agent of %s in %s mode", victim.Name, mode)
		if err := switchMode(victim, mode); err != nil {
			t.Fatalf("switch to %s: %v\n%s", mode, err, agent.Tail(30))
		}
		if got := nodeMode(t, victim.Name); got != mode {
			t.Fatalf("inspection API shows %s in %q mode, want %q", victim.Name, got, mode)
		}
		waitServes(t, victim, "tcp", addr, backends)
		expectPods(t, victim, "tcp", addr, 20, backends)
		expectPods(t, pod("pod3b"), "tcp", addr, 20, backends)

		chains := svcChains(t, victim)
		vss := virtualServers(t, victim)
		_, dummyErr := victim.Command(testContext(t), "ip", "link", "show", "kube-ipvs0").CombinedOutput()
		hasDummy := dummyErr == nil
		cip := svc.Spec.ClusterIP
		switch mode {
		case "iptables":
			if len(chains) == 0 {
				t.Errorf("iptables mode: no SBX-SVC- chains on %s", victim.Name)
			}
			if len(vss) != 0 || hasDummy {
				t.Errorf("iptables mode: IPVS state left on %s: virtual servers %v, kube-ipvs0 present %v", victim.Name, vss, hasDummy)
			}
		case "ipvs":
			if len(chains) != 0 {
				t.Errorf("ipvs mode: iptables-mode chains left on %s: %v", victim.Name, chains)
			}
			if !hasDummy || !slices.ContainsFunc(vss, func(s string) bool { return strings.Contains(s, cip+":") }) {
				t.Errorf("ipvs mode: no virtual server for %s on %s (kube-ipvs0 %v, virtual servers %v)", cip, victim.Name, hasDummy, vss)
			}
		}
	}
}
