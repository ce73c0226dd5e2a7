#!/usr/bin/env bash
# Installs what building and testing ferrovirt needs on Debian 12, and checks KVM.
# Idempotent: installs only missing packages; safe to run on every CI run.
set -euo pipefail

# Debian packages the workspace and its tests use today:
#   build-essential  cc and ld for linking Rust binaries; `as`/`ld` for small guest objects
#   pkg-config       crates that look for system libraries
#   qemu-system-x86  the benchmark peer (vmm-startup) and its tests
#   iproute2         `ip` for the harness's netns/TAP guards
#   acpica-tools     iasl, which checks the ACPI tables the VMM writes
#   fio              the host io_uring limit in the blk benchmark
#   iputils-ping     `ping` from a test netns to the test guest's net-responder
#   ethtool          the vhost-net tests read the TAP offloads the backend sets
#   dpdk-dev         dpdk-testpmd, the reference vhost-user-net backend (VMM frontend tests,
#                    the frontend harness cross-check, the net benchmark's peer)
#   dpkg, apt        (always present) fetch and unpack the Debian kernel for boot tests
#   e2fsprogs        mkfs.ext4 for vhost-blk's inflight crash test, which holds writes in
#                    flight by freezing a loop-mounted file system (losetup/mount/fsfreeze are
#                    util-linux, always present); the kernel has no device-mapper for dm-delay
#   clang            ebpf/build.rs compiles the datapath's C programs for the bpf target
#   libbpf-dev       bpf/bpf_helpers.h and bpf_endian.h for those programs
#   iperf3           bounded TCP runs through the eBPF datapath (ebpf namespace tests, datapath bench)
#   containernetworking-plugins  Debian's reference CNI plugins (host-local IPAM, tuning) in
#                    /usr/lib/cni, run beside ferrovirt-cni in its chaining and IPAM tests
#                    (also the pod network of the test Kubernetes: bridge, host-local, loopback)
#   containerd, runc the test Kubernetes' node (tests/k8s/cluster.sh runs its own containerd;
#                    the package's system service is not used)
#   openssl          the test Kubernetes' CA, certificates and service-account keys
#   busybox-static   a static /bin/busybox, put into test images of the k8s tests (sh, sleep, ip)
#   dosfstools, mtools  fsck.fat and mtype, FAT tools of their own that check the cloud-init
#                    disks the node writes (this kernel has no vfat to mount them)
# Later suites add theirs here (qemu-utils for blk images).
PACKAGES=(build-essential pkg-config qemu-system-x86 iproute2 acpica-tools fio iputils-ping ethtool dpdk-dev e2fsprogs clang libbpf-dev iperf3 containernetworking-plugins containerd runc openssl busybox-static dosfstools mtools)

log() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Another apt may be running (unattended upgrades, a parallel setup): wait for its lock.
    as_root apt-get -o DPkg::Lock::Timeout=600 update -qq
    as_root apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}"
else
    log "Debian packages present"
fi

# Rust: rustup and the pinned stable toolchain come with the machine; make sure the
# components the checks use are there.
command -v cargo >/dev/null || die "cargo not found: install Rust with rustup (stable >= 1.95)"
rust_version=$(rustc --version | awk '{print $2}')
if [ "$(printf '%s\n' 1.95.0 "$rust_version" | sort -V | head -n1)" != 1.95.0 ]; then
    die "rustc $rust_version is older than 1.95: run 'rustup update stable'"
fi
if command -v rustup >/dev/null; then
    for component in rustfmt clippy; do
        if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
            log "adding rustup component $component"
            rustup component add "$component" || die "cannot add rustup component $component"
        fi
    done
fi

# Go builds the test Kubernetes (tests/k8s/build.sh) from the Go module proxy.
command -v go >/dev/null || die "go not found: install Go >= 1.24 (tests/k8s/build.sh builds the test Kubernetes with it)"
go_version=$(go env GOVERSION | sed 's/^go//')
if [ "$(printf '%s\n' 1.24 "$go_version" | sort -V | head -n1)" != 1.24 ]; then
    die "go $go_version is older than 1.24: k8s.io/kubernetes v1.34 needs Go >= 1.24"
fi

# KVM: the VMM and the QEMU peer need /dev/kvm read-write.
if [ ! -e /dev/kvm ]; then
    as_root modprobe kvm_intel 2>/dev/null || as_root modprobe kvm_amd 2>/dev/null || true
fi
[ -e /dev/kvm ] || die "/dev/kvm is missing: enable virtualization (VT-x/AMD-V, or nested virtualization on a VM) and load kvm_intel or kvm_amd"
[ -r /dev/kvm ] && [ -w /dev/kvm ] || die "/dev/kvm is not read-write for $(id -un): run as root or join the kvm group"

# TAP devices for the network tests.
if [ ! -e /dev/net/tun ]; then
    as_root modprobe tun 2>/dev/null || log "warning: /dev/net/tun missing and 'modprobe tun' failed; TAP tests will fail"
fi

# bpffs at /sys/fs/bpf: the eBPF datapath pins its maps, programs and links there.
if ! mountpoint -q /sys/fs/bpf; then
    as_root mount -t bpf bpf /sys/fs/bpf || die "cannot mount bpffs at /sys/fs/bpf (needed by the ebpf tests)"
fi

log "ok"
