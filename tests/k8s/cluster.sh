#!/usr/bin/env bash
# A real one-node Kubernetes on loopback for ferrovirt's tests: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, a containerd of its own and one kubelet named
# "localhost", from the binaries tests/k8s/build.sh built. Everything it creates lives in one
# state directory per run (processes, certificates, containerd's root and state, pod logs, network
# namespaces, cgroups named after the run), so several clusters can run side by side with each
# other and with a system containerd, and `down` can remove all of it.
#
# Usage:
#   cluster.sh run -- CMD...    up; run CMD with the cluster's environment; down (always, also
#                               on failure or Ctrl-C); exit with CMD's status
#   cluster.sh up               start a cluster and print its environment as `export` lines:
#                               eval "$(tests/k8s/cluster.sh up)"
#   cluster.sh down [STATE]     stop the cluster of STATE (default $FERROVIRT_K8S_STATE) and
#                               remove everything it created
#   cluster.sh restart-kubelet [STATE]
#                               stop the cluster's kubelet and start it again the same way (for
#                               tests of what survives a kubelet restart, e.g. device plugins)
#
# CMD (and the lines `up` prints) get:
#   KUBECONFIG                 admin kubeconfig (system:masters)
#   FERROVIRT_K8S_STATE        the run's state directory (logs in $FERROVIRT_K8S_STATE/logs)
#   FERROVIRT_K8S_BIN          the bin dir of build.sh's cache, also put first on PATH
#   FERROVIRT_K8S_PAUSE_IMAGE  the pause image, loaded on the node (use imagePullPolicy: Never)
#   FERROVIRT_K8S_CONTAINERD   containerd's socket (for `ctr -a ... -n k8s.io images import`)
#   FERROVIRT_K8S_VM_CNI_DIR   the CNI conf dir of RuntimeClass "ferrovirt" (a second conflist
#                              dropped there becomes eth1 of that class's pods)
#   FERROVIRT_K8S_DEVICE_PLUGIN_DIR  what kubelet sees as /var/lib/kubelet/device-plugins: device
#                              plugins register at its kubelet.sock and put their sockets there
#
# Settings (environment):
#   FERROVIRT_K8S_BIN          use these binaries instead of build.sh's cache
#   FERROVIRT_K8S_STATE_ROOT   where state directories go (default /tmp/ferrovirt-k8s)
#   FERROVIRT_K8S_PORT_BASE    use ports BASE..BASE+6 and fail if one is taken (default: the first
#                              free block of 7 from 16400 up, in steps of 10)
#   FERROVIRT_K8S_TIMEOUT      seconds to wait for each component (default 180)
set -euo pipefail

K8S_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF="$K8S_DIR/cluster.sh"
TIMEOUT=${FERROVIRT_K8S_TIMEOUT:-180}
PAUSE_IMAGE=ferrovirt.io/pause:1
CNI_BIN_DIR=/usr/lib/cni
KUBE_BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl pause ociimage)
HOST_TOOLS=(containerd containerd-shim-runc-v2 runc ctr openssl ip ss flock setsid unshare findmnt)

log() { printf 'k8s-cluster: %s\n' "$*" >&2; }
die() { printf 'k8s-cluster: error: %s\n' "$*" >&2; exit 1; }
now_ms() { date +%s%3N; }
since() { echo "$(( ($(now_ms) - $1) / 100 ))" | sed 's/\(.\)$/.\1/;s/^\./0./'; }

# ---------------------------------------------------------------------------------------------
# up

check_prerequisites() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (containerd, kubelet, network namespaces and cgroups need it)"
    local tool missing=()
    for tool in "${HOST_TOOLS[@]}"; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    for tool in bridge host-local loopback; do
        [ -x "$CNI_BIN_DIR/$tool" ] || missing+=("$CNI_BIN_DIR/$tool")
    done
    [ ${#missing[@]} -eq 0 ] || die "missing ${missing[*]}: run scripts/setup.sh (it installs containerd, runc, containernetworking-plugins, openssl)"
    BIN=${FERROVIRT_K8S_BIN:-$("$K8S_DIR/build.sh" --bin-dir)}
    missing=()
    for tool in "${KUBE_BINARIES[@]}"; do
        [ -x "$BIN/$tool" ] || missing+=("$tool")
    done
    [ ${#missing[@]} -eq 0 ] || die "missing ${missing[*]} in $BIN: run tests/k8s/build.sh first (or set FERROVIRT_K8S_BIN)"
}

port_taken() { [ -n "$(ss -Hltn "sport = :$1")" ]; }

# claimed KEY VALUE: whether another run's state dir has claimed KEY=VALUE (its ports may not
# be bound yet while it starts).
claimed() { cat "$STATE_ROOT"/*/run 2>/dev/null | grep -qx "$1=$2"; }

# block_free BASE: none of BASE..BASE+6 is bound, and no other run claimed BASE.
block_free() {
    local p
    claimed PORT_BASE "$1" && return 1
    for p in $(seq "$1" $(($1 + 6))); do
        port_taken "$p" && return 1
    done
    return 0
}

choose_ports() {
    local base p free
    if [ -n "${FERROVIRT_K8S_PORT_BASE:-}" ]; then
        base=$FERROVIRT_K8S_PORT_BASE
        for p in $(seq "$base" $((base + 6))); do
            port_taken "$p" && die "port $p (FERROVIRT_K8S_PORT_BASE=$base..$((base + 6))) is taken: $(ss -Hltnp "sport = :$p" | head -n1); stop that process or choose another FERROVIRT_K8S_PORT_BASE"
        done
        claimed PORT_BASE "$base" && die "ports $base..$((base + 6)) are claimed by the cluster in $(grep -lx "PORT_BASE=$base" "$STATE_ROOT"/*/run | xargs dirname); stop it or choose another FERROVIRT_K8S_PORT_BASE"
    else
        free=0
        for base in $(seq 16400 10 16990); do
            block_free "$base" && { free=1; break; }
        done
        [ $free -eq 1 ] || die "no free block of 7 ports between 16400 and 16996: stop old clusters (tests/k8s/cluster.sh down STATE) or set FERROVIRT_K8S_PORT_BASE"
    fi
    PORT_BASE=$base ETCD_PORT=$base ETCD_PEER_PORT=$((base + 1)) APISERVER_PORT=$((base + 2))
    KCM_PORT=$((base + 3)) SCHEDULER_PORT=$((base + 4)) KUBELET_PORT=$((base + 5)) KUBELET_HEALTHZ_PORT=$((base + 6))
}

# The pod subnet is 10.244.N.0/24 with an N that no interface on this host uses yet.
choose_pod_subnet() {
    local n start
    start=$((16#${RUN_ID:0:2} % 200))
    for i in $(seq 0 199); do
        n=$(((start + i) % 200 + 40))
        if ! claimed POD_SUBNET "10.244.$n.0/24" && ! ip -4 -o addr show | grep -q " 10\.244\.$n\."; then
            POD_SUBNET=10.244.$n.0/24
            return
        fi
    done
    die "every 10.244.40-239.0/24 is in use on this host: stop old clusters"
}

# issue_cert NAME CN ORG EKU SANS: a key and a certificate signed by the run's CA.
issue_cert() {
    local name=$1 cn=$2 org=$3 eku=$4 sans=$5 subj
    subj="/CN=$cn"
    [ -z "$org" ] || subj="/O=$org$subj"
    {
        echo "basicConstraints=critical,CA:FALSE"
        echo "keyUsage=critical,digitalSignature,keyEncipherment"
        echo "extendedKeyUsage=$eku"
        [ -z "$sans" ] || echo "subjectAltName=$sans"
    } >"$PKI/$name.ext"
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "$subj" \
        -keyout "$PKI/$name.key" -out "$PKI/$name.csr" 2>/dev/null
    openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
        -days 7 -sha256 -extfile "$PKI/$name.ext" -out "$PKI/$name.crt" 2>/dev/null
}

make_pki() {
    PKI=$STATE/pki
    mkdir -p "$PKI"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 7 \
        -subj "/CN=ferrovirt-test-ca-$RUN_ID" -keyout "$PKI/ca.key" -out "$PKI/ca.crt" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    issue_cert apiserver kube-apiserver "" serverAuth \
        "IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:10.96.0.1"
    issue_cert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters clientAuth ""
    issue_cert admin ferrovirt-admin system:masters clientAuth ""
    issue_cert controller-manager system:kube-controller-manager "" clientAuth ""
    issue_cert scheduler system:kube-scheduler "" clientAuth ""
    issue_cert kubelet-client system:node:localhost system:nodes clientAuth ""
    issue_cert kubelet-serving system:node:localhost system:nodes serverAuth "IP:127.0.0.1,DNS:localhost"
    # Service-account tokens: the API server signs with sa.key, verifies with sa.pub.
    openssl ecparam -name prime256v1 -genkey -noout -out "$PKI/sa.key"
    openssl ec -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
}

# write_kubeconfig FILE CERT_NAME
write_kubeconfig() {
    cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: ferrovirt-test
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority: $PKI/ca.crt
users:
- name: $2
  user:
    client-certificate: $PKI/$2.crt
    client-key: $PKI/$2.key
contexts:
- name: ferrovirt-test
  context:
    cluster: ferrovirt-test
    user: $2
current-context: ferrovirt-test
EOF
}

# start NAME BINARY ARGS...: runs BINARY in a session of its own (so a Ctrl-C reaches only this
# script, which then stops everything in order), logs to logs/NAME.log, records its pid.
start() {
    local name=$1
    shift
    setsid "$@" >"$STATE/logs/$name.log" 2>&1 </dev/null &
    echo $! >"$STATE/pids/$name"
    log "started $name (pid $!)"
}

fail_with_log() {
    local name=$1
    shift
    log "$* -- last lines of $STATE/logs/$name.log:"
    tail -n 40 "$STATE/logs/$name.log" >&2 || true
    exit 1
}

# wait_until NAME WHAT CMD...: polls CMD until it succeeds; fails with NAME's log when NAME's
# process dies or the timeout passes.
wait_until() {
    local name=$1 what=$2 deadline=$(($(date +%s) + TIMEOUT))
    shift 2
    until "$@" >/dev/null 2>&1; do
        kill -0 "$(cat "$STATE/pids/$name")" 2>/dev/null || fail_with_log "$name" "$name exited while waiting for $what"
        [ "$(date +%s)" -lt "$deadline" ] || fail_with_log "$name" "timed out after ${TIMEOUT}s waiting for $what"
        sleep 0.2
    done
}

kubectl_admin() { "$BIN/kubectl" --kubeconfig "$STATE/admin.kubeconfig" "$@"; }

start_etcd() {
    start etcd "$BIN/etcd" --name default --data-dir "$STATE/etcd" \
        --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
        --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-cluster "default=http://127.0.0.1:$ETCD_PEER_PORT" --unsafe-no-fsync --log-level warn
}

start_apiserver() {
    start kube-apiserver "$BIN/kube-apiserver" \
        --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
        --bind-address 127.0.0.1 --secure-port "$APISERVER_PORT" \
        --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
        --client-ca-file "$PKI/ca.crt" \
        --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
        --service-account-issuer https://kubernetes.default.svc.cluster.local \
        --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
        --service-cluster-ip-range 10.96.0.0/16 --allow-privileged \
        --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" \
        --kubelet-client-key "$PKI/apiserver-kubelet-client.key" \
        --kubelet-certificate-authority "$PKI/ca.crt" \
        --kubelet-preferred-address-types Hostname \
        --profiling=false --v 1
}

start_controller_manager() {
    write_kubeconfig "$STATE/controller-manager.kubeconfig" controller-manager
    start kube-controller-manager "$BIN/kube-controller-manager" \
        --kubeconfig "$STATE/controller-manager.kubeconfig" \
        --authentication-kubeconfig "$STATE/controller-manager.kubeconfig" \
        --authorization-kubeconfig "$STATE/controller-manager.kubeconfig" \
        --bind-address 127.0.0.1 --secure-port "$KCM_PORT" \
        --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
        --use-service-account-credentials \
        --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
        --leader-elect=false --profiling=false --v 1
}

start_scheduler() {
    write_kubeconfig "$STATE/scheduler.kubeconfig" scheduler
    start kube-scheduler "$BIN/kube-scheduler" \
        --kubeconfig "$STATE/scheduler.kubeconfig" \
        --authentication-kubeconfig "$STATE/scheduler.kubeconfig" \
        --authorization-kubeconfig "$STATE/scheduler.kubeconfig" \
        --bind-address 127.0.0.1 --secure-port "$SCHEDULER_PORT" \
        --leader-elect=false --profiling=false --v 1
}

write_cni_config() {
    mkdir -p "$STATE/cni.d" "$STATE/cni-vm.d" "$STATE/cni-ipam"
    # No default route and no masquerading: pods reach each other and the host over the bridge,
    # nothing beyond it.
    cat >"$STATE/cni.d/10-cluster.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "$CNI_NETWORK",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$POD_SUBNET"}]],
        "dataDir": "$STATE/cni-ipam"
      }
    }
  ]
}
EOF
    # RuntimeClass "ferrovirt": the cluster network first (eth0), then whatever second conflist
    # the node's tests drop here (eth1).
    cp "$STATE/cni.d/10-cluster.conflist" "$STATE/cni-vm.d/10-cluster.conflist"
    # containerd's plugin directory: Debian's plugins, plus whatever a test links in (such as
    # ferrovirt-cni), without touching $CNI_BIN_DIR.
    mkdir -p "$STATE/cni-bin"
    for plugin in "$CNI_BIN_DIR"/*; do ln -sf "$plugin" "$STATE/cni-bin/"; done
}

write_containerd_config() {
    local ctrd=$STATE/containerd
    mkdir -p "$ctrd"
    cat >"$ctrd/config.toml" <<EOF
version = 2
root = "$ctrd/root"
state = "$ctrd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "$CONTAINERD_SOCK"

[ttrpc]
  address = "$CONTAINERD_SOCK.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "$ctrd/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # CAP_SYS_RESOURCE is withheld on these machines: without this every sandbox fails with
  # "can't get final child's PID from pipe".
  restrict_oom_score_adj = true
  # Pod network namespaces under the state dir, not /var/run/netns.
  netns_mounts_under_state_dir = true
  # No AppArmor profile is loaded into the kernel (nothing to unload at down).
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$STATE/cni-bin"
    conf_dir = "$STATE/cni.d"
    max_conf_num = 1

  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    snapshotter = "overlayfs"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$ctrd/runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.ferrovirt]
      runtime_type = "io.containerd.runc.v2"
      cni_conf_dir = "$STATE/cni-vm.d"
      cni_max_conf_num = 2
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.ferrovirt.options]
        SystemdCgroup = false
        Root = "$ctrd/runc"
EOF
}

start_containerd() {
    write_cni_config
    write_containerd_config
    start containerd containerd --config "$STATE/containerd/config.toml"
    wait_until containerd "containerd's socket" ctr -a "$CONTAINERD_SOCK" version
}

load_pause_image() {
    mkdir -p "$STATE/images"
    "$BIN/ociimage" --name "$PAUSE_IMAGE" --output "$STATE/images/pause.tar" \
        --entrypoint /pause --file "$BIN/pause:/pause:0755"
    ctr -a "$CONTAINERD_SOCK" -n k8s.io images import "$STATE/images/pause.tar" >/dev/null \
        || fail_with_log containerd "importing the pause image failed"
}

# kubelet's cgroupfs driver puts pods under cgroupRoot, which must exist in every hierarchy.
make_cgroup_root() {
    local hierarchy
    for hierarchy in /sys/fs/cgroup/*/; do
        mkdir -p "$hierarchy$CGROUP_ROOT"
    done
    if [ -e /sys/fs/cgroup/cpuset/cpuset.cpus ]; then
        cat /sys/fs/cgroup/cpuset/cpuset.cpus >"/sys/fs/cgroup/cpuset/$CGROUP_ROOT/cpuset.cpus"
        cat /sys/fs/cgroup/cpuset/cpuset.mems >"/sys/fs/cgroup/cpuset/$CGROUP_ROOT/cpuset.mems"
    fi
}

start_kubelet() {
    local kl=$STATE/kubelet
    mkdir -p "$kl/root" "$kl/pki" "$kl/volume-plugins" "$STATE/pod-logs"
    # kubelet keeps container log links in /var/log/containers whatever its config says.
    [ -d /var/log/containers ] || { mkdir -p /var/log/containers && echo /var/log/containers >>"$STATE_ROOT/created-dirs"; }
    make_cgroup_root
    share_kubelet_dir
    write_kubeconfig "$kl/kubeconfig" kubelet-client
    cat >"$kl/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
# This machine kind has cgroup v1 only.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /$CGROUP_ROOT
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
tlsCertFile: $PKI/kubelet-serving.crt
tlsPrivateKeyFile: $PKI/kubelet-serving.key
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: $PKI/ca.crt
authorization:
  mode: Webhook
podLogsDir: $STATE/pod-logs
volumePluginDir: $kl/volume-plugins
# No iptables chains: nothing to leave behind in the host's tables.
makeIPTablesUtilChains: false
failSwapOn: false
# Images are imported, never pulled: keep them however full the disk is.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: 100Mi
  nodefs.available: 1%
  imagefs.available: 1%
  nodefs.inodesFree: 1%
EOF
    launch_kubelet
}

# launch_kubelet: starts kubelet with the config start_kubelet wrote (also after a restart).
launch_kubelet() {
    local kl=$STATE/kubelet
    # kubelet serves device-plugin registration at a fixed path, /var/lib/kubelet/device-plugins
    # (and empties that directory when it starts), so it runs in a mount namespace of its own
    # where that path is the run's $DEVICE_PLUGIN_DIR: clusters side by side do not take each
    # other's device plugins. Its volume mounts still reach containerd through the shared
    # $STATE/kubelet mount.
    start kubelet unshare --mount --propagation unchanged sh -c '
        set -e
        mount --make-private "$(findmnt -n -o TARGET --target /var/lib/kubelet/device-plugins)"
        mount --bind "$1" /var/lib/kubelet/device-plugins
        shift
        exec "$@"' kubelet-ns "$DEVICE_PLUGIN_DIR" \
        "$BIN/kubelet" --config "$kl/config.yaml" --kubeconfig "$kl/kubeconfig" \
        --root-dir "$kl/root" --cert-dir "$kl/pki" --hostname-override localhost --v 1
}

# share_kubelet_dir: makes $STATE/kubelet a shared mount (so mounts kubelet makes in its own
# namespace appear on the host for containerd) and prepares the device-plugin mount point.
share_kubelet_dir() {
    mkdir -p "$DEVICE_PLUGIN_DIR"
    mount --bind "$STATE/kubelet" "$STATE/kubelet"
    mount --make-shared "$STATE/kubelet"
    local dir
    for dir in /var/lib/kubelet /var/lib/kubelet/device-plugins; do
        [ -d "$dir" ] || { mkdir "$dir" && echo "$dir" >>"$STATE_ROOT/created-dirs"; }
    done
}

node_ready() {
    [ "$(kubectl_admin get node localhost -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}')" = True ]
}

write_env() {
    cat >"$STATE/env" <<EOF
export KUBECONFIG=$STATE/admin.kubeconfig
export FERROVIRT_K8S_STATE=$STATE
export FERROVIRT_K8S_BIN=$BIN
export FERROVIRT_K8S_PAUSE_IMAGE=$PAUSE_IMAGE
export FERROVIRT_K8S_CONTAINERD=$CONTAINERD_SOCK
export FERROVIRT_K8S_VM_CNI_DIR=$STATE/cni-vm.d
export FERROVIRT_K8S_CNI_BIN_DIR=$STATE/cni-bin
export FERROVIRT_K8S_DEVICE_PLUGIN_DIR=$DEVICE_PLUGIN_DIR
export PATH=$BIN:\$PATH
EOF
}

# Sets the names of this run (used by up and, from $STATE/run, by down).
name_run() {
    CONTAINERD_SOCK=$STATE/containerd/containerd.sock
    CNI_NETWORK=fvk8s-$RUN_ID
    BRIDGE=fvk8s$RUN_ID
    CGROUP_ROOT=ferrovirt-k8s-$RUN_ID
    DEVICE_PLUGIN_DIR=$STATE/kubelet/device-plugins
}

cluster_up() {
    local t0 t
    t0=$(now_ms)
    check_prerequisites
    RUN_ID=$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
    STATE_ROOT=${FERROVIRT_K8S_STATE_ROOT:-/tmp/ferrovirt-k8s}
    STATE=$STATE_ROOT/$RUN_ID
    name_run
    mkdir -p "$STATE_ROOT"
    # Runs starting at once claim their ports and subnet one after the other: a claim is the
    # run file written under this lock, and counts before the ports are bound.
    exec 8>"$STATE_ROOT/.claims.lock"
    flock -w 60 8 || die "another cluster.sh holds $STATE_ROOT/.claims.lock for over 60 s"
    choose_ports
    choose_pod_subnet
    mkdir -p "$STATE/logs" "$STATE/pids"
    cat >"$STATE/run" <<EOF
RUN_ID=$RUN_ID
BIN=$BIN
PORT_BASE=$PORT_BASE
POD_SUBNET=$POD_SUBNET
EOF
    exec 8>&-
    log "state $STATE, ports $ETCD_PORT-$KUBELET_HEALTHZ_PORT, pod subnet $POD_SUBNET"
    make_pki
    write_kubeconfig "$STATE/admin.kubeconfig" admin

    start_etcd
    start_containerd
    load_pause_image
    start_apiserver
    wait_until etcd "etcd to listen on $ETCD_PORT" port_taken "$ETCD_PORT"
    t=$(now_ms)
    wait_until kube-apiserver "the API server's /readyz" kubectl_admin get --raw /readyz
    log "API server ready in $(since "$t") s"
    start_controller_manager
    start_scheduler
    start_kubelet
    t=$(now_ms)
    wait_until kubelet "node localhost to register" kubectl_admin get node localhost
    wait_until kubelet "node localhost to be Ready" node_ready
    log "node Ready $(since "$t") s after kubelet start"
    wait_until kube-controller-manager "ServiceAccount default/default" kubectl_admin -n default get serviceaccount default
    printf 'apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata:\n  name: ferrovirt\nhandler: ferrovirt\n' |
        kubectl_admin apply -f - >/dev/null
    write_env
    log "cluster up in $(since "$t0") s; its environment: . $STATE/env"
}

# ---------------------------------------------------------------------------------------------
# down

any_alive() {
    local pid
    for pid in "$@"; do
        kill -0 "$pid" 2>/dev/null && { echo "$pid"; return; }
    done
    return 0
}

# stop_processes NAME...: SIGTERM to each recorded pid at once, SIGKILL to those still running
# after 10 s.
stop_processes() {
    local name pid i pids=()
    for name in "$@"; do
        [ -f "$STATE/pids/$name" ] || continue
        pid=$(cat "$STATE/pids/$name")
        rm -f "$STATE/pids/$name"
        # Only the process we started: a recycled pid would run another program.
        [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "$name" || continue
        kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
    done
    for i in $(seq 100); do
        [ -n "$(any_alive "${pids[@]}")" ] || return 0
        sleep 0.1
    done
    for pid in "${pids[@]}"; do
        kill -0 "$pid" 2>/dev/null || continue
        log "pid $pid ($(tr '\0' ' ' <"/proc/$pid/cmdline" | cut -c1-60)) ignored SIGTERM for 10 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    done
}

# pids_in_cgroups: every process in the run's pod cgroups (containers and sandboxes).
pids_in_cgroups() {
    find /sys/fs/cgroup/*/"$CGROUP_ROOT" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -un
}

# shim_pids: the containerd shims this run's containerd started (they outlive containerd).
shim_pids() {
    local proc
    for proc in /proc/[0-9]*; do
        { tr '\0' ' ' <"$proc/cmdline"; } 2>/dev/null | grep -q -- "-address $CONTAINERD_SOCK " && echo "${proc#/proc/}"
    done
    return 0
}

remove_pods() {
    if [ -x "$BIN/crictl" ] && [ -S "$CONTAINERD_SOCK" ] && kill -0 "$(cat "$STATE/pids/containerd" 2>/dev/null)" 2>/dev/null; then
        # Through CRI, so containerd runs CNI DEL for each sandbox (veth, IPAM lease, netns).
        timeout 60 "$BIN/crictl" -r "unix://$CONTAINERD_SOCK" rmp --all --force >/dev/null 2>&1 ||
            log "crictl rmp failed; removing pod leftovers by hand"
    fi
}

kill_leftover_processes() {
    local pid cmdline i
    # Shims exit by themselves shortly after their last container is removed.
    for i in $(seq 30); do
        [ -z "$(pids_in_cgroups)$(shim_pids)" ] && return 0
        sleep 0.1
    done
    for pid in $(pids_in_cgroups) $(shim_pids); do
        cmdline=$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | cut -c1-100)
        kill -KILL "$pid" 2>/dev/null && log "killed leftover pid $pid ($cmdline)"
    done
    for pid in $(seq 50); do
        [ -z "$(pids_in_cgroups)$(shim_pids)" ] && break
        sleep 0.1
    done
}

unmount_state() {
    local mnt
    # Deepest first; a busy mount is detached lazily.
    for mnt in $(awk -v s="$STATE/" 'index($5, s) == 1 {print $5}' /proc/self/mountinfo | sort -r); do
        umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || log "cannot unmount $mnt"
    done
}

remove_network() {
    local link
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        for link in $(ip -o link show master "$BRIDGE" | awk -F': ' '{print $2}' | cut -d@ -f1); do
            ip link delete "$link" 2>/dev/null || true
        done
        ip link delete "$BRIDGE" 2>/dev/null || log "cannot delete bridge $BRIDGE"
    fi
    # libcni's result cache is outside containerd's config: /var/lib/cni/results/<network>-<id>-<if>.
    rm -f /var/lib/cni/results/"$CNI_NETWORK"-* 2>/dev/null || true
    rmdir /var/lib/cni/results /var/lib/cni 2>/dev/null || true
}

remove_cgroups() {
    local hierarchy
    for hierarchy in /sys/fs/cgroup/*/; do
        [ -d "$hierarchy$CGROUP_ROOT" ] || continue
        find "$hierarchy$CGROUP_ROOT" -depth -type d -exec rmdir {} + 2>/dev/null ||
            log "cannot remove cgroup $hierarchy$CGROUP_ROOT (processes left in it?)"
    done
}

remove_host_files() {
    local link dir
    for link in /var/log/containers/*.log; do
        [ -L "$link" ] && case "$(readlink "$link")" in "$STATE"/*) rm -f "$link" ;; esac
    done
    # Directories another cluster may still use stay until the last cluster goes.
    if [ -f "$STATE_ROOT/created-dirs" ] && [ "$(find "$STATE_ROOT" -mindepth 1 -maxdepth 1 -type d | wc -l)" -le 1 ]; then
        for dir in $(sort -ru "$STATE_ROOT/created-dirs"); do rmdir "$dir" 2>/dev/null || true; done
        rm -f "$STATE_ROOT/created-dirs"
    fi
    # containerd's shims keep sockets in /run/containerd/s whatever its state dir is.
    rmdir /run/containerd/s /run/containerd 2>/dev/null || true
}

# report_leftovers: what `down` could not remove, as a warning (and a non-zero exit).
report_leftovers() {
    local left=()
    [ -z "$(pids_in_cgroups)$(shim_pids)" ] || left+=("processes: $(pids_in_cgroups) $(shim_pids)")
    grep -q " $STATE/" /proc/self/mountinfo && left+=("mounts under $STATE")
    ip link show "$BRIDGE" >/dev/null 2>&1 && left+=("link $BRIDGE")
    ls -d /sys/fs/cgroup/*/"$CGROUP_ROOT" >/dev/null 2>&1 && left+=("cgroups $CGROUP_ROOT")
    [ -e "$STATE" ] && left+=("$STATE")
    if [ ${#left[@]} -gt 0 ]; then
        log "down left behind: ${left[*]}"
        return 1
    fi
}

cluster_down() {
    local t0
    t0=$(now_ms)
    STEP_T=$t0
    step() { log "down: $1 ($(since "$STEP_T") s)"; STEP_T=$(now_ms); }
    STATE=${1:-${FERROVIRT_K8S_STATE:-}}
    [ -n "$STATE" ] || die "down: give the state directory (cluster.sh down STATE) or set FERROVIRT_K8S_STATE"
    [ -f "$STATE/run" ] || die "down: $STATE is not a cluster state directory (no $STATE/run)"
    STATE_ROOT=$(dirname "$STATE")
    # shellcheck source=/dev/null
    . "$STATE/run"
    name_run
    set +e
    # kubelet first, so it does not restart the pods removed next.
    stop_processes kubelet
    step "kubelet stopped"
    remove_pods
    step "pods removed"
    stop_processes containerd
    kill_leftover_processes
    step "containerd stopped"
    stop_processes kube-scheduler kube-controller-manager kube-apiserver
    stop_processes etcd
    step "control plane stopped"
    unmount_state
    remove_network
    remove_cgroups
    remove_host_files
    rm -rf "$STATE"
    # The last cluster takes the shared root (and its lock file) with it.
    if [ -z "$(find "$STATE_ROOT" -mindepth 1 -maxdepth 1 -type d)" ]; then
        rm -f "$STATE_ROOT/.claims.lock"
        rmdir "$STATE_ROOT" 2>/dev/null
    fi
    set -e
    report_leftovers || return 1
    log "down in $(since "$t0") s; nothing left behind"
}

# ---------------------------------------------------------------------------------------------
# restart-kubelet

# restart_kubelet [STATE]: stops kubelet by its pid and starts it again as `up` did (same config,
# certificates and mount namespace setup); returns once the new kubelet serves device-plugin
# registration. Pods keep running; kubelet empties the device-plugin directory as it starts.
restart_kubelet() {
    local old_log
    STATE=${1:-${FERROVIRT_K8S_STATE:-}}
    [ -n "$STATE" ] || die "restart-kubelet: give the state directory or set FERROVIRT_K8S_STATE"
    [ -f "$STATE/run" ] || die "restart-kubelet: $STATE is not a cluster state directory (no $STATE/run)"
    [ -f "$STATE/pids/kubelet" ] || die "restart-kubelet: no kubelet pid in $STATE/pids (is the cluster up?)"
    STATE_ROOT=$(dirname "$STATE")
    # shellcheck source=/dev/null
    . "$STATE/run"
    name_run
    stop_processes kubelet
    # The old kubelet's socket, if it left one: what appears after this is the new kubelet's
    # (an inode number can be reused, so comparing them would not tell).
    rm -f "$DEVICE_PLUGIN_DIR/kubelet.sock"
    # Keep the old log beside the new one.
    old_log=$STATE/logs/kubelet.$(date +%s%N).log
    mv "$STATE/logs/kubelet.log" "$old_log"
    launch_kubelet
    wait_until kubelet "the new kubelet's $DEVICE_PLUGIN_DIR/kubelet.sock" test -S "$DEVICE_PLUGIN_DIR/kubelet.sock"
    log "kubelet restarted (previous log: $old_log)"
}

# ---------------------------------------------------------------------------------------------

case "${1:-}" in
up)
    [ $# -eq 1 ] || die "usage: cluster.sh up"
    # A failed start removes what it had started.
    trap 'status=$?; [ $status -eq 0 ] || { [ -z "${STATE:-}" ] || [ ! -f "$STATE/run" ] || "$SELF" down "$STATE"; }' EXIT
    cluster_up
    trap - EXIT
    cat "$STATE/env"
    ;;
down)
    [ $# -le 2 ] || die "usage: cluster.sh down [STATE]"
    cluster_down "${2:-}"
    ;;
run)
    shift
    [ "${1:-}" = "--" ] && shift
    [ $# -gt 0 ] || die "usage: cluster.sh run -- CMD..."
    trap '[ -z "${STATE:-}" ] || [ ! -f "$STATE/run" ] || "$SELF" down "$STATE"' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    cluster_up
    set +e
    (
        # shellcheck source=/dev/null
        . "$STATE/env"
        exec "$@"
    )
    status=$?
    set -e
    log "command exited with status $status"
    exit $status
    ;;
restart-kubelet)
    [ $# -le 2 ] || die "usage: cluster.sh restart-kubelet [STATE]"
    restart_kubelet "${2:-}"
    ;;
*)
    die "usage: cluster.sh up | down [STATE] | run -- CMD... | restart-kubelet [STATE]"
    ;;
esac
