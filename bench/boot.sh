#!/usr/bin/env bash
# Benchmarks of issue #3 on the tiny flavour: boot time (kernel start → end of
# kairos-immucore, → end of the boot stage) under QEMU/TCG, disk build time and bytes against
# the floor of writing the same tree once (mkfs.ext4 -d), and OS space on disk against the
# image size. Prints a Markdown report. Usage: bench/boot.sh [runs]
set -euo pipefail
source "$(dirname "$0")/../scripts/env.sh"
cd "$REPO"
RUNS="${1:-3}"
BIN="$(scripts/build-static)"
ROOTFS="$(scripts/images/tiny.sh)"
W="$(mktemp -d /tmp/kairos-bench-boot.XXXXXX)"
trap 'rm -rf "$W"' EXIT
cat > "$W/cc.yaml" <<'CC'
#cloud-config
users:
- name: root
  passwd: bench
runcmd:
- 'echo "kairos-bench: boot stage done" > /dev/kmsg'
CC

echo "# Boot and build benchmarks (tiny flavour)"
echo
echo "Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), kernel $(uname -r); QEMU TCG, 1 vCPU, 768 MiB; $(date -u +%Y-%m-%d)."
echo

# Build time and bytes.
t0=$(date +%s.%N)
"$BIN/kairosctl" build raw --image "dir:$ROOTFS" --output "$W/disk.raw" --cloud-config "$W/cc.yaml" >/dev/null 2>"$W/build.log"
t1=$(date +%s.%N)
disk_alloc=$(du -B1 "$W/disk.raw" | cut -f1)
tree=$(du -sB1 --apparent-size "$ROOTFS" | cut -f1)
size=$(( tree * 13 / 10 / 1048576 + 64 ))
t2=$(date +%s.%N)
truncate -s "${size}M" "$W/floor.img"
mkfs.ext4 -q -F -d "$ROOTFS" "$W/floor.img"
t3=$(date +%s.%N)
floor_alloc=$(du -B1 "$W/floor.img" | cut -f1)
echo "## Building the raw disk"
echo
echo "| | time (s) | bytes written (allocated) |"
echo "|---|---:|---:|"
printf '| `kairosctl build raw` (initrd, 2 EROFS layers ×2 stores, ESP, 5 filesystems, GPT) | %.2f | %s |\n' "$(echo "$t1 - $t0" | bc)" "$disk_alloc"
printf '| floor: `mkfs.ext4 -d` of the same tree, once | %.2f | %s |\n' "$(echo "$t3 - $t2" | bc)" "$floor_alloc"
echo
# OS space: STATE + RECOVERY contents vs the image (tree) size.
layers=$(grep -o '[0-9]* bytes)' "$W/build.log" | grep -o '[0-9]*' | head -1)
echo "OS payload per store (layer images): $layers bytes; root tree: $tree bytes (apparent). STATE and RECOVERY each hold one copy: OS space = $(( 2 * layers )) bytes = $(echo "scale=2; 2 * $layers / $tree" | bc) × the tree."
echo

echo "## Boot time (kernel clock, from the serial console)"
echo
echo "| run | end of kairos-immucore (s) | end of boot stage (s) |"
echo "|---:|---:|---:|"
for i in $(seq "$RUNS"); do
    cp /usr/share/OVMF/OVMF_VARS_4M.fd "$W/vars.fd"
    rm -f "$W/serial.log"
    cp --sparse=always "$W/disk.raw" "$W/run.raw"
    timeout 120 qemu-system-x86_64 -machine q35 -accel tcg -cpu max -smp 1 -m 768 \
        -drive if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \
        -drive if=pflash,format=raw,unit=1,file="$W/vars.fd" -drive file="$W/run.raw",if=virtio,format=raw \
        -display none -no-reboot -monitor none -nic none -serial file:"$W/serial.log" &
    pid=$!
    for _ in $(seq 600); do grep -aq "boot stage done" "$W/serial.log" 2>/dev/null && break; sleep 0.2; done
    kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true
    imm=$(grep -a "kairos-immucore: switching root" "$W/serial.log" | grep -o '^\[ *[0-9.]*\]' | tr -d '[] ' | head -1 || true)
    boot=$(grep -a "kairos-bench: boot stage done" "$W/serial.log" | grep -o '^\[ *[0-9.]*\]' | tr -d '[] ' | head -1 || true)
    [[ -n "$boot" ]] || { echo "run $i: no boot-stage marker; serial tail:" >&2; tail -20 "$W/serial.log" >&2; }
    echo "| $i | ${imm:-n/a} | ${boot:-n/a} |"
done
echo
echo "The dracut comparison (debian flavour) is bench/dracut.py."
