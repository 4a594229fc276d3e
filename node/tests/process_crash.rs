//! A real-process crash test: `kv repl` (the real binary, on a real data
//! directory) is driven through its stdin and killed with SIGKILL at random
//! moments — between writes, with one write in flight, with a pipeline of
//! writes in flight, in sync mode and in batch mode — then restarted on the
//! same directory, round after round, so recovery after recovery is
//! exercised.
//!
//! After every restart it checks, with `GET` and `SIZE`:
//! - every acknowledged write is there with its exact value (in sync mode an
//!   `OK` comes after fdatasync; in batch mode after the write was handed to
//!   the OS, which survives a process kill, and a `FLUSH` covers everything
//!   before it in any case);
//! - a write in flight at the kill is either fully there or fully absent, and
//!   the in-flight writes that survived are a prefix of the order they were
//!   sent in (recovery keeps a prefix of the log);
//! - nothing else is there (`SIZE` is exact).
//!
//! Small segments and a small automatic snapshot threshold make segment
//! rotation and snapshots happen (and get killed) too. The run is
//! deterministic for a seed, up to timing; set `KV_CRASH_SEED` to replay
//! another one.

// In a test, a failed `expect` is a test failure that names its reason.
#![allow(clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Rounds of write, kill, restart, verify.
const ROUNDS: u64 = 100;
/// Default base seed (override with `KV_CRASH_SEED`, decimal or 0x-hex).
const BASE_SEED: u64 = 0x6b76_2d6b_696c_6c39;
/// Engine options: small segments and frequent automatic snapshots, so kills
/// also land around segment rotation and snapshotting.
const KV_ARGS: &[&str] = &[
    "--segment-bytes-max",
    "8192",
    "--snapshot-wal-bytes",
    "32768",
];
/// Longest a reply may take before the test calls the REPL hung.
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);
/// GETs sent before reading their replies (bounded so neither pipe fills).
const GET_PIPELINE: usize = 64;

/// xorshift64*: deterministic for a seed, no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0; the bias is irrelevant here).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }
}

/// A running `kv repl` with piped stdin, stdout and stderr.
struct Kv {
    child: Child,
    stdin: ChildStdin,
    /// Reply lines, read by a thread so a hung REPL fails the test instead
    /// of hanging it.
    replies: Receiver<String>,
    /// Everything on stderr after the `kv: opened` line.
    stderr: Arc<Mutex<String>>,
    /// The `kv: opened ...` line.
    opened: String,
}

impl Kv {
    /// Starts `kv repl` on `dir` and waits for its recovery summary on
    /// stderr (which must be printed on every start).
    fn start(dir: &Path, ctx: &str) -> Kv {
        // The piped stdin, held in `Kv`, is also the REPL's lifeline: if
        // this test process dies, even by SIGKILL, the REPL reads EOF and
        // exits (see `common/process.rs`).
        let mut child = Command::new(env!("CARGO_BIN_EXE_kv"))
            .arg("repl")
            .arg("--data-dir")
            .arg(dir)
            .args(KV_ARGS)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kv repl");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stderr = BufReader::new(child.stderr.take().expect("piped stderr"));

        let mut before = String::new();
        let opened = loop {
            let mut line = String::new();
            let n = stderr.read_line(&mut line).expect("read kv stderr");
            if n == 0 {
                let status = child.wait().expect("wait kv");
                panic!(
                    "{ctx}: kv repl exited ({status}) without printing `kv: opened`; \
                     stderr:\n{before}"
                );
            }
            if line.starts_with("kv: opened") {
                break line.trim_end().to_owned();
            }
            before.push_str(&line);
        };
        let rest = Arc::new(Mutex::new(before));
        let sink = rest.clone();
        thread::spawn(move || {
            let mut buf = String::new();
            let _ = stderr.read_to_string(&mut buf);
            sink.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push_str(&buf);
        });

        let (tx, replies) = channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Kv {
            child,
            stdin,
            replies,
            stderr: rest,
            opened,
        }
    }

    /// Writes command lines without reading any reply.
    fn send(&mut self, lines: &[String]) {
        let mut buf = String::new();
        for line in lines {
            buf.push_str(line);
            buf.push('\n');
        }
        self.stdin
            .write_all(buf.as_bytes())
            .expect("write to kv stdin");
    }

    /// The next reply line.
    fn reply(&mut self, ctx: &str, what: &str) -> String {
        match self.replies.recv_timeout(REPLY_TIMEOUT) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => {
                panic!("{ctx}: no reply to {what} within {REPLY_TIMEOUT:?}")
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.child.wait().expect("wait kv");
                panic!(
                    "{ctx}: kv repl closed stdout ({status}) before replying to {what}; \
                     stderr:\n{}",
                    self.stderr()
                )
            }
        }
    }

    /// Sends one command and returns its reply.
    fn call(&mut self, ctx: &str, line: &str) -> String {
        self.send(&[line.to_owned()]);
        self.reply(ctx, line)
    }

    fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// SIGKILL, then reap; the child must have died of that signal (not
    /// exited or crashed on its own before).
    fn kill(mut self, ctx: &str) {
        self.child.kill().expect("kill kv");
        let status = self.child.wait().expect("wait kv");
        assert_eq!(
            status.signal(),
            Some(9),
            "{ctx}: kv repl was not killed by SIGKILL but ended with {status}; stderr:\n{}",
            self.stderr()
        );
    }
}

impl Drop for Kv {
    fn drop(&mut self) {
        // After a failed assertion: do not leave the child behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One command of the workload.
#[derive(Debug, Clone)]
enum Op {
    Put { key: String, value: String },
    Del { key: String },
    Snap,
}

impl Op {
    fn line(&self) -> String {
        match self {
            Op::Put { key, value } => format!("PUT {key} {value}"),
            Op::Del { key } => format!("DEL {key}"),
            Op::Snap => "SNAP".to_owned(),
        }
    }

    /// The key it changes and the state it leaves (None: absent).
    fn effect(&self) -> Option<(&str, Option<&str>)> {
        match self {
            Op::Put { key, value } => Some((key, Some(value))),
            Op::Del { key } => Some((key, None)),
            Op::Snap => None,
        }
    }

    fn reply_ok(&self, reply: &str) -> bool {
        match self {
            Op::Snap => reply.starts_with("OK snapshot at LSN "),
            _ => reply == "OK",
        }
    }
}

/// What the data directory must hold.
#[derive(Default)]
struct Model {
    /// Every key ever written, with its value (None: deleted).
    keys: BTreeMap<String, Option<String>>,
    /// Keys in the order first written, to pick overwrite and delete targets.
    order: Vec<String>,
    /// Ops sent but not acknowledged when the process was killed, in order.
    in_flight: Vec<Op>,
    /// How the last kill happened (for failure messages).
    last_kill: String,
    // Totals for the summary line.
    acked: u64,
    in_flight_kept: u64,
    in_flight_lost: u64,
}

impl Model {
    fn apply(&mut self, op: &Op) {
        if let Some((key, value)) = op.effect() {
            if !self.keys.contains_key(key) {
                self.order.push(key.to_owned());
            }
            self.keys.insert(key.to_owned(), value.map(str::to_owned));
        }
    }

    fn live(&self) -> usize {
        self.keys.values().filter(|v| v.is_some()).count()
    }

    /// A random op for round `round`, number `i`: mostly new keys, some
    /// overwrites and deletes of live keys not in `busy` (so every op of a
    /// burst touches its own key and its effect is recognisable), a rare
    /// SNAP.
    fn next_op(&self, rng: &mut Rng, round: u64, i: u64, busy: &BTreeSet<String>) -> Op {
        let pad_len = rng.index(160);
        let pad: String = (0..pad_len)
            .map(|_| char::from(b'a' + rng.below(26) as u8))
            .collect();
        let value = format!("v{round}-{i}-{pad}");
        let roll = rng.below(100);
        if roll < 2 {
            return Op::Snap;
        }
        if roll < 22 && !self.order.is_empty() {
            let key = &self.order[rng.index(self.order.len())];
            if !busy.contains(key) && self.keys.get(key).is_some_and(Option::is_some) {
                let key = key.clone();
                return if roll < 12 {
                    Op::Put { key, value }
                } else {
                    Op::Del { key }
                };
            }
        }
        Op::Put {
            key: format!("k{round}-{i}"),
            value,
        }
    }

    /// `n` ops to send together, numbered from `*i + 1`, each on its own key.
    fn burst(&self, rng: &mut Rng, round: u64, i: &mut u64, n: u64) -> Vec<Op> {
        let mut busy = BTreeSet::new();
        (0..n)
            .map(|_| {
                *i += 1;
                let op = self.next_op(rng, round, *i, &busy);
                if let Some((key, _)) = op.effect() {
                    busy.insert(key.to_owned());
                }
                op
            })
            .collect()
    }

    /// After a restart: resolves the in-flight ops (each fully there or
    /// fully absent, survivors a prefix), then checks every key and `SIZE`.
    fn verify(&mut self, kv: &mut Kv, ctx: &str) {
        let ctx = format!("{ctx}, after {}", self.last_kill);
        let in_flight = std::mem::take(&mut self.in_flight);
        let mut first_lost: Option<String> = None;
        for op in &in_flight {
            let Some((key, new)) = op.effect() else {
                continue;
            };
            let old = self.keys.get(key).cloned().flatten();
            let got = get(kv, &ctx, key);
            if got.as_deref() == new {
                if let Some(lost) = &first_lost {
                    panic!(
                        "{ctx}: in-flight `{}` survived but the earlier in-flight `{lost}` \
                         did not: recovery kept more than a prefix of the log",
                        short(&op.line())
                    );
                }
                self.in_flight_kept += 1;
                self.apply(op);
            } else if got == old {
                self.in_flight_lost += 1;
                first_lost.get_or_insert_with(|| short(&op.line()));
            } else {
                panic!(
                    "{ctx}: key {key} (written by the in-flight `{}`) is {:?}; \
                     it must be the old {:?} or the new {:?}",
                    short(&op.line()),
                    got.as_deref().map(short),
                    old.as_deref().map(short),
                    new.map(short)
                );
            }
        }

        let keys: Vec<(&String, &Option<String>)> = self.keys.iter().collect();
        for chunk in keys.chunks(GET_PIPELINE) {
            let lines: Vec<String> = chunk.iter().map(|(k, _)| format!("GET {k}")).collect();
            kv.send(&lines);
            for (key, want) in chunk {
                let got = kv.reply(&ctx, &format!("GET {key}"));
                let got = (got != "(nil)").then_some(got);
                assert!(
                    got == **want,
                    "{ctx}: acknowledged key {key} is {:?}, must be {:?}",
                    got.as_deref().map(short),
                    want.as_deref().map(short)
                );
            }
        }
        let size = kv.call(&ctx, "SIZE");
        assert_eq!(
            size,
            self.live().to_string(),
            "{ctx}: SIZE is {size}, but exactly {} keys must be there",
            self.live()
        );
    }
}

fn get(kv: &mut Kv, ctx: &str, key: &str) -> Option<String> {
    let got = kv.call(ctx, &format!("GET {key}"));
    (got != "(nil)").then_some(got)
}

/// A value or line cut short for messages.
fn short(s: &str) -> String {
    if s.len() <= 40 {
        s.to_owned()
    } else {
        format!("{}...", &s[..40])
    }
}

fn base_seed() -> u64 {
    match std::env::var("KV_CRASH_SEED") {
        Ok(s) => {
            let s = s.trim();
            match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            }
            .expect("KV_CRASH_SEED is a u64 (decimal or 0x-hex)")
        }
        Err(_) => BASE_SEED,
    }
}

/// Bytes cut from the tail, from the `kv: opened` line.
fn tail_cut(opened: &str) -> u64 {
    opened
        .split(", ")
        .find_map(|part| part.strip_suffix(" bytes cut from the tail"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no tail count in {opened:?}"))
}

/// Sends `ops` as one pipelined write, reads `acked` of the replies (each
/// must be a success), applies those to the model and returns the rest,
/// still in flight.
fn run_burst(kv: &mut Kv, model: &mut Model, ctx: &str, ops: Vec<Op>, acked: usize) -> Vec<Op> {
    let lines: Vec<String> = ops.iter().map(Op::line).collect();
    kv.send(&lines);
    for op in &ops[..acked] {
        let reply = kv.reply(ctx, &short(&op.line()));
        assert!(
            op.reply_ok(&reply),
            "{ctx}: `{}` got {reply:?}",
            short(&op.line())
        );
        model.apply(op);
        model.acked += 1;
    }
    ops[acked..].to_vec()
}

#[test]
fn acknowledged_writes_survive_sigkill_of_the_real_process() {
    let started = Instant::now();
    let base = base_seed();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut model = Model {
        last_kill: "a fresh start".to_owned(),
        ..Model::default()
    };
    let mut restarts_with_tail_cut = 0;

    for round in 0..ROUNDS {
        let seed = base ^ round.wrapping_mul(0xA24B_AED4_963E_E407);
        let ctx = format!("round {round} (seed {seed:#x}, base seed {base:#x})");
        let mut rng = Rng::new(seed);
        let mut kv = Kv::start(dir.path(), &ctx);
        if tail_cut(&kv.opened) > 0 {
            restarts_with_tail_cut += 1;
        }
        model.verify(&mut kv, &ctx);

        // Every fifth round runs in batch mode and FLUSHes half-way.
        let batch = round % 5 == 3;
        let mut flushed_at = None;
        if batch {
            assert_eq!(kv.call(&ctx, "SETBATCH 8"), "OK", "{ctx}");
        }
        let target = 1 + rng.below(40);
        let mut acked = 0;
        let mut i = 0;
        while acked < target {
            let burst = if rng.below(4) == 0 {
                2 + rng.below(7)
            } else {
                1
            };
            let ops = model.burst(&mut rng, round, &mut i, burst);
            run_burst(&mut kv, &mut model, &ctx, ops, burst as usize);
            acked += burst;
            if batch && flushed_at.is_none() && acked >= target / 2 {
                assert_eq!(kv.call(&ctx, "FLUSH"), "OK", "{ctx}");
                flushed_at = Some(acked);
            }
        }

        // The kill: with nothing, one op, or a pipeline of ops in flight.
        let sent = match rng.below(3) {
            0 => 0,
            1 => 1,
            _ => 2 + rng.below(7),
        };
        let replies_read = if sent > 0 { rng.below(sent) } else { 0 };
        let ops = model.burst(&mut rng, round, &mut i, sent);
        model.in_flight = run_burst(&mut kv, &mut model, &ctx, ops, replies_read as usize);
        // Vary where in the child's write/fdatasync the kill lands.
        let delay_us = match rng.below(3) {
            0 => 0,
            _ => rng.below(1500),
        };
        if delay_us > 0 {
            thread::sleep(Duration::from_micros(delay_us));
        }
        kv.kill(&ctx);
        model.last_kill = format!(
            "the kill in round {round} (seed {seed:#x}: {} mode{}, {} acknowledged \
             this round, {} in flight, {delay_us} us after the last send)",
            if batch { "SETBATCH 8" } else { "sync" },
            flushed_at.map_or(String::new(), |n| format!(", FLUSH after {n} writes")),
            acked + replies_read,
            model.in_flight.len(),
        );
    }

    // A last restart: verify, then a clean EXIT and an offline check.
    let ctx = format!("final restart (base seed {base:#x})");
    let mut kv = Kv::start(dir.path(), &ctx);
    model.verify(&mut kv, &ctx);
    kv.send(&["EXIT".to_owned()]);
    let status = kv.child.wait().expect("wait kv");
    assert!(status.success(), "{ctx}: EXIT ended with {status}");
    let check = Command::new(env!("CARGO_BIN_EXE_kv"))
        .arg("check")
        .arg("--data-dir")
        .arg(dir.path())
        .args(KV_ARGS)
        .output()
        .expect("run kv check");
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success() && text.lines().any(|l| l.starts_with("verdict: recovers")),
        "{ctx}: kv check after a clean exit: {}\n{text}",
        check.status
    );

    let files: Vec<String> = std::fs::read_dir(dir.path())
        .expect("list data dir")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    eprintln!(
        "process_crash: {ROUNDS} kills, {} writes acknowledged, in flight at a kill: {} kept \
         and {} lost, {restarts_with_tail_cut} restarts cut a torn tail, {} keys live, \
         files at the end {files:?}, {:?}",
        model.acked,
        model.in_flight_kept,
        model.in_flight_lost,
        model.live(),
        started.elapsed()
    );
}
