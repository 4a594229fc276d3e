#!/usr/bin/env bash
# bench-catchup.sh: leader write throughput while a follower catches up a
# large WAL, against steady state. See usage() or run with -h.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/bench-catchup.sh [options]

Starts a 3-node cluster of real `kv serve` processes on loopback (node 1 is
a fixed leader), with automatic snapshots off (so a follower catches up
through the log, never by snapshot install), then:
  1. steady:   `kv bench cluster` with all three nodes up and in sync;
  2. stops node 3 and writes RECORDS records (`kv bench cluster`);
  3. restarts node 3 and at once runs `kv bench cluster` again: the leader
     serves the writes while it ships the backlog to node 3 (node 3's lag
     is printed before and after, to show the catch-up was under way);
  4. waits until node 3 has caught up (`kv status`), and runs the bench a
     third time.
Prints one table row per phase. Every server it started is stopped on exit,
also on SIGINT/SIGTERM.

Options:
  -n, --records N     records written while node 3 is down (default 1000000)
  -o, --ops N         writes per measured bench (default 20000)
  -c, --clients N     concurrent clients of every bench (default 64)
  -p, --port P        first port; the nodes listen on P, P+1, P+2 (default 7411)
  -d, --dir DIR       parent of the temporary data directories (default /tmp)
      --kv PATH       the kv binary (default: target/release/kv, built with
                      `cargo build --release --bin kv` if missing)
      --rebuild       run `cargo build --release --bin kv` even if present
      --keep          keep the data and logs (the path is printed)
  -h, --help          this text

Needs python3 (to parse the JSON rows). Timings never make it fail.
EOF
}

NAME=bench-catchup
# shellcheck source=lib/common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/common.sh"

RECORDS=1000000
OPS=20000
CLIENTS=64
PORT=7411
PARENT=/tmp
KV=""
REBUILD=0
KEEP=0
while [[ $# -gt 0 ]]; do
    case $1 in
        -n | --records) RECORDS=$2; shift 2 ;;
        -o | --ops) OPS=$2; shift 2 ;;
        -c | --clients) CLIENTS=$2; shift 2 ;;
        -p | --port) PORT=$2; shift 2 ;;
        -d | --dir) PARENT=$(abspath "$2"); shift 2 ;;
        --kv) KV=$(abspath "$2"); shift 2 ;;
        --rebuild) REBUILD=1; shift ;;
        --keep) KEEP=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option $1 (see -h)" ;;
    esac
done
positive_int --records "$RECORDS"
positive_int --ops "$OPS"
positive_int --clients "$CLIENTS"
positive_int --port "$PORT"
need_python3
ensure_kv

declare -A PIDS=()
make_work_dir catchup

stop_node() { # id: SIGTERM, then SIGKILL after 10 s
    local id=$1 pid=${PIDS[$1]:-} i
    [[ -n $pid ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    unset "PIDS[$id]"
}

cleanup() {
    local id
    for id in "${!PIDS[@]}"; do stop_node "$id"; done
    if [[ $KEEP == 1 ]]; then
        echo "$NAME: data and logs kept under $WORK"
    else
        work_cleanup
    fi
}

ADDRS=("127.0.0.1:$PORT" "127.0.0.1:$((PORT + 1))" "127.0.0.1:$((PORT + 2))")
LEADER=${ADDRS[0]}
for id in 1 2 3; do
    {
        echo "cluster_id = \"kv-catchup\""
        echo "node_id = $id"
        echo "listen = \"${ADDRS[id - 1]}\""
        echo "data_dir = \"$WORK/node$id\""
        echo "leader = 1"
        echo "snapshot_wal_bytes = 0"
        for m in 1 2 3; do
            printf '\n[[members]]\nid = %d\naddr = "%s"\n' "$m" "${ADDRS[m - 1]}"
        done
    } >"$WORK/node$id.toml"
done
echo_work_dir

start_node() { # id
    "$KV" serve --config "$WORK/node$1.toml" >>"$WORK/node$1.log" 2>&1 &
    PIDS[$1]=$!
}

# Prints "<last_lsn of node 1> <applied of node 3>" (empty fields if unknown).
positions() {
    "$KV" status --endpoints "$(IFS=,; echo "${ADDRS[*]}")" --timeout-ms 2000 2>/dev/null |
        awk '$1 == 1 { l = $6 } $1 == 3 { a = $9 } END { print l, a }' || true
}

bench() { # label: one bench against the leader; appends "label<TAB>json" to RESULTS
    local out
    show_cmd "$KV" bench cluster --endpoints "$LEADER" --clients "$CLIENTS" --ops "$2" --json
    out=$("$KV" bench cluster --endpoints "$LEADER" --clients "$CLIENTS" --ops "$2" --json | tail -1)
    printf '%s\t%s\n' "$1" "$out" >>"$RESULTS"
    echo "  $1: $out"
}

lag() { # prints node 3's lag behind the leader's last LSN
    local l a
    read -r l a <<<"$(positions)"
    if [[ -n $l && -n $a ]]; then echo $((l - a)); else echo "?"; fi
}

for id in 1 2 3; do start_node "$id"; done
for ((i = 0; i < 100; i++)); do
    "$KV" put warmup 1 --endpoints "$LEADER" --timeout-ms 1000 >/dev/null 2>&1 && break
    sleep 0.2
done

echo "== 1. steady state (all nodes in sync)"
bench steady "$OPS"

echo "== 2. node 3 stopped; writing $RECORDS records"
stop_node 3
bench load "$RECORDS"

echo "== 3. node 3 restarted; bench while it catches up"
start_node 3
sleep 1
LAG_BEFORE=$(lag)
echo "  node 3 lag before: $LAG_BEFORE records"
bench catch-up "$OPS"
LAG_AFTER=$(lag)
echo "  node 3 lag after:  $LAG_AFTER records"

echo "== 4. waiting for node 3 to catch up"
START=$(date +%s)
while :; do
    read -r l a <<<"$(positions)"
    [[ -n ${l:-} && -n ${a:-} && $a -ge $l ]] && break
    (($(date +%s) - START < 600)) || { warn "node 3 did not catch up in 600 s"; FAILED=1; break; }
    sleep 1
done
echo "  caught up after $(($(date +%s) - START)) s more"
bench caught-up "$OPS"

echo
echo "== writes/s on the leader (clients $CLIENTS; catch-up lag: $LAG_BEFORE before, $LAG_AFTER after its bench)"
python3 - "$RESULTS" <<'PY'
import json, sys
rows = [l.rstrip("\n").split("\t", 1) for l in open(sys.argv[1]) if l.strip()]
print(f"{'phase':<10} {'ops':>9} {'seconds':>8} {'ops/s':>9} {'p50_us':>8} {'p99_us':>8}")
for label, js in rows:
    try:
        r = json.loads(js)
    except ValueError:
        print(f"{label:<10} (no result)")
        continue
    print(f"{label:<10} {r['ops']:>9} {r['seconds']:>8.2f} {r['ops_per_sec']:>9.0f} {r['p50_us']:>8} {r['p99_us']:>8}")
PY
finish
