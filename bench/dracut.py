#!/usr/bin/env python3
"""Boot time of the debian flavour through kairos-immucore against the same Debian userland
booted the classic way, through a dracut-built initramfs (what the Go Kairos uses).

Both disks boot under QEMU/TCG with `kairosctl vm run` (1 vCPU, 768 MiB). After login as root,
`systemd-analyze` gives the time from kernel start to the end of the initramfs: for dracut
"kernel + initrd"; kairos-immucore is not a systemd initrd, so its share is inside "kernel".
The dracut root also gets the Kairos layer (kairos-agent and its systemd units, taken from
`kairosctl kairosify` of the same tree), so both run the same `boot` stage; the end of that
stage is when cos-setup-boot.service exited (CLOCK_MONOTONIC, i.e. since kernel start).
Prints a Markdown table. Usage: bench/dracut.py [runs]
"""
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time

CACHE = os.environ.get("KAIROS_CACHE", "/var/cache/kairos-rs")
BIN = f"{CACHE}/bin"
DRACUT_ROOT = f"{CACHE}/images/debian-dracut/rootfs"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 3


def sh(cmd):
    subprocess.run(cmd, shell=True, check=True)


def out(cmd):
    return subprocess.check_output(cmd, shell=True, cwd=REPO).decode().strip()


def build_dracut_image():
    if os.path.isdir(DRACUT_ROOT):
        if not os.path.exists(f"{DRACUT_ROOT}/etc/kairos-release"):
            add_kairos_layer(DRACUT_ROOT)
        return
    os.makedirs(os.path.dirname(DRACUT_ROOT), exist_ok=True)
    hooks = [
        'echo dracut-node > "$1/etc/hostname"',
        'echo root:bench | chroot "$1" chpasswd',
        'echo "LABEL=ROOT / ext4 defaults 0 1" > "$1/etc/fstab"',
        'ln -sf /dev/null "$1/etc/systemd/system/systemd-firstboot.service"',
        'chroot "$1" sh -c "dracut --force --no-hostonly --add-drivers \\"virtio_blk virtio_pci ext4\\" '
        '/boot/initrd.dracut \\$(ls /lib/modules)"',
    ]
    args = ["mmdebstrap", "--quiet", "--variant=minbase",
            "--include=systemd,systemd-sysv,udev,linux-image-cloud-amd64,login,passwd,dracut,kmod"]
    args += [f"--customize-hook={h}" for h in hooks]
    subprocess.run(args + ["bookworm", DRACUT_ROOT], check=True)
    add_kairos_layer(DRACUT_ROOT)


def add_kairos_layer(root):
    """Unpacks the layer `kairosctl kairosify` adds (agent, units, /system/oem) into `root`,
    without its /boot (dracut's initrd stays)."""
    tmp = tempfile.mkdtemp(prefix="kairos-layer-")
    try:
        sh(f"{BIN}/kairosctl image import {root} oci-layout:{tmp}/base >/dev/null")
        sh(f"{BIN}/kairosctl kairosify oci-layout:{tmp}/base oci-layout:{tmp}/k >/dev/null 2>&1")
        index = json.load(open(f"{tmp}/k/index.json"))
        digest = index["manifests"][0]["digest"].split(":")[1]
        manifest = json.load(open(f"{tmp}/k/blobs/sha256/{digest}"))
        top = manifest["layers"][-1]["digest"].split(":")[1]
        sh(f"tar -xzf {tmp}/k/blobs/sha256/{top} -C {root} --exclude=boot --exclude=./boot")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_dracut_disk(work):
    kver = os.listdir(f"{DRACUT_ROOT}/lib/modules")[0]
    esp, root, disk = f"{work}/esp.img", f"{work}/root.img", f"{work}/dracut.raw"
    sh(f"truncate -s 96M {esp} && mkfs.vfat -F 32 -n ESP {esp} >/dev/null")
    for d in ["EFI", "EFI/BOOT", "loader", "loader/entries"]:
        sh(f"mmd -i {esp} ::/{d}")
    with open(f"{work}/loader.conf", "w") as f:
        f.write("default dracut.conf\ntimeout 3\n")
    with open(f"{work}/dracut.conf", "w") as f:
        f.write("title Debian (dracut)\nlinux /vmlinuz\ninitrd /initrd\n"
                "options root=LABEL=ROOT ro console=tty1 console=ttyS0,115200\n")
    sh(f"mcopy -i {esp} /usr/lib/systemd/boot/efi/systemd-bootx64.efi ::/EFI/BOOT/BOOTX64.EFI")
    sh(f"mcopy -i {esp} {work}/loader.conf ::/loader/loader.conf")
    sh(f"mcopy -i {esp} {work}/dracut.conf ::/loader/entries/dracut.conf")
    sh(f"mcopy -i {esp} {DRACUT_ROOT}/boot/vmlinuz-{kver} ::/vmlinuz")
    sh(f"mcopy -i {esp} {DRACUT_ROOT}/boot/initrd.dracut ::/initrd")
    size = int(subprocess.check_output(["du", "-sm", DRACUT_ROOT]).split()[0]) * 13 // 10 + 256
    sh(f"truncate -s {size}M {root} && mkfs.ext4 -q -F -L ROOT -d {DRACUT_ROOT} {root}")
    sh(f"truncate -s {size + 100}M {disk}")
    script = (f"label: gpt\nstart=2048, size={96 * 2048}, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n"
              f"start={98 * 2048}, size={size * 2048}\n")
    subprocess.run(["sfdisk", "--quiet", disk], input=script.encode(), check=True)
    sh(f"dd if={esp} of={disk} bs=1M seek=1 conv=notrunc,sparse status=none")
    sh(f"dd if={root} of={disk} bs=1M seek=98 conv=notrunc,sparse status=none")
    return disk


def build_kairos_disk(work):
    rootfs = out("scripts/images/debian.sh")
    cc = f"{work}/cc.yaml"
    with open(cc, "w") as f:
        f.write("#cloud-config\nusers:\n- name: root\n  passwd: bench\n")
    disk = f"{work}/kairos.raw"
    sh(f"{BIN}/kairosctl build raw --image dir:{rootfs} --output {disk} --cloud-config {cc} >/dev/null 2>&1")
    return disk


class Vm:
    def __init__(self, disk):
        self.p = subprocess.Popen([f"{BIN}/kairosctl", "vm", "run", disk, "--smp", "1", "--memory", "768"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.buf = b""

    def wait(self, needle, timeout=400):
        end = time.time() + timeout
        while time.time() < end:
            i = self.buf.find(needle.encode())
            if i >= 0:
                got, self.buf = self.buf[: i + len(needle)], self.buf[i + len(needle):]
                return got.decode(errors="replace")
            r, _, _ = select.select([self.p.stdout], [], [], 0.5)
            if r:
                chunk = os.read(self.p.stdout.fileno(), 65536)
                if not chunk:
                    break
                self.buf += chunk
        raise TimeoutError(f"waiting for {needle!r}; tail: {self.buf[-600:]!r}")

    def send(self, line):
        self.p.stdin.write(line.encode() + b"\r")
        self.p.stdin.flush()

    def close(self):
        self.p.kill()
        self.p.wait()


def measure(disk):
    vm = Vm(disk)
    try:
        vm.wait("login: ")
        vm.send("root")
        vm.wait("Password: ")
        vm.send("bench")
        vm.wait("# ", 60)
        for _ in range(40):
            vm.send("systemd-analyze | head -1")
            try:
                got = vm.wait("(userspace)", timeout=8)
                break
            except TimeoutError:
                time.sleep(3)  # "Bootup is not yet finished"
        else:
            raise TimeoutError("systemd-analyze never reported a finished boot")
        m = re.search(r"Startup finished in ([\d.]+)s \(kernel\)(?: \+ ([\d.]+)s \(initrd\))?", got)
        initramfs = float(m.group(1)) + float(m.group(2) or 0)
        vm.send("systemctl show -P ExecMainExitTimestampMonotonic cos-setup-boot.service; echo END")
        got = vm.wait("\nEND", 30)
        usec = re.search(r"(\d+)\s*END$", got)
        if not usec or int(usec.group(1)) == 0:
            raise RuntimeError(f"cos-setup-boot.service did not run: {got!r}")
        return initramfs, int(usec.group(1)) / 1e6
    finally:
        vm.close()


def main():
    build_dracut_image()
    work = tempfile.mkdtemp(prefix="kairos-dracut-")
    try:
        dracut_disk = build_dracut_disk(work)
        kairos_disk = build_kairos_disk(work)
        rows = [(i + 1, *measure(kairos_disk), *measure(dracut_disk)) for i in range(RUNS)]
        print("| run | end of initramfs: kairos-immucore (s) | dracut (s) | ratio "
              "| end of boot stage: kairos-immucore (s) | dracut (s) | ratio |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for i, ki, kb, di, db in rows:
            print(f"| {i} | {ki:.2f} | {di:.2f} | {ki / di:.2f} | {kb:.2f} | {db:.2f} | {kb / db:.2f} |")
        m = [sum(r[c] for r in rows) / len(rows) for c in range(1, 5)]
        print(f"| mean | {m[0]:.2f} | {m[2]:.2f} | {m[0] / m[2]:.2f} "
              f"| {m[1]:.2f} | {m[3]:.2f} | {m[1] / m[3]:.2f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
