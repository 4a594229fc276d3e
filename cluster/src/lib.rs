//! The replication protocol of `REPLICATION.md` (at the repository root),
//! with no I/O: [`replica::Replica`], the whole protocol as one state
//! machine, and the pure decisions it is built from.
//!
//! This crate does no I/O, holds no clock and spawns nothing: the node crate
//! is the runtime that feeds the replica its inputs and carries the effects
//! out (`TERM` writes, appends, truncations, the commit, RPCs). So every
//! protocol rule is a plain unit test here: the state machine's in
//! `replica/tests.rs`, the decisions' in this file; and `tests/model.rs`
//! model-checks the replica.
//!
//! What is here:
//! - [`replica`]: [`replica::Replica`] owns all protocol state (term and
//!   vote, role, leader, election timer, votes, follower progress, lease
//!   evidence, commit LSN, read barrier, a transfer) and changes it only
//!   in [`replica::Replica::step`]; every message it emits is
//!   [`replica::Gated`] on what must be durable first.
//! - [`observe_term`]: fencing as a decision — reject a lower term, step
//!   down on a higher. The replica applies the same rule in its own steps;
//!   it does not call this function.
//! - [`follower_append`]: log matching on a follower — accept, skip
//!   duplicates, truncate from the first *conflicting* record (never at or
//!   below the commit LSN), or refuse with a hint where to back up to.
//! - [`Progress`]: the leader's view of one follower (`match`, `next`,
//!   bytes in flight) and how acks move it.
//! - [`quorum_commit`]: the commit rule — a majority durable *and* the
//!   record is of the leader's current term.
//! - [`AckLevel::satisfied`]: when a write may be acknowledged at `local`,
//!   `quorum` or `all`.
//! - [`LogView`]: what the protocol reads of a node's log.

pub mod replica;

/// A log position. LSN 0 is "before the first record".
pub type Lsn = u64;
/// A leader's term (epoch).
pub type Term = u64;
/// A member's id.
pub type NodeId = u64;

/// What a node must do about the term carried by a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TermAction {
    /// Lower than ours: refuse the message, answering with our term.
    Reject { ours: Term },
    /// Equal: go on.
    Accept,
    /// Higher: persist the new term durably, step down to follower, then go on.
    StepDown { new_term: Term },
}

/// Fencing: every message carries its sender's term.
pub fn observe_term(ours: Term, theirs: Term) -> TermAction {
    match theirs.cmp(&ours) {
        std::cmp::Ordering::Less => TermAction::Reject { ours },
        std::cmp::Ordering::Equal => TermAction::Accept,
        std::cmp::Ordering::Greater => TermAction::StepDown { new_term: theirs },
    }
}

/// What a follower knows of its own log, for log matching.
pub trait LogView {
    /// LSN of its last record (0 if none).
    fn last_lsn(&self) -> Lsn;
    /// Term of the record at `lsn`, if the log (or the snapshot, for its own
    /// LSN) still knows it. `term_at(0)` is `Some(0)`.
    fn term_at(&self, lsn: Lsn) -> Option<Term>;
    /// LSN through which records are committed (and so identical on every
    /// node that has them).
    fn commit_lsn(&self) -> Lsn;
    /// LSN through which records are durable here.
    fn durable_lsn(&self) -> Lsn;
}

/// The parts of an append request the rules look at.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AppendMeta {
    /// LSN of the record just before the batch.
    pub prev_lsn: Lsn,
    /// Its term.
    pub prev_term: Term,
    /// `(lsn, term)` of each record in the batch, in order.
    pub records: Vec<(Lsn, Term)>,
}

/// Why a follower refused an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `prev_lsn` is past our last record: back up to `last_lsn + 1`.
    Gap { last_lsn: Lsn },
    /// Our record at `prev_lsn` has another term (or is unknown): back up.
    Mismatch {
        prev_lsn: Lsn,
        our_term: Option<Term>,
    },
    /// The batch is not a run of consecutive LSNs after `prev_lsn`.
    Malformed(String),
    /// A record conflicts with a *committed* one: a protocol violation (two
    /// leaders committed different records). Never truncate for it.
    ConflictsWithCommitted { lsn: Lsn },
}

/// A follower's verdict on an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendVerdict {
    /// Refuse; nothing changes.
    Refuse(Refusal),
    /// Accept: first durably truncate everything after `truncate_after` (if
    /// set), then append the batch's records from index `append_from` on
    /// (the ones before it are duplicates we already hold).
    Accept {
        truncate_after: Option<Lsn>,
        append_from: usize,
    },
}

/// Log matching (Raft's AppendEntries rule) for a follower whose log is
/// `log`. Duplicates and stale retransmissions never truncate anything;
/// only the first record whose term differs from ours does, and never at or
/// below the commit LSN.
pub fn follower_append(log: &impl LogView, req: &AppendMeta) -> AppendVerdict {
    for (i, (lsn, _)) in req.records.iter().enumerate() {
        if *lsn != req.prev_lsn + 1 + i as u64 {
            return AppendVerdict::Refuse(Refusal::Malformed(format!(
                "record {i} has LSN {lsn}, expected {}",
                req.prev_lsn + 1 + i as u64
            )));
        }
    }
    let last = log.last_lsn();
    if req.prev_lsn > last {
        return AppendVerdict::Refuse(Refusal::Gap { last_lsn: last });
    }
    // Below our commit point every node holds the same records, so a
    // `prev_lsn` there matches even if our log no longer has its term.
    if req.prev_lsn > log.commit_lsn() {
        let ours = log.term_at(req.prev_lsn);
        if ours != Some(req.prev_term) {
            return AppendVerdict::Refuse(Refusal::Mismatch {
                prev_lsn: req.prev_lsn,
                our_term: ours,
            });
        }
    }
    for (i, (lsn, term)) in req.records.iter().enumerate() {
        if *lsn > last {
            return AppendVerdict::Accept {
                truncate_after: None,
                append_from: i,
            };
        }
        match log.term_at(*lsn) {
            Some(ours) if ours == *term => continue,
            // Committed and compacted away here: identical everywhere.
            None if *lsn <= log.commit_lsn() => continue,
            // A different record at a committed LSN: two leaders committed
            // different things. Never truncate a committed record for it.
            _ if *lsn <= log.commit_lsn() => {
                return AppendVerdict::Refuse(Refusal::ConflictsWithCommitted { lsn: *lsn });
            }
            _ => {
                return AppendVerdict::Accept {
                    truncate_after: Some(lsn - 1),
                    append_from: i,
                };
            }
        }
    }
    // Every record was a duplicate (or the batch was a heartbeat).
    AppendVerdict::Accept {
        truncate_after: None,
        append_from: req.records.len(),
    }
}

/// The leader's view of one follower.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Progress {
    /// Highest LSN known durable on the follower.
    pub match_lsn: Lsn,
    /// Next LSN to send. Invariant: `match_lsn < next_lsn`.
    pub next_lsn: Lsn,
    /// Bytes sent and not yet acknowledged.
    pub inflight_bytes: u64,
}

impl Progress {
    /// A follower we know nothing about: probe from just after our last LSN.
    pub fn new(leader_last_lsn: Lsn) -> Self {
        Progress {
            match_lsn: 0,
            next_lsn: leader_last_lsn + 1,
            inflight_bytes: 0,
        }
    }

    /// May a batch of `bytes` be sent now, with at most `inflight_max` in
    /// flight? (One batch is always allowed when nothing is in flight.)
    pub fn can_send(&self, bytes: u64, inflight_max: u64) -> bool {
        self.inflight_bytes == 0 || self.inflight_bytes + bytes <= inflight_max
    }

    /// A batch `(first..=last)` of `bytes` was sent.
    pub fn sent(&mut self, last: Lsn, bytes: u64) {
        self.next_lsn = self.next_lsn.max(last + 1);
        self.inflight_bytes += bytes;
    }

    /// The follower acknowledged `durable_lsn`; `bytes` of the batch are no
    /// longer in flight. `match` never goes backwards.
    pub fn acked(&mut self, durable_lsn: Lsn, bytes: u64) {
        self.match_lsn = self.match_lsn.max(durable_lsn);
        self.next_lsn = self.next_lsn.max(self.match_lsn + 1);
        self.inflight_bytes = self.inflight_bytes.saturating_sub(bytes);
        debug_assert!(self.match_lsn < self.next_lsn);
    }

    /// The follower refused: restart from the hint (its last LSN + 1, or
    /// `prev_lsn` on a mismatch), never below `match + 1`. Everything in
    /// flight is void.
    pub fn refused(&mut self, resume_from: Lsn) {
        self.next_lsn = resume_from.max(self.match_lsn + 1);
        self.inflight_bytes = 0;
    }

    /// The stream broke: nothing is in flight; resend from `match + 1`.
    pub fn reset(&mut self) {
        self.next_lsn = self.match_lsn + 1;
        self.inflight_bytes = 0;
    }
}

/// The commit rule. `durable` holds, for every member (leader included),
/// the highest LSN known durable there. The result is the highest LSN
/// durable on a majority whose record carries `current_term`, or
/// `current_commit` if that is higher (commit never goes backwards).
pub fn quorum_commit(
    durable: &[Lsn],
    current_term: Term,
    term_at: impl Fn(Lsn) -> Option<Term>,
    current_commit: Lsn,
) -> Lsn {
    assert!(!durable.is_empty(), "a cluster has at least one member");
    let mut sorted = durable.to_vec();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    // With n members, the value at index n/2 (descending) is durable on
    // n/2 + 1 of them: a majority.
    let majority = sorted[durable.len() / 2];
    if majority > current_commit && term_at(majority) == Some(current_term) {
        majority
    } else {
        current_commit
    }
}

/// How many copies must be durable before a write is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AckLevel {
    /// The leader's own fsync.
    Local,
    /// A majority, leader included (and the write committed).
    Quorum,
    /// Every member (and the write committed).
    All,
}

impl AckLevel {
    /// Is a write at `lsn` acknowledged at this level, given the leader's
    /// durable LSN, the commit LSN and every member's durable LSN?
    pub fn satisfied(self, lsn: Lsn, leader_durable: Lsn, commit: Lsn, durable: &[Lsn]) -> bool {
        match self {
            AckLevel::Local => leader_durable >= lsn,
            AckLevel::Quorum => commit >= lsn,
            AckLevel::All => commit >= lsn && durable.iter().all(|d| *d >= lsn),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A follower's log for the tests: terms of LSN 1..=n, and a commit LSN.
    struct Log {
        terms: Vec<Term>,
        commit: Lsn,
    }

    impl LogView for Log {
        fn last_lsn(&self) -> Lsn {
            self.terms.len() as Lsn
        }
        fn term_at(&self, lsn: Lsn) -> Option<Term> {
            if lsn == 0 {
                return Some(0);
            }
            self.terms.get(lsn as usize - 1).copied()
        }
        fn commit_lsn(&self) -> Lsn {
            self.commit
        }
        fn durable_lsn(&self) -> Lsn {
            self.last_lsn()
        }
    }

    fn req(prev_lsn: Lsn, prev_term: Term, terms: &[Term]) -> AppendMeta {
        AppendMeta {
            prev_lsn,
            prev_term,
            records: terms
                .iter()
                .enumerate()
                .map(|(i, t)| (prev_lsn + 1 + i as Lsn, *t))
                .collect(),
        }
    }

    fn check(log: (&[Term], Lsn), request: AppendMeta, expected: AppendVerdict) {
        let log = Log {
            terms: log.0.to_vec(),
            commit: log.1,
        };
        assert_eq!(follower_append(&log, &request), expected, "{request:?}");
    }

    fn accept(truncate_after: Option<Lsn>, append_from: usize) -> AppendVerdict {
        AppendVerdict::Accept {
            truncate_after,
            append_from,
        }
    }

    #[test]
    fn terms_fence_stale_leaders() {
        assert_eq!(observe_term(5, 4), TermAction::Reject { ours: 5 });
        assert_eq!(observe_term(5, 5), TermAction::Accept);
        assert_eq!(observe_term(5, 7), TermAction::StepDown { new_term: 7 });
    }

    #[test]
    fn appends_in_order_are_accepted() {
        check((&[], 0), req(0, 0, &[1, 1]), accept(None, 0));
        check((&[1, 1], 0), req(2, 1, &[1]), accept(None, 0));
        // A heartbeat: no records.
        check((&[1, 1], 0), req(2, 1, &[]), accept(None, 0));
    }

    #[test]
    fn a_gap_is_refused_with_our_last_lsn() {
        check(
            (&[1], 0),
            req(3, 1, &[1]),
            AppendVerdict::Refuse(Refusal::Gap { last_lsn: 1 }),
        );
    }

    #[test]
    fn a_prev_term_mismatch_is_refused() {
        check(
            (&[1, 1, 2], 1),
            req(3, 3, &[3]),
            AppendVerdict::Refuse(Refusal::Mismatch {
                prev_lsn: 3,
                our_term: Some(2),
            }),
        );
    }

    #[test]
    fn duplicates_and_stale_retransmissions_never_truncate() {
        // The whole batch is already here: nothing to do.
        check((&[1, 1, 1, 1], 0), req(1, 1, &[1, 1]), accept(None, 2));
        // Partly here: append only the new tail.
        check((&[1, 1, 1], 0), req(1, 1, &[1, 1, 1]), accept(None, 2));
    }

    #[test]
    fn the_first_conflicting_record_truncates_from_there() {
        // Ours: terms 1 1 2 2; the leader's term-3 records replace 3 and 4.
        check(
            (&[1, 1, 2, 2], 2),
            req(2, 1, &[3, 3, 3]),
            accept(Some(2), 0),
        );
        // Conflict in the middle of the batch.
        check((&[1, 1, 2, 2], 1), req(1, 1, &[1, 3]), accept(Some(2), 1));
    }

    #[test]
    fn never_truncates_at_or_below_the_commit_lsn() {
        // Records at or below commit are identical by the log matching
        // property: they are skipped, never compared into a truncation.
        check((&[1, 1, 2], 3), req(0, 0, &[1, 1, 2, 2]), accept(None, 3));
        // A prev_lsn at or below commit matches even if we forgot its term.
        let log = Log {
            terms: vec![1, 1],
            commit: 2,
        };
        assert_eq!(follower_append(&log, &req(2, 9, &[3])), accept(None, 0));
    }

    #[test]
    fn a_conflict_with_a_committed_record_is_refused_not_truncated() {
        check(
            (&[1, 1, 2], 3),
            req(2, 1, &[3]),
            AppendVerdict::Refuse(Refusal::ConflictsWithCommitted { lsn: 3 }),
        );
    }

    #[test]
    fn malformed_batches_are_refused() {
        let mut r = req(0, 0, &[1, 1]);
        r.records[1].0 = 5;
        assert!(matches!(
            follower_append(
                &Log {
                    terms: vec![],
                    commit: 0
                },
                &r
            ),
            AppendVerdict::Refuse(Refusal::Malformed(_))
        ));
    }

    #[test]
    fn commit_needs_a_majority_and_the_current_term() {
        let term_at = |lsn: Lsn| Some(if lsn <= 5 { 1 } else { 2 });
        // 3 members: durable at 8, 7, 3 -> 7 is on a majority, of term 2.
        assert_eq!(quorum_commit(&[8, 7, 3], 2, term_at, 0), 7);
        // The leader alone (8) is not a majority.
        assert_eq!(quorum_commit(&[8, 0, 0], 2, term_at, 0), 0);
        // A majority at 5 but of an older term: not committed by counting.
        assert_eq!(quorum_commit(&[8, 5, 5], 2, term_at, 0), 0);
        // Commit never goes backwards.
        assert_eq!(quorum_commit(&[8, 2, 2], 2, term_at, 7), 7);
        // 5 members: the third highest.
        assert_eq!(quorum_commit(&[9, 9, 8, 1, 0], 2, term_at, 0), 8);
        // One member is its own majority.
        assert_eq!(quorum_commit(&[4], 1, term_at, 0), 4);
    }

    /// `quorum_commit` and `AckLevel` together, for clusters of `members`:
    /// `durable_on` of them (the leader first) hold LSN 10 durable, the
    /// rest hold nothing. Returns (commit, quorum acknowledged, all
    /// acknowledged) for the write at LSN 10.
    fn ack_of_lsn_10(members: usize, durable_on: usize) -> (Lsn, bool, bool) {
        let durable: Vec<Lsn> = (0..members)
            .map(|i| if i < durable_on { 10 } else { 0 })
            .collect();
        let commit = quorum_commit(&durable, 3, |_| Some(3), 0);
        let leader = durable[0];
        (
            commit,
            AckLevel::Quorum.satisfied(10, leader, commit, &durable),
            AckLevel::All.satisfied(10, leader, commit, &durable),
        )
    }

    #[test]
    fn a_majority_of_four_is_three_and_of_five_is_three() {
        // (members, durable on, commit, quorum acknowledged, all acknowledged)
        let table: &[(usize, usize, Lsn, bool, bool)] = &[
            // 4 members: two copies are half, not a majority.
            (4, 1, 0, false, false),
            (4, 2, 0, false, false),
            (4, 3, 10, true, false),
            (4, 4, 10, true, true),
            // 5 members: three copies are a majority, two are not.
            (5, 1, 0, false, false),
            (5, 2, 0, false, false),
            (5, 3, 10, true, false),
            (5, 4, 10, true, false),
            (5, 5, 10, true, true),
        ];
        for &(members, durable_on, commit, quorum, all) in table {
            assert_eq!(
                ack_of_lsn_10(members, durable_on),
                (commit, quorum, all),
                "{members} members, LSN 10 durable on {durable_on}"
            );
        }
        // Which members hold it does not matter, only how many: the leader
        // need not be among the highest.
        assert_eq!(quorum_commit(&[0, 10, 10, 10], 3, |_| Some(3), 0), 10);
        assert_eq!(quorum_commit(&[10, 0, 10, 0], 3, |_| Some(3), 0), 0);
        assert_eq!(quorum_commit(&[0, 10, 0, 10, 10], 3, |_| Some(3), 0), 10);
        assert_eq!(quorum_commit(&[10, 10, 0, 0, 0], 3, |_| Some(3), 0), 0);
        // Mixed positions: the highest LSN durable on 3 of 4 (resp. 3 of 5).
        assert_eq!(quorum_commit(&[12, 9, 11, 4], 3, |_| Some(3), 0), 9);
        assert_eq!(quorum_commit(&[12, 9, 11, 4, 2], 3, |_| Some(3), 0), 9);
        // A 4-member majority of an older term still commits nothing.
        let term_at = |lsn: Lsn| Some(if lsn <= 9 { 2 } else { 3 });
        assert_eq!(quorum_commit(&[12, 9, 9, 9], 3, term_at, 0), 0);
        // Quorum is acknowledged exactly when committed; `all` also needs
        // the member that is down.
        let durable = [10, 10, 10, 0];
        assert!(AckLevel::Quorum.satisfied(10, 10, 10, &durable));
        assert!(!AckLevel::All.satisfied(10, 10, 10, &durable));
        assert!(!AckLevel::Quorum.satisfied(10, 10, 9, &durable));
    }

    #[test]
    fn progress_moves_with_acks_and_refusals() {
        let mut p = Progress::new(10);
        assert_eq!((p.match_lsn, p.next_lsn), (0, 11));
        p.refused(4);
        assert_eq!(p.next_lsn, 4);
        p.sent(8, 500);
        assert_eq!((p.next_lsn, p.inflight_bytes), (9, 500));
        assert!(p.can_send(400, 1000));
        assert!(!p.can_send(600, 1000));
        p.acked(8, 500);
        assert_eq!((p.match_lsn, p.next_lsn, p.inflight_bytes), (8, 9, 0));
        // An old ack never moves match backwards; a refusal never below it.
        p.acked(3, 0);
        p.refused(2);
        assert_eq!((p.match_lsn, p.next_lsn), (8, 9));
        p.sent(20, 100);
        p.reset();
        assert_eq!((p.next_lsn, p.inflight_bytes), (9, 0));
        // One batch always goes when nothing is in flight, however large.
        assert!(p.can_send(10_000, 1000));
    }

    #[test]
    fn acknowledgement_levels() {
        let durable = [9, 7, 3];
        assert!(AckLevel::Local.satisfied(9, 9, 7, &durable));
        assert!(AckLevel::Quorum.satisfied(7, 9, 7, &durable));
        assert!(!AckLevel::Quorum.satisfied(8, 9, 7, &durable));
        assert!(!AckLevel::All.satisfied(7, 9, 7, &durable));
        assert!(AckLevel::All.satisfied(3, 9, 7, &durable));
    }
}
