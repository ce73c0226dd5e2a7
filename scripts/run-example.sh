#!/usr/bin/env bash
# Sets everything up and boots the example VM standalone, its serial console on this
# terminal: examples/testguest-vm.json (the ring-3 test guest, 2 vCPUs, virtio-rng) under
# the release ferrovirt-vmm.
#   VM=examples/testguest-vm.json  the VM description (a VmConfig, see runtime/src/api/openapi.yaml)
#   SKIP_SETUP=1                   skip scripts/setup.sh
# Extra arguments go to ferrovirt-vmm (e.g. --api-socket /tmp/vm.sock).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${SKIP_SETUP:-0}" != 1 ]; then
    scripts/setup.sh
fi

echo "run-example: building the test guest and the VMM" >&2
(cd runtime/testguest && cargo build --release --target-dir ../../target/testguest)
cargo build --release -p ferrovirt-runtime --bin ferrovirt-vmm

cmd=(target/release/ferrovirt-vmm --config "${VM:-examples/testguest-vm.json}" "$@")
echo "run-example: ${cmd[*]}" >&2
echo "---- guest console ----" >&2
set +e
"${cmd[@]}"
status=$?
set -e
echo "---- VM ended: ferrovirt-vmm exit status $status" \
     "(0 guest passed or powered off, 1 VMM error, 3 reset, 4 crash, >=32 guest test failure) ----" >&2
exit "$status"
