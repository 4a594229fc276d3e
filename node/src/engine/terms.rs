//! The term of every LSN the log holds, in O(number of term changes) memory.
//!
//! Replication asks "what is the term of the record at LSN n?" for log
//! matching and for the commit rule. Terms change rarely (once per leader),
//! so the log's terms are kept as runs `(first LSN, term)`. No I/O here: the
//! engine feeds it from recovery, appends and truncations.

/// Runs of equal terms over the LSNs the engine knows.
#[derive(Debug, Clone, Default)]
pub struct TermRuns {
    /// The snapshot's LSN and term: known even though its records are gone.
    base: (u64, u64),
    /// `(first LSN, term)`, first LSNs increasing, all above `base.0`.
    runs: Vec<(u64, u64)>,
    /// Last LSN covered.
    last: u64,
    /// Records at or below the snapshot that the WAL still holds (found by
    /// recovery): their LSN range and runs `(first LSN, term)`.
    below: Vec<(u64, u64)>,
    below_range: Option<(u64, u64)>,
}

impl TermRuns {
    /// Runs starting after a snapshot at `lsn` of `term` (0, 0 without one).
    pub fn new(lsn: u64, term: u64) -> Self {
        TermRuns {
            base: (lsn, term),
            runs: Vec::new(),
            last: lsn,
            below: Vec::new(),
            below_range: None,
        }
    }

    /// Takes the below-the-snapshot terms `other` collected (with
    /// [`TermRuns::push_below`]).
    pub fn set_below(&mut self, other: TermRuns) {
        self.below = other.below;
        self.below_range = other.below_range;
    }

    /// Records that the record at `lsn`, at or below the snapshot but still
    /// in the log, has `term` (recovery feeds these in LSN order).
    pub fn push_below(&mut self, lsn: u64, term: u64) {
        assert!(lsn <= self.base.0, "push_below is for the snapshot's range");
        self.below_range = match self.below_range {
            Some((first, last)) if lsn == last + 1 => Some((first, lsn)),
            Some((_, last)) => {
                // A gap: recovery skips leftover segments before it; only
                // the run that reaches the snapshot counts.
                assert!(lsn > last, "terms are recorded in LSN order");
                self.below.clear();
                Some((lsn, lsn))
            }
            None => Some((lsn, lsn)),
        };
        if self.below.last().is_none_or(|&(_, t)| t != term) {
            self.below.push((lsn, term));
        }
    }

    /// Records that the record at `lsn` (the next one) has `term`.
    pub fn push(&mut self, lsn: u64, term: u64) {
        assert_eq!(lsn, self.last + 1, "terms are recorded in LSN order");
        if self.runs.last().is_none_or(|&(_, t)| t != term) {
            self.runs.push((lsn, term));
        }
        self.last = lsn;
    }

    /// Forgets every LSN after `lsn`.
    pub fn truncate_after(&mut self, lsn: u64) {
        self.runs.retain(|&(first, _)| first <= lsn);
        self.last = self.last.min(lsn).max(self.base.0);
    }

    /// The term of the record at `lsn`: `Some(0)` for LSN 0, `None` if the
    /// LSN is past the end, or older than the snapshot and not in the log.
    pub fn term_at(&self, lsn: u64) -> Option<u64> {
        if lsn == 0 {
            return Some(0);
        }
        if lsn > self.last {
            return None;
        }
        if lsn < self.base.0 {
            let (first, last) = self.below_range?;
            if lsn < first || lsn > last {
                return None;
            }
            let i = self.below.partition_point(|&(first, _)| first <= lsn);
            return i.checked_sub(1).map(|i| self.below[i].1);
        }
        if lsn == self.base.0 {
            return Some(self.base.1);
        }
        let i = self.runs.partition_point(|&(first, _)| first <= lsn);
        i.checked_sub(1).map(|i| self.runs[i].1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_answer_terms_and_forget_truncated_lsns() {
        let mut t = TermRuns::new(10, 2);
        for lsn in 11..=15 {
            t.push(lsn, 2);
        }
        for lsn in 16..=18 {
            t.push(lsn, 3);
        }
        assert_eq!(t.term_at(0), Some(0));
        assert_eq!(t.term_at(9), None, "before the snapshot");
        assert_eq!(t.term_at(10), Some(2), "the snapshot's own LSN");
        assert_eq!(t.term_at(15), Some(2));
        assert_eq!(t.term_at(16), Some(3));
        assert_eq!(t.term_at(19), None);
        t.truncate_after(16);
        assert_eq!(t.term_at(17), None);
        t.push(17, 4);
        assert_eq!((t.term_at(16), t.term_at(17)), (Some(3), Some(4)));
        t.truncate_after(12);
        assert_eq!(t.term_at(16), None);
        assert_eq!(t.term_at(12), Some(2));
    }

    #[test]
    fn records_below_the_snapshot_that_the_log_holds_keep_their_terms() {
        let mut t = TermRuns::new(10, 2);
        for (lsn, term) in [(6, 1), (7, 1), (8, 2), (9, 2), (10, 2)] {
            t.push_below(lsn, term);
        }
        t.push(11, 3);
        assert_eq!(t.term_at(5), None, "not in the log");
        assert_eq!((t.term_at(6), t.term_at(7)), (Some(1), Some(1)));
        assert_eq!((t.term_at(8), t.term_at(9)), (Some(2), Some(2)));
        assert_eq!(t.term_at(10), Some(2));
        assert_eq!(t.term_at(11), Some(3));
    }
}
