//! The client commands as a script sees them, against real `kv serve`
//! clusters: `-w json` parsed with serde_json (`get`, `status`, `put`,
//! `del`, `transfer-leader`), binary keys and values through `--hex` and
//! base64 (never lossy UTF-8), the environment variables (`KV_ENDPOINTS`,
//! `KV_CONFIGS`, `KV_TIMEOUT_MS`, `KV_WRITE_OUT`), one exit code per class
//! of failure, `kv completion`, `kv shell` on a pipe (byte for byte as
//! before) and on a terminal (line editing, history; faked with
//! util-linux's `script`).

// Shared with the other integration tests; a failed unwrap is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::cluster::Cluster;
use common::process::KV;
use serde_json::Value;

/// `kv <args>` with no `KV_*` variable inherited, from a directory with no
/// `configs/` (so only what the test passes finds a cluster).
fn kv(args: &[&OsStr], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(KV);
    for (name, _) in std::env::vars() {
        if name.starts_with("KV_") {
            command.env_remove(name);
        }
    }
    command
        .args(args)
        .envs(env.iter().copied())
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn os<'a>(args: &[&'a str]) -> Vec<&'a OsStr> {
    args.iter().map(|a| OsStr::new(*a)).collect()
}

/// `kv <args> --endpoints <endpoints>`.
fn kv_at(args: &[&str], endpoints: &str) -> Output {
    let mut all = os(args);
    all.extend(os(&["--endpoints", endpoints]));
    kv(&all, &[])
}

fn json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 1, "one line of JSON: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn b64(v: &Value) -> Vec<u8> {
    let s = v.as_str().unwrap_or_else(|| panic!("not a string: {v}"));
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

fn code(out: &Output) -> Option<i32> {
    out.status.code()
}

#[test]
fn json_output_of_get_status_put_and_del_parses() {
    let cluster = Cluster::start();
    let all = cluster.all_endpoints();
    let put = json(&kv_at(&["put", "k", "hello world", "-w", "json"], &all));
    let lsn = put["lsn"].as_u64().unwrap();
    assert!(lsn > 0 && put["term"].as_u64().unwrap() > 0, "{put}");

    let got = json(&kv_at(&["get", "k", "-w", "json"], &all));
    assert_eq!(got["found"], true, "{got}");
    assert_eq!(b64(&got["key_base64"]), b"k");
    assert_eq!(b64(&got["value_base64"]), b"hello world");
    assert!(got["applied_lsn"].as_u64().unwrap() >= lsn, "{got}");
    assert_eq!(got["node_id"], 1, "the fixed leader answers: {got}");

    let missing = json(&kv_at(&["get", "nope", "--write-out", "json"], &all));
    assert_eq!(missing["found"], false, "{missing}");
    assert_eq!(missing["value_base64"], Value::Null, "{missing}");

    let del = json(&kv_at(&["del", "k", "-w", "json"], &all));
    assert!(del["lsn"].as_u64().unwrap() > lsn, "{del}");

    cluster.wait_converged();
    let status = json(&kv_at(&["status", "-w", "json"], &all));
    let nodes = status["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{status}");
    for (i, node) in nodes.iter().enumerate() {
        assert_eq!(node["endpoint"], cluster.endpoint(i + 1), "{node}");
        assert_eq!(node["reachable"], true, "{node}");
        assert_eq!(node["node_id"], i as u64 + 1, "{node}");
        assert_eq!(node["cluster_id"], cluster.cluster_id.as_str(), "{node}");
        assert_eq!(node["leader_id"], 1, "{node}");
        assert_eq!(node["lag"], 0, "{node}");
        assert_eq!(node["keys"], 0, "{node}");
        assert_eq!(node["applied_lsn"], del["lsn"], "{node}");
        assert_eq!(node["digest"], nodes[0]["digest"], "{node}");
        assert_eq!(node["digest"].as_str().unwrap().len(), 16, "{node}");
    }
    let roles: Vec<&str> = nodes.iter().map(|n| n["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["leader", "follower", "follower"]);
    assert_eq!(nodes[0]["followers"].as_array().unwrap().len(), 2);

    // An endpoint with no node: `reachable: false`, an error, exit 4.
    let down = common::cluster::free_ports(1)[0].to_string();
    let out = kv_at(
        &["status", "-w", "json", "--timeout-ms", "300"],
        &format!("{},{down}", cluster.endpoint(1)),
    );
    assert_eq!(code(&out), Some(4), "{out:?}");
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["nodes"][0]["reachable"], true, "{status}");
    assert_eq!(status["nodes"][1]["reachable"], false, "{status}");
    assert!(status["nodes"][1]["error"].is_string(), "{status}");
    assert!(status["nodes"][1].get("role").is_none(), "{status}");
}

#[test]
fn binary_keys_and_values_survive_a_round_trip() {
    let cluster = Cluster::start();
    let all = cluster.all_endpoints();
    // Not UTF-8, with a NUL and a newline in it.
    let (key, value) = (
        b"\xff\x00k\n".as_slice(),
        b"\xfe\xff\x00\x01v\n\x80".as_slice(),
    );
    let (key_hex, value_hex) = (hex::encode(key), hex::encode(value));
    let out = kv_at(&["put", "--hex", &key_hex, &value_hex], &all);
    assert!(out.status.success(), "{out:?}");

    let got = kv_at(&["get", "--hex", &key_hex], &all);
    assert_eq!(got.stdout, format!("{value_hex}\n").as_bytes(), "{got:?}");
    let got = json(&kv_at(&["get", "--hex", &key_hex, "-w", "json"], &all));
    assert_eq!(got["key_hex"], key_hex, "{got}");
    assert_eq!(got["value_hex"], value_hex, "{got}");

    // Without --hex the arguments' own bytes are the key and value, and the
    // table output is the value's bytes, not lossy UTF-8.
    let raw_key = OsStr::from_bytes(b"raw\xfe");
    let raw_value = OsStr::from_bytes(b"\xc3\x28\xff");
    let mut args = vec![OsStr::new("put"), raw_key, raw_value];
    args.extend(os(&["--endpoints", &all]));
    let out = kv(&args, &[]);
    assert!(out.status.success(), "{out:?}");
    let mut args = vec![OsStr::new("get"), raw_key];
    args.extend(os(&["--endpoints", &all]));
    let out = kv(&args, &[]);
    assert_eq!(out.stdout, b"\xc3\x28\xff\n", "{out:?}");
    let got = json(&kv_at(&["get", "--hex", "726177fe", "-w", "json"], &all));
    assert_eq!(got["value_hex"], "c328ff", "{got}");
    let got = json(&kv_at(&["get", &key_hex, "-w", "json"], &all));
    assert_eq!(
        got["found"], false,
        "without --hex the hex digits are the key: {got}"
    );
    let mut args = vec![OsStr::new("get"), raw_key];
    args.extend(os(&["-w", "json", "--endpoints", &all]));
    let got = json(&kv(&args, &[]));
    assert_eq!(b64(&got["key_base64"]), b"raw\xfe", "{got}");
    assert_eq!(b64(&got["value_base64"]), b"\xc3\x28\xff", "{got}");
    // A key with a NUL byte cannot be an argument: --hex carries it.
    let got = json(&kv_at(&["get", "--hex", &key_hex, "-w", "json"], &all));
    assert!(got.get("value_base64").is_none(), "{got}");

    // `kv shell` prints a value's bytes too.
    let mut shell = Command::new(KV)
        .args(["shell", "--endpoints", &all])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(shell.stdin.as_mut().unwrap(), b"GET raw\xfe\n").unwrap();
    drop(shell.stdin.take());
    let out = shell.wait_with_output().unwrap();
    assert_eq!(out.stdout, b"\xc3\x28\xff\n");
}

#[test]
fn environment_variables_set_endpoints_timeouts_and_format() {
    let cluster = Cluster::start();
    let all = cluster.all_endpoints();
    let put = kv(
        &os(&["put", "e", "1", "-w", "json"]),
        &[("KV_ENDPOINTS", &all)],
    );
    assert!(json(&put)["lsn"].as_u64().is_some());
    // KV_ENDPOINTS alone finds the cluster (the working directory has no
    // configs/), and KV_WRITE_OUT picks JSON.
    let got = kv(
        &os(&["get", "e"]),
        &[("KV_ENDPOINTS", &all), ("KV_WRITE_OUT", "json")],
    );
    assert_eq!(b64(&json(&got)["value_base64"]), b"1");
    // A flag beats its variable.
    let got = kv(
        &os(&["get", "e", "-w", "table"]),
        &[("KV_ENDPOINTS", &all), ("KV_WRITE_OUT", "json")],
    );
    assert_eq!(got.stdout, b"1\n", "{got:?}");
    // KV_CONFIGS: the members listed in a directory of node configs.
    let configs = cluster.dir.path().to_str().unwrap();
    let got = kv(&os(&["get", "e"]), &[("KV_CONFIGS", configs)]);
    assert_eq!(got.stdout, b"1\n", "{got:?}");
    let out = kv(&os(&["get", "e"]), &[]);
    assert_eq!(code(&out), Some(1), "no endpoints, no configs/: {out:?}");
    // KV_TIMEOUT_MS bounds a client that finds no node (twice the timeout).
    let nobody = common::cluster::free_ports(1)[0].to_string();
    let start = Instant::now();
    let out = kv(
        &os(&["get", "e"]),
        &[("KV_ENDPOINTS", &nobody), ("KV_TIMEOUT_MS", "300")],
    );
    let took = start.elapsed();
    assert_eq!(code(&out), Some(4), "{out:?}");
    assert!(
        took < Duration::from_secs(4),
        "KV_TIMEOUT_MS=300 ignored: gave up after {took:?}"
    );
}

#[test]
fn exit_codes_tell_the_failure_classes_apart() {
    let mut cluster = Cluster::start();
    let leader = cluster.endpoint(1);
    // 2: usage, from clap and from malformed --hex input.
    let out = kv_at(&["get"], &leader);
    assert_eq!(code(&out), Some(2), "{out:?}");
    let out = kv_at(&["put", "k", "v", "--ack", "sometimes"], &leader);
    assert_eq!(code(&out), Some(2), "{out:?}");
    let out = kv_at(&["get", "--hex", "xyz"], &leader);
    assert_eq!(code(&out), Some(2), "{out:?}");
    // 3: refused, nothing done: an oversized key, a transfer a fixed
    // leader refuses.
    let out = kv_at(&["put", &"k".repeat(1025), "v"], &leader);
    assert_eq!(code(&out), Some(3), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("key is 1025 bytes"));
    let start = Instant::now();
    let out = kv_at(&["transfer-leader", "2"], &leader);
    assert_eq!(code(&out), Some(3), "{out:?}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "a refusal is not retried"
    );
    assert_eq!(cluster.status_of(1).unwrap().last_lsn, 0, "nothing written");
    // 4: unreachable: no server at the endpoints.
    let nobody = common::cluster::free_ports(2)
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",");
    for args in [
        &["get", "k"][..],
        &["put", "k", "v"],
        &["del", "k"],
        &["status"],
    ] {
        let mut args = args.to_vec();
        args.extend(["--timeout-ms", "300"]);
        let out = kv_at(&args, &nobody);
        assert_eq!(code(&out), Some(4), "{args:?}: {out:?}");
    }
    // 0, and 4 from `kv status` once a node is down.
    assert_eq!(code(&kv_at(&["status"], &cluster.all_endpoints())), Some(0));
    cluster.kill(3);
    let out = kv_at(&["status"], &cluster.all_endpoints());
    assert_eq!(code(&out), Some(4), "{out:?}");
    // 5: outcome unknown: a quorum write with two of three down.
    cluster.kill(2);
    let out = kv_at(&["put", "lonely", "1", "--ack", "quorum"], &leader);
    assert_eq!(code(&out), Some(5), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("outcome unknown"));
}

#[test]
fn transfer_leader_json_and_exit_code() {
    let cluster = Cluster::start_elected("");
    let leader = cluster.wait_leader();
    let next = if leader == 1 { 2 } else { 1 };
    let out = kv_at(
        &["transfer-leader", &next.to_string(), "-w", "json"],
        &cluster.all_endpoints(),
    );
    let reply = json(&out);
    assert_eq!(reply["transferred"], true, "{reply}");
    assert_eq!(reply["target"], next, "{reply}");
    assert_eq!(reply["leader_id"], next, "{reply}");
    assert!(
        reply["term"].as_u64().unwrap() > reply["from_term"].as_u64().unwrap(),
        "{reply}"
    );
}

#[test]
fn help_documents_exit_codes_and_completion_scripts_are_printed() {
    let help = kv(&os(&["--help"]), &[]);
    let text = String::from_utf8_lossy(&help.stdout);
    for line in ["3  refused", "4  unreachable", "5  outcome unknown"] {
        assert!(text.contains(line), "kv --help lacks {line:?}:\n{text}");
    }
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef kv"),
        ("fish", "complete -c kv"),
    ] {
        let out = kv(&os(&["completion", shell]), &[]);
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && script.contains(marker) && script.contains("transfer-leader"),
            "kv completion {shell}: {}, {} bytes:\n{}",
            out.status,
            script.len(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = kv(&os(&["completion", "tcsh"]), &[]);
    assert_eq!(code(&out), Some(2), "{out:?}");
}

/// What `kv shell` printed for [`SHELL_SCRIPT`] before line editing came
/// (recorded from that binary), except for `GET bin`: it printed the value
/// through lossy UTF-8 (`\xef\xbf\xbd` twice), and now prints its bytes.
fn shell_golden() -> Vec<u8> {
    let mut g = b"OK\nhello world\nOK\n2\n(nil)\nOK\nna\xc3\xafve caf\xc3\xa9\nOK\n\xff\xfe\x00\x01 raw\nOK\ncrlf\nOK\n(nil)\nERR unknown command 'FROB' (try HELP)\nERR usage: PUT key value\nOK\n".to_vec();
    g.extend_from_slice(kv_node::repl::HELP.as_bytes());
    g.extend_from_slice(b"\n(kv shell: FLUSH is implicit, SNAP, SETBATCH and BENCH act on a local engine: use kv repl)\nERR SIZE takes no arguments\n");
    for _ in 0..3 {
        g.extend_from_slice(
            b"ERR this command acts on a local engine; use kv repl on a data directory\n",
        );
    }
    g.extend_from_slice(b"4\n");
    g
}

const SHELL_SCRIPT: &[u8] = b"PUT a hello world\nGET a\nput b 2\n\nSIZE\nGET nothing\nPUT u na\xc3\xafve caf\xc3\xa9\nGET u\nPUT bin \xff\xfe\x00\x01 raw\nGET bin\nPUT c crlf\r\nGET c\nDEL a\nget a\nFROB x\nPUT k\nFLUSH\nHELP\nSIZE now\nSNAP\nSETBATCH 3\nBENCH 2\nSIZE\nEXIT\nGET b\n";

#[test]
fn piped_kv_shell_prints_exactly_what_it_did_before() {
    let cluster = Cluster::start();
    let mut shell = Command::new(KV)
        .args(["shell", "--endpoints", &cluster.endpoint(2)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(shell.stdin.as_mut().unwrap(), SHELL_SCRIPT).unwrap();
    drop(shell.stdin.take());
    let out = shell.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let want = shell_golden();
    assert!(
        out.stdout == want,
        "kv shell on a pipe:\n got {:?}\nwant {:?}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&want)
    );
}

/// Runs `command` on a pseudo-terminal (`script -qec`), typing `lines`
/// one by one; returns what the terminal showed.
fn on_a_terminal(command: &str, lines: &[&str], env: &[(&str, &str)]) -> Option<Vec<u8>> {
    let mut child = match Command::new("script")
        .args(["-qec", command, "/dev/null"])
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            eprintln!("skipped: no util-linux `script` to fake a terminal ({e})");
            return None;
        }
    };
    let mut stdin = child.stdin.take().unwrap();
    for line in lines {
        // One at a time, as typed: the editor reads each before the next.
        std::thread::sleep(Duration::from_millis(300));
        std::io::Write::write_all(&mut stdin, format!("{line}\n").as_bytes()).unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{command}: {out:?}");
    Some(out.stdout)
}

#[test]
fn on_a_terminal_repl_and_shell_edit_lines_and_keep_history() {
    let cluster = Cluster::start();
    let tmp = tempfile::tempdir().unwrap();
    let history = tmp.path().join("history");
    let history_env = history.to_str().unwrap();
    let repl = format!("{KV} repl --data-dir {}", tmp.path().join("data").display());
    let shell = format!("{KV} shell --endpoints {}", cluster.endpoint(1));
    for (what, command) in [("repl", &repl), ("shell", &shell)] {
        let _ = std::fs::remove_file(&history);
        let Some(screen) = on_a_terminal(
            command,
            &["PUT t typed", "GET t", "EXIT"],
            &[("KV_HISTORY", history_env)],
        ) else {
            return;
        };
        let screen = String::from_utf8_lossy(&screen);
        // rustyline's prompt, and bracketed paste switched on around it.
        assert!(
            screen.contains("kv> ")
                && screen.contains("\x1b[?2004h")
                && screen.contains("typed\r\n"),
            "kv {what} on a terminal: {screen:?}"
        );
        let kept = std::fs::read_to_string(&history).unwrap_or_default();
        assert!(
            kept.contains("PUT t typed") && kept.contains("GET t"),
            "kv {what}: history {kept:?}"
        );
    }
}
