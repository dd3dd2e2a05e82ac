#!/usr/bin/env bash
# Bytes an upgrade pulls and writes when one small layer changed: the tiny image v1 → v2 (v2 =
# v1 + one layer of 512 KiB of incompressible bytes) in QEMU, counted at the registry (its
# access log: bytes of every GET response) and at the disk (/sys/block/vda/stat, sectors
# written during `kairos-agent upgrade`), against the compressed size of the whole image (what
# the Go Kairos pulls and writes on every upgrade). Runs the VM test that asserts the bounds.
set -euo pipefail
source "$(dirname "$0")/../scripts/env.sh"
cd "$REPO"
scripts/build-static >/dev/null
scripts/images/tiny.sh >/dev/null
out=$(cargo test --quiet -p kairos-e2e --test lifecycle -- --ignored --nocapture \
      upgrade_fetches_one_layer 2>&1 | grep '^BENCH' | tail -1)
echo "$out"
python3 - "$out" <<'PY'
import sys
kv = dict(x.split("=") for x in sys.argv[1].split()[3:])
p, w, li = int(kv["pulled"]), int(kv["written"]), int(kv["layer_image"])
cc, cu, full = int(kv["changed_layer_compressed"]), int(kv["changed_layer_uncompressed"]), int(kv["full_image_compressed"])
print(f"| pulled from the registry | {p} B | {p/cc:.2f} × the changed layer (compressed) | {p/full:.4f} of the full image |")
print(f"| written to disk | {w} B | {w/cu:.2f} × the changed layer (uncompressed) | {w/full:.4f} of the full image |")
print(f"| of which the layer image | {li} B | {li/cu:.2f} × the changed layer (uncompressed) | metadata (journal, manifest, entries, history): {w-li} B |")
PY
