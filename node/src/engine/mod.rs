//! The local engine: an ordered in-memory map made durable by a write-ahead
//! log with group commit, snapshots, and deterministic recovery.
//!
//! What it promises: a write acknowledged as durable is never lost, and a
//! write that was not is, after any crash, either wholly there or wholly
//! absent. See `node/DESIGN.md` for the byte layouts and the argument.
//!
//! How a write flows (sync mode, `batch == 1`):
//! 1. under the state lock the op is validated, given the next LSN, encoded
//!    into the [`LogBuffer`] and queued for apply;
//! 2. the writer waits until `durable_lsn >= lsn`. If no flush is running it
//!    becomes the flusher itself (no thread hop on the fast path): it takes
//!    every buffered chunk, writes and `fdatasync`s them *outside* the state
//!    lock while other writers keep appending, then applies every queued op
//!    that is now durable, in LSN order, and wakes all waiters. One sync
//!    covers every writer that appended before it: group commit;
//! 3. only then is the write visible to readers and acknowledged.
//!
//! In batch mode (`batch == N > 1`) a write is applied at once and
//! acknowledged once *written* (handed to the OS: it survives a process kill),
//! and every N-th write, `FLUSH` and the caller's flush timer make everything
//! durable. Up to N-1 acknowledged writes (and at most one timer interval)
//! can be lost to a power failure.
//!
//! The flusher is also drivable without threads: [`Engine::submit`] appends
//! without waiting and [`Engine::flush_step`] runs one flush round, so a
//! simulation can drive the engine on one thread.
//!
//! Positions, asserted after every flush round:
//! `durable_lsn <= written_lsn <= last_lsn` and `applied_lsn <= written_lsn`;
//! in sync and replicated mode also `applied_lsn <= durable_lsn` (a batch-mode
//! write is visible once written).
//!
//! What it does not do: networking, replication decisions, or timers of its
//! own (the caller runs the flush timer; see [`crate::timer`]).
//!
//! Where the code is, one `impl Engine` block per file:
//! - this file: the [`Engine`] type and its shared state, [`EngineConfig`],
//!   reads of the applied state, [`EngineStats`], the lock helpers;
//! - `open.rs`: opening and recovery, decided as a pure plan before the
//!   engine repairs a file of its own;
//! - `commit.rs`: group commit: appends, flush rounds, waiting for a
//!   position, batch mode, poisoning, and the exclusive log operations;
//! - `apply.rs`: applying records in LSN order, the commit LSN and its
//!   `COMMIT` file, the leader's digest checkpoints;
//! - `checkpoint.rs`: snapshots as checkpoints of the log: taking one and
//!   what it lets the engine delete, installing a leader's, finding the
//!   newest to ship;
//! - `replication.rs`: the log hooks a cluster node uses: terms, appends at
//!   given LSNs, reads from an LSN, truncation;
//! - below those, with no `Engine` in them: the WAL files ([`wal`]), the
//!   log buffer ([`log_buffer`]), snapshot files ([`snapshot`]), the map
//!   ([`state`]), terms ([`terms`]), byte layouts ([`record`]), errors
//!   ([`error`]).

pub mod error;
pub mod log_buffer;
pub mod record;
pub mod snapshot;
pub mod state;
pub mod terms;
pub mod wal;

mod apply;
mod checkpoint;
mod commit;
mod open;
mod replication;

use std::any::Any;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{
    Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
};

pub use apply::{COMMIT_FILE, Divergence};
pub use checkpoint::SnapshotInfo;
pub use error::{EngineError, Result};
pub use open::RecoverySummary;
pub use record::{Op, RECORD_PAYLOAD_BYTES_MAX, Record};

use apply::CommitFile;
use log_buffer::LogBuffer;
use state::MapState;
use terms::TermRuns;
use wal::Wal;

use crate::storage::Storage;

/// Engine settings. Every field has a default (see [`EngineConfig::new`]).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Directory for WAL segments and snapshots; created on demand.
    pub data_dir: PathBuf,
    /// Longest key accepted, in bytes. Default 1 KiB.
    pub key_bytes_max: usize,
    /// Longest value accepted, in bytes. Default 1 MiB.
    pub value_bytes_max: usize,
    /// A WAL segment is sealed once it holds this many bytes. Default 64 MiB.
    pub segment_bytes_max: u64,
    /// The active segment grows by this many zeroed bytes at a time, so
    /// syncs rarely change the file size. 0: no preallocation. Default 1 MiB.
    pub segment_preallocate_bytes: u64,
    /// Take a snapshot automatically after this many WAL bytes since the last
    /// one; 0 turns automatic snapshots off. Default 64 MiB.
    pub snapshot_wal_bytes: u64,
    /// Sync every `batch` writes; 1 (the default) syncs before every
    /// acknowledgement.
    pub batch: u32,
    /// In batch mode, the longest a written write stays unsynced, in
    /// milliseconds (enforced by [`crate::timer::FlushTimer`]). Default 100.
    pub flush_interval_ms: u64,
    /// Bytes one group commit writes at most. Default 4 MiB.
    pub group_commit_bytes_max: usize,
    /// Records one group commit writes at most. Default 16384.
    pub group_commit_records_max: usize,
    /// Replicated mode (a cluster node): records are applied only once
    /// committed. Recovery applies records up to the commit LSN last saved
    /// in the `COMMIT` file and keeps the rest waiting for the leader.
    /// Default false (single node: durable means committed).
    pub replicated: bool,
}

impl EngineConfig {
    /// Defaults, with data in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        EngineConfig {
            data_dir: data_dir.into(),
            key_bytes_max: 1024,
            value_bytes_max: 1 << 20,
            segment_bytes_max: 64 << 20,
            segment_preallocate_bytes: 1 << 20,
            snapshot_wal_bytes: 64 << 20,
            batch: 1,
            flush_interval_ms: 100,
            group_commit_bytes_max: 4 << 20,
            group_commit_records_max: 16384,
            replicated: false,
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |why: &str| Err(EngineError::Config(why.to_owned()));
        if self.key_bytes_max == 0 {
            return bad("key_bytes_max must be at least 1");
        }
        let payload = self
            .key_bytes_max
            .checked_add(self.value_bytes_max)
            .and_then(|n| n.checked_add(4));
        if payload.is_none_or(|n| n > RECORD_PAYLOAD_BYTES_MAX) {
            return bad(
                "key_bytes_max + value_bytes_max must be under 64 MiB (the WAL format's record limit)",
            );
        }
        if self.segment_preallocate_bytes > 1 << 30 {
            return bad("segment_preallocate_bytes must be at most 1 GiB");
        }
        if self.segment_bytes_max < 4096 {
            return bad("segment_bytes_max must be at least 4096");
        }
        if self.batch == 0 {
            return bad("batch must be at least 1");
        }
        if self.group_commit_bytes_max == 0 || self.group_commit_records_max == 0 {
            return bad("group commit bounds must be positive");
        }
        Ok(())
    }
}

/// A point-in-time view of the engine's positions and counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineStats {
    /// Last LSN appended.
    pub last_lsn: u64,
    /// Last LSN handed to the OS.
    pub written_lsn: u64,
    /// Last LSN covered by a completed `fdatasync`.
    pub durable_lsn: u64,
    /// Last LSN applied to the map.
    pub applied_lsn: u64,
    /// LSN of the newest snapshot on disk (0 if none).
    pub snapshot_lsn: u64,
    /// Keys in the map.
    pub keys: usize,
    /// State digest.
    pub digest: u64,
    /// WAL `fdatasync` calls made by group commit since open.
    pub fsyncs: u64,
    /// Current batch setting.
    pub batch: u32,
    /// Why the engine is poisoned, if it is.
    pub poisoned: Option<String>,
}

/// A record waiting to be applied, and when it may be (single-node mode).
#[derive(Debug)]
struct Pending {
    record: Record,
    /// `Durable`: sync mode, visible once durable. `Written`: batch mode,
    /// visible once handed to the OS.
    visible_at: Level,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Written,
    Durable,
}

#[derive(Debug)]
struct State {
    log: LogBuffer,
    /// Every record with LSN <= this was handed to the OS.
    written_lsn: u64,
    /// Every record with LSN <= this is covered by a completed sync.
    durable_lsn: u64,
    /// Records appended but not yet applied, in LSN order.
    pending_apply: VecDeque<Pending>,
    /// Mirror of the map's applied LSN (readable without the map lock).
    applied_lsn: u64,
    /// Digests another replica had at LSNs not yet applied here, in LSN
    /// order: when this engine applies that LSN it compares its own
    /// ([`Engine::expect_digest`]).
    checkpoints: VecDeque<(u64, u64)>,
    /// The first checkpoint this state failed, if one did.
    divergence: Option<Divergence>,
    /// The term of every LSN the log holds.
    terms: TermRuns,
    /// Bumped by every truncation, so a waiter for a truncated LSN fails
    /// instead of waiting for a different record with the same LSN.
    truncations: u64,
    /// Bumped when a log cut (truncation, snapshot install) *begins*, before
    /// it touches a file: a reader that saw the same value before and after
    /// reading read no byte the cut changed.
    cuts: u64,
    /// In replicated mode, records above this are not applied even when
    /// durable (they are not committed yet). `None`: single-node mode, where
    /// durable means committed.
    commit_lsn: Option<u64>,
    /// A flush round (or another exclusive WAL operation) is running.
    flushing: bool,
    /// Flush rounds completed; the round in progress (if `flushing`) is
    /// `rounds_done + 1`. Waiters sleep on `wakeups[round % 2]` for the round
    /// that will cover them.
    rounds_done: u64,
    /// The last LSN the round in progress writes.
    round_target: u64,
    /// Whether the round in progress syncs.
    round_syncs: bool,
    /// Threads asleep on each of `wakeups`: a notify is a system call even
    /// with nobody waiting, so it is skipped when nobody is.
    sleepers: [u32; 2],
    /// The highest LSN some waiter needs durable.
    sync_wanted: u64,
    poisoned: Option<String>,
    batch: u32,
    term: u64,
    wal_bytes_since_snapshot: u64,
    snapshot_lsn: u64,
}

/// The engine. Share it between threads with an `Arc`.
pub struct Engine {
    storage: Arc<dyn Storage>,
    config: EngineConfig,
    state: Mutex<State>,
    /// Waiters for round `r` sleep on `wakeups[r % 2]`. When round `r` ends,
    /// all of `wakeups[r % 2]` wake (their writes are covered) and one of
    /// `wakeups[(r + 1) % 2]` wakes to run the next round: no thundering herd
    /// of waiters that the round did not cover.
    wakeups: [Condvar; 2],
    /// Lock order: `wal`, then `state`, then `map`.
    map: RwLock<MapState>,
    wal: Mutex<Wal>,
    /// `COMMIT` (replicated mode). Taken with no other lock held: its file
    /// I/O never runs under `state`.
    commit_file: Mutex<CommitFile>,
    snapshot_lock: Mutex<()>,
    snapshot_running: AtomicBool,
    fsyncs: AtomicU64,
    /// Metric handles (no-ops unless `kv serve` installed a recorder).
    metrics: crate::metrics::EngineMetrics,
    recovery: RecoverySummary,
    _dir_lock: Box<dyn Any + Send + Sync>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("data_dir", &self.config.data_dir)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock is a bug that already failed loudly; the
    // guarded data is kept consistent by the code holding it, so go on.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(PoisonError::into_inner)
}

impl Engine {
    /// The configuration in force.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Checks a key and value against the configured limits.
    pub fn validate(&self, key: &[u8], value: Option<&[u8]>) -> Result<()> {
        if key.is_empty() {
            return Err(EngineError::EmptyKey);
        }
        if key.len() > self.config.key_bytes_max {
            return Err(EngineError::KeyTooLarge {
                len: key.len(),
                max: self.config.key_bytes_max,
            });
        }
        if let Some(v) = value
            && v.len() > self.config.value_bytes_max
        {
            return Err(EngineError::ValueTooLarge {
                len: v.len(),
                max: self.config.value_bytes_max,
            });
        }
        Ok(())
    }

    /// Sets `key` to `value`; returns the write's LSN once it is acknowledged
    /// (durable in sync mode, written in batch mode).
    pub fn put(&self, key: Vec<u8>, value: Vec<u8>) -> Result<u64> {
        self.validate(&key, Some(&value))?;
        self.write(Op::Put { key, value })
    }

    /// Removes `key` (acknowledged like [`Engine::put`]).
    pub fn delete(&self, key: Vec<u8>) -> Result<u64> {
        self.validate(&key, None)?;
        self.write(Op::Delete { key })
    }

    /// The value of `key`, as of the applied state.
    pub fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        read(&self.map).get(key).cloned()
    }

    /// The value of `key` and the applied LSN it reflects, read together.
    pub fn get_with_lsn(&self, key: &[u8]) -> (Option<Vec<u8>>, u64) {
        let map = read(&self.map);
        (map.get(key).cloned(), map.applied_lsn())
    }

    /// Number of keys in the applied state.
    pub fn len(&self) -> usize {
        read(&self.map).len()
    }

    /// True if the applied state has no keys.
    pub fn is_empty(&self) -> bool {
        read(&self.map).is_empty()
    }

    /// Digest of the applied state and the LSN it reflects.
    pub fn digest(&self) -> (u64, u64) {
        let map = read(&self.map);
        (map.digest(), map.applied_lsn())
    }

    /// Recomputes the digest from every entry and checks it against the
    /// incremental one; returns it. For tests and `kv check`.
    pub fn verify_digest(&self) -> u64 {
        let map = read(&self.map);
        let full = map.digest_full();
        assert_eq!(full, map.digest(), "incremental digest matches the entries");
        full
    }

    /// Calls `f` with every entry, in no particular order (under the read
    /// lock).
    pub fn for_each(&self, mut f: impl FnMut(&[u8], &[u8])) {
        for (k, v) in read(&self.map).iter() {
            f(k, v);
        }
    }

    fn check_writable(&self, st: &State) -> Result<()> {
        match &st.poisoned {
            Some(cause) => Err(EngineError::Poisoned {
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    /// LSN of the last record appended.
    pub fn last_lsn(&self) -> u64 {
        lock(&self.state).log.last_lsn()
    }

    /// LSN through which the log is durable.
    pub fn durable_lsn(&self) -> u64 {
        lock(&self.state).durable_lsn
    }

    /// The engine's positions and counters.
    pub fn stats(&self) -> EngineStats {
        let st = lock(&self.state);
        let map = read(&self.map);
        EngineStats {
            last_lsn: st.log.last_lsn(),
            written_lsn: st.written_lsn,
            durable_lsn: st.durable_lsn,
            applied_lsn: map.applied_lsn(),
            snapshot_lsn: st.snapshot_lsn,
            keys: map.len(),
            digest: map.digest(),
            fsyncs: self.fsyncs.load(Ordering::Relaxed),
            batch: st.batch,
            poisoned: st.poisoned.clone(),
        }
    }

    /// True once a failed write or sync poisoned the engine.
    pub fn poisoned(&self) -> bool {
        lock(&self.state).poisoned.is_some()
    }

    /// Bytes the WAL's segment files hold (records and headers, not
    /// preallocated space). Waits for a flush round's I/O (it takes the
    /// WAL lock): for scrapes, not the write path.
    pub fn wal_bytes(&self) -> u64 {
        lock(&self.wal).segments().iter().map(|s| s.bytes).sum()
    }

    /// The storage the engine runs on (a node keeps its term file there too).
    pub fn storage(&self) -> Arc<dyn Storage> {
        self.storage.clone()
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }
}
