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
// Where the apiserver and the control plane run is labenv.Site's business,
// so a VM run can keep them on the host.
package e2e
