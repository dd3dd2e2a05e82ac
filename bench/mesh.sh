#!/usr/bin/env bash
# Benchmarks of issue #10, the P2P mesh, across real network namespaces on one bridge (a LAN),
# one `kairos-agent p2p run` (release build) per namespace, mDNS discovery, DHCP over the
# ledger, the DHT off. Prints a Markdown report; docs/benchmarks.md holds its numbers.
#
#   join      time from a daemon's start to an address, every live machine seen, and a first
#             ping answered over the VPN (a new node joining a running 3-node mesh; repeated)
#   idle      bytes on each node's LAN link (rx + tx) over an idle window, scaled to an hour;
#             RSS and CPU time of each daemon at the end of the window (3 and 10 nodes)
#   vpn       iperf3 TCP throughput and ping latency between two nodes: the raw veth path
#             against the VPN between the same namespaces; CPU seconds per Gbit through the VPN
#
# Needs root (namespaces, TUN). Usage: bench/mesh.sh [join|idle|vpn ...] [> report.md]
# MESH_IDLE_SECS (default 600) sets the idle window; MESH_IDLE_NODES (default "3 10") the sizes;
# MESH_JOIN_RUNS (default 5) the joins measured; MESH_VPN_MTUS (default "1200 9000 65000") the VPN
# MTUs measured (1200 is EdgeVPN's default).
set -euo pipefail
source "$(dirname "$0")/../scripts/env.sh"
cd "$REPO"
cargo build --quiet --release -p kairos-agent
AGENT="$CARGO_TARGET_DIR/release/kairos-agent"
WORK="$(mktemp -d /tmp/kairos-bench-mesh.XXXXXX)"
TAG="kb$(($$ % 10000))"
IDLE_SECS="${MESH_IDLE_SECS:-600}"
IDLE_NODES="${MESH_IDLE_NODES:-3 10}"
JOIN_RUNS="${MESH_JOIN_RUNS:-5}"
VPN_MTUS="${MESH_VPN_MTUS:-1200 9000 65000}"
WHAT=("$@")
((${#WHAT[@]})) || WHAT=(join idle vpn)
NODES=()

cleanup() {
    for i in "${NODES[@]}"; do stop_node "$i"; done
    for ns in $(ip netns list | awk '{print $1}' | grep "^$TAG-" || true); do ip netns del "$ns"; done
    rm -rf "$WORK" /etc/netns/"$TAG"-*
}
trap cleanup EXIT

ns() { echo "$TAG-n$1"; }

lan_up() {
    ip netns add "$TAG-lan"
    ip -n "$TAG-lan" link add br0 type bridge
    ip -n "$TAG-lan" link set br0 up
}

# Namespace of node i, on the bridge at 192.168.66.i.
plug() {
    local i=$1 n
    n=$(ns "$i")
    ip netns add "$n"
    ip link add "${TAG}v$i" netns "$n" type veth peer name "${TAG}p$i" netns "$TAG-lan"
    ip -n "$TAG-lan" link set "${TAG}p$i" master br0 up
    ip -n "$n" addr add "192.168.66.$i/24" dev "${TAG}v$i"
    ip -n "$n" link set "${TAG}v$i" up
    ip -n "$n" link set lo up
}

# Writes node i's root (hostname, p2p config) with `p2p:` lines $2 and starts its daemon.
start_node() {
    local i=$1 cfg=$2 root="$WORK/n$1"
    mkdir -p "$root/oem" "$root/etc"
    echo "node$i" > "$root/etc/hostname"
    printf '#cloud-config\np2p:\n%s' "$cfg" > "$root/oem/90_p2p.yaml"
    ip netns exec "$(ns "$i")" "$AGENT" --root "$root" --cmdline '' p2p run > "$root/log" 2>&1 &
    echo $! > "$root/pid"
    NODES+=("$i")
}

stop_node() {
    local root="$WORK/n$1"
    [[ -f $root/pid ]] || return 0
    kill "$(cat "$root/pid")" 2>/dev/null || true
    wait "$(cat "$root/pid")" 2>/dev/null || true
    rm -f "$root/pid"
}

status() { "$AGENT" --root "$WORK/n$1" p2p status --json 2>/dev/null || true; }

# The node's VPN address once it has one and sees at least $2 live machines, else nothing.
joined() {
    status "$1" | python3 -c '
import json, sys
try:
    v = json.load(sys.stdin)
except ValueError:
    sys.exit()
live = sum(1 for m in v.get("machines", []) if m.get("live"))
a = (v.get("vpn") or {}).get("address")
if a and live >= int(sys.argv[1]):
    print(a.split("/")[0])' "$2"
}

wait_joined() {
    local i=$1 n=$2 end=$((SECONDS + 180)) a
    while ((SECONDS < end)); do
        a=$(joined "$i" "$n")
        [[ -n $a ]] && { echo "$a"; return; }
        sleep 0.2
    done
    echo "node $i did not join ($n machines) within 180 s; its log:" >&2
    cat "$WORK/n$i/log" >&2
    exit 1
}

now_ms() { date +%s%3N; }

link_bytes() {
    ip netns exec "$(ns "$1")" cat "/sys/class/net/${TAG}v$1/statistics/rx_bytes" \
        "/sys/class/net/${TAG}v$1/statistics/tx_bytes" | awk '{s+=$1} END {print s}'
}

rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$(cat "$WORK/n$1/pid")/status"; }
hwm_kib() { awk '/VmHWM/ {print $2}' "/proc/$(cat "$WORK/n$1/pid")/status"; }
# utime + stime, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$(cat "$WORK/n$1/pid")/stat"; }

median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

TOKEN=$("$AGENT" p2p generate-token)
CFG="  network_token: $TOKEN
  disable_dht: true
"

mesh_up() {
    local n=$1 i
    lan_up
    for i in $(seq 1 "$n"); do plug "$i"; start_node "$i" "$CFG"; done
    for i in $(seq 1 "$n"); do wait_joined "$i" "$n" > "$WORK/n$i/address"; done
}

mesh_down() {
    local i
    for i in "${NODES[@]}"; do stop_node "$i"; done
    NODES=()
    for n in $(ip netns list | awk '{print $1}' | grep "^$TAG-" || true); do ip netns del "$n"; done
    rm -rf "${WORK:?}"/n*
}

echo "# Mesh benchmarks"
echo
echo "Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), kernel $(uname -r); $(date -u +%Y-%m-%d)."
echo "Binary: release build of kairos-agent ($(stat -c %s "$AGENT") bytes); $(git rev-parse --short HEAD)."

for what in "${WHAT[@]}"; do
case $what in
join)
    echo
    echo "### Join: a new node into a running 3-node mesh ($JOIN_RUNS runs)"
    echo
    c0=$(now_ms)
    mesh_up 3
    cold=$(( $(now_ms) - c0 ))
    plug 4
    : > "$WORK/addr.ms"; : > "$WORK/ping.ms"
    first=$(cat "$WORK/n1/address")
    for run in $(seq 1 "$JOIN_RUNS"); do
        stop_node 4
        rm -rf "$WORK/n4"
        t0=$(now_ms)
        start_node 4 "$CFG"
        wait_joined 4 4 > /dev/null
        t1=$(now_ms)
        until ip netns exec "$(ns 4)" busybox ping -c 1 -W 1 "$first" > /dev/null 2>&1; do :; done
        t2=$(now_ms)
        echo $((t1 - t0)) >> "$WORK/addr.ms"
        echo $((t2 - t0)) >> "$WORK/ping.ms"
        # Its lease and machine entry stay in the ledger: a fresh node next time takes a
        # fresh address, as a new machine would.
    done
    echo "| from start to | median [ms] | min [ms] | max [ms] |"
    echo "|---|---:|---:|---:|"
    for f in addr ping; do
        label=$([[ $f == addr ]] && echo "an address and all 4 machines live in its ledger" || echo "the first ping to node1 answered over the VPN")
        echo "| $label | $(median < "$WORK/$f.ms") | $(sort -n "$WORK/$f.ms" | head -1) | $(sort -n "$WORK/$f.ms" | tail -1) |"
    done
    echo
    echo "Three daemons started at once on an empty LAN, to all three with an address and 3 live machines: $cold ms (EdgeVPN's DHCP rule gives addresses one node at a time)."
    mesh_down
    ;;
idle)
    for n in $IDLE_NODES; do
        t0=$(now_ms)
        mesh_up "$n"
        t1=$(now_ms)
        sleep 30
        declare -A b0=() c0=()
        for i in $(seq 1 "$n"); do b0[$i]=$(link_bytes "$i"); c0[$i]=$(cpu_ticks "$i"); done
        sleep "$IDLE_SECS"
        echo
        echo "### Idle: $n nodes, $IDLE_SECS s window"
        echo
        echo "All $n daemons started at once; all joined (address + $n live machines each) after $((t1 - t0)) ms; the window began 30 s later."
        echo
        echo "| node | LAN traffic [MB/h] | RSS [MiB] | peak RSS [MiB] | CPU [s/h] |"
        echo "|---|---:|---:|---:|---:|"
        tot=0
        for i in $(seq 1 "$n"); do
            b=$(( $(link_bytes "$i") - b0[$i] ))
            c=$(( $(cpu_ticks "$i") - c0[$i] ))
            tot=$((tot + b))
            awk -v i="$i" -v b="$b" -v s="$IDLE_SECS" -v r="$(rss_kib "$i")" -v h="$(hwm_kib "$i")" -v c="$c" -v hz="$(getconf CLK_TCK)" \
                'BEGIN {printf "| node%d | %.2f | %.1f | %.1f | %.1f |\n", i, b * 3600 / s / 1e6, r / 1024, h / 1024, c / hz * 3600 / s}'
        done
        awk -v t="$tot" -v n="$n" -v s="$IDLE_SECS" 'BEGIN {printf "| mean | %.2f | | | |\n", t / n * 3600 / s / 1e6}'
        unset b0 c0
        mesh_down
    done
    ;;
vpn)
    echo
    echo "### VPN against the raw veth path, node1 → node2 (3-node mesh)"
    echo
    echo "| path | MTU | iperf3 TCP, 10 s [Gbit/s] | ping avg [ms] | daemons' CPU [s per Gbit] |"
    echo "|---|---:|---:|---:|---:|"
    for mtu in $VPN_MTUS; do
        base=$CFG
        CFG="$CFG  vpn:
    mtu: $mtu
"
        mesh_up 3
        CFG=$base
        a2=$(cat "$WORK/n2/address")
        paths=(vpn)
        [[ $mtu == "${VPN_MTUS%% *}" ]] && paths=(veth vpn)
        for path in "${paths[@]}"; do
            to=$([[ $path == veth ]] && echo 192.168.66.2 || echo "$a2")
            ip netns exec "$(ns 2)" iperf3 -s -D -1 > /dev/null 2>&1
            sleep 0.5
            c0=$(( $(cpu_ticks 1) + $(cpu_ticks 2) ))
            bps=$(ip netns exec "$(ns 1)" iperf3 -c "$to" -t 10 -J | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"])')
            c1=$(( $(cpu_ticks 1) + $(cpu_ticks 2) ))
            rtt=$(ip netns exec "$(ns 1)" busybox ping -c 20 -i 0.2 "$to" | awk -F/ '/round-trip/ {print $4}')
            if [[ $path == vpn ]]; then
                cpu=$(awk -v c=$((c1 - c0)) -v hz="$(getconf CLK_TCK)" -v b="$bps" 'BEGIN {printf "%.2f", c / hz / (b * 10 / 1e9)}')
                m=$mtu
            else
                cpu="—"; m=1500
            fi
            awk -v p="$path" -v m="$m" -v b="$bps" -v r="$rtt" -v c="$cpu" 'BEGIN {printf "| %s | %s | %.3f | %s | %s |\n", p, m, b / 1e9, r, c}'
        done
        mesh_down
    done
    ;;
*) echo "bench/mesh.sh: unknown part '$what' (join, idle or vpn)" >&2; exit 2 ;;
esac
done
