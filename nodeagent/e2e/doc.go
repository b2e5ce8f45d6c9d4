// Package e2e holds the end-to-end acceptance tests of the node agent: a
// real kube-apiserver and the control plane in the lab's control namespace,
// one real agent per node namespace, and real TCP/UDP traffic from pods,
// nodes and an external client, checked for who answered and what source
// address the answering pod saw.
//
// The tests need root and run as part of `make test`:
//
//	go test ./nodeagent/e2e/
//
// SIGNALBOX_E2E_MODE selects the agents' data plane (iptables, the default,
// or ipvs); SIGNALBOX_E2E_BIN points at prebuilt binaries (see labenv).
// Where the apiserver and the control plane run is labenv.Site's business:
// SIGNALBOX_E2E_SITE=vm selects labenv.VMSite, with which nodeagent/e2e/vm
// runs this same suite in ipvs mode inside a qemu VM (the host kernel has
// no IPVS) while the apiserver and the control plane stay on the host.
// TestModeSwitch needs IPVS and runs only there; on the host it skips, and
// the VM run requires it to pass.
package e2e
