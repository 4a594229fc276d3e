//! Snapshots as checkpoints of the log: when the engine takes one and what
//! it may delete after, installing one a leader sent, and finding the
//! newest to ship to a follower.
//!
//! Taking one ([`Engine::snapshot`], or [`Engine::maybe_snapshot`] once
//! `snapshot_wal_bytes` of WAL were written since the last): freeze the map
//! in O(1), encode it while applies go on, wait until the WAL is durable
//! through its LSN, write the file durably, then keep the two newest
//! snapshots and delete the WAL segments the older of them covers, so
//! either can be recovered from. A failed write or sync on the way poisons
//! the engine. Installing ([`Engine::install_received_snapshot`]) replaces
//! the state and restarts the log after the snapshot, unless it brings
//! nothing new; the log rewrite runs with the flush token held
//! (`exclusive_wal_op`, in `commit.rs`).
//!
//! What it does not do: the file format, the durable write protocol or
//! verification (`snapshot.rs`), deciding which segments a snapshot covers
//! on disk (`Wal::remove_segments_through`), or comparing digests with
//! another replica (the leader's digest checkpoints are checked as records
//! apply, in `apply.rs`).

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use super::state::{self, MapState};
use super::terms::TermRuns;
use super::{Engine, EngineError, Level, Result, lock, snapshot, write};

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

impl Engine {
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
}
