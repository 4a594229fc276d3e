# scripts/lib/common.sh: helpers shared by the scripts/bench-*.sh scripts.
#
# Sourced, never run. Before sourcing, a script sets NAME (the prefix of its
# messages) and, optionally, CMD_QUOTING=minimal (see show_cmd). Sourcing it
# records the caller's working directory (ORIG_PWD), finds the repository root
# (ROOT, from this file's own path, so the scripts run from any cwd) and cd's
# there. Everything else is a function, called by the script where it needs it.

die() { echo "$NAME: $*" >&2; exit 2; }
warn() { echo "$NAME: $*" >&2; }

ORIG_PWD=$PWD
abspath() { case $1 in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$ORIG_PWD/$1" ;; esac; }
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
LIB="$ROOT/scripts/lib"
cd "$ROOT"

# --- argument checks -------------------------------------------------------------
positive_int() { # option value
    [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer (got '$2')"
}

positive_int_list() { # option value example: a comma-separated list of them
    [[ $2 =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || die "$1 must look like $3 (got '$2')"
}

need_python3() {
    command -v python3 >/dev/null 2>&1 || die "python3 is needed to parse results"
}

# --- the kv binary ------------------------------------------------------------------
# Uses KV (empty: the release build in the target directory) and REBUILD (1:
# run cargo build even if the binary exists); sets KV to the binary's path.
ensure_kv() {
    if [[ -z $KV ]]; then
        KV="${CARGO_TARGET_DIR:-$ROOT/target}/release/kv"
        if [[ $REBUILD == 1 || ! -x $KV ]]; then
            echo "+ cargo build --release --bin kv"
            cargo build --release --bin kv
        fi
    fi
    [[ -x $KV ]] || die "kv binary not found or not executable: $KV"
}

# --- work directory -----------------------------------------------------------------
# make_work_dir PREFIX: creates PARENT if it does not exist (and then removes it
# again on exit if it is empty), a fresh WORK=$PARENT/PREFIX.XXXXXX in it, and
# RESULTS (an empty $WORK/results.tsv, one line per run); empties COMMANDS and
# FAILED. On EXIT the trap runs `cleanup`, which by default is work_cleanup; a
# script with more to undo defines its own cleanup that ends with work_cleanup.
make_work_dir() {
    CREATED_PARENT=0
    if [[ ! -d $PARENT ]]; then
        mkdir -p "$PARENT"
        CREATED_PARENT=1
    fi
    WORK=$(mktemp -d "$PARENT/$1.XXXXXX")
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    RESULTS="$WORK/results.tsv"
    : >"$RESULTS"
    COMMANDS=()
    FAILED=0
}

work_cleanup() {
    rm -rf -- "$WORK"
    if [[ $CREATED_PARENT == 1 ]]; then rmdir -- "$PARENT" 2>/dev/null || true; fi
}

cleanup() { work_cleanup; }

# Prints "NAME: data under WORK (device mounted on mountpoint)".
echo_work_dir() {
    echo "$NAME: data under $WORK ($(df -P "$WORK" | awk 'NR==2 {print $1 " mounted on " $6}'))"
}

# --- commands -------------------------------------------------------------------------
record_cmd() { # prints an already-quoted command line and remembers it for the summary
    echo "+ $1"
    COMMANDS+=("$1")
}

# show_cmd command...: prints the command line, shell-quoted, and remembers it.
# Every word goes through printf %q, unless CMD_QUOTING=minimal: then only words
# with characters outside [A-Za-z0-9_./:=,@%+-] do (so commas stay unescaped).
show_cmd() {
    local s="" a
    if [[ ${CMD_QUOTING:-} == minimal ]]; then
        for a in "$@"; do
            if [[ $a =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then s+=" $a"; else s+=" $(printf '%q' "$a")"; fi
        done
        s=${s# }
    else
        s=$(printf '%q ' "$@")
        s=${s% }
    fi
    record_cmd "$s"
}

# Prints the commands used and exits with FAILED.
finish() {
    echo
    echo "== commands used"
    local c
    for c in "${COMMANDS[@]}"; do echo "  $c"; done
    exit "$FAILED"
}
