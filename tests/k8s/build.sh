#!/usr/bin/env bash
# Builds the test Kubernetes of tests/k8s/ (kube-apiserver, kube-controller-manager,
# kube-scheduler, kubelet, kubectl, etcd, pause, ociimage, crictl) into a cache outside the tree:
#   ${FERROVIRT_K8S_CACHE:-/var/cache/ferrovirt/k8s}/<key>/bin
# <key> is a hash of this module's go.mod, go.sum, tools/ sources, this script and the Go
# version, so a change to any of them builds into a new directory and a warm cache is reused
# as it is (a second run takes seconds). Each binary is built to a temporary name and renamed,
# so an interrupted build never leaves a half-written binary that a later run would trust.
#
# Usage: tests/k8s/build.sh            build what is missing, print timings, print the bin dir last
#        tests/k8s/build.sh --bin-dir  print the bin dir only (builds nothing)
# Env:   FERROVIRT_K8S_CACHE   cache root (default /var/cache/ferrovirt/k8s)
#        FERROVIRT_K8S_NICE    niceness of the Go builds (default 10)
set -euo pipefail

K8S_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KUBE_VERSION=v1.34.2
CRICTL_MODULE=sigs.k8s.io/cri-tools/cmd/crictl
CRICTL_VERSION=v1.34.0

log() { printf 'k8s-build: %s\n' "$*" >&2; }
die() { printf 'k8s-build: error: %s\n' "$*" >&2; exit 1; }

command -v go >/dev/null || die "go not found: install Go >= 1.24 (the Go toolchain is needed to build the test Kubernetes)"

cache_key() {
    (
        cd "$K8S_DIR"
        sha256sum go.mod go.sum build.sh
        find tools -type f -name '*.go' | LC_ALL=C sort | xargs sha256sum
        go version
    ) | sha256sum | cut -c1-16
}

CACHE_ROOT=${FERROVIRT_K8S_CACHE:-/var/cache/ferrovirt/k8s}
KEY=$(cache_key)
BIN_DIR=$CACHE_ROOT/$KEY/bin

if [ "${1:-}" = "--bin-dir" ]; then
    printf '%s\n' "$BIN_DIR"
    exit 0
fi
[ $# -eq 0 ] || die "unknown argument $1 (usage: build.sh [--bin-dir])"

mkdir -p "$BIN_DIR" || die "cannot create $BIN_DIR: set FERROVIRT_K8S_CACHE to a writable directory"
# Two builds at once (test.sh and a developer's shell) would compile everything twice.
exec 9>"$CACHE_ROOT/$KEY/.lock"
flock 9

# Everything below (the Go builds) runs niced: the machine is shared with other work.
renice -n "${FERROVIRT_K8S_NICE:-10}" -p $$ >/dev/null
VERSION_LDFLAGS="-X k8s.io/component-base/version.gitVersion=$KUBE_VERSION"
VERSION_LDFLAGS+=" -X k8s.io/component-base/version.gitMajor=$(echo "${KUBE_VERSION#v}" | cut -d. -f1)"
VERSION_LDFLAGS+=" -X k8s.io/component-base/version.gitMinor=$(echo "${KUBE_VERSION#v}" | cut -d. -f2)"
VERSION_LDFLAGS+=" -X k8s.io/component-base/version.gitTreeState=clean"
# client-go keeps a second copy of the version variables; set both as Kubernetes' release does.
VERSION_LDFLAGS+=" ${VERSION_LDFLAGS//component-base\/version/client-go\/pkg\/version}"
LDFLAGS="-s -w"

# No VCS stamp: the binaries depend only on the inputs of the key, not on the checkout's state.
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-buildvcs=false"

total_start=$(date +%s)
timings=()

# build NAME CMD...: runs CMD (which must write $tmp) unless $BIN_DIR/NAME exists, then renames.
build() {
    local name=$1; shift
    if [ -x "$BIN_DIR/$name" ]; then
        timings+=("$name cached")
        return
    fi
    tmp="$BIN_DIR/.$name.tmp"
    rm -f "$tmp"
    log "building $name"
    local start
    start=$(date +%s)
    (cd "$K8S_DIR" && "$@") || die "building $name failed (command: $*)"
    [ -x "$tmp" ] || die "building $name produced no binary at $tmp"
    mv -f "$tmp" "$BIN_DIR/$name"
    local secs=$(($(date +%s) - start))
    timings+=("$name ${secs}s")
    log "built $name in ${secs}s"
}

# go build writes $tmp; `tmp` is set by build() before the command runs, so it is expanded late.
gobuild() { go build -ldflags "$1" -o "$tmp" "$2"; }
gobuild_static() { CGO_ENABLED=0 gobuild "$@"; }

# kube-apiserver first: it is the longest (about 6 min cold on 2 cores) and the others reuse
# most of its packages from the Go build cache.
for cmd in kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl; do
    build "$cmd" gobuild "$LDFLAGS $VERSION_LDFLAGS" "k8s.io/kubernetes/cmd/$cmd"
done
build etcd gobuild "$LDFLAGS" ./tools/etcd
# pause runs as a container's only binary: static, no libc in its image.
build pause gobuild_static "$LDFLAGS" ./tools/pause
build ociimage gobuild "$LDFLAGS" ./tools/ociimage
# crictl lives in its own module (cri-tools pins its own dependency versions); `go install`
# builds it from the Go module proxy. Optional: a failure here only loses a debugging tool.
if [ ! -x "$BIN_DIR/crictl" ]; then
    start=$(date +%s)
    log "building crictl"
    if (cd / && GOBIN="$BIN_DIR" go install -ldflags "$LDFLAGS" "$CRICTL_MODULE@$CRICTL_VERSION"); then
        timings+=("crictl $(($(date +%s) - start))s")
    else
        log "crictl $CRICTL_VERSION did not build; continuing without it (it is only for debugging)"
        timings+=("crictl failed")
    fi
else
    timings+=("crictl cached")
fi

log "timings: ${timings[*]}; total $(($(date +%s) - total_start))s"
printf '%s\n' "$BIN_DIR"
