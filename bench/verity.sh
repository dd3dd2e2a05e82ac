#!/usr/bin/env bash
# What dm-verity costs where layer images are made: the debian test image's root tree as one
# EROFS layer (mkfs.erofs -zlz4, as the layer writer does), its whole-file SHA-256 against
# building and appending its hash tree (best of 3 runs each, page cache warm), and the tree's
# size. Boot-time numbers (immucore's mount-layers step, read-through vs lazy) come from the
# VM tests' boot timelines: see docs/benchmarks.md.
set -euo pipefail
source "$(dirname "$0")/../scripts/env.sh"
cd "$REPO"
scripts/images/debian.sh >/dev/null
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkfs.erofs -zlz4 -T0 --quiet "$work/layer.erofs" "$KAIROS_CACHE/images/debian/rootfs"
cargo build --quiet --release -p kairos-layers --example verity_bench
for _ in 1 2 3; do
    "$CARGO_TARGET_DIR/release/examples/verity_bench" "$work/layer.erofs"
done
