#!/usr/bin/env bash
# bench-snapshot-transfer.sh: peak memory (VmHWM) of a leader and a follower
# while the follower catches up by snapshot install, for one or more kv
# binaries (say, before and after a change). See usage() or run with -h.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/bench-snapshot-transfer.sh [options] [LABEL=KV_BINARY ...]

For each LABEL=KV_BINARY (default: after=target/release/kv), on 127.0.0.1
only, with data under a fresh directory:
  1. starts a 3-node cluster of `kv serve` (ports PORT..PORT+2, node 1 the
     fixed leader, segment_bytes_max 8 MiB, snapshot_wal_bytes 16 MiB, so the
     leader snapshots and cuts its WAL while the load runs);
  2. stops node 3 and writes N distinct keys through the leader:
     kv bench cluster --clients 64 --ops N --key-size 16 --value-size 100
     (random 16-byte keys, so the keys are distinct);
  3. restarts node 1 (a fresh process: its peak is the open plus the send)
     and reads its VmHWM once it answers;
  4. starts node 3, which needs records the leader's WAL no longer holds and
     so catches up by snapshot install; times the start until node 3's
     applied LSN reaches the leader's, then reads VmHWM of both.
Prints one table: leader VmHWM after its open and after the send, follower
VmHWM right after it answered and after the install, the newest snapshot's
size and the catch-up time. A trap stops every server it started (also on
Ctrl-C and SIGTERM) and removes the data.

Options:
  -n, --keys N     keys to write (default 1000000)
  -p, --port PORT  first of the three ports (default 7421)
  -d, --dir DIR    parent of the data directory (default /tmp)
      --snapshot-wal-bytes B  the nodes' snapshot_wal_bytes (default 16777216)
      --segment-bytes B       the nodes' segment_bytes_max (default 8388608)
  -h, --help       this text

A benchmark, not a test: it exits non-zero only if it could not run.
EOF
}

NAME=bench-snapshot-transfer
KEYS=1000000
PORT=7421
PARENT=/tmp
SNAPSHOT_WAL_BYTES=16777216
SEGMENT_BYTES=8388608
RUNS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        -n|--keys) KEYS=${2:?}; shift 2 ;;
        -p|--port) PORT=${2:?}; shift 2 ;;
        -d|--dir) PARENT=${2:?}; shift 2 ;;
        --snapshot-wal-bytes) SNAPSHOT_WAL_BYTES=${2:?}; shift 2 ;;
        --segment-bytes) SEGMENT_BYTES=${2:?}; shift 2 ;;
        *=*) RUNS+=("$1"); shift ;;
        *) echo "$NAME: unknown argument $1 (see -h)" >&2; exit 2 ;;
    esac
done
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[[ ${#RUNS[@]} -gt 0 ]] || RUNS=("after=$ROOT/target/release/kv")
[[ $KEYS =~ ^[1-9][0-9]*$ ]] || { echo "$NAME: --keys must be a positive integer" >&2; exit 2; }

WORK=$(mktemp -d "$PARENT/kv-snapbench.XXXXXX")
declare -A PIDS=()
cleanup() {
    local id
    for id in "${!PIDS[@]}"; do
        kill "${PIDS[$id]}" 2>/dev/null || true
    done
    for id in "${!PIDS[@]}"; do
        wait "${PIDS[$id]}" 2>/dev/null || true
    done
    rm -rf -- "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

addr() { echo "127.0.0.1:$((PORT + $1 - 1))"; }
ENDPOINTS="$(addr 1),$(addr 2),$(addr 3)"

write_configs() { # dir
    local dir=$1 id m
    for id in 1 2 3; do
        {
            echo "cluster_id = \"snapbench\""
            echo "node_id = $id"
            echo "listen = \"$(addr "$id")\""
            echo "data_dir = \"$dir/node$id\""
            echo "leader = 1"
            echo "segment_bytes_max = $SEGMENT_BYTES"
            echo "snapshot_wal_bytes = $SNAPSHOT_WAL_BYTES"
            for m in 1 2 3; do
                printf '[[members]]\nid = %s\naddr = "%s"\n' "$m" "$(addr "$m")"
            done
        } >"$dir/node$id.toml"
    done
}

# status_field KV ID COLUMN: a column of node ID's `kv status` row (empty if
# it does not answer). Columns: 6 last_lsn, 9 applied, 10 snapshot.
status_field() {
    "$1" status --endpoints "$(addr "$2")" --timeout-ms 2000 2>/dev/null |
        awk -v col="$3" '$1 ~ /^[0-9]+$/ { print $col; exit }' || true
}

start_node() { # KV DIR ID
    "$1" serve --config "$2/node$3.toml" >/dev/null 2>>"$2/node$3.log" &
    PIDS[$3]=$!
    local i
    for ((i = 0; i < 600; i++)); do
        [[ -n $(status_field "$1" "$3" 9) ]] && return 0
        sleep 0.1
    done
    echo "$NAME: node $3 did not answer; log: $2/node$3.log" >&2
    exit 1
}

stop_node() { # ID
    kill "${PIDS[$1]}" 2>/dev/null || true
    wait "${PIDS[$1]}" 2>/dev/null || true
    unset "PIDS[$1]"
}

hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/${PIDS[$1]}/status"; }
mib() { awk -v k="$1" 'BEGIN { printf "%.0f", k / 1024 }'; }

ROWS=()
for run in "${RUNS[@]}"; do
    label=${run%%=*}
    kv=${run#*=}
    [[ -x $kv ]] || { echo "$NAME: $kv is not an executable" >&2; exit 2; }
    dir="$WORK/$label"
    mkdir -p "$dir"
    write_configs "$dir"
    echo "== $label: $kv"
    for id in 1 2 3; do start_node "$kv" "$dir" "$id"; done
    stop_node 3
    echo "+ $kv bench cluster --endpoints $(addr 1),$(addr 2) --clients 64 --ops $KEYS --key-size 16 --value-size 100"
    "$kv" bench cluster --endpoints "$(addr 1),$(addr 2)" --clients 64 --ops "$KEYS" \
        --key-size 16 --value-size 100 >"$dir/bench.txt"
    tail -n 1 "$dir/bench.txt"
    # A fresh leader process: its peak is its open, then the send.
    stop_node 1
    start_node "$kv" "$dir" 1
    leader_open=$(hwm_kib 1)
    target=$(status_field "$kv" 1 9)
    snap_lsn=$(status_field "$kv" 1 10)
    snap_file="$dir/node1/$(printf 'snap-%020d.snap' "$snap_lsn")"
    snap_bytes=$(stat -c %s "$snap_file")
    first_wal=$(find "$dir/node1" -name 'wal-*.wal' -printf '%f\n' | sort | head -n 1)
    echo "leader: applied $target, snapshot at LSN $snap_lsn ($snap_bytes bytes), first segment $first_wal"
    t0=$(date +%s.%N)
    start_node "$kv" "$dir" 3
    follower_start=$(hwm_kib 3)
    for ((i = 0; i < 6000; i++)); do
        applied=$(status_field "$kv" 3 9)
        [[ -n $applied && $applied -ge $target ]] && break
        sleep 0.1
    done
    t1=$(date +%s.%N)
    [[ -n $applied && $applied -ge $target ]] || { echo "$NAME: node 3 did not catch up" >&2; exit 1; }
    follower_snap=$(status_field "$kv" 3 10)
    [[ $follower_snap -gt 0 ]] || { echo "$NAME: node 3 caught up without a snapshot install" >&2; exit 1; }
    leader_send=$(hwm_kib 1)
    follower_end=$(hwm_kib 3)
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    ROWS+=("$(printf '%-8s %12s %12s %14s %14s %10s %9s' "$label" \
        "$(mib "$leader_open")" "$(mib "$leader_send")" \
        "$(mib "$follower_start")" "$(mib "$follower_end")" \
        "$(mib $((snap_bytes / 1024)))" "$secs")")
    for id in 1 2 3; do stop_node "$id"; done
    rm -rf -- "$dir"
done

echo
echo "== peak RSS (VmHWM, MiB) around a snapshot transfer of $KEYS keys (16-byte keys, 100-byte values)"
printf '%-8s %12s %12s %14s %14s %10s %9s\n' binary leader_open leader_send follower_start follower_end snap_MiB catchup_s
for row in "${ROWS[@]}"; do echo "$row"; done
