#!/usr/bin/env bash
# Sets everything up and runs the example VirtualMachine standalone with `fvctl run`, its
# serial console on this terminal: examples/vm.yaml (the ring-3 test guest on 2 vCPUs, an
# empty disk served by ferrovirt-vhost-blk that the guest writes and verifies, a vhost-user
# NIC on a TAP). Ctrl-C stops it; everything it made is removed when it ends.
#   VM=examples/vm.yaml   the VirtualMachine manifest
#   SKIP_SETUP=1          skip scripts/setup.sh
# Extra arguments go to `fvctl run` (see `fvctl run --help`).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${SKIP_SETUP:-0}" != 1 ]; then
    scripts/setup.sh
fi

echo "run-example: building the test guest, the VMM, the backends and fvctl" >&2
(cd runtime/testguest && cargo build --release --target-dir ../../target/testguest)
cargo build --release -p ferrovirt-runtime -p ferrovirt-vhost-blk -p ferrovirt-vhost-net \
    -p ferrovirt-controller --bin ferrovirt-vmm --bin ferrovirt-vhost-blk \
    --bin ferrovirt-vhost-net --bin fvctl

cmd=(target/release/fvctl run "${VM:-examples/vm.yaml}" "$@")
echo "run-example: ${cmd[*]}" >&2
echo "---- guest console ----" >&2
set +e
"${cmd[@]}"
status=$?
set -e
echo "---- VM ended: exit status $status" \
     "(0 guest passed or powered off, 1 VMM error, 3 reset, 4 crash, >=32 guest test failure) ----" >&2
exit "$status"
