#!/usr/bin/env bash
# bench-repl.sh: the REPL's BENCH under SETBATCH 1 and SETBATCH 5, set against
# the raw fdatasync rate of the same disk (fio). See usage() or run with -h.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/bench-repl.sh [options]

In one run, on a fresh temporary directory on the disk of DIR:
  (a) the raw fdatasync rate of the disk, measured with fio (128-byte
      sequential writes, fdatasync after each) in three file layouts:
        append     the file grows with every write, so every fdatasync
                   also commits the new file size (--file_append=1
                   --create_on_open=1 --fallocate=none): the baseline for a
                   WAL that appends to a growing file
        prelaid    fio's default: the file is fallocate()d first (unwritten
                   extents, so each sync still converts extent metadata)
        overwrite  the file is fully written first, then overwritten:
                   data-only syncs, the disk's best case, and the baseline
                   for a WAL that zero-fills its segment ahead of the records
  (b) `kv repl` with `SETBATCH 1` + `BENCH N` and, on a fresh data directory,
      `SETBATCH 5` + `BENCH N`, repeated R times (interleaved);
then a table of median ops/s and fsyncs, the ratio batch5/batch1, and
batch1 as a percentage of the raw fdatasync rate.

Options:
  -n, --ops N           BENCH size (default 10000)
  -r, --runs R          repetitions of each REPL mode (default 3)
  -d, --dir DIR         put the temporary data under DIR, which decides the disk
                        (default: ./kv-bench-data in the repository; created
                        and removed by the script if it did not exist)
      --fio-size SIZE   bytes written by each fio run (default 4m)
      --fio-runtime S   cap each fio run at S seconds (default 60)
      --no-fio          skip the raw fdatasync measurement
      --kv PATH         the kv binary (default: target/release/kv, built with
                        `cargo build --release --bin kv` if missing)
      --rebuild         run `cargo build --release --bin kv` even if present
  -h, --help            this text

Needs: python3, fio (apt-get install -y fio). Timings never make it fail;
it exits 1 only if a kv run produced no BENCH line.
EOF
}

NAME=bench-repl
# die, warn, abspath, ROOT (and cd there), show_cmd, make_work_dir, finish, ...
# shellcheck source=lib/common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/common.sh"

OPS=10000
RUNS=3
PARENT="$ROOT/kv-bench-data"
FIO_SIZE=4m
FIO_RUNTIME=60
USE_FIO=1
KV=""
REBUILD=0

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        -n|--ops) OPS=${2:?}; shift 2 ;;
        -r|--runs) RUNS=${2:?}; shift 2 ;;
        -d|--dir) PARENT=$(abspath "${2:?}"); shift 2 ;;
        --fio-size) FIO_SIZE=${2:?}; shift 2 ;;
        --fio-runtime) FIO_RUNTIME=${2:?}; shift 2 ;;
        --no-fio) USE_FIO=0; shift ;;
        --kv) KV=$(abspath "${2:?}"); shift 2 ;;
        --rebuild) REBUILD=1; shift ;;
        *) usage >&2; die "unknown argument '$1'" ;;
    esac
done
positive_int --ops "$OPS"
positive_int --runs "$RUNS"
positive_int --fio-runtime "$FIO_RUNTIME"

# --- tools -------------------------------------------------------------------
need_python3
if [[ $USE_FIO == 1 ]] && ! command -v fio >/dev/null 2>&1; then
    cat >&2 <<'EOF'
bench-repl: fio is not installed; it measures the disk's raw fdatasync rate.
  Install it with:   apt-get install -y fio
  or run with --no-fio to skip the raw-disk baseline.
EOF
    exit 2
fi

ensure_kv

# --- work directory ------------------------------------------------------------
make_work_dir bench-repl   # RESULTS: kind <TAB> name <TAB> run <TAB> payload

echo "bench-repl: kv=$KV"
echo_work_dir
echo "bench-repl: BENCH $OPS, $RUNS run(s) per mode"
echo

# --- (a) raw fdatasync rate --------------------------------------------------------
fio_run() { # name extra-args...
    local name=$1; shift
    local dir="$WORK/fio-$name"
    mkdir -p "$dir"
    local cmd=(fio --name=raw --rw=write --bs=128 --size="$FIO_SIZE" --fdatasync=1
        --directory="$dir" "$@" --runtime="$FIO_RUNTIME" --output-format=json)
    show_cmd "${cmd[@]}"
    if "${cmd[@]}" >"$dir.json" 2>"$dir.err"; then
        printf 'fio\t%s\t1\t%s\n' "$name" "$dir.json" >>"$RESULTS"
    else
        echo "bench-repl: fio ($name) failed:" >&2
        tail -n 5 "$dir.err" >&2 || true
    fi
    rm -rf -- "$dir"
}

if [[ $USE_FIO == 1 ]]; then
    echo "== raw fdatasync rate (fio $(fio --version 2>/dev/null || echo '?'))"
    fio_run append --file_append=1 --create_on_open=1 --fallocate=none
    fio_run prelaid
    fio_run overwrite --overwrite=1
    echo
fi

# --- (b) kv repl BENCH ----------------------------------------------------------------
repl_run() { # batch run
    local batch=$1 run=$2
    local dir="$WORK/repl-b$batch-r$run"
    local shown
    shown="printf 'SETBATCH $batch\\nBENCH $OPS\\nEXIT\\n' | $(printf '%q' "$KV") repl --data-dir $(printf '%q' "$dir")"
    record_cmd "$shown"
    local line=""
    if printf 'SETBATCH %s\nBENCH %s\nEXIT\n' "$batch" "$OPS" |
        "$KV" repl --data-dir "$dir" >"$dir.out" 2>"$dir.err"; then
        line=$(grep -m1 '^BENCH ' "$dir.out" || true)
    else
        echo "bench-repl: kv repl exited with an error:" >&2
        tail -n 5 "$dir.err" >&2 || true
    fi
    if [[ -n $line ]]; then
        echo "  $line"
        printf 'repl\tbatch%s\t%s\t%s\n' "$batch" "$run" "$line" >>"$RESULTS"
    else
        echo "bench-repl: no BENCH line from kv (batch $batch, run $run); output was:" >&2
        cat "$dir.out" >&2 || true
        FAILED=1
    fi
    rm -rf -- "$dir" "$dir.out" "$dir.err"
}

echo "== kv repl BENCH $OPS"
for ((run = 1; run <= RUNS; run++)); do
    repl_run 1 "$run"
    repl_run 5 "$run"
done
echo

# --- report ---------------------------------------------------------------------------
python3 - "$RESULTS" "$OPS" <<'PY' || { warn "could not summarise the results"; FAILED=1; }
import json, re, statistics, sys

results, ops = sys.argv[1], int(sys.argv[2])
fio, repl = {}, {}
for raw in open(results):
    kind, name, run, payload = raw.rstrip("\n").split("\t", 3)
    if kind == "fio":
        try:
            job = json.load(open(payload))["jobs"][0]
            iops = float(job["write"]["iops"])
            lat = job.get("sync", {}).get("lat_ns", {})
            p50 = lat.get("percentile", {}).get("50.000000")
            fio[name] = (iops, int(job["write"]["total_ios"]), p50 / 1000 if p50 else None)
        except Exception as e:  # a broken run is reported, never fatal
            print(f"bench-repl: cannot parse fio {name}: {e}", file=sys.stderr)
    else:
        f = dict(kv.split("=", 1) for kv in payload.split()[1:])
        repl.setdefault(name, []).append(
            (float(f["ops_per_sec"]), int(f["fsyncs"]), int(f["total_ms"])))

def fmt(x, nd=0):
    return "n/a" if x is None else f"{x:,.{nd}f}"

print("== results")
if fio:
    print(f"{'raw disk (fio, 128 B writes)':<34} {'fdatasyncs/s':>13} {'writes':>8} {'sync p50 us':>12}")
    for name in ("append", "prelaid", "overwrite"):
        if name in fio:
            iops, n, p50 = fio[name]
            print(f"{'  fio ' + name:<34} {fmt(iops):>13} {n:>8} {fmt(p50, 1):>12}")
    print()

med = {}
print(f"{'kv repl (BENCH ' + str(ops) + ')':<34} {'median ops/s':>13} {'fsyncs':>8} {'ops/fsync':>10}   all runs (ops/s)")
for name, label in (("batch1", "SETBATCH 1"), ("batch5", "SETBATCH 5")):
    rows = repl.get(name, [])
    if not rows:
        print(f"{'  ' + label:<34} {'n/a':>13}")
        continue
    m = statistics.median(r[0] for r in rows)
    fs = statistics.median(r[1] for r in rows)
    med[name] = m
    runs = ", ".join(f"{r[0]:,.0f}" for r in rows)
    print(f"{'  ' + label:<34} {fmt(m):>13} {fmt(fs):>8} {fmt(ops / fs if fs else None, 1):>10}   {runs}")
print()

print("ratios")
b1, b5 = med.get("batch1"), med.get("batch5")
print(f"  batch5 / batch1                    {f'{b5 / b1:.2f}x' if b1 and b5 else 'n/a'}")
for name in ("append", "prelaid", "overwrite"):
    if name in fio and b1:
        note = {"append": "  (fair if the WAL appends to a growing file)",
                "overwrite": "  (fair if the WAL writes over preallocated, zero-filled blocks)"}.get(name, "")
        print(f"  batch1 / raw fdatasync ({name + ')':<10}  {100 * b1 / fio[name][0]:.0f}%{note}")
PY

finish
