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

die() { echo "bench-engine-vs-rocksdb: $*" >&2; exit 2; }
warn() { echo "bench-engine-vs-rocksdb: $*" >&2; }

ORIG_PWD=$PWD
abspath() { case $1 in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$ORIG_PWD/$1" ;; esac; }
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

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
[[ $WRITERS =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || die "--writers must look like 1,8,32,64 (got '$WRITERS')"
[[ $OPS =~ ^[1-9][0-9]*$ ]] || die "--ops must be a positive integer (got '$OPS')"
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "--runs must be a positive integer (got '$RUNS')"
IFS=, read -r -a WLIST <<<"$WRITERS"

# --- tools -------------------------------------------------------------------
command -v python3 >/dev/null 2>&1 || die "python3 is needed to parse results"
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

if [[ -z $KV ]]; then
    KV="${CARGO_TARGET_DIR:-$ROOT/target}/release/kv"
    if [[ $REBUILD == 1 || ! -x $KV ]]; then
        echo "+ cargo build --release --bin kv"
        cargo build --release --bin kv
    fi
fi
[[ -x $KV ]] || die "kv binary not found or not executable: $KV"

# --- work directory ------------------------------------------------------------
CREATED_PARENT=0
if [[ ! -d $PARENT ]]; then
    mkdir -p "$PARENT"
    CREATED_PARENT=1
fi
WORK=$(mktemp -d "$PARENT/bench-engine.XXXXXX")
cleanup() {
    rm -rf -- "$WORK"
    if [[ $CREATED_PARENT == 1 ]]; then rmdir -- "$PARENT" 2>/dev/null || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

RESULTS="$WORK/results.tsv"   # system <TAB> writers <TAB> run <TAB> file
: >"$RESULTS"
COMMANDS=()
FAILED=0

show_cmd() {
    local s
    s=$(printf '%q ' "$@")
    s=${s% }
    echo "+ $s"
    COMMANDS+=("$s")
}

echo "bench-engine-vs-rocksdb: kv=$KV"
if [[ $USE_ROCKSDB == 1 ]]; then
    echo "bench-engine-vs-rocksdb: db_bench=$(command -v "$DB_BENCH") ($("$DB_BENCH" --version 2>&1 | head -n1 || true))"
fi
echo "bench-engine-vs-rocksdb: data under $WORK ($(df -P "$WORK" | awk 'NR==2 {print $1 " mounted on " $6}'))"
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
python3 - "$RESULTS" "$WRITERS" "$OPS" "$PLOT" <<'PY' || { warn "could not summarise the results"; FAILED=1; }
import json, os, re, statistics, sys
from xml.sax.saxutils import escape

results, writers, ops, plot = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
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
    W, H, L, R, T, B = 640, 400, 80, 20, 40, 50
    vals = [v for s in series.values() for v in s if v]
    top = max(vals) if vals else 1.0
    mag = 10 ** (len(str(int(top))) - 1)
    step = next(s * mag for s in (0.1, 0.2, 0.25, 0.5, 1, 2, 2.5, 5, 10) if top / (s * mag) <= 6)
    ymax = step * (int(top / step) + 1)
    def x(i):
        return L + (W - L - R) * (i + 0.5) / len(writers)
    def y(v):
        return H - B - (H - T - B) * v / ymax
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="14">'
           f'{escape(f"durable writes: ops/s vs writers ({ops} x 16 B key + 100 B value)")}</text>']
    v = 0.0
    while v <= ymax + 1e-9:
        out.append(f'<line x1="{L}" y1="{y(v):.1f}" x2="{W - R}" y2="{y(v):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{L - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:,.0f}</text>')
        v += step
    out.append(f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>')
    out.append(f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>')
    for i, t in enumerate(writers):
        out.append(f'<text x="{x(i):.1f}" y="{H - B + 18}" text-anchor="middle">{t}</text>')
    out.append(f'<text x="{(L + W - R) / 2}" y="{H - 10}" text-anchor="middle">writer threads</text>')
    out.append(f'<text x="16" y="{(T + H - B) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 16 {(T + H - B) / 2})">ops/s</text>')
    colors = {"kv": "#1f77b4", "rocksdb": "#ff7f0e"}
    for n, (name, s) in enumerate(series.items()):
        pts = [(x(i), y(v)) for i, v in enumerate(s) if v]
        if not pts:
            continue
        c = colors[name]
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="'
                   + " ".join(f"{a:.1f},{b:.1f}" for a, b in pts) + '"/>')
        out += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="4" fill="{c}"/>' for a, b in pts]
        ly = T + 10 + 18 * n
        out.append(f'<line x1="{L + 12}" y1="{ly}" x2="{L + 36}" y2="{ly}" stroke="{c}" stroke-width="2"/>')
        out.append(f'<text x="{L + 42}" y="{ly + 4}">{name}</text>')
    out.append("</svg>")
    try:
        os.makedirs(os.path.dirname(plot) or ".", exist_ok=True)
        with open(plot, "w") as f:
            f.write("\n".join(out) + "\n")
        print(f"\nplot written to {plot}")
    except OSError as e:
        print(f"cannot write the plot {plot}: {e}", file=sys.stderr)
PY

echo
echo "== commands used"
for c in "${COMMANDS[@]}"; do echo "  $c"; done
exit "$FAILED"
