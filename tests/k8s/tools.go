//go:build tools

// Package k8s only records, for `go mod tidy`, the Kubernetes commands that build.sh builds
// with `go build k8s.io/kubernetes/cmd/<name>`; it is never compiled (build tag "tools").
package k8s

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
