//! The real `kv` binary fed bad input: oversized keys and values, unknown and
//! malformed commands (each an `ERR` line, after which the REPL goes on and
//! nothing was written, not even across a restart), data directories that
//! cannot be used (a regular file, a path under one, one that cannot be
//! created, one another process holds), `kv check` on healthy, torn and
//! corrupted directories (it never changes a byte), and the `BENCH` line.
//!
//! REPL sessions are table-driven: [`check`] pipes a script of commands into
//! `kv repl` and compares every reply line exactly (`<int>` in an expected
//! line stands for a run of digits).

// In a test, a failed `expect` is a test failure that names its reason.
#![allow(clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;

use kv_node::engine::record::{RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES};

/// What a finished `kv` process left.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `kv <args>` with `stdin` piped in and waits for it. The pipe is
/// also the lifeline of a `kv repl`: it ends at EOF, which comes when the
/// script is written or when this test process dies, however it dies (see
/// `common/process.rs`).
fn kv(args: &[&str], dir: &Path, stdin: &[u8]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kv"))
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kv");
    let mut pipe = child.stdin.take().expect("piped stdin");
    let input = stdin.to_vec();
    // From a thread, so a long script cannot deadlock against a full stdout
    // pipe; a process that exits early (EPIPE) is the caller's to judge.
    let writer = thread::spawn(move || {
        let _ = pipe.write_all(&input);
    });
    let out = child.wait_with_output().expect("wait kv");
    writer.join().expect("stdin writer");
    Run {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// True if `line` matches `pattern`, where each `<int>` in the pattern
/// stands for one or more ASCII digits and everything else is literal.
fn matches(pattern: &str, line: &str) -> bool {
    let mut pieces = pattern.split("<int>");
    let Some(first) = pieces.next() else {
        return line.is_empty();
    };
    let Some(mut rest) = line.strip_prefix(first) else {
        return false;
    };
    for piece in pieces {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 {
            return false;
        }
        match rest[digits..].strip_prefix(piece) {
            Some(r) => rest = r,
            None => return false,
        }
    }
    rest.is_empty()
}

/// `s` cut to `max` characters for messages (keys here can be 100 kB long).
fn short(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}...({} bytes)", &s[..at], s.len()),
        None => s.to_owned(),
    }
}

/// Runs one `kv repl` session over `rows` of (command, expected reply) and
/// compares every reply line exactly. An expected reply may span several
/// lines (`HELP`), and `""` means no reply (a blank line, or anything after
/// `EXIT`). The session must end with exit status 0 after printing its
/// recovery summary.
fn check(dir: &Path, args: &[&str], rows: &[(&str, &str)]) {
    let mut script = String::new();
    for (command, _) in rows {
        script.push_str(command);
        script.push('\n');
    }
    let mut repl_args = vec!["repl"];
    repl_args.extend_from_slice(args);
    let run = kv(&repl_args, dir, script.as_bytes());
    let got: Vec<&str> = run.stdout.split_terminator('\n').collect();

    let mut report = String::new();
    let mut failed = false;
    let mut at = 0;
    for (command, expected) in rows {
        let want: Vec<&str> = expected.split_terminator('\n').collect();
        for (j, pattern) in want.iter().enumerate() {
            let line = got.get(at).copied();
            let ok = line.is_some_and(|l| matches(pattern, l));
            failed |= !ok;
            let cmd = if j == 0 {
                format!("{:?}", short(command, 40))
            } else {
                String::new()
            };
            report.push_str(&format!(
                "{} {cmd:<50} expected {pattern:?}, got {:?}\n",
                if ok { ' ' } else { '!' },
                line.map(|l| short(l, 100))
            ));
            at += 1;
        }
        if want.is_empty() {
            let cmd = format!("{:?}", short(command, 40));
            report.push_str(&format!("  {cmd:<50} expected no reply\n"));
        }
    }
    for extra in got.iter().skip(at) {
        failed = true;
        report.push_str(&format!(
            "! unexpected extra line {:?}\n",
            short(extra, 100)
        ));
    }
    assert!(
        !failed && run.status.success() && run.stderr.starts_with("kv: opened"),
        "kv repl --data-dir {} {}: {}, replies:\n{report}stderr:\n{}",
        dir.display(),
        args.join(" "),
        run.status,
        run.stderr
    );
}

/// Every file in `dir` with its bytes.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .expect("list data dir")
        .map(|entry| {
            let entry = entry.expect("dir entry");
            let bytes = std::fs::read(entry.path()).expect("read file");
            (entry.file_name().to_string_lossy().into_owned(), bytes)
        })
        .collect()
}

/// Runs `f` and asserts that no file in `dir` appeared, vanished or changed.
fn assert_unchanged<R>(dir: &Path, what: &str, f: impl FnOnce() -> R) -> R {
    let before = files(dir);
    let r = f();
    let after = files(dir);
    let names = |m: &BTreeMap<String, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        names(&before),
        names(&after),
        "{what}: files appeared or vanished"
    );
    for (name, bytes) in &before {
        assert!(
            after[name] == *bytes,
            "{what}: {name} changed ({} bytes before, {} after)",
            bytes.len(),
            after[name].len()
        );
    }
    r
}

/// WAL segments in `dir`, oldest first.
fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("list data dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("wal-") && n.ends_with(".wal"))
        })
        .collect();
    segs.sort();
    segs
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

#[test]
fn oversized_key_is_refused_and_nothing_is_written() {
    let tmp = tempdir();
    let dir = &tmp.path().join("data");
    let at_max = "b".repeat(1024);
    let over = "k".repeat(1025);
    let prefix = &over[..1024];
    let huge = "h".repeat(100_000);
    let (put_at_max, get_at_max) = (format!("PUT {at_max} v"), format!("GET {at_max}"));
    check(
        dir,
        &[],
        &[("PUT a 1", "OK"), (&put_at_max, "OK"), ("SIZE", "2")],
    );

    let err = "ERR key is 1025 bytes, over the maximum of 1024";
    let (put, get, del) = (
        format!("PUT {over} v"),
        format!("GET {over}"),
        format!("DEL {over}"),
    );
    let (put_huge, get_prefix) = (format!("PUT {huge} v"), format!("GET {prefix}"));
    assert_unchanged(dir, "a session of oversized keys", || {
        check(
            dir,
            &[],
            &[
                (&put, err),
                (&get, err),
                (&del, err),
                (
                    &put_huge,
                    "ERR key is 100000 bytes, over the maximum of 1024",
                ),
                (&get_prefix, "(nil)"),
                (&get_at_max, "v"),
                ("GET a", "1"),
                ("SIZE", "2"),
            ],
        )
    });
    check(
        dir,
        &[],
        &[
            (&get_prefix, "(nil)"),
            (&get_at_max, "v"),
            ("GET a", "1"),
            ("SIZE", "2"),
        ],
    );
}

#[test]
fn oversized_value_is_refused_and_nothing_is_written() {
    let tmp = tempdir();
    let dir = &tmp.path().join("data");
    let args = &["--value-bytes-max", "10"];
    check(dir, args, &[("PUT k 0123456789", "OK"), ("SIZE", "1")]);

    let huge = format!("PUT j {}", "x".repeat(100_000));
    assert_unchanged(dir, "a session of oversized values", || {
        check(
            dir,
            args,
            &[
                (
                    "PUT k 0123456789A",
                    "ERR value is 11 bytes, over the maximum of 10",
                ),
                // The value is the rest of the line, spaces included.
                (
                    "PUT j hello world!",
                    "ERR value is 12 bytes, over the maximum of 10",
                ),
                // Longer than any valid line (1024 + 10 + 64 bytes): refused
                // before it is parsed, and not held in memory whole.
                (&huge, "ERR line longer than 1098 bytes; ignored"),
                ("GET k", "0123456789"),
                ("GET j", "(nil)"),
                ("SIZE", "1"),
            ],
        )
    });
    check(
        dir,
        args,
        &[("GET k", "0123456789"), ("GET j", "(nil)"), ("SIZE", "1")],
    );
}

#[test]
fn unknown_and_malformed_commands_get_an_error_and_the_repl_goes_on() {
    let tmp = tempdir();
    let dir = &tmp.path().join("data");
    check(dir, &[], &[("PUT a 1", "OK")]);
    let unknown = "ERR unknown command 'FROB' (try HELP)";
    assert_unchanged(dir, "a session of malformed commands", || {
        check(
            dir,
            &[],
            &[
                ("FROB", unknown),
                ("frob a b", unknown),
                ("PUT k", "ERR usage: PUT key value"),
                ("PUT k   ", "ERR usage: PUT key value"),
                ("PUT", "ERR usage: PUT key value"),
                ("GET", "ERR usage: GET key"),
                ("GET a b", "ERR usage: GET key"),
                ("DEL", "ERR usage: DEL key"),
                ("DEL a b", "ERR usage: DEL key"),
                ("SETBATCH", "ERR usage: SETBATCH n"),
                ("SETBATCH 0", "ERR SETBATCH: n must be at least 1"),
                ("SETBATCH -1", "ERR SETBATCH: '-1' is not a valid number"),
                ("SETBATCH 2 3", "ERR usage: SETBATCH n"),
                (
                    "SETBATCH 99999999999",
                    "ERR SETBATCH: '99999999999' is not a valid number",
                ),
                ("BENCH", "ERR usage: BENCH n"),
                ("BENCH x", "ERR BENCH: 'x' is not a valid number"),
                ("BENCH 0", "ERR BENCH: n must be at least 1"),
                ("SIZE now", "ERR SIZE takes no arguments"),
                ("SNAP now", "ERR SNAP takes no arguments"),
                ("FLUSH now", "ERR FLUSH takes no arguments"),
                ("HELP me", "ERR HELP takes no arguments"),
                ("EXIT now", "ERR EXIT takes no arguments"),
                ("quit now", "ERR EXIT takes no arguments"),
                // Blank lines get no reply at all.
                ("", ""),
                (" \t ", ""),
                ("GET a", "1"),
                ("SIZE", "1"),
            ],
        )
    });
    check(
        dir,
        &[],
        &[("GET a", "1"), ("GET k", "(nil)"), ("SIZE", "1")],
    );
}

#[test]
fn commands_are_case_insensitive_and_keys_are_not() {
    let tmp = tempdir();
    let dir = &tmp.path().join("data");
    check(
        dir,
        &[],
        &[
            ("put a 1", "OK"),
            ("Put b 2", "OK"),
            ("pUT c 3", "OK"),
            ("get a", "1"),
            ("Get b", "2"),
            ("GET A", "(nil)"),
            ("dEl c", "OK"),
            ("size", "2"),
            ("Size", "2"),
            ("flush", "OK"),
            ("setbatch 2", "OK"),
            ("SetBatch 1", "OK"),
            (
                "snap",
                "OK snapshot at LSN 4 (2 keys, <int> bytes, 0 WAL segments removed)",
            ),
            (
                "bench 3",
                "BENCH n=3 batch=1 total_ms=<int> ops_per_sec=<int> fsyncs=3",
            ),
            ("help", kv_node::repl::HELP),
            ("Exit", ""),
            // Nothing after EXIT is read.
            ("SIZE", ""),
        ],
    );
    check(
        dir,
        &[],
        &[("GET a", "1"), ("GET c", "(nil)"), ("SIZE", "5")],
    );
}

#[test]
fn put_value_is_the_rest_of_the_line() {
    let tmp = tempdir();
    let dir = &tmp.path().join("data");
    let rows = [
        ("GET k", "hello  world"),
        ("GET t", "spaced out \t "),
        ("GET c", "crlf ending"),
        ("GET u", "naïve café ✓"),
        ("SIZE", "4"),
    ];
    let mut session = vec![
        ("PUT k hello  world", "OK"),
        // Whitespace before the value separates; after it, it is the value.
        ("PUT \t t  \t spaced out \t ", "OK"),
        ("PUT c crlf ending\r", "OK"),
        ("PUT u naïve café ✓", "OK"),
    ];
    session.extend_from_slice(&rows);
    check(dir, &[], &session);
    check(dir, &[], &rows);
}

/// Data directories that cannot be used: an existing regular file, a path
/// under one, and one that cannot be created (/proc refuses mkdir even to
/// root). `file` is a regular file.
fn unusable_dirs(file: &Path) -> [PathBuf; 3] {
    [
        file.to_path_buf(),
        file.join("sub"),
        PathBuf::from("/proc/kv-test-unwritable"),
    ]
}

#[test]
fn unusable_data_dirs_fail_with_a_clear_error() {
    let tmp = tempdir();
    let file = tmp.path().join("plain-file");
    std::fs::write(&file, b"not a data dir").expect("write file");
    for dir in unusable_dirs(&file) {
        for args in [&["repl"][..], &["check"]] {
            let run = kv(args, &dir, b"PUT a 1\nSIZE\n");
            let what = format!("kv {} --data-dir {}", args[0], dir.display());
            // `kv repl` says which step failed; `kv check` creates nothing.
            let step = if args[0] == "repl" {
                "create data directory"
            } else {
                "is not a directory"
            };
            let path = dir.display().to_string();
            assert!(
                run.status.code() == Some(1)
                    && run.stdout.is_empty()
                    && run.stderr.starts_with("kv: error:")
                    && run.stderr.contains(&path)
                    && run.stderr.contains(step),
                "{what}: want exit status 1, no stdout, and `kv: error:` with {path:?} and \
                 {step:?} on stderr; got {}, stdout {:?}, stderr {:?}",
                run.status,
                run.stdout,
                run.stderr
            );
            assert!(!dir.is_dir(), "{what}: created the directory");
        }
    }
    assert_eq!(
        std::fs::read(&file).expect("read file"),
        b"not a data dir",
        "the regular file was changed"
    );
}

/// The OS error behind an unusable data directory is printed once, not
/// twice (`...: File exists (os error 17): File exists (os error 17)`).
#[test]
fn unusable_data_dir_error_names_the_cause_once() {
    let tmp = tempdir();
    let file = tmp.path().join("plain-file");
    std::fs::write(&file, b"x").expect("write file");
    for dir in unusable_dirs(&file) {
        let run = kv(&["repl"], &dir, b"");
        assert_eq!(
            run.stderr.matches("(os error").count(),
            1,
            "kv repl --data-dir {}: stderr {:?}",
            dir.display(),
            run.stderr
        );
    }
}

#[test]
fn a_second_process_on_the_same_data_dir_is_refused() {
    let tmp = tempdir();
    let dir = &tmp.path().join("data");
    // Its stdin, held until the end, is its lifeline too.
    let mut first = Command::new(env!("CARGO_BIN_EXE_kv"))
        .args(["repl", "--data-dir"])
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the first kv repl");
    let mut stdin = first.stdin.take().expect("piped stdin");
    let mut stdout = BufReader::new(first.stdout.take().expect("piped stdout"));
    let mut stderr = BufReader::new(first.stderr.take().expect("piped stderr"));
    let mut opened = String::new();
    stderr.read_line(&mut opened).expect("read stderr");
    assert!(opened.starts_with("kv: opened"), "first: {opened:?}");
    stdin.write_all(b"PUT a 1\n").expect("write stdin");
    let mut reply = String::new();
    stdout.read_line(&mut reply).expect("read stdout");
    assert_eq!(reply, "OK\n", "first: PUT a 1");

    let second = kv(&["repl"], dir, b"PUT b 2\nSIZE\n");
    assert!(
        !second.status.success()
            && second.stdout.is_empty()
            && second.stderr.starts_with("kv: error:")
            && second.stderr.contains("in use by another process"),
        "second kv repl on {}: {}, stdout {:?}, stderr {:?}",
        dir.display(),
        second.status,
        second.stdout,
        second.stderr
    );

    // The first goes on undisturbed, and the second wrote nothing.
    stdin.write_all(b"SIZE\n").expect("write stdin");
    drop(stdin);
    let mut rest = String::new();
    for line in stdout.lines() {
        rest.push_str(&line.expect("read stdout"));
        rest.push('\n');
    }
    assert_eq!(rest, "1\n", "first: SIZE after the second was refused");
    let status = first.wait().expect("wait kv");
    assert!(status.success(), "first kv repl: {status}");
    check(
        dir,
        &[],
        &[("GET a", "1"), ("GET b", "(nil)"), ("SIZE", "1")],
    );
}

/// Small segments, so a directory of a few dozen writes holds several.
const SMALL_SEGMENTS: &[&str] = &["--segment-bytes-max", "4096"];

fn value(i: usize) -> String {
    format!("value-{i}-{}", "x".repeat(100))
}

/// Writes keys `key-0..n` to `dir` through `kv repl`.
fn fill(dir: &Path, args: &[&str], n: usize) {
    let script: Vec<(String, &str)> = (0..n)
        .map(|i| (format!("PUT key-{i} {}", value(i)), "OK"))
        .collect();
    let rows: Vec<(&str, &str)> = script.iter().map(|(c, r)| (c.as_str(), *r)).collect();
    check(dir, args, &rows);
}

/// Asserts `dir` holds exactly keys `key-0..n`.
fn assert_holds(dir: &Path, args: &[&str], n: usize) {
    let mut script: Vec<(String, String)> =
        (0..n).map(|i| (format!("GET key-{i}"), value(i))).collect();
    script.push(("SIZE".to_owned(), n.to_string()));
    let rows: Vec<(&str, &str)> = script
        .iter()
        .map(|(c, r)| (c.as_str(), r.as_str()))
        .collect();
    check(dir, args, &rows);
}

/// Runs `kv check` on `dir`, asserting it changes no file.
fn kv_check(dir: &Path, args: &[&str]) -> Run {
    let mut check_args = vec!["check"];
    check_args.extend_from_slice(args);
    assert_unchanged(dir, "kv check", || kv(&check_args, dir, b""))
}

fn verdict(run: &Run) -> &str {
    run.stdout
        .lines()
        .find(|l| l.starts_with("verdict: "))
        .unwrap_or_else(|| panic!("kv check printed no verdict:\n{}", run.stdout))
}

#[test]
fn check_on_a_healthy_dir_says_it_recovers() {
    let tmp = tempdir();
    let dir = &tmp.path().join("data");
    fill(dir, SMALL_SEGMENTS, 60);
    assert!(segments(dir).len() >= 3, "want several segments");
    let run = kv_check(dir, SMALL_SEGMENTS);
    assert_eq!(run.status.code(), Some(0), "kv check:\n{}", run.stdout);
    let verdict = verdict(&run);
    assert!(
        verdict.starts_with("verdict: recovers")
            && verdict.contains(" 0 bytes cut from the tail")
            && verdict.contains(" 60 keys"),
        "kv check on a healthy dir:\n{}",
        run.stdout
    );
}

/// Where [`check_reports_a_torn_tail_and_changes_nothing`] puts garbage in
/// the last segment.
#[derive(Debug, Clone, Copy)]
enum Garbage {
    /// Appended at the end of the file (after the preallocated zeros).
    AtEndOfFile,
    /// Right after the last record, as a torn write would leave it.
    AfterLastRecord,
}

#[test]
fn check_reports_a_torn_tail_and_changes_nothing() {
    for place in [Garbage::AtEndOfFile, Garbage::AfterLastRecord] {
        let tmp = tempdir();
        let dir = &tmp.path().join("data");
        fill(dir, SMALL_SEGMENTS, 60);
        let segs = segments(dir);
        let last = segs.last().expect("a segment");
        let mut bytes = std::fs::read(last).expect("read the last segment");
        let at = match place {
            Garbage::AtEndOfFile => bytes.len(),
            // Records end in a non-zero byte (`x`); zeros follow.
            Garbage::AfterLastRecord => bytes.iter().rposition(|b| *b != 0).expect("data") + 1,
        };
        bytes.truncate(at);
        bytes.extend_from_slice(&[0xA5; 13]);
        std::fs::write(last, &bytes).expect("write the last segment");

        let run = kv_check(dir, SMALL_SEGMENTS);
        let what = format!("kv check, garbage {place:?} of the last segment");
        assert_eq!(run.status.code(), Some(0), "{what}:\n{}", run.stdout);
        let name = last.file_name().and_then(|n| n.to_str()).expect("name");
        let verdict = verdict(&run);
        let cut: u64 = verdict
            .split(", ")
            .find_map(|p| p.strip_suffix(" bytes cut from the tail"))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let reported = run
            .stdout
            .lines()
            .any(|l| l.starts_with(&format!("segment {name}:")) && l.contains("bad record"));
        assert!(
            verdict.starts_with("verdict: recovers")
                && verdict.contains(" 60 keys")
                && cut > 0
                && reported,
            "{what}: must report the torn tail of {name} and recover:\n{}",
            run.stdout
        );
        // The real open cuts the tail and loses nothing.
        assert_holds(dir, SMALL_SEGMENTS, 60);
    }
}

#[test]
fn check_refuses_mid_log_corruption_and_changes_nothing() {
    let tmp = tempdir();
    let dir = &tmp.path().join("data");
    fill(dir, &[], 5);
    let segs = segments(dir);
    assert_eq!(segs.len(), 1, "one segment with several records");
    let mut bytes = std::fs::read(&segs[0]).expect("read segment");
    let first_len = RECORD_HEADER_BYTES + 4 + "key-0".len() + value(0).len();
    let middle = SEGMENT_HEADER_BYTES + first_len / 2;
    bytes[middle] ^= 0xFF;
    std::fs::write(&segs[0], &bytes).expect("write segment");

    let run = kv_check(dir, &[]);
    assert!(
        run.status.code() == Some(2) && verdict(&run).contains("REFUSES"),
        "kv check after flipping byte {middle} of {}: {}\n{}",
        segs[0].display(),
        run.status,
        run.stdout
    );
    // The engine itself refuses too, and does not "repair" anything.
    let open = assert_unchanged(dir, "kv repl on a corrupt log", || {
        kv(&["repl"], dir, b"SIZE\n")
    });
    assert!(
        open.status.code() == Some(1)
            && open.stdout.is_empty()
            && open.stderr.starts_with("kv: error:")
            && open.stderr.contains("corruption"),
        "kv repl on a corrupt log: {}, stdout {:?}, stderr {:?}",
        open.status,
        open.stdout,
        open.stderr
    );
}

#[test]
fn bench_prints_one_line() {
    let tmp = tempdir();
    let dir = &tmp.path().join("data");
    // No timer flushes in the middle, so the batch fsync count is exact.
    check(
        dir,
        &["--flush-interval-ms", "600000"],
        &[
            (
                "BENCH 50",
                "BENCH n=50 batch=1 total_ms=<int> ops_per_sec=<int> fsyncs=50",
            ),
            ("SIZE", "50"),
            ("SETBATCH 10", "OK"),
            (
                "BENCH 50",
                "BENCH n=50 batch=10 total_ms=<int> ops_per_sec=<int> fsyncs=5",
            ),
            ("SIZE", "50"),
        ],
    );
}

/// `kv repl` on a pipe prints, byte for byte, what it printed before line
/// editing came (recorded from that binary): no prompt, no escape
/// sequences, values as their bytes (a non-UTF-8 one too).
#[test]
fn piped_repl_output_is_byte_identical_to_before() {
    let tmp = tempdir();
    let script: &[u8] = b"PUT a hello world\nGET a\nput b 2\n\nSIZE\nGET nothing\nPUT u na\xc3\xafve caf\xc3\xa9\nGET u\nPUT bin \xff\xfe\x00\x01 raw\nGET bin\nPUT c crlf\r\nGET c\nDEL a\nget a\nFROB x\nPUT k\nSETBATCH 0\nFLUSH\nSNAP\nHELP\nSIZE now\nEXIT\nGET b\n";
    let mut want = b"OK\nhello world\nOK\n2\n(nil)\nOK\nna\xc3\xafve caf\xc3\xa9\nOK\n\xff\xfe\x00\x01 raw\nOK\ncrlf\nOK\n(nil)\nERR unknown command 'FROB' (try HELP)\nERR usage: PUT key value\nERR SETBATCH: n must be at least 1\nOK\nOK snapshot at LSN 6 (4 keys, 115 bytes, 0 WAL segments removed)\n".to_vec();
    want.extend_from_slice(kv_node::repl::HELP.as_bytes());
    want.extend_from_slice(b"\nERR SIZE takes no arguments\n");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kv"))
        .args(["repl", "--data-dir"])
        .arg(tmp.path().join("data"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kv repl");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(script)
        .expect("write the script");
    let out = child.wait_with_output().expect("wait kv repl");
    assert!(out.status.success(), "kv repl: {out:?}");
    assert!(
        out.stdout == want,
        "kv repl on a pipe:\n got {:?}\nwant {:?}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&want)
    );
}

#[test]
fn matches_understands_int_placeholders() {
    for (pattern, line, want) in [
        ("OK", "OK", true),
        ("OK", "OK ", false),
        ("n=<int> x", "n=12 x", true),
        ("n=<int> x", "n= x", false),
        ("n=<int> x", "n=1a x", false),
        ("n=<int>", "n=7", true),
        ("n=<int>", "n=7 ", false),
    ] {
        assert_eq!(matches(pattern, line), want, "{pattern:?} vs {line:?}");
    }
}

/// `kv check` names a snapshot receive a crash interrupted (and changes
/// nothing: recovery is what removes it).
#[test]
fn check_names_an_interrupted_snapshot_receive() {
    let tmp = tempdir();
    let dir = &tmp.path().join("data");
    fill(dir, SMALL_SEGMENTS, 10);
    let name = "snap-00000000000000000300-0.snap.recv";
    std::fs::write(dir.join(name), b"KVSNAP01 partial").expect("write a leftover receive");
    let run = kv_check(dir, SMALL_SEGMENTS);
    assert_eq!(run.status.code(), Some(0), "kv check:\n{}", run.stdout);
    assert!(
        run.stdout.contains(&format!(
            "leftover {name}: an interrupted snapshot receive from a leader (recovery removes it)"
        )),
        "kv check:\n{}",
        run.stdout
    );
    assert!(
        verdict(&run).starts_with("verdict: recovers"),
        "{}",
        run.stdout
    );
}
