#!/usr/bin/env bash
# Benchmarks of issue #2: `run-stage boot` on a 200-step config against a temp root (wall time,
# peak RSS), and the cold start of `kairos-agent --help`. Prints a Markdown report; the numbers
# in docs/benchmarks.md come from running it. Usage: bench/stages.sh [> report.md]
set -euo pipefail
source "$(dirname "$0")/../scripts/env.sh"
cd "$REPO"
cargo build --quiet --release -p kairos-agent
AGENT="$CARGO_TARGET_DIR/release/kairos-agent"
WORK="$(mktemp -d /tmp/kairos-bench.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

# A 200-step boot stage: a realistic mix of files, directories, environment, sysctl, dns,
# systemctl and commands (busybox is the root's shell), spread over 10 files of 20 steps.
make_root() {
    local r="$1"
    mkdir -p "$r/bin" "$r/etc" "$r/oem" "$r/usr/lib/systemd/system"
    cp "$(command -v busybox)" "$r/bin/sh"
    printf 'root:x:0:0:root:/root:/bin/sh\n' > "$r/etc/passwd"
    printf 'root:x:0:\n' > "$r/etc/group"
    printf 'ID=debian\nPRETTY_NAME="Debian GNU/Linux 12"\n' > "$r/etc/os-release"
    for u in $(seq 0 9); do
        printf '[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n' > "$r/usr/lib/systemd/system/svc$u.service"
    done
    for f in $(seq -w 0 9); do
        {
            echo "stages:"
            echo "  boot:"
            for s in $(seq -w 0 19); do
                echo "  - name: step$s"
                case $((10#$s % 5)) in
                    0) printf '    files:\n    - {path: /etc/bench/%s/%s.conf, content: "value {{ .Values.os.vendor }} %s", permissions: 0644}\n' "$f" "$s" "$s" ;;
                    1) printf '    directories:\n    - {path: /var/lib/bench/%s/%s, permissions: 0750}\n' "$f" "$s" ;;
                    2) printf '    environment:\n      BENCH_%s_%s: "%s"\n    sysctl:\n      vm.bench_%s_%s: %s\n' "$f" "$s" "$s" "$f" "$s" "$s" ;;
                    3) printf '    systemctl:\n      enable: [svc%s]\n    dns:\n      nameservers: [10.0.%s.%s]\n' "$((10#$s % 10))" "$f" "$s" ;;
                    4) printf '    commands:\n    - echo %s-%s >> /var/log/bench.log\n' "$f" "$s" ;;
                esac
            done
        } > "$r/oem/$f-bench.yaml"
    done
}

make_root "$WORK/template"
steps=$(grep -c '  - name: step' "$WORK"/template/oem/*.yaml | awk -F: '{s+=$2} END {print s}')

echo "# Stage engine benchmarks"
echo
echo "Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), kernel $(uname -r); $(date -u +%Y-%m-%d)."
echo "Binary: release build of kairos-agent ($(stat -c %s "$AGENT") bytes)."
echo
echo "### run-stage boot, $steps steps in 10 files, fresh temp root each run"
echo
hyperfine --style none --warmup 2 --runs 15 --export-markdown "$WORK/run.md" \
    --prepare "rm -rf $WORK/root && cp -a $WORK/template $WORK/root" \
    "$AGENT run-stage boot --root $WORK/root --cmdline ''" >/dev/null
cat "$WORK/run.md"
echo
echo "Re-run over the already-configured root (files, users and unit links are already right and are left alone; the 40 commands run again):"
echo
hyperfine --style none --warmup 2 --runs 15 --export-markdown "$WORK/rerun.md" \
    "$AGENT run-stage boot --root $WORK/root --cmdline ''" >/dev/null
cat "$WORK/rerun.md"
rm -rf "$WORK/root" && cp -a "$WORK/template" "$WORK/root"
rss=$(/usr/bin/time -f '%M' "$AGENT" run-stage boot --root "$WORK/root" --cmdline '' 2>&1 >/dev/null | tail -1)
echo
echo "Peak RSS of one run: ${rss} KiB."
echo
echo "### kairos-agent --help"
echo
hyperfine --style none --warmup 3 --runs 50 -N --export-markdown "$WORK/help.md" "$AGENT --help" >/dev/null
cat "$WORK/help.md"
if [[ $(id -u) -eq 0 ]]; then
    hyperfine --style none --runs 10 --export-markdown "$WORK/cold.md" \
        --prepare 'sync; echo 3 > /proc/sys/vm/drop_caches' "$AGENT --help" >/dev/null
    echo
    echo "With the page cache dropped before each run (truly cold):"
    echo
    cat "$WORK/cold.md"
fi
help_rss=$(/usr/bin/time -f '%M' "$AGENT" --help 2>&1 >/dev/null | tail -1)
echo
echo "Peak RSS of \`--help\`: ${help_rss} KiB."
