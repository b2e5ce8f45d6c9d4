//go:build tools

// Package k8sbuild pins the upstream Kubernetes module that builds the dev
// cluster's kube-apiserver and the benchmark baseline kube-proxy.
package k8sbuild

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
)
