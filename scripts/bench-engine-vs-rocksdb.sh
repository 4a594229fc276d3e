#!/usr/bin/env bash
# bench-engine-vs-rocksdb.sh: durable small writes from T threads, kv's engine
# (group commit) against RocksDB's db_bench fillrandom --sync=1, on the same
# disk, interleaved. See usage() or run with -h.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/bench-engine-vs-rocksdb.sh [options]

For each writer count T, runs (interleaved, so both see the same machine
state, on the same disk):
  kv bench engine --writers T --ops OPS --key-size 16 --value-size 100 --json
  db_bench --benchmarks=fillrandom --sync=1 --threads=T --num=OPS/T
           --key_size=16 --value_size=100 --compression_type=none
           --disable_auto_compactions=1 --histogram=1 --statistics=1
(db_bench's --num is per thread, so both write OPS/T*T records in total),
then prints one table: kv ops/s, p50/p99 latency and records per fsync,
the same for RocksDB (records per WAL sync from its statistics), and the
ratio kv/rocksdb. The order of the two alternates from one writer count (and
run) to the next.

Options:
  -w, --writers LIST   comma-separated writer counts (default 1,8,32,64)
  -o, --ops N          total records per run, for each system (default 20000)
  -r, --runs R         repeat everything R times, report medians (default 1)
  -d, --dir DIR        put the temporary data under DIR, which decides the disk
                       (default: ./kv-bench-data in the repository; created
                       and removed by the script if it did not exist)
      --plot FILE      also write an SVG plot of ops/s against writers
      --no-rocksdb     run kv only (e.g. where db_bench is not installed)
      --no-stats       do not pass --statistics=1 to db_bench (no records/sync)
      --kv PATH        the kv binary (default: target/release/kv, built with
                       `cargo build --release --bin kv` if missing)
      --rebuild        run `cargo build --release --bin kv` even if present
      --db-bench PATH  the db_bench binary (default: db_bench on PATH)
  -h, --help           this text

Needs: python3, db_bench (apt-get install -y rocksdb-tools). Timings never
make it fail; it exits 1 only if a run produced no result.
EOF
}

NAME=bench-engine-vs-rocksdb
# die, warn, abspath, ROOT (and cd there), show_cmd, make_work_dir, finish, ...
# shellcheck source=lib/common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/common.sh"

WRITERS=1,8,32,64
OPS=20000
RUNS=1
PARENT="$ROOT/kv-bench-data"
PLOT=""
USE_ROCKSDB=1
USE_STATS=1
KV=""
REBUILD=0
DB_BENCH=db_bench

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        -w|--writers) WRITERS=${2:?}; shift 2 ;;
        -o|--ops) OPS=${2:?}; shift 2 ;;
        -r|--runs) RUNS=${2:?}; shift 2 ;;
        -d|--dir) PARENT=$(abspath "${2:?}"); shift 2 ;;
        --plot) PLOT=$(abspath "${2:?}"); shift 2 ;;
        --no-rocksdb) USE_ROCKSDB=0; shift ;;
        --no-stats) USE_STATS=0; shift ;;
        --kv) KV=$(abspath "${2:?}"); shift 2 ;;
        --rebuild) REBUILD=1; shift ;;
        --db-bench) DB_BENCH=${2:?}; shift 2 ;;
        *) usage >&2; die "unknown argument '$1'" ;;
    esac
done
positive_int_list --writers "$WRITERS" 1,8,32,64
positive_int --ops "$OPS"
positive_int --runs "$RUNS"
IFS=, read -r -a WLIST <<<"$WRITERS"

# --- tools -------------------------------------------------------------------
need_python3
DB_EXTRA=()
if [[ $USE_ROCKSDB == 1 ]]; then
    if ! command -v "$DB_BENCH" >/dev/null 2>&1; then
        cat >&2 <<'EOF'
bench-engine-vs-rocksdb: RocksDB's db_bench is not installed.
  Install it with:   apt-get install -y rocksdb-tools
  (or pass --db-bench PATH, or run with --no-rocksdb for kv alone).
EOF
        exit 2
    fi
    DB_HELP=$("$DB_BENCH" --help 2>&1 || true)
    for flag in benchmarks sync threads num key_size value_size compression_type \
        disable_auto_compactions db; do
        grep -qE "^ +-$flag " <<<"$DB_HELP" ||
            die "$DB_BENCH --help does not list -$flag; this script needs it"
    done
    if grep -qE '^ +-histogram ' <<<"$DB_HELP"; then
        DB_EXTRA+=(--histogram=1)
    else
        warn "db_bench has no -histogram: RocksDB p50/p99 will be n/a"
    fi
    if [[ $USE_STATS == 1 ]]; then
        if grep -qE '^ +-statistics ' <<<"$DB_HELP"; then
            DB_EXTRA+=(--statistics=1)
        else
            warn "db_bench has no -statistics: RocksDB records/sync will be n/a"
        fi
    fi
fi

ensure_kv

# --- work directory ------------------------------------------------------------
make_work_dir bench-engine   # RESULTS: system <TAB> writers <TAB> run <TAB> file

echo "bench-engine-vs-rocksdb: kv=$KV"
if [[ $USE_ROCKSDB == 1 ]]; then
    echo "bench-engine-vs-rocksdb: db_bench=$(command -v "$DB_BENCH") ($("$DB_BENCH" --version 2>&1 | head -n1 || true))"
fi
echo_work_dir
echo "bench-engine-vs-rocksdb: $(nproc) CPUs, kernel $(uname -r); writers $WRITERS, $OPS records per run, $RUNS run(s)"
echo

kv_run() { # writers run
    local t=$1 run=$2
    local out="$WORK/kv-w$t-r$run.out"
    local cmd=("$KV" bench engine --writers "$t" --ops "$OPS" --key-size 16 --value-size 100
        --data-dir "$WORK/kv" --json)
    show_cmd "${cmd[@]}"
    if "${cmd[@]}" >"$out" 2>"$out.err"; then
        local line
        line=$(grep '^{' "$out" | tail -n1 || true)
        if [[ -n $line ]]; then
            echo "  $line"
            printf 'kv\t%s\t%s\t%s\n' "$t" "$run" "$out" >>"$RESULTS"
            return
        fi
    fi
    warn "kv bench engine (writers $t) produced no result:"
    tail -n 5 "$out" "$out.err" >&2 || true
    FAILED=1
}

rocksdb_run() { # writers run
    local t=$1 run=$2
    local out="$WORK/rocksdb-w$t-r$run.out"
    local num=$((OPS / t))
    ((num >= 1)) || num=1
    local db="$WORK/rocksdb"
    rm -rf -- "$db"
    local cmd=("$DB_BENCH" --benchmarks=fillrandom --sync=1 --threads="$t" --num="$num"
        --key_size=16 --value_size=100 --compression_type=none --disable_auto_compactions=1
        "${DB_EXTRA[@]}" --db="$db")
    show_cmd "${cmd[@]}"
    if "${cmd[@]}" >"$out" 2>&1 && grep -q '^fillrandom *:' "$out"; then
        echo "  $(grep -m1 '^fillrandom *:' "$out" | tr -s ' ')"
        printf 'rocksdb\t%s\t%s\t%s\n' "$t" "$run" "$out" >>"$RESULTS"
    else
        warn "db_bench (threads $t) produced no result:"
        tail -n 10 "$out" >&2 || true
        FAILED=1
    fi
    rm -rf -- "$db"
}

step=0
for ((run = 1; run <= RUNS; run++)); do
    for t in "${WLIST[@]}"; do
        if [[ $USE_ROCKSDB == 1 && $((step % 2)) == 1 ]]; then
            rocksdb_run "$t" "$run"
            kv_run "$t" "$run"
        else
            kv_run "$t" "$run"
            if [[ $USE_ROCKSDB == 1 ]]; then rocksdb_run "$t" "$run"; fi
        fi
        step=$((step + 1))
    done
done
echo

# --- report ---------------------------------------------------------------------------
python3 - "$LIB" "$RESULTS" "$WRITERS" "$OPS" "$PLOT" <<'PY' || { warn "could not summarise the results"; FAILED=1; }
import json, re, statistics, sys

sys.dont_write_bytecode = True  # no __pycache__ in scripts/lib
sys.path.insert(0, sys.argv[1])
from svg_plot import line_plot

results, writers, ops, plot = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
writers = [int(w) for w in writers.split(",")]
kv, rdb = {}, {}

def num(pattern, text):
    m = re.search(pattern, text, re.M)
    return float(m.group(1)) if m else None

for raw in open(results):
    system, t, run, path = raw.rstrip("\n").split("\t", 3)
    t, text = int(t), open(path).read()
    try:
        if system == "kv":
            row = json.loads([l for l in text.splitlines() if l.startswith("{")][-1])
            kv.setdefault(t, []).append(dict(
                ops_s=float(row["ops_per_sec"]), p50=float(row["p50_us"]),
                p99=float(row["p99_us"]), per_sync=float(row["records_per_fsync"])))
        else:
            ops_s = num(r"^fillrandom\s*:\s*[\d.]+ micros/op\s+([\d.]+) ops/sec", text)
            written = num(r"^rocksdb\.write\.wal COUNT : (\d+)", text)
            synced = num(r"^rocksdb\.wal\.synced COUNT : (\d+)", text)
            rdb.setdefault(t, []).append(dict(
                ops_s=ops_s,
                p50=num(r"^Percentiles: P50: ([\d.]+)", text),
                p99=num(r"^Percentiles: .*\bP99: ([\d.]+)", text),
                per_sync=written / synced if written and synced else None))
    except Exception as e:  # one unreadable run is reported, never fatal
        print(f"cannot parse {path}: {e}", file=sys.stderr)

def med(rows, key):
    xs = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(xs) if xs else None

def fmt(x, nd=0):
    return "n/a" if x is None else f"{x:,.{nd}f}"

head = (f"{'writers':>7}  {'kv ops/s':>10} {'p50 us':>7} {'p99 us':>7} {'rec/fsync':>9}"
        f"  {'rocksdb ops/s':>13} {'p50 us':>7} {'p99 us':>7} {'rec/sync':>8}  {'kv/rocksdb':>10}")
print(f"== results ({ops} records of 16 B key + 100 B value per run; medians over runs)")
print(head)
series = {"kv": [], "rocksdb": []}
for t in writers:
    k, r = kv.get(t, []), rdb.get(t, [])
    ko, ro = med(k, "ops_s"), med(r, "ops_s")
    series["kv"].append(ko)
    series["rocksdb"].append(ro)
    ratio = f"{ko / ro:.2f}x" if ko and ro else "n/a"
    print(f"{t:>7}  {fmt(ko):>10} {fmt(med(k, 'p50')):>7} {fmt(med(k, 'p99')):>7} {fmt(med(k, 'per_sync'), 1):>9}"
          f"  {fmt(ro):>13} {fmt(med(r, 'p50')):>7} {fmt(med(r, 'p99')):>7} {fmt(med(r, 'per_sync'), 1):>8}  {ratio:>10}")

if plot:
    line_plot(plot, f"durable writes: ops/s vs writers ({ops} x 16 B key + 100 B value)",
              writers, series, {"kv": "#1f77b4", "rocksdb": "#ff7f0e"}, "writer threads")
PY

finish
