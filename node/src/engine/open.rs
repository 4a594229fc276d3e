//! Opening a data directory: recovery.
//!
//! [`Engine::open`] takes the directory (creates it, locks `LOCK`, makes its
//! name durable), loads the newest snapshot that verifies, reads the commit
//! floor from `COMMIT` (replicated mode), opens the WAL (which judges every
//! segment by the case table and repairs its own files only once its
//! verdict is "open"), then sets aside snapshots that did not verify,
//! removes temp files of interrupted snapshots and receives, and assembles
//! the engine's state.
//!
//! What it does not do: judge segment or snapshot bytes (`wal.rs`,
//! `snapshot.rs`), delete a snapshot that fails to verify (it is kept as
//! `*.broken` for inspection), or change any file once the engine is open.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use super::apply::{CommitFile, read_commit_file};
use super::log_buffer::{BufferLimits, LogBuffer};
use super::state::MapState;
use super::terms::TermRuns;
use super::wal::{Wal, WalConfig};
use super::{Engine, EngineConfig, EngineError, Level, Pending, Result, State, snapshot};
use crate::storage::Storage;

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
