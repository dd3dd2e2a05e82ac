#!/usr/bin/env bash
# Install from the ISO (tiny image) against the floor of writing the same bytes with dd, in the
# same live VM under QEMU/TCG: `kairos-agent manual-install` timed, the bytes it wrote counted
# from /sys/block/vda/stat, then `dd if=/dev/zero of=/dev/vda bs=1M count=<same> conv=fsync`.
# Also prints OS space: the store on the medium (installed twice: STATE and RECOVERY) and the
# store after one upgrade (from the upgrade VM test), against the image's compressed size.
set -euo pipefail
source "$(dirname "$0")/../scripts/env.sh"
cd "$REPO"
scripts/build-static >/dev/null
scripts/images/tiny.sh >/dev/null
cargo test --quiet -p kairos-e2e --test install -- --ignored --nocapture manual_install_and_the_dd_floor 2>&1 | grep '^BENCH' || true
cargo test --quiet -p kairos-e2e --test lifecycle -- --ignored --nocapture upgrade_fetches_one_layer 2>&1 | grep '^BENCH' || true
