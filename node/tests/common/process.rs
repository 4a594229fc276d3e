//! Starting the real `kv` binary from tests so that it cannot outlive the
//! test process, and telling from `/proc` whether a process still runs.
//!
//! `Drop` does not run when a test binary is SIGKILLed (or aborted by a
//! second Ctrl-C), so a node stopped only in some `Drop` would live on,
//! holding its port and its data directory's lock. The lifeline: every
//! `kv serve` started here gets a pipe as stdin and `--exit-on-stdin-eof`;
//! the write end stays in the returned [`Child`] (`child.stdin`), the kernel
//! closes it when the test process dies for whatever reason, and the node
//! then stops as on SIGTERM. `kv repl` needs no option: it reads its commands
//! from stdin and ends at EOF, so a piped stdin the test holds is already its
//! lifeline (the REPL tests keep theirs in their `Child` or close it to end
//! the session).
//!
//! Not done here: killing children when a test fails; the callers' `Drop`
//! does that, and the lifeline covers the case where `Drop` never runs.

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// The `kv` binary under test.
pub const KV: &str = env!("CARGO_BIN_EXE_kv");

/// Starts `kv serve --config <config>` with the stdin lifeline, stderr to
/// `log`. Keep the returned child's `stdin` open for as long as the node
/// should run (`Child::wait` closes it, which is fine once it was killed).
pub fn serve(config: &Path, log: File) -> Child {
    Command::new(KV)
        .args(["serve", "--exit-on-stdin-eof", "--config"])
        .arg(config)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn kv serve")
}

/// A process's identity: its pid and its start time (in clock ticks since
/// boot, field 22 of `/proc/<pid>/stat`), so a pid the kernel reuses is not
/// mistaken for the process it named. `None` if no such process exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pid {
    pub pid: u32,
    pub start_ticks: u64,
}

/// `/proc/<pid>/stat`'s state letter and start time, if the pid exists.
fn stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces or
    // parentheses itself: the fields after the last ')' are plain.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 3 is the state, so field 22 (the start time) is index 19 here.
    let start_ticks = fields.get(19)?.parse().ok()?;
    Some((state, start_ticks))
}

impl Pid {
    /// The running process `pid`, if there is one.
    pub fn of(pid: u32) -> Option<Pid> {
        let (_, start_ticks) = stat(pid)?;
        Some(Pid { pid, start_ticks })
    }

    /// True while this very process exists and has not exited. A zombie
    /// (exited, not yet reaped by its parent, which after the death of
    /// ours is init or a subreaper) holds no port, file or lock: it
    /// counts as gone.
    pub fn running(&self) -> bool {
        stat(self.pid).is_some_and(|(state, start)| start == self.start_ticks && state != 'Z')
    }

    /// Waits up to `limit` until the process is gone; true if it is.
    pub fn gone_within(&self, limit: std::time::Duration) -> bool {
        let start = std::time::Instant::now();
        while self.running() {
            if start.elapsed() > limit {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        true
    }

    /// SIGKILLs the process if it still runs (clean-up after a failed
    /// check; the identity check keeps a reused pid safe).
    pub fn kill_if_running(&self) {
        if self.running() {
            let _ = Command::new("kill")
                .args(["-KILL", &self.pid.to_string()])
                .status();
        }
    }
}

/// SIGKILLs the processes that still run when dropped: for a test that
/// expects them gone and fails, so they do not outlive it either.
pub struct KillOnDrop(pub Vec<Pid>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.0.iter().for_each(Pid::kill_if_running);
    }
}

/// Sends `signal` to process `pid`, which must exist.
pub fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("a pid fits an i32"));
    nix::sys::signal::kill(pid, signal).expect("send the signal");
}
