//! Applying records: in LSN order, to the map, once each may be seen; the
//! commit LSN and its `COMMIT` file; the leader's digest checkpoints.
//!
//! `apply_ready` runs under the state lock at the end of every flush round
//! and whenever the commit LSN moves: it applies queued records in LSN
//! order, each once it is visible (single node: durable, or written in
//! batch mode; replicated mode: committed *and* durable here), and mirrors
//! the map's applied LSN. In replicated mode [`Engine::set_commit_lsn`] also
//! writes the applied LSN to `COMMIT` (not synced: a lost update only lowers
//! the floor recovery applies to, which the leader's commit LSN raises
//! again). As each record applies, the digest checkpoints a leader sent
//! ([`Engine::expect_digest`]) are compared; the first mismatch is kept as a
//! [`Divergence`]. A digest checkpoint is a comparison point, not a
//! snapshot (those are `checkpoint.rs`'s).
//!
//! What it does not do: decide what is committed (the cluster does and
//! passes the commit LSN in), write or sync the WAL (`commit.rs`), or act on
//! a divergence (the caller decides what to refuse).

use std::path::Path;

use super::{Engine, EngineError, Level, Result, State, lock, read, write};
use crate::storage::Storage;

/// A replica's state that differs from another's at the same applied LSN
/// (the same records were applied, so one of the two states is wrong: a
/// disk that returned other bytes with a valid CRC, a bug, memory damage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Divergence {
    /// The LSN both had applied.
    pub lsn: u64,
    /// This engine's digest there.
    pub ours: u64,
    /// The other replica's.
    pub theirs: u64,
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "state diverged at LSN {}: digest {:016x} here, {:016x} on the leader",
            self.lsn, self.ours, self.theirs
        )
    }
}

/// Checkpoints waiting for their LSN at most (older ones are dropped).
const CHECKPOINTS_MAX: usize = 64;

impl State {
    /// Compares this state's digest at `lsn` with another replica's; the
    /// first mismatch is kept.
    fn check_digest(&mut self, lsn: u64, ours: u64, theirs: u64) {
        if ours != theirs && self.divergence.is_none() {
            self.divergence = Some(Divergence { lsn, ours, theirs });
        }
    }
}

/// `COMMIT` and the LSN last written to it.
#[derive(Default)]
pub(super) struct CommitFile {
    /// Opened (or created) on the first write.
    file: Option<Box<dyn crate::storage::StorageFile>>,
    /// The LSN last written, if any. Writers compute their value under
    /// `state` and write it after releasing it, so two of them can reach the
    /// file in the other order: the later-computed (higher) value must win,
    /// so a value at or below this one is not written.
    written: Option<u64>,
}

impl Engine {
    /// Applies queued records in LSN order: in single-node mode each once it
    /// is visible (durable, or written in batch mode), in replicated mode
    /// once it is committed and durable here.
    pub(super) fn apply_ready(&self, st: &mut State) {
        let mut map = None;
        while let Some(front) = st.pending_apply.front() {
            let limit = match (st.commit_lsn, front.visible_at) {
                (Some(commit), _) => commit.min(st.durable_lsn),
                (None, Level::Written) => st.written_lsn,
                (None, Level::Durable) => st.durable_lsn,
            };
            if front.record.lsn > limit {
                break;
            }
            let Some(p) = st.pending_apply.pop_front() else {
                break;
            };
            let map = map.get_or_insert_with(|| write(&self.map));
            map.apply(p.record.lsn, p.record.term, p.record.op);
            st.applied_lsn = map.applied_lsn();
            while let Some(&(lsn, theirs)) = st.checkpoints.front() {
                if lsn > st.applied_lsn {
                    break;
                }
                st.checkpoints.pop_front();
                if lsn == st.applied_lsn {
                    st.check_digest(lsn, map.digest(), theirs);
                }
            }
        }
        assert!(st.applied_lsn <= st.written_lsn, "applied <= written");
        if st.commit_lsn.is_some() {
            assert!(
                st.applied_lsn <= st.durable_lsn,
                "applied <= durable (replicated)"
            );
        }
    }

    /// Another replica (the leader) had `digest` once it applied `lsn`:
    /// this engine compares its own when it has applied exactly `lsn` (now,
    /// if it is there; later, as it applies; never, if it is already past
    /// it). A mismatch is kept as [`Engine::divergence`]; it changes
    /// nothing else here, the caller decides what to refuse.
    pub fn expect_digest(&self, lsn: u64, digest: u64) {
        let mut st = lock(&self.state);
        if lsn < st.applied_lsn {
            return;
        }
        if lsn == st.applied_lsn {
            let ours = read(&self.map).digest();
            st.check_digest(lsn, ours, digest);
            return;
        }
        if st.checkpoints.back().is_some_and(|&(last, _)| last >= lsn) {
            return;
        }
        if st.checkpoints.len() >= CHECKPOINTS_MAX {
            st.checkpoints.pop_front();
        }
        st.checkpoints.push_back((lsn, digest));
    }

    /// The first checkpoint this replica's state failed, if one did.
    pub fn divergence(&self) -> Option<Divergence> {
        lock(&self.state).divergence
    }

    /// The commit LSN (replicated mode), or the durable LSN (single node).
    pub fn commit_lsn(&self) -> u64 {
        let st = lock(&self.state);
        st.commit_lsn.unwrap_or(st.durable_lsn)
    }

    /// Switches to replicated mode: records are applied only once `commit`
    /// covers them and they are durable here. `commit` never goes backwards.
    ///
    /// In replicated mode the new commit LSN is also written (not synced) to
    /// `COMMIT`: recovery applies records up to what it finds there. A lost
    /// or torn update only makes that floor lower, which is safe: the leader
    /// sends its commit LSN again.
    ///
    /// The file is written after the state lock is released (writers and
    /// the flusher need it meanwhile), under its own mutex; of two racing
    /// calls the higher value is the one left in the file.
    pub fn set_commit_lsn(&self, commit: u64) -> Result<()> {
        let applied = {
            let mut st = lock(&self.state);
            let commit = commit.min(st.log.last_lsn());
            let previous = st.commit_lsn.unwrap_or(0);
            if st.commit_lsn.is_some() && commit <= previous {
                return Ok(());
            }
            st.commit_lsn = Some(previous.max(commit));
            self.apply_ready(&mut st);
            // Only what is applied (committed and durable here) is
            // recorded. The applied LSN never goes down (truncation keeps
            // applied records), so a value computed here stays a lower
            // bound of it while it is written below.
            st.applied_lsn
        };
        if self.config.replicated {
            self.write_commit_file(applied)?;
        }
        Ok(())
    }

    /// Writes `applied` to `COMMIT` unless a value at least as high is
    /// there already (see [`CommitFile::written`]).
    fn write_commit_file(&self, applied: u64) -> Result<()> {
        let mut cf = lock(&self.commit_file);
        if cf.written.is_some_and(|w| w >= applied) {
            return Ok(());
        }
        let path = self.config.data_dir.join(COMMIT_FILE);
        let file = match cf.file.take() {
            Some(file) => file,
            None => match self.storage.open(&path) {
                Ok(file) => file,
                Err(_) => {
                    let file = self
                        .storage
                        .create(&path)
                        .map_err(EngineError::io("create commit file", &path))?;
                    let dir = &self.config.data_dir;
                    self.storage
                        .sync_dir(dir)
                        .map_err(EngineError::io("sync data directory", dir))?;
                    file
                }
            },
        };
        let written = file.write_at(&encode_commit(applied), 0);
        cf.file = Some(file);
        written.map_err(EngineError::io("write commit file", &path))?;
        cf.written = Some(applied);
        Ok(())
    }
}

/// File holding the last applied commit LSN of a replicated node.
pub const COMMIT_FILE: &str = "COMMIT";

/// `lsn u64 | crc32 u32` (little endian), one sector: 12 bytes.
fn encode_commit(lsn: u64) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..8].copy_from_slice(&lsn.to_le_bytes());
    let crc = crc32fast::hash(&b[..8]);
    b[8..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// The commit floor saved in `COMMIT`: 0 if missing or damaged (a lower
/// floor is always safe; the leader resends its commit LSN).
pub(super) fn read_commit_file(storage: &dyn Storage, dir: &Path) -> Result<u64> {
    let path = dir.join(COMMIT_FILE);
    let names = storage
        .list_dir(dir)
        .map_err(EngineError::io("list data directory", dir))?;
    if !names.iter().any(|n| n == COMMIT_FILE) {
        return Ok(0);
    }
    let bytes = storage
        .read_file(&path)
        .map_err(EngineError::io("read commit file", &path))?;
    let Some(b) = bytes.get(..12) else {
        return Ok(0);
    };
    let mut lsn = [0u8; 8];
    lsn.copy_from_slice(&b[..8]);
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&b[8..12]);
    if crc32fast::hash(&b[..8]) != u32::from_le_bytes(crc) {
        tracing::warn!(path = %path.display(), "commit file does not verify; recovering from commit 0");
        return Ok(0);
    }
    Ok(u64::from_le_bytes(lsn))
}
