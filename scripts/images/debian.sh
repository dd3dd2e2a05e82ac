#!/usr/bin/env bash
# Builds the `debian` test image tree: bookworm with systemd and the cloud kernel, made with
# mmdebstrap from Debian's mirror (the only distribution reachable here). Cached.
# cryptsetup-bin and libtss2 are for install.encrypted_partitions (immucore runs the image's
# cryptsetup and systemd-cryptenroll/-cryptsetup, which load libtss2 for the TPM).
# Usage: scripts/images/debian.sh  → prints the rootfs directory.
set -euo pipefail
source "$(dirname "$0")/../env.sh"
OUT="$KAIROS_CACHE/images/debian"
ROOTFS="$OUT/rootfs"
STAMP="$OUT/.built-v2"
if [[ -f "$STAMP" ]]; then echo "$ROOTFS"; exit 0; fi
command -v mmdebstrap >/dev/null || { echo "debian: mmdebstrap missing (apt-get install mmdebstrap)" >&2; exit 1; }
rm -rf "$OUT.tmp" && mkdir -p "$OUT.tmp"
mmdebstrap --quiet --variant=minbase \
    --include=systemd,systemd-sysv,udev,linux-image-cloud-amd64,login,passwd,iproute2,kmod,cryptsetup-bin,libtss2-esys-3.0.2-0,libtss2-rc0,libtss2-mu0,libtss2-tcti-device0 \
    --customize-hook='echo debian-node > "$1/etc/hostname"' \
    --customize-hook='ln -sf /dev/null "$1/etc/systemd/system/systemd-firstboot.service"' \
    --customize-hook='rm -f "$1/etc/machine-id"; touch "$1/etc/machine-id"' \
    --customize-hook='mkdir -p "$1/oem" "$1/usr/local"' \
    --customize-hook='ln -sf "$(basename "$(ls "$1"/boot/vmlinuz-* | head -1)")" "$1/boot/vmlinuz"' \
    bookworm "$OUT.tmp/rootfs" >&2
mkdir -p "$OUT" && rm -rf "$ROOTFS" && mv "$OUT.tmp/rootfs" "$ROOTFS" && rm -rf "$OUT.tmp"
touch "$STAMP"
echo "$ROOTFS"
