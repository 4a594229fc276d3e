//! Group commit: appending writes, flush rounds, waiting for a position,
//! batch mode, and poisoning when a write or sync fails.
//!
//! A write is appended under the state lock ([`Engine::submit`], or the
//! private `write` behind [`Engine::put`] and [`Engine::delete`]): LSN
//! assigned, record encoded into the log buffer, queued for apply. A flush
//! round (`begin_round` under the lock, `run_round` without it) writes every
//! buffered chunk with the WAL lock alone, syncs once if any waiter needs
//! durability, then publishes `written_lsn`/`durable_lsn`, has what became
//! visible applied (`apply.rs`), and wakes the waiters its round covered.
//! The first waiter that finds no round running runs one itself; a cluster
//! node's flusher thread or a simulation drives rounds instead with
//! [`Engine::flush_step`] (and [`Engine::write_step`], which writes without
//! syncing). In batch mode a write is visible and acknowledged once
//! written; the write N past the durable LSN waits for a sync.
//!
//! A failed write or sync poisons the engine (never retried, see
//! `node/DESIGN.md`), as does a panic mid-round; every waiter wakes and
//! gets the error. The same flush token serialises the operations that
//! rewrite the log (`exclusive_wal_op`: truncation, snapshot install).
//!
//! What it does not do: decide which records are visible (`apply.rs`), when
//! to snapshot (`checkpoint.rs`), or what a truncation or install changes in
//! the log (`replication.rs`, `checkpoint.rs`); it touches files only
//! through [`Wal`].

use std::sync::atomic::Ordering;
use std::sync::{MutexGuard, PoisonError};

use super::wal::{self, Wal};
use super::{Engine, EngineError, Level, Op, Pending, Record, Result, State, lock};

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

/// One flush round's work, decided under the state lock.
struct RoundPlan {
    chunks: Vec<wal::Chunk>,
    /// Last LSN in `chunks` (or the written LSN if there are none).
    target: u64,
    sync: bool,
}

impl Engine {
    /// The write path of [`Engine::put`] and [`Engine::delete`]: appends
    /// `op`, waits until it is acknowledged (durable, or written in batch
    /// mode), then takes an automatic snapshot if one is due.
    pub(super) fn write(&self, op: Op) -> Result<u64> {
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
    pub(super) fn append_locked(st: &mut State, term: u64, op: Op, visible_at: Level) -> u64 {
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

    pub(super) fn wait_for(&self, lsn: u64, level: Level) -> Result<()> {
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

    /// Records a fatal error and wakes every waiter so they see it.
    pub(super) fn poison(&self, e: &EngineError) {
        tracing::error!(error = %e, "I/O failure; the engine is poisoned");
        let mut st = lock(&self.state);
        if st.poisoned.is_none() {
            st.poisoned = Some(e.to_string());
        }
        drop(st);
        self.wake_all();
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
    pub(super) fn exclusive_wal_op<T>(
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
}
