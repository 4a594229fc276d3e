//! The replication hooks: the WAL as a log of records at given LSNs and
//! terms, for a cluster node's leader and followers.
//!
//! A leader stamps its term on new records ([`Engine::set_term`]), starts
//! its term with [`Engine::submit_term_start`], and ships durable records
//! read with [`Engine::read_from`] (or, for a follower behind
//! [`Engine::wal_first_lsn`], a snapshot: `checkpoint.rs`). A follower
//! appends the leader's records at their own LSNs and terms
//! ([`Engine::append_records`], all of a batch or none) after durably
//! cutting a conflicting suffix ([`Engine::truncate_after`], which never
//! removes an applied record). [`Engine::term_at`] answers the log-matching
//! question.
//!
//! What it does not do: the replication protocol's decisions (whom to
//! follow, what is committed: the cluster's), applying records or the
//! commit LSN (`apply.rs`), or the group commit that makes appended records
//! durable (`commit.rs`).

use super::{Engine, EngineError, Level, Op, Record, Result, lock, read};

impl Engine {
    /// Sets the term stamped on records appended from now on.
    pub fn set_term(&self, term: u64) {
        lock(&self.state).term = term;
    }

    /// The term of the record at `lsn`, if the log still knows it.
    pub fn term_at(&self, lsn: u64) -> Option<u64> {
        lock(&self.state).terms.term_at(lsn)
    }

    /// The term stamped on new records.
    pub fn term(&self) -> u64 {
        lock(&self.state).term
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
}
