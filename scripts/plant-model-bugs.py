#!/usr/bin/env python3
"""plant-model-bugs.py: shows what catches each bug class planted in the
consensus core.

For each plant it makes a fresh git worktree of a revision (HEAD by
default), applies the plant (exact text replacements in `cluster/src/`;
the script stops if a replacement's text is not there exactly once, so a
plant that no longer applies is never silently skipped), runs

    cargo test --release --no-fail-fast -p kv-cluster -- --nocapture --test-threads 1

(the core's unit tests, then the model checker's searches at the bounds
CI runs) and prints one row per plant: every test that failed, and the
first line of each counterexample the model printed. A plant that nothing
catches says so, and the script then exits non-zero. `none` plants
nothing, and that run must pass (the script stops if it does not); `all`
(the default) runs it first, then every plant. A run that fails without a
failing test (a plant that does not build, a test binary that dies) stops
the script too.

The worktrees share one target directory (`target/plants` by default), so
only the first build is a full one. Nothing is committed or left behind
but that directory.

Usage: scripts/plant-model-bugs.py [--rev REV] [--plants NAME,...] [--list]
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPLICA = "cluster/src/replica.rs"
RULES = "cluster/src/lib.rs"

# name -> (what is planted, [(file, text, replacement)])
PLANTS = {
    "vote-not-durable": (
        "vote reply released before the vote is durable",
        [
            (
                REPLICA,
                """        self.send(
            Message::VoteReply {
                to: req.from,
                reply,
            },
            ready,
        );
    }

    fn vote_reply(""",
                """        ready.messages.push(Gated {
            msg: Message::VoteReply {
                to: req.from,
                reply,
            },
            hard_state: 0,
            log: 0,
        });
    }

    fn vote_reply(""",
            )
        ],
    ),
    "majority-half": (
        "a majority of n/2",
        [(REPLICA, "self.members.len() / 2 + 1", "self.members.len() / 2")],
    ),
    "second-vote": (
        "a second vote in a term",
        [
            (
                REPLICA,
                "self.hard.voted_for.filter(|v| *v != req.from)",
                "self.hard.voted_for.filter(|_| false)",
            )
        ],
    ),
    "no-up-to-date": (
        "votes without the log up-to-date check",
        [
            (
                REPLICA,
                "if (req.last_term, req.last_lsn) < (last_term, last_lsn) {",
                "if (req.last_term, req.last_lsn) < (last_term, last_lsn) && false {",
            )
        ],
    ),
    "no-prev-term": (
        "appends without the prev-term check",
        [(RULES, "if ours != Some(req.prev_term) {", "if ours.is_none() {")],
    ),
    "ack-replaced": (
        "a write acknowledged after its record was replaced",
        [
            (
                REPLICA,
                "Some(by) => WriteStatus::Replaced { by },",
                "Some(_) => WriteStatus::Acknowledged,",
            )
        ],
    ),
    "read-in-transfer": (
        "lease reads while a transfer is under way",
        [
            (
                REPLICA,
                "if let Some(t) = &self.transfer {\n            return Verdict::Refused(Refused::Transferring",
                "if let Some(t) = self.transfer.as_ref().filter(|_| !read) {\n            return Verdict::Refused(Refused::Transferring",
            )
        ],
    ),
    "vote-despite-leader": (
        "votes granted while a leader was heard recently",
        [
            (
                REPLICA,
                "|| now.saturating_sub(self.heard) < self.config.election_timeout)",
                "|| (now.saturating_sub(self.heard) < self.config.election_timeout && false))",
            )
        ],
    ),
    "lease-from-answer": (
        "the lease counted from the answer, not the send",
        [
            (
                REPLICA,
                "peer.acked_sent = Some(peer.acked_sent.map_or(sent.at, |t| t.max(sent.at)));",
                "peer.acked_sent = Some(peer.acked_sent.map_or(now, |t| t.max(now)));",
            )
        ],
    ),
    "old-term-commit": (
        "an older term's record committed by count",
        [
            (
                RULES,
                "if majority > current_commit && term_at(majority) == Some(current_term) {",
                "if majority > current_commit && term_at(majority).is_some() {",
            )
        ],
    ),
    "commit-past-vouched": (
        "a follower's commit past what the leader vouched for",
        [
            (
                REPLICA,
                "let commit = self.leader_commit.min(self.vouched).min(durable);",
                "let commit = self.leader_commit.min(durable);",
            )
        ],
    ),
}


def sh(args, cwd, **kw):
    return subprocess.run(args, cwd=cwd, check=True, **kw)


def apply(tree, edits):
    for path, old, new in edits:
        full = os.path.join(tree, path)
        with open(full) as f:
            text = f.read()
        n = text.count(old)
        if n != 1:
            sys.exit(f"plant does not apply: {path} holds {n} copies of:\n{old}")
        with open(full, "w") as f:
            f.write(text.replace(old, new))


def run(tree, target, timeout):
    env = dict(os.environ, CARGO_TARGET_DIR=target)
    started = time.monotonic()
    try:
        out = subprocess.run(
            [
                "cargo", "test", "--release", "--no-fail-fast", "-p", "kv-cluster",
                "--", "--nocapture", "--test-threads", "1",
            ],
            cwd=tree,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        partial = e.stdout or b""
        if isinstance(partial, bytes):
            partial = partial.decode(errors="replace")
        sys.exit(f"cargo test took more than {timeout} s in {tree}:\n{partial[-3000:]}")
    return out.returncode, out.stdout, time.monotonic() - started


def findings(output):
    """The failed tests, and each model counterexample's first line."""
    # Each test binary's summary lists its failures, one per line.
    failed = []
    for block in re.findall(r"^failures:\n((?:    \S+\n)+)", output, re.M):
        failed += block.split()
    found = re.findall(
        r"model (\w+): property \"([^\"]+)\" fails after (\d+) steps", output
    )
    return failed, found


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", default="HEAD")
    ap.add_argument("--plants", default="all", help="comma-separated names (none: no plant), or all")
    ap.add_argument("--target", default="target/plants")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--log-dir", help="keep each run's output here")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per cargo test run")
    a = ap.parse_args()
    if a.list:
        for name, (what, _) in PLANTS.items():
            print(f"{name:22} {what}")
        return
    top = subprocess.run(
        ["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True
    ).stdout.strip()
    names = ["none"] + list(PLANTS) if a.plants == "all" else a.plants.split(",")
    for n in names:
        if n != "none" and n not in PLANTS:
            sys.exit(f"no plant {n!r}; --list shows them")
    target = os.path.abspath(os.path.join(top, a.target))
    # Every plant goes into the same commit, even if the branch moves.
    rev = subprocess.run(
        ["git", "rev-parse", "--verify", a.rev + "^{commit}"],
        cwd=top, capture_output=True, text=True, check=True,
    ).stdout.strip()
    rows = []
    for name in names:
        tree = tempfile.mkdtemp(prefix=f"kv-plant-{name}-")
        try:
            sh(["git", "worktree", "add", "--detach", "-q", tree, rev], cwd=top)
            what = "nothing planted"
            if name != "none":
                what, edits = PLANTS[name]
                apply(tree, edits)
            code, output, secs = run(tree, target, a.timeout)
            if a.log_dir:
                os.makedirs(a.log_dir, exist_ok=True)
                with open(os.path.join(a.log_dir, f"{name}.log"), "w") as f:
                    f.write(output)
            failed, found = findings(output)
            if code != 0 and not failed:
                # A build error, or a test binary that died without its
                # summary: not a catch.
                sys.exit(f"{name}: cargo test failed without a test failing:\n{output[-3000:]}")
            if name == "none" and code != 0:
                sys.exit(f"the unplanted run fails ({', '.join(failed)}): plants prove nothing")
            rows.append((name, what, failed, found))
            caught = "every test passes" if name == "none" else "; ".join(failed) or "NOT CAUGHT"
            print(f"{name}: exit {code}, {secs:.0f} s: {caught}", flush=True)
            for search, prop, steps in found:
                print(f"    model {search}: \"{prop}\" after {steps} steps", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", tree], cwd=top)
            shutil.rmtree(tree, ignore_errors=True)
    print()
    print("| planted | caught by | model counterexample |")
    print("|---|---|---|")
    for name, what, failed, found in rows:
        if name == "none":
            continue
        caught = ", ".join(f"`{f}`" for f in failed) if failed else "**not caught**"
        cex = "; ".join(f'{s}: "{p}" after {n} steps' for s, p, n in found) or "-"
        print(f"| {what} | {caught} | {cex} |")
    missed = [name for name, _, failed, _ in rows if name != "none" and not failed]
    if missed:
        sys.exit(f"not caught: {', '.join(missed)}")


if __name__ == "__main__":
    main()
