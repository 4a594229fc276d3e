//! Opening a data directory: recovery, decided before it repairs.
//!
//! [`Engine::open`] takes the directory (creates it, locks `LOCK`, makes its
//! name durable), then recovers in the two phases `node/DESIGN.md`
//! ("Recovery") describes, so that a refused open leaves every file as it
//! was:
//!
//! 1. read and judge: load the newest snapshot that verifies
//!    ([`snapshot::load_newest`]), read the commit floor from `COMMIT`
//!    (replicated mode; [`commit_floor`] decides what replay applies), and
//!    open the WAL. [`Wal::open`] has the same shape inside: it judges every
//!    segment by the case table, refuses, or, once its verdict is "open",
//!    repairs its own files; it replays the records after the snapshot on
//!    the way, and here each is applied or left waiting for its commit;
//! 2. decide, then repair: [`RecoveryPlan::decide`] (pure) takes what was
//!    found ([`Found`]) and names every change the engine itself makes:
//!    the snapshots that did not verify and the unused `*.broken` name each
//!    is set aside as, the temp files of interrupted snapshots and receives
//!    to remove, and the term the log continues with.
//!    [`RecoveryPlan::carry_out`] makes those changes and syncs the
//!    directory; then the engine's state is assembled.
//!
//! The engine's own part never refuses an open (an I/O error still stops
//! it): a bad configuration or a locked directory is refused before
//! recovery starts, damage and missing records by the WAL in phase 1.
//!
//! What it does not do: judge segment or snapshot bytes (`wal.rs`,
//! `snapshot.rs`), delete a snapshot that fails to verify (it is kept as
//! `*.broken` for inspection), or change any file once the engine is open.

use std::any::Any;
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
        let dir_lock = take_data_dir(&*storage, &dir)?;

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
        let saved_commit = if config.replicated {
            Some(read_commit_file(&*storage, &dir)?)
        } else {
            None
        };
        let commit_floor = commit_floor(saved_commit, snapshot_lsn);
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

        // The WAL's verdict was "open" (it repaired its own files): decide
        // the engine's own changes, then make them.
        let names = storage
            .list_dir(&dir)
            .map_err(EngineError::io("list data directory", &dir))?;
        let plan = RecoveryPlan::decide(Found {
            dir: &dir,
            names: &names,
            rejected: loaded.rejected,
            wal_holds_records: wal.last_lsn() >= wal.first_lsn(),
            wal_last_term: rec.last_term,
            applied_term: map.applied_term(),
        });
        plan.carry_out(&*storage, &dir)?;
        let last_term = plan.last_term;
        summary.snapshots_rejected = plan
            .set_aside
            .into_iter()
            .map(|s| (s.path, s.reason))
            .collect();

        summary.records_replayed = rec.replayed;
        summary.tail_bytes_cut = rec.tail_bytes_cut;
        summary.removed_segment = rec.removed_segment;
        summary.last_lsn = wal.last_lsn();
        summary.keys = map.len();
        summary.digest = map.digest();

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

/// Creates the data directory if it is missing, takes its `LOCK` (held
/// while the returned value lives) and makes the directory's own name
/// durable.
fn take_data_dir(storage: &dyn Storage, dir: &Path) -> Result<Box<dyn Any + Send + Sync>> {
    storage
        .create_dir_all(dir)
        .map_err(EngineError::io("create data directory", dir))?;
    let dir_lock = storage.lock_dir(dir).map_err(|e| {
        if e.kind() == std::io::ErrorKind::WouldBlock {
            EngineError::Locked {
                dir: dir.to_path_buf(),
            }
        } else {
            EngineError::Io {
                op: "lock data directory",
                path: dir.to_path_buf(),
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
    Ok(dir_lock)
}

/// The highest LSN replay applies at open; the records above it wait in
/// the apply queue for the leader's commit LSN. Replicated mode (`saved`
/// is what `COMMIT` holds, 0 if it is missing or damaged): the saved commit
/// LSN, or the snapshot's if that is higher (a snapshot holds only applied,
/// so committed, records). Single node (`None`): every record, as durable
/// means committed.
fn commit_floor(saved: Option<u64>, snapshot_lsn: u64) -> u64 {
    match saved {
        Some(commit) => commit.max(snapshot_lsn),
        None => u64::MAX,
    }
}

/// What phase 1 of recovery found, as far as the engine's own decisions
/// need it: the WAL is open (and repaired) by now, nothing else changed.
#[derive(Debug)]
struct Found<'a> {
    /// The data directory.
    dir: &'a Path,
    /// The names in it, listed once the WAL is open.
    names: &'a [String],
    /// Snapshots that did not verify (newest first), with why.
    rejected: Vec<(PathBuf, String)>,
    /// Whether the WAL holds any record (its last LSN is at or after its
    /// first), above the snapshot or not.
    wal_holds_records: bool,
    /// Term of the WAL's last valid record.
    wal_last_term: u64,
    /// Term of the last record applied to the map: the snapshot's if the
    /// WAL holds none.
    applied_term: u64,
}

/// A snapshot that did not verify, and the unused name it is renamed to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SetAside {
    path: PathBuf,
    to: PathBuf,
    reason: String,
}

/// The engine's own part of recovery, decided from what was found before
/// any of it is done.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RecoveryPlan {
    /// Snapshots that did not verify, each renamed to `<path>.broken` (or
    /// `.broken.<n>` if that is taken): kept for inspection, never deleted.
    set_aside: Vec<SetAside>,
    /// Temp files of interrupted snapshots and receives, to remove.
    remove: Vec<PathBuf>,
    /// The term of the last record in the log: from the WAL if it holds any
    /// record, else from the snapshot.
    last_term: u64,
}

impl RecoveryPlan {
    /// Decides, without I/O, what the engine changes on disk at open.
    fn decide(found: Found<'_>) -> RecoveryPlan {
        // The names as the renames leave them, one after another, so each
        // `.broken` name is unused when its rename runs.
        let mut names = found.names.to_vec();
        let set_aside = found
            .rejected
            .into_iter()
            .map(|(path, reason)| {
                let to = unused_name(&names, &path);
                names.retain(|n| Some(n.as_str()) != path.file_name().and_then(|f| f.to_str()));
                if let Some(f) = to.file_name().and_then(|f| f.to_str()) {
                    names.push(f.to_owned());
                }
                SetAside { path, to, reason }
            })
            .collect();
        let remove = names
            .iter()
            .filter(|n| snapshot::is_snapshot_temp(n))
            .map(|n| found.dir.join(n))
            .collect();
        let last_term = if found.wal_holds_records {
            found.wal_last_term
        } else {
            found.applied_term
        };
        RecoveryPlan {
            set_aside,
            remove,
            last_term,
        }
    }

    /// Makes the plan's changes: renames the bad snapshots, removes the
    /// temp files, then syncs the directory if anything changed in it.
    fn carry_out(&self, storage: &dyn Storage, dir: &Path) -> Result<()> {
        for SetAside { path, to, reason } in &self.set_aside {
            tracing::warn!(path = %path.display(), %reason, "snapshot does not verify; set aside as {}", to.display());
            storage
                .rename(path, to)
                .map_err(EngineError::io("set aside bad snapshot", path))?;
        }
        for p in &self.remove {
            storage
                .remove_file(p)
                .map_err(EngineError::io("remove unfinished snapshot", p))?;
        }
        if !self.set_aside.is_empty() || !self.remove.is_empty() {
            storage
                .sync_dir(dir)
                .map_err(EngineError::io("sync data directory", dir))?;
        }
        Ok(())
    }
}

/// `<path>.broken`, or `<path>.broken.<n>` if that is in `names` already.
fn unused_name(names: &[String], path: &Path) -> PathBuf {
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
    candidate
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|n| (*n).to_owned()).collect()
    }

    fn found<'a>(
        dir: &'a Path,
        names: &'a [String],
        rejected: Vec<(PathBuf, String)>,
    ) -> Found<'a> {
        Found {
            dir,
            names,
            rejected,
            wal_holds_records: true,
            wal_last_term: 3,
            applied_term: 2,
        }
    }

    #[test]
    fn a_clean_directory_plans_no_change() {
        let dir = Path::new("/data");
        let listed = names(&["LOCK", "COMMIT", "wal-00000000000000000001.wal"]);
        let plan = RecoveryPlan::decide(found(dir, &listed, Vec::new()));
        assert_eq!(
            plan,
            RecoveryPlan {
                set_aside: Vec::new(),
                remove: Vec::new(),
                last_term: 3,
            }
        );
    }

    #[test]
    fn bad_snapshots_are_set_aside_under_unused_names_and_temps_removed() {
        let dir = Path::new("/data");
        let (s400, s300) = (
            dir.join("snap-00000000000000000400.snap"),
            dir.join("snap-00000000000000000300.snap"),
        );
        let listed = names(&[
            "snap-00000000000000000300.snap",
            "snap-00000000000000000400.snap",
            // Set aside at an earlier open.
            "snap-00000000000000000400.snap.broken",
            "snap-00000000000000000500.snap.tmp",
            "snap-00000000000000000600-1.snap.recv",
            "wal-00000000000000000001.wal",
        ]);
        let rejected = vec![
            (s400.clone(), "bad CRC".to_owned()),
            (s300.clone(), "entries out of order".to_owned()),
        ];
        let plan = RecoveryPlan::decide(found(dir, &listed, rejected));
        assert_eq!(
            plan.set_aside,
            vec![
                SetAside {
                    path: s400,
                    to: dir.join("snap-00000000000000000400.snap.broken.1"),
                    reason: "bad CRC".into(),
                },
                SetAside {
                    path: s300,
                    to: dir.join("snap-00000000000000000300.snap.broken"),
                    reason: "entries out of order".into(),
                },
            ]
        );
        assert_eq!(
            plan.remove,
            vec![
                dir.join("snap-00000000000000000500.snap.tmp"),
                dir.join("snap-00000000000000000600-1.snap.recv"),
            ]
        );
    }

    #[test]
    fn each_broken_name_is_unused_once_the_renames_before_it_ran() {
        let listed = names(&["a.broken", "a.broken.1", "a.broken.2"]);
        assert_eq!(
            unused_name(&listed, Path::new("/d/a")),
            PathBuf::from("/d/a.broken.3")
        );
        assert_eq!(
            unused_name(&listed, Path::new("/d/b")),
            PathBuf::from("/d/b.broken")
        );
    }

    #[test]
    fn the_log_continues_with_the_wal_term_or_else_the_snapshot_term() {
        let dir = Path::new("/data");
        let listed = Vec::new();
        let with_records = found(dir, &listed, Vec::new());
        assert_eq!(RecoveryPlan::decide(with_records).last_term, 3);
        let empty_wal = Found {
            wal_holds_records: false,
            ..found(dir, &listed, Vec::new())
        };
        assert_eq!(RecoveryPlan::decide(empty_wal).last_term, 2);
    }

    #[test]
    fn replay_applies_up_to_the_saved_commit_or_the_snapshot_and_everything_on_one_node() {
        assert_eq!(commit_floor(None, 0), u64::MAX);
        assert_eq!(commit_floor(None, 50), u64::MAX);
        assert_eq!(commit_floor(Some(70), 50), 70);
        // A lost or damaged `COMMIT` reads as 0: the snapshot still counts.
        assert_eq!(commit_floor(Some(0), 50), 50);
    }
}
