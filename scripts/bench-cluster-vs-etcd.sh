#!/usr/bin/env bash
# bench-cluster-vs-etcd.sh: replicated writes from C concurrent clients, kv's
# 3-node cluster against a 3-member etcd cluster, both on 127.0.0.1, same
# workload, interleaved. See usage() or run with -h.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/bench-cluster-vs-etcd.sh [options]

Starts, on 127.0.0.1 only and with data under a fresh temporary directory:
  * a 3-member etcd cluster (Debian's etcd-server, default durability: the
    WAL is fsynced on every commit; client ports 23791-23793, peer ports
    23801-23803, static initial cluster), waited on with
    `etcdctl endpoint health`;
  * a 3-node kv cluster (`kv serve`, client ports 27001-27003, peer ports
    27101-27103, an elected leader, default ack level quorum), waited on
    with `kv status`.
With --tls, both run with TLS on every connection, from one CA that
`kv certs init` makes: clients verify the servers' certificates, peers use
mutual TLS (etcd: --cert-file/--key-file, --peer-cert-file/--peer-key-file,
--peer-trusted-ca-file, --peer-client-cert-auth; kv: a [tls] table).
Then for each client count C (the order of the runs rotates from one
count, and run, to the next, so all see the same machine state):
  kv bench cluster --endpoints 127.0.0.1:27001,... --clients C --ops N
                   --key-size 16 --value-size 100 --api API --json
                   (once per API in --kv-api: batch, unary)
  etcd-bench       --endpoints 127.0.0.1:23791,... --clients C --ops N
                   --key-size 16 --value-size 100 --json
All send every write to their leader, C clients each waiting for its write
before sending the next, one HTTP/2 connection per 32 clients, the same keys.
kv's clients send their writes either as messages of one `Kv.Batch` stream
per connection (`batch`: kv's client for many callers) or as one unary
`Kv.Put` call each (`unary`, as etcd's clients do with `Put`).
Prints one table (ops/s, p50/p99 latency of each, the servers' CPU time per
write: user + system time of the three server processes over the run,
divided by its writes; ratios kv/etcd), writes an SVG plot of ops/s against
clients, and stops every process it started.

etcd-bench (bench/etcd-bench, a standalone Cargo project outside the
workspace) is built into target/etcd-bench; its etcd-client dependency
compiles protos, with the protoc vendored by the protoc-bin-vendored crate
in the cargo registry (run `cargo build -p kv-proto` once if it is missing).

Options:
  -c, --clients LIST   comma-separated client counts (default 1,16,64,256)
  -o, --ops N          total writes per client count, per system (default 20000)
  -r, --runs R         repeat everything R times, report medians (default 1)
  -d, --dir DIR        put the temporary data under DIR, which decides the disk
                       (default: ./kv-bench-data in the repository; created
                       and removed by the script if it did not exist)
      --plot FILE      where to write the SVG plot
                       (default: bench-results/cluster-vs-etcd.svg)
      --no-plot        write no plot
      --kv-api LIST    kv client APIs to run, comma-separated (default
                       batch,unary)
      --no-kv          run etcd only (e.g. before `kv bench cluster` exists)
      --kv PATH        the kv binary to run (default: target/release/kv,
                       built first); for an A/B, run the script once per
                       binary, alternating
      --tls            TLS on every connection of both systems (see above)
      --single-port    kv nodes without a peer listener (replication on the
                       client port), as kv binaries before peer_listen
                       need for an A/B
  -h, --help           this text

Needs: python3, etcd and etcdctl (apt-get install -y etcd-server etcd-client).
Timings never make it fail; it exits 1 only if a run produced no result, 2 if
it could not set up.
EOF
}

NAME=bench-cluster-vs-etcd
CMD_QUOTING=minimal   # show_cmd leaves the commas of endpoint lists unescaped
# die, warn, abspath, ROOT (and cd there), show_cmd, make_work_dir, finish, ...
# shellcheck source=lib/common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/common.sh"

CLIENTS=1,16,64,256
OPS=20000
RUNS=1
PARENT="$ROOT/kv-bench-data"
PLOT="$ROOT/bench-results/cluster-vs-etcd.svg"
USE_KV=1
KV_APIS=batch,unary
KV_GIVEN=""
TLS=0
SINGLE_PORT=0

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        -c|--clients) CLIENTS=${2:?}; shift 2 ;;
        -o|--ops) OPS=${2:?}; shift 2 ;;
        -r|--runs) RUNS=${2:?}; shift 2 ;;
        -d|--dir) PARENT=$(abspath "${2:?}"); shift 2 ;;
        --plot) PLOT=$(abspath "${2:?}"); shift 2 ;;
        --no-plot) PLOT=""; shift ;;
        --kv-api) KV_APIS=${2:?}; shift 2 ;;
        --no-kv) USE_KV=0; shift ;;
        --kv) KV_GIVEN=$(abspath "${2:?}"); shift 2 ;;
        --tls) TLS=1; shift ;;
        --single-port) SINGLE_PORT=1; shift ;;
        *) usage >&2; die "unknown argument '$1'" ;;
    esac
done
positive_int_list --clients "$CLIENTS" 1,16,64,256
positive_int --ops "$OPS"
positive_int --runs "$RUNS"
IFS=, read -r -a CLIST <<<"$CLIENTS"
IFS=, read -r -a KV_API_LIST <<<"$KV_APIS"
for api in "${KV_API_LIST[@]}"; do
    [[ $api == batch || $api == unary ]] || { usage >&2; die "--kv-api: '$api' is neither batch nor unary"; }
done

# Loopback only: every address below is 127.0.0.1.
HOST=127.0.0.1
ETCD_CLIENT_PORTS=(23791 23792 23793)
ETCD_PEER_PORTS=(23801 23802 23803)
KV_PORTS=(27001 27002 27003)
KV_PEER_PORTS=(27101 27102 27103)
join() { local IFS=,; printf '%s\n' "$*"; }
ETCD_ENDPOINTS=$(join "${ETCD_CLIENT_PORTS[@]/#/$HOST:}")
KV_ENDPOINTS=$(join "${KV_PORTS[@]/#/$HOST:}")

# --- tools -------------------------------------------------------------------
need_python3
# etcd reads ETCD_* variables as flags, etcdctl ETCDCTL_*: none may leak in.
while read -r v; do unset "$v"; done < <(compgen -e | grep -E '^ETCD(CTL)?_' || true)
export ETCDCTL_API=3
for tool in etcd etcdctl; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        cat >&2 <<EOF
$NAME: $tool is not installed.
  Install it with:   apt-get install -y etcd-server etcd-client
EOF
        exit 2
    fi
done

TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
KV="${KV_GIVEN:-$TARGET_DIR/release/kv}"
ETCD_BENCH="$TARGET_DIR/etcd-bench/release/etcd-bench"

if [[ $USE_KV == 1 ]]; then
    if [[ -z $KV_GIVEN ]]; then
        echo "+ cargo build --release --bin kv"
        cargo build --release --bin kv || die "building kv failed"
    fi
    "$KV" bench cluster --help >/dev/null 2>&1 ||
        die "$KV has no 'bench cluster' subcommand yet; run with --no-kv to bench etcd alone"
fi

# etcd-client's build script compiles etcd's protos: it needs protoc, which
# the protoc-bin-vendored crate (a kv-proto build dependency) ships.
if [[ -z ${PROTOC:-} ]]; then
    PROTOC=$(ls -1 "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/protoc-bin-vendored-linux-x86_64-*/bin/protoc \
        2>/dev/null | sort -V | tail -n1 || true)
    if [[ -z $PROTOC ]]; then
        cat >&2 <<EOF
$NAME: no vendored protoc found under ${CARGO_HOME:-$HOME/.cargo}/registry/src/*/protoc-bin-vendored-linux-x86_64-*/bin/protoc
  Fetch it with:   cargo build -p kv-proto
  (or set PROTOC to a protoc binary).
EOF
        exit 2
    fi
fi
[[ -x $PROTOC ]] || die "PROTOC=$PROTOC is not an executable file"
export PROTOC
echo "+ PROTOC=$PROTOC cargo build --release --manifest-path bench/etcd-bench/Cargo.toml --target-dir $TARGET_DIR/etcd-bench"
cargo build --release --manifest-path bench/etcd-bench/Cargo.toml --target-dir "$TARGET_DIR/etcd-bench" ||
    die "building etcd-bench failed"

# Every port must be free on 127.0.0.1 (a stale cluster would be benched instead).
python3 - "$HOST" "${ETCD_CLIENT_PORTS[@]}" "${ETCD_PEER_PORTS[@]}" "${KV_PORTS[@]}" "${KV_PEER_PORTS[@]}" <<'PY' ||
import socket, sys
host, busy = sys.argv[1], []
for p in map(int, sys.argv[2:]):
    s = socket.socket()
    # As the servers do: connections of a previous run in TIME_WAIT don't count.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, p))
    except OSError:
        busy.append(p)
    finally:
        s.close()
if busy:
    print("ports in use on %s: %s" % (host, " ".join(map(str, busy))), file=sys.stderr)
    sys.exit(1)
PY
    die "stop whatever listens there first"

# --- work directory, and stopping everything on exit ----------------------------------
PIDS=()     # every server process this script started
ETCD_PIDS=() KV_PIDS=()  # the same, by system (for their CPU time)
BENCH_PID=""  # the benchmark client running now, if any
make_work_dir "$NAME"   # RESULTS: system <TAB> clients <TAB> run <TAB> servers' CPU s <TAB> file
mkdir -p "$WORK/logs"

alive() { # pid: running (a zombie child counts as gone)
    local s
    s=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ $s != Z* ]]
}

stop_servers() {
    local pid i
    ((${#PIDS[@]})) || return 0
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for ((i = 0; i < 100; i++)); do # up to 10 s for a clean stop
        local any=0
        for pid in "${PIDS[@]}"; do if alive "$pid"; then any=1; fi; done
        ((any)) || break
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do
        if alive "$pid"; then
            warn "pid $pid did not stop on SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
}

cleanup() {
    if [[ -n $BENCH_PID ]]; then
        kill -TERM "$BENCH_PID" 2>/dev/null || true
        wait "$BENCH_PID" 2>/dev/null || true
    fi
    stop_servers
    work_cleanup
}

show_logs() { # prints the tail of every server log (before they are removed)
    local f
    for f in "$WORK"/logs/*.log; do
        [[ -e $f ]] || continue
        echo "--- $f (last 15 lines)" >&2
        tail -n 15 "$f" >&2 || true
    done
}

start_server() { # log-name command...: starts it in the background
    local log="$WORK/logs/$1.log"
    shift
    show_cmd "$@"
    "$@" >"$log" 2>&1 &
    PIDS+=("$!")
}

cpu_ticks() { # pid...: their user + system time so far, in clock ticks
    local pid total=0 f stat
    for pid in "$@"; do
        # Fields 14 and 15 of /proc/<pid>/stat (after the parenthesised name).
        f=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null) || continue
        read -r -a stat <<<"$f"
        total=$((total + stat[11] + stat[12]))
    done
    echo "$total"
}
CLK_TCK=$(getconf CLK_TCK)

# --- TLS: one CA for both systems -----------------------------------------------------
SCHEME=http
CERTS=""
KV_TLS_ARGS=()
ETCD_TLS_ARGS=()
((TLS && SINGLE_PORT)) && die "--tls needs a peer listener: it cannot go with --single-port"
if ((TLS)); then
    [[ -x $KV ]] || die "--tls needs the kv binary for its certificates (kv certs init): $KV"
    SCHEME=https
    CERTS="$WORK/certs"
    # `kv certs init` makes them (ECDSA P-256, SAN 127.0.0.1); etcd reads the
    # same files.
    show_cmd "$KV" certs init --out "$CERTS" --nodes 3 --clients admin --hosts "$HOST"
    "$KV" certs init --out "$CERTS" --nodes 3 --clients admin --hosts "$HOST" >/dev/null ||
        die "kv certs init failed"
    KV_TLS_ARGS=(--cacert "$CERTS/ca.pem")
    ETCD_TLS_ARGS=(--cacert "$CERTS/ca.pem")
fi

echo
echo "$NAME: $(etcd --version | head -n1) ($(etcd --version | grep -m1 'Go Version' || true)), $(etcdctl version | head -n1)"
if [[ $USE_KV == 1 ]]; then echo "$NAME: $("$KV" --version)"; fi
echo "$NAME: $("$ETCD_BENCH" --version)"
echo_work_dir
echo "$NAME: $(nproc) CPUs, kernel $(uname -r); clients $CLIENTS, $OPS writes per run, $RUNS run(s)$( ((TLS)) && echo ", TLS on every connection")"
echo

# --- etcd cluster -----------------------------------------------------------------------
echo "== starting etcd (3 members on $HOST)"
INITIAL_CLUSTER=""
for i in 0 1 2; do
    INITIAL_CLUSTER+="${INITIAL_CLUSTER:+,}etcd$((i + 1))=$SCHEME://$HOST:${ETCD_PEER_PORTS[i]}"
done
for i in 0 1 2; do
    n=$((i + 1))
    etcd_tls=()
    if ((TLS)); then
        etcd_tls=(--cert-file "$CERTS/node$n.pem" --key-file "$CERTS/node$n-key.pem"
            --peer-cert-file "$CERTS/node$n.pem" --peer-key-file "$CERTS/node$n-key.pem"
            --peer-trusted-ca-file "$CERTS/ca.pem" --peer-client-cert-auth)
    fi
    start_server "etcd$n" etcd --name "etcd$n" --data-dir "$WORK/etcd$n" \
        --listen-client-urls "$SCHEME://$HOST:${ETCD_CLIENT_PORTS[i]}" \
        --advertise-client-urls "$SCHEME://$HOST:${ETCD_CLIENT_PORTS[i]}" \
        --listen-peer-urls "$SCHEME://$HOST:${ETCD_PEER_PORTS[i]}" \
        --initial-advertise-peer-urls "$SCHEME://$HOST:${ETCD_PEER_PORTS[i]}" \
        --initial-cluster "$INITIAL_CLUSTER" \
        --initial-cluster-token "$NAME" --initial-cluster-state new \
        "${etcd_tls[@]}" \
        --logger zap --log-outputs stderr
    ETCD_PIDS+=("${PIDS[-1]}")
done
ETCDCTL_ENDPOINTS=$(join "${ETCD_CLIENT_PORTS[@]/#/$SCHEME://$HOST:}")
show_cmd etcdctl --endpoints "$ETCDCTL_ENDPOINTS" "${ETCD_TLS_ARGS[@]}" endpoint health
ok=0
for ((i = 0; i < 60; i++)); do # up to 30 s
    if etcdctl --endpoints "$ETCDCTL_ENDPOINTS" "${ETCD_TLS_ARGS[@]}" --dial-timeout 1s --command-timeout 2s \
        endpoint health >"$WORK/etcd-health.out" 2>&1; then
        ok=1
        break
    fi
    sleep 0.5
done
if ((ok == 0)); then
    warn "the etcd cluster did not become healthy within 30 s:"
    cat "$WORK/etcd-health.out" >&2 || true
    show_logs
    exit 2
fi
sed 's/^/  /' "$WORK/etcd-health.out"

# --- kv cluster --------------------------------------------------------------------------
if [[ $USE_KV == 1 ]]; then
    echo
    echo "== starting kv (3 nodes on $HOST, electing their leader)"
    for i in 0 1 2; do
        n=$((i + 1))
        # Like configs/node$n.toml (configs/tls/ with --tls), on other ports
        # and data directories.
        cat >"$WORK/node$n.toml" <<EOF
# Written by scripts/$NAME.sh: configs/node$n.toml on ports ${KV_PORTS[*]}.
cluster_id = "kv-bench"
node_id = $n
listen = "$HOST:${KV_PORTS[i]}"
peer_listen = "$HOST:${KV_PEER_PORTS[i]}"
data_dir = "$WORK/kv$n"

[[members]]
id = 1
addr = "$HOST:${KV_PORTS[0]}"
peer_addr = "$HOST:${KV_PEER_PORTS[0]}"

[[members]]
id = 2
addr = "$HOST:${KV_PORTS[1]}"
peer_addr = "$HOST:${KV_PEER_PORTS[1]}"

[[members]]
id = 3
addr = "$HOST:${KV_PORTS[2]}"
peer_addr = "$HOST:${KV_PEER_PORTS[2]}"
EOF
        if ((SINGLE_PORT)); then
            sed -i -e '/^peer_listen = /d' -e '/^peer_addr = /d' "$WORK/node$n.toml"
        fi
        if ((TLS)); then
            cat >>"$WORK/node$n.toml" <<EOF

[tls]
ca = "$CERTS/ca.pem"
cert = "$CERTS/node$n.pem"
key = "$CERTS/node$n-key.pem"
EOF
        fi
        start_server "kv$n" "$KV" serve --config "$WORK/node$n.toml"
        KV_PIDS+=("${PIDS[-1]}")
    done
    show_cmd "$KV" status --endpoints "$KV_ENDPOINTS" "${KV_TLS_ARGS[@]}"
    ok=0
    for ((i = 0; i < 60; i++)); do # up to 30 s
        # Every node answers, and one of them was elected leader.
        if "$KV" status --endpoints "$KV_ENDPOINTS" "${KV_TLS_ARGS[@]}" --timeout-ms 1000 >"$WORK/kv-status.out" 2>&1 &&
            awk 'NR > 1 && $2 == "leader" { found = 1 } END { exit !found }' "$WORK/kv-status.out"; then
            ok=1
            break
        fi
        sleep 0.5
    done
    if ((ok == 0)); then
        warn "the kv cluster did not answer kv status with a leader within 30 s:"
        cat "$WORK/kv-status.out" >&2 || true
        show_logs
        exit 2
    fi
    sed 's/^/  /' "$WORK/kv-status.out"
fi
echo

# --- the runs ----------------------------------------------------------------------------
bench_run() { # system (kv-batch, kv-unary or etcd) clients run
    local system=$1 c=$2 run=$3
    local out="$WORK/$system-c$c-r$run.out"
    local cmd servers
    if [[ $system == kv-* ]]; then
        cmd=("$KV" bench cluster --endpoints "$KV_ENDPOINTS" --api "${system#kv-}" "${KV_TLS_ARGS[@]}")
        servers=("${KV_PIDS[@]}")
    else
        cmd=("$ETCD_BENCH" --endpoints "$ETCD_ENDPOINTS" "${ETCD_TLS_ARGS[@]}")
        servers=("${ETCD_PIDS[@]}")
    fi
    local cpu0 cpu
    cpu0=$(cpu_ticks "${servers[@]}")
    cmd+=(--clients "$c" --ops "$OPS" --key-size 16 --value-size 100 --json)
    show_cmd "${cmd[@]}"
    # In the background, so that a signal to this script is acted on at once
    # (bash runs traps only between commands; `wait` is interruptible).
    "${cmd[@]}" >"$out" 2>"$out.err" &
    BENCH_PID=$!
    local rc=0
    wait "$BENCH_PID" || rc=$?
    BENCH_PID=""
    cpu=$(($(cpu_ticks "${servers[@]}") - cpu0))
    if ((rc == 0)); then
        local line
        line=$(grep '^{' "$out" | tail -n1 || true)
        if [[ -n $line ]]; then
            echo "  $line (servers' CPU: $cpu ticks of 1/$CLK_TCK s)"
            printf '%s\t%s\t%s\t%s\t%s\n' "$system" "$c" "$run" \
                "$(awk -v t="$cpu" -v hz="$CLK_TCK" 'BEGIN { printf "%.6f", t / hz }')" "$out" >>"$RESULTS"
            return
        fi
    fi
    warn "$system (clients $c, run $run) produced no result:"
    # The error, without the backtrace RUST_BACKTRACE=1 would append.
    { tail -n 3 "$out"; sed -e '/^Stack backtrace:/,$d' "$out.err" | head -n 12; } >&2 || true
    FAILED=1
}

echo "== runs"
SYSTEMS=()
if [[ $USE_KV == 1 ]]; then SYSTEMS+=("${KV_API_LIST[@]/#/kv-}"); fi
SYSTEMS+=(etcd)
step=0
for ((run = 1; run <= RUNS; run++)); do
    for c in "${CLIST[@]}"; do
        # Rotate who goes first, so no system always runs on a cooler machine.
        n=${#SYSTEMS[@]}
        for ((i = 0; i < n; i++)); do
            bench_run "${SYSTEMS[(step + i) % n]}" "$c" "$run"
        done
        step=$((step + 1))
    done
done
if ((FAILED)); then show_logs; fi
stop_servers
echo

# --- report ---------------------------------------------------------------------------
python3 - "$LIB" "$RESULTS" "$CLIENTS" "$OPS" "$PLOT" "$TLS" <<'PY' || { warn "could not summarise the results"; FAILED=1; }
import json, statistics, sys

sys.dont_write_bytecode = True  # no __pycache__ in scripts/lib
sys.path.insert(0, sys.argv[1])
from svg_plot import line_plot

results, clients, ops, plot, tls = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6] == "1"
clients = [int(c) for c in clients.split(",")]
rows = {}  # system -> clients -> [row per run]

for raw in open(results):
    system, c, run, cpu_s, path = raw.rstrip("\n").split("\t", 4)
    try:
        line = [l for l in open(path).read().splitlines() if l.startswith("{")][-1]
        r = json.loads(line)
        rows.setdefault(system, {}).setdefault(int(c), []).append(
            dict(ops_s=float(r["ops_per_sec"]), p50=float(r["p50_us"]), p99=float(r["p99_us"]),
                 cpu_us=float(cpu_s) * 1e6 / max(int(r["ops"]), 1)))
    except Exception as e:  # one unreadable run is reported, never fatal
        print(f"cannot parse {path}: {e}", file=sys.stderr)

def med(rs, key):
    xs = [r[key] for r in rs if r.get(key) is not None]
    return statistics.median(xs) if xs else None

def fmt(x, nd=0):
    return "n/a" if x is None else f"{x:,.{nd}f}"

def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "n/a"

systems = [s for s in ("kv-batch", "kv-unary", "etcd") if s in rows]
kvs = [s for s in systems if s != "etcd"]
mode = "TLS on every connection" if tls else "plaintext"
print(f"== results ({ops} writes of 16 B key + 100 B value per run, to the leader of 3, {mode}; medians over runs)")
print("(cpu us/w: user + system CPU time of the 3 server processes during the run, per write)")
print(f"{'clients':>7}" + "".join(f"  {s + ' ops/s':>14} {'p50 us':>8} {'p99 us':>8} {'cpu us/w':>8}" for s in systems))
series = {s: [] for s in systems}
for c in clients:
    line = f"{c:>7}"
    for s in systems:
        rs = rows[s].get(c, [])
        series[s].append(med(rs, "ops_s"))
        line += f"  {fmt(med(rs, 'ops_s')):>14} {fmt(med(rs, 'p50')):>8} {fmt(med(rs, 'p99')):>8} {fmt(med(rs, 'cpu_us'), 1):>8}"
    print(line)
if "etcd" in rows and kvs:
    print()
    print(f"{'clients':>7}" + "".join(f"  {k + '/etcd ops/s':>20} {'p99':>6}" for k in kvs))
    for c in clients:
        e = rows["etcd"].get(c, [])
        line = f"{c:>7}"
        for k in kvs:
            rs = rows[k].get(c, [])
            line += f"  {ratio(med(rs, 'ops_s'), med(e, 'ops_s')):>20} {ratio(med(rs, 'p99'), med(e, 'p99')):>6}"
        print(line)
    print("(ops/s ratio above 1: kv is faster; p99 ratio below 1: kv's tail is shorter)")

if plot:
    # ops/s (linear y) against clients (log2 x).
    title = f"replicated writes, 3 nodes on 127.0.0.1{', TLS' if tls else ''}: ops/s vs clients ({ops} x 16 B key + 100 B value)"
    colours = {"kv-batch": "#1f77b4", "kv-unary": "#2ca02c", "etcd": "#d62728"}
    line_plot(plot, title, clients, series, {s: colours[s] for s in systems},
              "concurrent clients (log scale)", log_x=True, margin_right=30, title_size=13)
PY

finish
