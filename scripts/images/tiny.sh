#!/usr/bin/env bash
# Builds the `tiny` test image tree: busybox (static) as init and userland, plus a Debian cloud
# kernel and its modules. Everything comes from Debian packages; the result is cached.
# Usage: scripts/images/tiny.sh  → prints the rootfs directory.
set -euo pipefail
source "$(dirname "$0")/../env.sh"
OUT="$KAIROS_CACHE/images/tiny"
ROOTFS="$OUT/rootfs"
STAMP="$OUT/.built-v3"
if [[ -f "$STAMP" ]]; then echo "$ROOTFS"; exit 0; fi

DEBS="$KAIROS_CACHE/debs"
mkdir -p "$DEBS"
fetch() { # package name → .deb path in the cache
    local f
    f=$(ls "$DEBS/$1"_*.deb 2>/dev/null | head -1 || true)
    if [[ -z "$f" ]]; then
        (cd "$DEBS" && apt-get download "$1" >/dev/null 2>&1) || { echo "tiny: apt-get download $1 failed (run apt-get update?)" >&2; exit 1; }
        f=$(ls "$DEBS/$1"_*.deb | head -1)
    fi
    echo "$f"
}
KPKG=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
[[ -n "$KPKG" ]] || { echo "tiny: cannot resolve linux-image-cloud-amd64 (run apt-get update)" >&2; exit 1; }

rm -rf "$OUT.tmp" && mkdir -p "$OUT.tmp/rootfs"
R="$OUT.tmp/rootfs"
dpkg-deb -x "$(fetch busybox-static)" "$R"
dpkg-deb -x "$(fetch "$KPKG")" "$R"
mkdir -p "$R"/{bin,sbin,etc/init.d,proc,sys,dev,run,tmp,root,home,var/log,srv,opt,usr/local,oem,usr/bin,usr/sbin}
chmod 1777 "$R/tmp"
# busybox provides every command through symlinks.
for app in $("$R/bin/busybox" --list-full); do
    [[ -e "$R/$app" ]] || ln -s /bin/busybox "$R/$app"
done
KVER=$(ls "$R/lib/modules")
cat > "$R/etc/inittab" <<'TAB'
::sysinit:/etc/init.d/rcS
ttyS0::respawn:/sbin/getty -L 115200 ttyS0 vt100
tty1::respawn:/sbin/getty 38400 tty1
::ctrlaltdel:/sbin/reboot
::shutdown:/bin/umount -a -r
TAB
# No `hostname -F /etc/hostname`: the kernel hostname must come from Kairos (immucore sets it).
cat > "$R/etc/init.d/rcS" <<'RC'
#!/bin/sh
mount -t devpts devpts /dev/pts 2>/dev/null
for s in /etc/init.d/S*; do [ -x "$s" ] && "$s" start; done
RC
chmod 755 "$R/etc/init.d/rcS"
mkdir -p "$R/dev/pts"
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$R/etc/passwd"
printf 'root:x:0:\n' > "$R/etc/group"
printf 'root:*:19000:0:99999:7:::\n' > "$R/etc/shadow"; chmod 640 "$R/etc/shadow"
printf 'tiny\n' > "$R/etc/hostname"
printf '127.0.0.1 localhost\n' > "$R/etc/hosts"
printf '/bin/sh\n' > "$R/etc/shells"
printf 'PRETTY_NAME="Kairos tiny (busybox) on Debian kernel %s"\nNAME="Kairos tiny"\nID=kairos-tiny\nID_LIKE=debian\nVERSION_ID="1"\n' "$KVER" > "$R/etc/os-release"
ln -sf "vmlinuz-$KVER" "$R/boot/vmlinuz"
# modules.dep, as the kernel package's postinst would make it, so busybox modprobe works.
depmod -b "$R" "$KVER"
rm -rf "$ROOTFS" && mkdir -p "$OUT" && mv "$R" "$ROOTFS" && rm -rf "$OUT.tmp"
touch "$STAMP"
echo "$ROOTFS"
