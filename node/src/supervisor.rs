//! `kv cluster up`: runs `kv serve` for every node configuration in a
//! directory as child processes, logs to files, and supervises them.
//!
//! - A node that exits is reported with its id and how it ended (exit
//!   status, or the signal that killed it); the others keep serving. With
//!   `restart`, it is started again after a pause that doubles (from 1 s,
//!   up to 30 s) while it keeps dying within 10 s of its start.
//! - Each child gets a pipe as stdin and `--exit-on-stdin-eof` (the
//!   lifeline): if the supervisor dies, even by SIGKILL, every node sees
//!   its stdin close and stops cleanly.
//! - On `shutdown` (the caller's: SIGINT or SIGTERM) every running node
//!   gets SIGTERM and is waited for; the stop is clean if each exited with
//!   status 0.
//!
//! Not here: what a node does on SIGTERM (`kv serve`), or reading the
//! configurations beyond the node id and address it reports.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, ChildStdin, Command};
use tokio::time::Instant;

use crate::server::config::NodeConfig;

/// The first pause before a restart, and the longest.
const RESTART_PAUSE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));
/// A node that ran at least this long before it died restarts after the
/// first pause again.
const RAN_LONG_ENOUGH: Duration = Duration::from_secs(10);

/// One configured node.
#[derive(Debug, Clone)]
struct Member {
    id: u64,
    config: PathBuf,
    log: PathBuf,
    listen: std::net::SocketAddr,
}

/// A running node: the child, its lifeline (held apart: `Child::wait`
/// closes the child's stdin, which would end its life), when it started.
struct Running {
    child: Child,
    _lifeline: ChildStdin,
    started: Instant,
}

/// How a child ended, in words.
pub fn describe(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return if code == 0 {
            "exited cleanly (status 0)".to_owned()
        } else {
            format!("exited with status {code}")
        };
    }
    match status.signal() {
        Some(sig) => match Signal::try_from(sig) {
            Ok(name) => format!("was killed by signal {sig} ({name})"),
            Err(_) => format!("was killed by signal {sig}"),
        },
        None => format!("ended ({status})"),
    }
}

fn start(exe: &Path, member: &Member, append: bool) -> anyhow::Result<Running> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(&member.log)
        .with_context(|| format!("open {}", member.log.display()))?;
    let mut child = Command::new(exe)
        .arg("serve")
        .arg("--config")
        .arg(&member.config)
        .arg("--exit-on-stdin-eof")
        .stdin(Stdio::piped())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("start node {}", member.id))?;
    let lifeline = child
        .stdin
        .take()
        .context("the child's stdin pipe is missing")?;
    eprintln!(
        "kv: node {} on {} (pid {}), log {}",
        member.id,
        member.listen,
        child.id().unwrap_or(0),
        member.log.display()
    );
    Ok(Running {
        child,
        _lifeline: lifeline,
        started: Instant::now(),
    })
}

enum Event {
    Stop,
    Exited(u64, std::io::Result<ExitStatus>),
    RestartDue,
}

/// Runs every `*.toml` node configuration in `dir` until `shutdown`
/// resolves (or, without `restart`, until every node has exited). Returns
/// true if the final stop was clean.
pub async fn cluster_up(
    exe: &Path,
    dir: &Path,
    log_dir: &Path,
    restart: bool,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<bool> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    if paths.is_empty() {
        anyhow::bail!("no *.toml node configurations in {}", dir.display());
    }
    std::fs::create_dir_all(log_dir).with_context(|| format!("create {}", log_dir.display()))?;
    let mut members = BTreeMap::new();
    for path in paths {
        let config = NodeConfig::load(&path)?;
        let member = Member {
            id: config.node_id,
            log: log_dir.join(format!("node{}.log", config.node_id)),
            listen: config.listen,
            config: path,
        };
        if members.insert(member.id, member).is_some() {
            anyhow::bail!(
                "two configurations in {} are node {}",
                dir.display(),
                config.node_id
            );
        }
    }
    let mut running: BTreeMap<u64, Running> = BTreeMap::new();
    for member in members.values() {
        running.insert(member.id, start(exe, member, false)?);
    }
    eprintln!(
        "kv: cluster up; Ctrl-C or SIGTERM stops it{}",
        if restart {
            "; a node that exits is restarted"
        } else {
            ""
        }
    );
    let mut due: BTreeMap<u64, Instant> = BTreeMap::new();
    let mut pause: BTreeMap<u64, Duration> = BTreeMap::new();
    tokio::pin!(shutdown);
    loop {
        if running.is_empty() && due.is_empty() {
            eprintln!("kv: every node has exited");
            return Ok(false);
        }
        let event = {
            let exits = async {
                if running.is_empty() {
                    return std::future::pending().await;
                }
                let waits = running
                    .iter_mut()
                    .map(|(id, r)| Box::pin(async move { (*id, r.child.wait().await) }));
                futures_util::future::select_all(waits).await.0
            };
            let next = due.values().min().copied();
            let restart_due = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = &mut shutdown => Event::Stop,
                (id, status) = exits => Event::Exited(id, status),
                () = restart_due => Event::RestartDue,
            }
        };
        match event {
            Event::Stop => break,
            Event::Exited(id, status) => {
                let Some(gone) = running.remove(&id) else {
                    continue;
                };
                let how = status.map_or_else(|e| format!("could not be waited for: {e}"), describe);
                let member = &members[&id];
                if restart {
                    let ran = gone.started.elapsed();
                    let wait = match pause.get(&id) {
                        Some(p) if ran < RAN_LONG_ENOUGH => (*p * 2).min(RESTART_PAUSE.1),
                        _ => RESTART_PAUSE.0,
                    };
                    pause.insert(id, wait);
                    due.insert(id, Instant::now() + wait);
                    eprintln!(
                        "kv: node {id} {how}; restarting it in {:.0} s (the others keep serving)",
                        wait.as_secs_f64()
                    );
                } else {
                    eprintln!(
                        "kv: node {id} {how}; the others keep serving (start it again with \
                         `kv serve --config {}`, or run `kv cluster up --restart`)",
                        member.config.display()
                    );
                }
            }
            Event::RestartDue => {
                let now = Instant::now();
                let ready: Vec<u64> = due
                    .iter()
                    .filter(|(_, at)| **at <= now)
                    .map(|(id, _)| *id)
                    .collect();
                for id in ready {
                    due.remove(&id);
                    eprintln!("kv: restarting node {id}");
                    running.insert(id, start(exe, &members[&id], true)?);
                }
            }
        }
    }
    // Stop every node cleanly: SIGTERM makes each one (hand over if it
    // leads,) sync and exit.
    for (id, r) in &running {
        if let Some(pid) = r.child.id().and_then(|p| i32::try_from(p).ok())
            && let Err(e) = kill(Pid::from_raw(pid), Signal::SIGTERM)
        {
            eprintln!("kv: could not signal node {id} (pid {pid}): {e}");
        }
    }
    let mut clean = true;
    for (id, mut r) in running {
        match r.child.wait().await {
            Ok(status) if status.success() => {}
            Ok(status) => {
                eprintln!("kv: node {id} {}", describe(status));
                clean = false;
            }
            Err(e) => {
                eprintln!("kv: node {id} could not be waited for: {e}");
                clean = false;
            }
        }
    }
    eprintln!("kv: cluster stopped");
    Ok(clean)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_described_by_status_or_signal() {
        assert_eq!(
            describe(ExitStatus::from_raw(0)),
            "exited cleanly (status 0)"
        );
        assert_eq!(
            describe(ExitStatus::from_raw(3 << 8)),
            "exited with status 3"
        );
        assert_eq!(
            describe(ExitStatus::from_raw(9)),
            "was killed by signal 9 (SIGKILL)"
        );
    }
}
