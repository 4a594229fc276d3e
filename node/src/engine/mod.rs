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

pub mod error;
pub mod log_buffer;
pub mod record;
pub mod snapshot;
pub mod state;
pub mod terms;
pub mod wal;

use std::any::Any;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{
    Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
};

pub use error::{EngineError, Result};
use log_buffer::{BufferLimits, LogBuffer};
pub use record::{Op, RECORD_PAYLOAD_BYTES_MAX, Record};
use state::MapState;
use terms::TermRuns;
use wal::{Wal, WalConfig};

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

/// What opening found, for the one-line start-up summary.
#[derive(Debug, Clone, Default)]
pub struct RecoverySummary {
    /// LSN of the snapshot loaded, if any.
    pub snapshot_lsn: Option<u64>,
    /// Snapshots that failed to verify (renamed to `*.broken`), with reasons.
    pub snapshots_rejected: Vec<(PathBuf, String)>,
    /// WAL records replayed on top of the snapshot.
    pub records_replayed: u64,
    /// Bytes cut from a torn WAL tail.
    pub tail_bytes_cut: u64,
    /// A half-created last segment that was removed.
    pub removed_segment: Option<PathBuf>,
    /// Last LSN in the log.
    pub last_lsn: u64,
    /// Keys in the recovered map.
    pub keys: usize,
    /// State digest after recovery.
    pub digest: u64,
}

impl std::fmt::Display for RecoverySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.snapshot_lsn {
            Some(lsn) => write!(f, "snapshot LSN {lsn}")?,
            None => write!(f, "no snapshot")?,
        }
        write!(
            f,
            ", {} WAL records replayed, {} bytes cut from the tail, last LSN {}, {} keys, digest {:016x}",
            self.records_replayed, self.tail_bytes_cut, self.last_lsn, self.keys, self.digest
        )?;
        if !self.snapshots_rejected.is_empty() {
            write!(
                f,
                ", {} bad snapshot(s) set aside",
                self.snapshots_rejected.len()
            )?;
        }
        Ok(())
    }
}

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

/// Result of a snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    /// LSN the snapshot covers.
    pub lsn: u64,
    /// Its path.
    pub path: PathBuf,
    /// Keys in it.
    pub keys: usize,
    /// Its size in bytes.
    pub bytes: u64,
    /// WAL segments deleted because the retained snapshots cover them.
    pub segments_removed: usize,
}

/// Poisons the engine if a flush round unwinds (a panic mid-round).
struct RoundGuard<'a> {
    engine: &'a Engine,
}

impl Drop for RoundGuard<'_> {
    fn drop(&mut self) {
        let mut st = lock(&self.engine.state);
        st.poisoned = Some("a flush round panicked".into());
        st.flushing = false;
        drop(st);
        self.engine.wake_all();
    }
}

/// A record waiting to be applied, and when it may be (single-node mode).
#[derive(Debug)]
struct Pending {
    record: Record,
    /// `Durable`: sync mode, visible once durable. `Written`: batch mode,
    /// visible once handed to the OS.
    visible_at: Level,
}

/// One flush round's work, decided under the state lock.
struct RoundPlan {
    chunks: Vec<wal::Chunk>,
    /// Last LSN in `chunks` (or the written LSN if there are none).
    target: u64,
    sync: bool,
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
struct CommitFile {
    /// Opened (or created) on the first write.
    file: Option<Box<dyn crate::storage::StorageFile>>,
    /// The LSN last written, if any. Writers compute their value under
    /// `state` and write it after releasing it, so two of them can reach the
    /// file in the other order: the later-computed (higher) value must win,
    /// so a value at or below this one is not written.
    written: Option<u64>,
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
    /// Opens the engine on `config.data_dir`, recovering whatever is there:
    /// load the newest snapshot that verifies, replay the WAL after it, cut a
    /// torn tail, refuse mid-log corruption.
    pub fn open(storage: Arc<dyn Storage>, config: EngineConfig) -> Result<Engine> {
        config.validate()?;
        let dir = config.data_dir.clone();
        storage
            .create_dir_all(&dir)
            .map_err(EngineError::io("create data directory", &dir))?;
        let dir_lock = storage.lock_dir(&dir).map_err(|e| {
            if e.kind() == std::io::ErrorKind::WouldBlock {
                EngineError::Locked { dir: dir.clone() }
            } else {
                EngineError::Io {
                    op: "lock data directory",
                    path: dir.clone(),
                    error: e,
                }
            }
        })?;
        // Make the directory's own name durable (a first start creates it).
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        storage.sync_dir(&parent).map_err(EngineError::io(
            "sync parent of the data directory",
            &parent,
        ))?;

        // Decide first (load, replay, judge), change files only once the
        // verdict is "open": a refused open leaves the directory as it was.
        let mut summary = RecoverySummary::default();
        let loaded = snapshot::load_newest(&*storage, &dir)?;
        let mut map = match loaded.snapshot {
            Some(s) => {
                summary.snapshot_lsn = Some(s.lsn);
                MapState::from_snapshot(s.map, s.lsn, s.term, s.digest)
            }
            None => MapState::default(),
        };
        let snapshot_lsn = map.applied_lsn();
        let wal_config = WalConfig {
            segment_bytes_max: config.segment_bytes_max,
            preallocate_bytes: config.segment_preallocate_bytes,
        };
        // In replicated mode only records known committed are applied; the
        // rest wait for the leader's commit LSN.
        let commit_floor = if config.replicated {
            read_commit_file(&*storage, &dir)?.max(snapshot_lsn)
        } else {
            u64::MAX
        };
        let mut terms = TermRuns::new(snapshot_lsn, map.applied_term());
        let mut deferred = VecDeque::new();
        let mut below_snapshot = TermRuns::new(snapshot_lsn, map.applied_term());
        let (wal, rec) = Wal::open(
            storage.clone(),
            &dir,
            wal_config,
            snapshot_lsn,
            config.replicated,
            |r| {
                terms.push(r.lsn, r.term);
                if r.lsn <= commit_floor {
                    map.apply(r.lsn, r.term, r.op);
                } else {
                    deferred.push_back(Pending {
                        record: r,
                        visible_at: Level::Durable,
                    });
                }
            },
            // The snapshot covers these, but the log still holds them: a
            // leader must know their terms to ship them.
            |lsn, term| below_snapshot.push_below(lsn, term),
        )?;
        terms.set_below(below_snapshot);
        assert_eq!(
            map.applied_lsn() + deferred.len() as u64,
            wal.last_lsn(),
            "recovery applies or defers every record"
        );
        for (path, reason) in &loaded.rejected {
            let broken = unused_name(&*storage, &dir, path)?;
            tracing::warn!(path = %path.display(), %reason, "snapshot does not verify; set aside as {}", broken.display());
            storage
                .rename(path, &broken)
                .map_err(EngineError::io("set aside bad snapshot", path))?;
        }
        let temps_removed = remove_snapshot_temps(&*storage, &dir)?;
        if temps_removed || !loaded.rejected.is_empty() {
            storage
                .sync_dir(&dir)
                .map_err(EngineError::io("sync data directory", &dir))?;
        }
        summary.snapshots_rejected = loaded.rejected;

        summary.records_replayed = rec.replayed;
        summary.tail_bytes_cut = rec.tail_bytes_cut;
        summary.removed_segment = rec.removed_segment;
        summary.last_lsn = wal.last_lsn();
        summary.keys = map.len();
        summary.digest = map.digest();
        // The term of the last record: from the WAL if it holds any record,
        // else from the snapshot.
        let last_term = if wal.last_lsn() >= wal.first_lsn() {
            rec.last_term
        } else {
            map.applied_term()
        };

        let limits = BufferLimits {
            segment_bytes_max: config.segment_bytes_max,
            group_commit_bytes_max: config.group_commit_bytes_max,
            group_commit_records_max: config.group_commit_records_max,
        };
        let last = wal.last_lsn();
        let state = State {
            log: LogBuffer::new(
                limits,
                wal.active_header(),
                wal.active_bytes(),
                last,
                last_term,
                wal.salt_high(),
            ),
            written_lsn: last,
            durable_lsn: last,
            applied_lsn: map.applied_lsn(),
            checkpoints: VecDeque::new(),
            divergence: None,
            pending_apply: deferred,
            commit_lsn: config.replicated.then(|| map.applied_lsn()),
            terms,
            truncations: 0,
            cuts: 0,
            flushing: false,
            rounds_done: 0,
            round_target: 0,
            round_syncs: false,
            sleepers: [0, 0],
            sync_wanted: 0,
            poisoned: None,
            batch: config.batch,
            term: last_term,
            wal_bytes_since_snapshot: 0,
            snapshot_lsn,
        };
        Ok(Engine {
            storage,
            config,
            state: Mutex::new(state),
            wakeups: [Condvar::new(), Condvar::new()],
            map: RwLock::new(map),
            wal: Mutex::new(wal),
            commit_file: Mutex::new(CommitFile::default()),
            snapshot_lock: Mutex::new(()),
            snapshot_running: AtomicBool::new(false),
            fsyncs: AtomicU64::new(0),
            metrics: crate::metrics::EngineMetrics::new(),
            recovery: summary,
            _dir_lock: dir_lock,
        })
    }

    /// What recovery found when this engine was opened.
    pub fn recovery(&self) -> &RecoverySummary {
        &self.recovery
    }

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

    fn write(&self, op: Op) -> Result<u64> {
        let (lsn, level) = {
            let mut st = lock(&self.state);
            self.check_writable(&st)?;
            let batch = u64::from(st.batch);
            let visible_at = if batch <= 1 {
                Level::Durable
            } else {
                Level::Written
            };
            let term = st.term;
            let lsn = Self::append_locked(&mut st, term, op, visible_at);
            // In batch mode the write that is `batch` past the durable LSN
            // syncs; the others only need to be written.
            let level = if batch <= 1 || lsn - st.durable_lsn >= batch {
                Level::Durable
            } else {
                Level::Written
            };
            (lsn, level)
        };
        self.wait_for(lsn, level)?;
        self.maybe_snapshot();
        Ok(lsn)
    }

    /// Appends one record to the log buffer and the apply queue.
    fn append_locked(st: &mut State, term: u64, op: Op, visible_at: Level) -> u64 {
        st.wal_bytes_since_snapshot += op.record_len() as u64;
        let lsn = st.log.append(term, &op);
        st.terms.push(lsn, term);
        if visible_at == Level::Durable {
            // Its visibility waits for a sync: make sure the next round syncs.
            st.sync_wanted = st.sync_wanted.max(lsn);
        }
        st.pending_apply.push_back(Pending {
            record: Record { lsn, term, op },
            visible_at,
        });
        lsn
    }

    fn check_writable(&self, st: &State) -> Result<()> {
        match &st.poisoned {
            Some(cause) => Err(EngineError::Poisoned {
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Appends a write without waiting for it; returns its LSN. It becomes
    /// durable and visible after a flush round ([`Engine::flush_step`], or any
    /// waiting writer's). For callers that drive the flusher themselves.
    pub fn submit(&self, op: Op) -> Result<u64> {
        self.validate(
            op.key(),
            match &op {
                Op::Put { value, .. } => Some(value),
                Op::Delete { .. } => None,
            },
        )?;
        let mut st = lock(&self.state);
        self.check_writable(&st)?;
        let term = st.term;
        Ok(Self::append_locked(&mut st, term, op, Level::Durable))
    }

    /// Appends the entry a new leader starts its term with
    /// ([`Op::term_start`], which changes no state) without waiting; returns
    /// its LSN. Committing it commits everything before it (Raft's rule: a
    /// leader commits only entries of its own term by counting).
    pub fn submit_term_start(&self) -> Result<u64> {
        let mut st = lock(&self.state);
        self.check_writable(&st)?;
        let term = st.term;
        Ok(Self::append_locked(
            &mut st,
            term,
            Op::term_start(),
            Level::Durable,
        ))
    }

    /// Runs one flush round if none is running and there is anything to
    /// write or sync: writes the buffered records, syncs, applies what became
    /// durable (committed), wakes waiters. Returns whether it ran.
    pub fn flush_step(&self) -> Result<bool> {
        let plan = {
            let mut st = lock(&self.state);
            self.check_writable(&st)?;
            if st.flushing || (st.log.is_empty() && st.written_lsn == st.durable_lsn) {
                return Ok(false);
            }
            st.sync_wanted = st.sync_wanted.max(st.log.last_lsn());
            Self::begin_round(&mut st)
        };
        self.run_round(plan);
        self.check_writable(&lock(&self.state))?;
        Ok(true)
    }

    /// The first half of a round: writes the buffered records to the WAL
    /// without syncing them (they are written, not durable, until a later
    /// [`Engine::flush_step`] syncs). Lets a simulation put time between a
    /// round's write and its sync, as a real disk's fsync takes. Returns
    /// whether it wrote anything.
    pub fn write_step(&self) -> Result<bool> {
        let plan = {
            let mut st = lock(&self.state);
            self.check_writable(&st)?;
            if st.flushing || st.log.is_empty() {
                return Ok(false);
            }
            let mut plan = Self::begin_round(&mut st);
            plan.sync = false;
            st.round_syncs = false;
            plan
        };
        self.run_round(plan);
        self.check_writable(&lock(&self.state))?;
        Ok(true)
    }

    /// Blocks until every record up to `lsn` is durable.
    pub fn wait_durable(&self, lsn: u64) -> Result<()> {
        self.wait_for(lsn, Level::Durable)
    }

    /// Makes every write appended before the call durable (`FLUSH`).
    pub fn flush(&self) -> Result<()> {
        let last = lock(&self.state).log.last_lsn();
        self.wait_for(last, Level::Durable)
    }

    /// Changes the batch setting; makes everything so far durable first.
    pub fn set_batch(&self, batch: u32) -> Result<()> {
        if batch == 0 {
            return Err(EngineError::Config("batch must be at least 1".into()));
        }
        self.flush()?;
        lock(&self.state).batch = batch;
        self.flush()
    }

    /// The current batch setting.
    pub fn batch(&self) -> u32 {
        lock(&self.state).batch
    }

    /// True if some write is not yet durable (the flush timer's question).
    pub fn has_unsynced(&self) -> bool {
        let st = lock(&self.state);
        st.durable_lsn < st.log.last_lsn()
    }

    fn wait_for(&self, lsn: u64, level: Level) -> Result<()> {
        let mut st = lock(&self.state);
        let truncations = st.truncations;
        if level == Level::Durable {
            st.sync_wanted = st.sync_wanted.max(lsn);
        }
        loop {
            if st.truncations != truncations && lsn > st.log.last_lsn() {
                return Err(EngineError::InvalidLogOp(format!(
                    "LSN {lsn} was truncated while waiting for it"
                )));
            }
            if lsn > st.log.last_lsn() {
                return Err(EngineError::InvalidLogOp(format!(
                    "LSN {lsn} is past the end of the log ({})",
                    st.log.last_lsn()
                )));
            }
            let position = match level {
                Level::Written => st.written_lsn,
                Level::Durable => st.durable_lsn,
            };
            // Single-node writes are acknowledged once visible; the flusher
            // applies them in the same critical section that advances the
            // positions. In replicated mode, commit decides visibility.
            let visible = st.commit_lsn.is_some() || st.applied_lsn >= lsn;
            if position >= lsn && visible {
                return Ok(());
            }
            self.check_writable(&st)?;
            if !st.flushing {
                let plan = Self::begin_round(&mut st);
                drop(st);
                self.run_round(plan);
                st = lock(&self.state);
                continue;
            }
            // A round is running: sleep until the round that covers us ends.
            let covered = lsn <= st.round_target && (level == Level::Written || st.round_syncs);
            let round = st.rounds_done + if covered { 1 } else { 2 };
            st = self.sleep(st, round);
        }
    }

    /// Starts a flush round under the state lock: takes the buffered chunks
    /// and decides whether the round syncs.
    fn begin_round(st: &mut State) -> RoundPlan {
        assert!(!st.flushing, "one flush round at a time");
        st.flushing = true;
        let chunks = st.log.take_group();
        let target = chunks.last().map_or(st.written_lsn, |c| c.last_lsn);
        let sync = st.sync_wanted > st.durable_lsn;
        st.round_target = target;
        st.round_syncs = sync;
        RoundPlan {
            chunks,
            target,
            sync,
        }
    }

    /// Runs a round begun by [`Engine::begin_round`]: writes and syncs
    /// without the state lock, then publishes the new positions, applies what
    /// became durable, and wakes the waiters.
    fn run_round(&self, plan: RoundPlan) {
        let RoundPlan {
            chunks,
            target,
            sync,
        } = plan;
        // If anything below panics, the guard poisons the engine and wakes
        // everyone, instead of leaving `flushing` set and all writers asleep.
        let guard = RoundGuard { engine: self };
        let result = (|| {
            let mut wal = lock(&self.wal);
            for chunk in &chunks {
                wal.write_chunk(chunk)?;
                self.metrics
                    .wal_written_bytes
                    .increment(chunk.bytes.len() as u64);
            }
            if sync {
                let start = std::time::Instant::now();
                wal.sync()?;
                self.metrics
                    .fsync_seconds
                    .record(start.elapsed().as_secs_f64());
            }
            Ok::<(), EngineError>(())
        })();
        let mut st = lock(&self.state);
        match result {
            Ok(()) => {
                st.written_lsn = target;
                if sync {
                    self.metrics
                        .fsync_records
                        .record(target.saturating_sub(st.durable_lsn) as f64);
                    st.durable_lsn = target;
                    self.fsyncs.fetch_add(1, Ordering::Relaxed);
                }
                self.apply_ready(&mut st);
            }
            Err(e) => {
                tracing::error!(error = %e, "WAL write or sync failed; the engine is poisoned");
                st.poisoned = Some(e.to_string());
            }
        }
        assert!(st.durable_lsn <= st.written_lsn, "durable <= written");
        assert!(st.written_lsn <= st.log.last_lsn(), "written <= last");
        st.flushing = false;
        st.rounds_done += 1;
        let done = (st.rounds_done % 2) as usize;
        let next = 1 - done;
        let poisoned = st.poisoned.is_some();
        let (covered, waiting) = (st.sleepers[done] > 0, st.sleepers[next] > 0);
        drop(st);
        std::mem::forget(guard);
        if poisoned {
            self.wake_all();
            return;
        }
        if covered {
            self.wakeups[done].notify_all();
        }
        if waiting {
            self.wakeups[next].notify_one();
        }
    }

    /// Sleeps until round `round` ends (or a spurious wake-up).
    fn sleep<'a>(&self, mut st: MutexGuard<'a, State>, round: u64) -> MutexGuard<'a, State> {
        let slot = (round % 2) as usize;
        st.sleepers[slot] += 1;
        let mut st = self.wakeups[slot]
            .wait(st)
            .unwrap_or_else(PoisonError::into_inner);
        st.sleepers[slot] -= 1;
        st
    }

    fn wake_all(&self) {
        for w in &self.wakeups {
            w.notify_all();
        }
    }

    /// Applies queued records in LSN order: in single-node mode each once it
    /// is visible (durable, or written in batch mode), in replicated mode
    /// once it is committed and durable here.
    fn apply_ready(&self, st: &mut State) {
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

    /// Takes a snapshot of the applied state: the WAL is made durable through
    /// its LSN first, then the file is written durably (temp, sync, rename,
    /// sync dir); then only the two newest snapshots are kept, and WAL
    /// segments wholly covered by the *older* of them are deleted, so either
    /// snapshot can be recovered from.
    ///
    /// A failed write or sync on the way poisons the engine (`node/DESIGN.md`: a
    /// failed fsync is fatal), so nothing is ever deleted on the strength of
    /// a rename whose durability is unknown.
    pub fn snapshot(&self) -> Result<SnapshotInfo> {
        let _one_at_a_time = lock(&self.snapshot_lock);
        self.check_writable(&lock(&self.state))?;
        let start = std::time::Instant::now();
        let info = self.snapshot_locked().inspect_err(|e| {
            if matches!(e, EngineError::Io { .. }) {
                self.poison(e);
            }
        })?;
        self.metrics.snapshots.increment(1);
        self.metrics
            .snapshot_seconds
            .record(start.elapsed().as_secs_f64());
        self.metrics.snapshot_bytes.set(info.bytes as f64);
        Ok(info)
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

    /// Records a fatal error and wakes every waiter so they see it.
    fn poison(&self, e: &EngineError) {
        tracing::error!(error = %e, "I/O failure; the engine is poisoned");
        let mut st = lock(&self.state);
        if st.poisoned.is_none() {
            st.poisoned = Some(e.to_string());
        }
        drop(st);
        self.wake_all();
    }

    fn snapshot_locked(&self) -> Result<SnapshotInfo> {
        lock(&self.state).wal_bytes_since_snapshot = 0;
        // The map lock is held only to take the frozen state (O(1)): applies
        // go on while the entries are encoded.
        let frozen = write(&self.map).freeze();
        let (lsn, keys) = (frozen.lsn, frozen.map.len());
        let bytes = snapshot::encode(
            frozen.lsn,
            frozen.term,
            frozen.digest,
            keys,
            state::sorted(&frozen.map).into_iter(),
        );
        drop(frozen);
        // Never let a snapshot hold a write the WAL could still lose.
        self.wait_for(lsn, Level::Durable)?;
        let dir = &self.config.data_dir;
        let path = snapshot::write(&*self.storage, dir, lsn, &bytes)?;
        lock(&self.state).snapshot_lsn = lsn;

        let mut retained = snapshot::list(&*self.storage, dir)?;
        let old = retained.split_off(retained.len().min(2));
        for lsn in &old {
            let p = dir.join(snapshot::snapshot_name(*lsn));
            self.storage
                .remove_file(&p)
                .map_err(EngineError::io("remove old snapshot", &p))?;
        }
        if !old.is_empty() {
            self.storage
                .sync_dir(dir)
                .map_err(EngineError::io("sync data directory", dir))?;
        }
        let segments_removed = match retained.get(1) {
            Some(&older) => lock(&self.wal).remove_segments_through(older)?,
            None => 0,
        };
        Ok(SnapshotInfo {
            lsn,
            path,
            keys,
            bytes: bytes.len() as u64,
            segments_removed,
        })
    }

    /// True if enough WAL was written since the last snapshot that an
    /// automatic one is due (and none is running).
    pub fn snapshot_due(&self) -> bool {
        let threshold = self.config.snapshot_wal_bytes;
        threshold > 0
            && lock(&self.state).wal_bytes_since_snapshot >= threshold
            && !self.snapshot_running.load(Ordering::Acquire)
    }

    /// Takes an automatic snapshot if one is due; errors are logged (and a
    /// failed sync poisons the engine, see [`Engine::snapshot`]).
    pub fn maybe_snapshot(&self) {
        if !self.snapshot_due() {
            return;
        }
        if self.snapshot_running.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Err(e) = self.snapshot() {
            tracing::warn!(error = %e, "automatic snapshot failed");
        }
        self.snapshot_running.store(false, Ordering::Release);
    }

    // ----- replication hooks: the WAL as a log of records at given LSNs -----

    /// Sets the term stamped on records appended from now on.
    pub fn set_term(&self, term: u64) {
        lock(&self.state).term = term;
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

    /// The commit LSN (replicated mode), or the durable LSN (single node).
    pub fn commit_lsn(&self) -> u64 {
        let st = lock(&self.state);
        st.commit_lsn.unwrap_or(st.durable_lsn)
    }

    /// The term of the record at `lsn`, if the log still knows it.
    pub fn term_at(&self, lsn: u64) -> Option<u64> {
        lock(&self.state).terms.term_at(lsn)
    }

    /// The term stamped on new records.
    pub fn term(&self) -> u64 {
        lock(&self.state).term
    }

    /// Appends records received from a leader at their own LSNs and terms.
    /// The first must follow the last LSN; the rest must be contiguous.
    /// Returns the last LSN; wait with [`Engine::wait_durable`].
    pub fn append_records(&self, records: Vec<Record>) -> Result<u64> {
        let mut st = lock(&self.state);
        self.check_writable(&st)?;
        // Validate the whole batch first: all of it is appended or none.
        for (expected, r) in (st.log.last_lsn() + 1..).zip(&records) {
            if r.lsn != expected {
                return Err(EngineError::InvalidLogOp(format!(
                    "append at LSN {} where {expected} is next",
                    r.lsn
                )));
            }
            if r.op.is_term_start() {
                continue;
            }
            self.validate(
                r.op.key(),
                match &r.op {
                    Op::Put { value, .. } => Some(value),
                    Op::Delete { .. } => None,
                },
            )?;
        }
        for r in records {
            let lsn = Self::append_locked(&mut st, r.term, r.op, Level::Durable);
            assert_eq!(lsn, r.lsn, "validated above");
        }
        Ok(st.log.last_lsn())
    }

    /// Reads up to `max` durable records from the WAL starting at `from`
    /// (callers ship only durable records).
    ///
    /// The WAL lock (which every group commit round needs) is held only to
    /// plan the read: segment handles, the durable LSN, the cut counter.
    /// The records are read after releasing it, from the indexed position
    /// before `from`. A cut that began meanwhile may have removed or
    /// rewritten what was read, so then the read is thrown away and done
    /// again: no record a cut removed is ever returned.
    pub fn read_from(&self, from: u64, max: usize) -> Result<Vec<Record>> {
        const ATTEMPTS: usize = 8;
        for _ in 0..ATTEMPTS {
            let (plan, cuts) = {
                let wal = lock(&self.wal);
                let (durable, cuts) = {
                    let st = lock(&self.state);
                    (st.durable_lsn, st.cuts)
                };
                (wal.plan_read(from, max, durable)?, cuts)
            };
            let read = plan.read();
            if lock(&self.state).cuts == cuts {
                return read;
            }
        }
        Err(EngineError::InvalidLogOp(format!(
            "the log was cut {ATTEMPTS} times while reading from LSN {from}"
        )))
    }

    /// Installs a snapshot held in memory, as if received from a leader in
    /// one chunk: see [`Engine::install_received_snapshot`]. For tests and
    /// tools; a node streams it through [`Engine::begin_snapshot_receive`].
    pub fn install_snapshot(&self, bytes: &[u8]) -> Result<u64> {
        // The announced LSN is the header's (checked again after decoding);
        // a buffer too short to hold one fails to verify below.
        let lsn = bytes.get(16..24).map_or(0, |b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        });
        let mut recv = self.begin_snapshot_receive(lsn, bytes.len() as u64)?;
        recv.write(0, bytes)?;
        self.install_received_snapshot(recv)
    }

    /// Starts receiving a snapshot from the leader: a temp file in the data
    /// directory (`snap-<lsn>-<n>.snap.recv`) that chunks are written to as
    /// they arrive. Dropping the [`snapshot::Receive`] removes it.
    pub fn begin_snapshot_receive(&self, lsn: u64, total_bytes: u64) -> Result<snapshot::Receive> {
        if !self.config.replicated {
            return Err(EngineError::InvalidLogOp(
                "snapshot install needs replicated mode".into(),
            ));
        }
        snapshot::Receive::begin(
            self.storage.clone(),
            &self.config.data_dir,
            lsn,
            total_bytes,
        )
    }

    /// Installs a snapshot received from the leader (replicated mode): its
    /// state replaces ours, and the log restarts right after it. The file is
    /// synced and verified (decoded from the file, every byte) before the
    /// old log is touched, then renamed into place and the directory synced
    /// before the old log is deleted, so a crash at any point recovers
    /// either the old state or the new one (a leftover receive file is
    /// removed at open). Ignored if we already applied its LSN or our log
    /// holds its last record (same LSN and term). Returns the LSN through
    /// which our durable log now matches the leader's. The receive file is
    /// gone afterwards, whatever the outcome (unless a crash or failed
    /// removal leaves it to the next open).
    pub fn install_received_snapshot(&self, mut recv: snapshot::Receive) -> Result<u64> {
        let snap = recv.sync_and_decode()?.map_err(|reason| {
            EngineError::InvalidLogOp(format!(
                "snapshot from the leader does not verify: {reason}"
            ))
        })?;
        let _one_at_a_time = lock(&self.snapshot_lock);
        let (lsn, term) = (snap.lsn, snap.term);
        let map = MapState::from_snapshot(snap.map, lsn, term, snap.digest);
        // Install only if it brings something new: never over records we
        // have applied, nor over a log that already holds the snapshot's
        // last record (then everything up to it matches the leader's, is
        // durable here, and may already count towards a commit: dropping
        // it would un-replicate committed records).
        self.exclusive_wal_op(
            lsn,
            |st| Ok(lsn > st.applied_lsn && st.terms.term_at(lsn) != Some(term)),
            |wal| {
                recv.rename_into_place()?;
                wal.reset_after(lsn)?;
                Ok((wal.active_header(), wal.active_bytes()))
            },
            |st, (header, segment_bytes)| {
                st.pending_apply.clear();
                st.log.reset(header, segment_bytes, lsn, term);
                st.written_lsn = lsn;
                st.durable_lsn = lsn;
                st.sync_wanted = lsn;
                st.applied_lsn = lsn;
                st.terms = TermRuns::new(lsn, term);
                st.commit_lsn = Some(lsn);
                st.snapshot_lsn = lsn;
                *write(&self.map) = map;
            },
        )?;
        // Not installed (nothing new): dropping `recv` removes the file.
        drop(recv);
        // Installed, or the log already matched through `lsn` durably.
        Ok(lock(&self.state).applied_lsn.max(lsn))
    }

    /// The newest snapshot on disk, opened for shipping to a follower that
    /// needs records the log no longer holds. It is read a chunk at a time
    /// through the open handle, which stays readable even if newer
    /// snapshots' cleanup removes the file meanwhile.
    pub fn newest_snapshot(&self) -> Result<Option<snapshot::SnapshotFile>> {
        let dir = &self.config.data_dir;
        // The newest listed can vanish before it is opened only if two newer
        // snapshots were taken in between; the next listing shows them.
        const TRIES: usize = 8;
        for _ in 0..TRIES {
            let Some(&lsn) = snapshot::list(&*self.storage, dir)?.first() else {
                return Ok(None);
            };
            match snapshot::SnapshotFile::open(&*self.storage, dir, lsn) {
                Err(EngineError::Io { error, .. })
                    if error.kind() == std::io::ErrorKind::NotFound =>
                {
                    continue;
                }
                opened => return opened.map(Some),
            }
        }
        Err(EngineError::Io {
            op: "open newest snapshot",
            path: dir.clone(),
            error: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("newer snapshots removed it {TRIES} times in a row"),
            ),
        })
    }

    /// The first LSN the WAL still holds.
    pub fn wal_first_lsn(&self) -> u64 {
        lock(&self.wal).first_lsn()
    }

    /// Durably removes every record after `lsn`. Refuses to remove an applied
    /// (committed) record. Everything buffered is flushed first.
    pub fn truncate_after(&self, lsn: u64) -> Result<()> {
        self.exclusive_wal_op(
            lsn,
            |st| {
                if lsn < st.applied_lsn {
                    return Err(EngineError::InvalidLogOp(format!(
                        "truncate after LSN {lsn} would remove applied records (applied through {})",
                        st.applied_lsn
                    )));
                }
                if !st.log.is_empty() {
                    return Err(EngineError::InvalidLogOp(
                        "truncate while appends are in flight".into(),
                    ));
                }
                Ok(true)
            },
            |wal| {
                wal.truncate_after(lsn)?;
                Ok((wal.active_header(), wal.active_bytes(), wal.last_lsn()))
            },
            |st, (header, bytes, last)| {
                let term = st
                    .pending_apply
                    .iter()
                    .rev()
                    .find(|p| p.record.lsn <= last)
                    .map(|p| p.record.term);
                st.pending_apply.retain(|p| p.record.lsn <= last);
                let term = term.unwrap_or_else(|| read(&self.map).applied_term());
                st.log.reset(header, bytes, last, term);
                st.written_lsn = last;
                st.durable_lsn = last;
                st.sync_wanted = st.sync_wanted.min(last);
                st.terms.truncate_after(last);
            },
        )
    }

    /// Runs an operation that rewrites the log (truncation, snapshot
    /// install) with the flush token held, so no group commit round runs
    /// meanwhile: everything appended is flushed first, `check` decides
    /// under the state lock whether to go on (`Ok(false)`: nothing to do),
    /// `io` does the file work, and `publish` installs the new positions.
    /// A failure in `io` poisons the engine. Waiters for LSNs the operation
    /// removed get an error (the truncation counter moves).
    ///
    /// Records after `cut_to` stop counting as durable before `io` touches
    /// a file: if it fails midway, the disk may already have lost them, and
    /// the engine must not claim them (a restart will not find them).
    fn exclusive_wal_op<T>(
        &self,
        cut_to: u64,
        check: impl FnOnce(&State) -> Result<bool>,
        io: impl FnOnce(&mut Wal) -> Result<T>,
        publish: impl FnOnce(&mut State, T),
    ) -> Result<()> {
        self.flush()?;
        let mut st = lock(&self.state);
        while st.flushing {
            let round = st.rounds_done + 1;
            st = self.sleep(st, round);
        }
        self.check_writable(&st)?;
        if !check(&st)? {
            return Ok(());
        }
        st.flushing = true;
        st.durable_lsn = st.durable_lsn.min(cut_to);
        st.cuts += 1;
        drop(st);
        let result = io(&mut lock(&self.wal));
        let mut st = lock(&self.state);
        let outcome = match result {
            Ok(value) => {
                publish(&mut st, value);
                st.truncations += 1;
                Ok(())
            }
            Err(e) => {
                st.poisoned = Some(e.to_string());
                Err(e)
            }
        };
        st.flushing = false;
        drop(st);
        self.wake_all();
        outcome
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
fn read_commit_file(storage: &dyn Storage, dir: &Path) -> Result<u64> {
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

/// `<path>.broken`, or `<path>.broken.<n>` if that exists already.
fn unused_name(storage: &dyn Storage, dir: &Path, path: &Path) -> Result<PathBuf> {
    let names = storage
        .list_dir(dir)
        .map_err(EngineError::io("list data directory", dir))?;
    let base = format!("{}.broken", path.display());
    let mut candidate = PathBuf::from(&base);
    let mut n = 1;
    while candidate
        .file_name()
        .and_then(|f| f.to_str())
        .is_some_and(|f| names.iter().any(|x| x == f))
    {
        candidate = PathBuf::from(format!("{base}.{n}"));
        n += 1;
    }
    Ok(candidate)
}

/// Removes temp files of interrupted snapshots (the caller syncs the dir);
/// returns whether there were any.
fn remove_snapshot_temps(storage: &dyn Storage, dir: &Path) -> Result<bool> {
    let names = storage
        .list_dir(dir)
        .map_err(EngineError::io("list data directory", dir))?;
    let mut removed = false;
    for name in names.iter().filter(|n| snapshot::is_snapshot_temp(n)) {
        removed = true;
        let p = dir.join(name);
        storage
            .remove_file(&p)
            .map_err(EngineError::io("remove unfinished snapshot", &p))?;
    }
    Ok(removed)
}
