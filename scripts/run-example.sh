#!/usr/bin/env bash
# Boots the example VM standalone and shows its serial console on this terminal:
# the test guest under the release ferrovirt-vmm.
#   SCENARIO=hello   which test-guest scenario to run (hello, exit, smp, pci, rng)
#   CPUS=1 MEMORY=64 vCPUs and guest memory in MiB
#   SKIP_SETUP=1     skip scripts/setup.sh
# Extra arguments go to ferrovirt-vmm (e.g. --rng).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${SKIP_SETUP:-0}" != 1 ]; then
    scripts/setup.sh
fi

[ -f runtime/testguest/Cargo.toml ] || {
    echo "run-example: runtime/testguest/Cargo.toml is missing; the example boots the test guest" >&2
    exit 1
}
echo "run-example: building the test guest and the VMM" >&2
(cd runtime/testguest && cargo build --release --target-dir ../../target/testguest)
cargo build --release -p ferrovirt-runtime --bin ferrovirt-vmm

guest=target/testguest/release/ferrovirt-testguest
vmm=target/release/ferrovirt-vmm
cmd=("$vmm" --kernel "$guest" --cmdline "scenario=${SCENARIO:-hello}"
     --cpus "${CPUS:-1}" --memory "${MEMORY:-64}" --serial tty "$@")
echo "run-example: ${cmd[*]}" >&2
echo "---- guest console ----" >&2
set +e
"${cmd[@]}"
status=$?
set -e
echo "---- VM ended: ferrovirt-vmm exit status $status" \
     "(0 guest passed or powered off, 1 VMM error, 3 reset, 4 crash, >=32 guest test failure) ----" >&2
exit "$status"
