//! Wake exactly the writers whose LSN a position now covers.
//!
//! A `tokio::sync::watch` wakes every waiting task on every change; with
//! hundreds of writers waiting for the durable or commit LSN that is a
//! thundering herd on every group commit. Here each waiter registers the LSN
//! it needs, and an advance wakes only the waiters it covers.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{oneshot, watch};

/// A monotonic LSN position with per-LSN waiters.
#[derive(Debug, Default)]
pub struct LsnNotifier {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    current: u64,
    waiters: BTreeMap<u64, Vec<oneshot::Sender<()>>>,
}

impl LsnNotifier {
    /// A position starting at `current`.
    pub fn new(current: u64) -> Self {
        LsnNotifier {
            inner: Mutex::new(Inner {
                current,
                waiters: BTreeMap::new(),
            }),
        }
    }

    /// The position now.
    pub fn current(&self) -> u64 {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .current
    }

    /// Moves the position forward (never back) and wakes every waiter it
    /// now covers.
    pub fn advance(&self, to: u64) {
        let ready = {
            let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            if to <= inner.current {
                return;
            }
            inner.current = to;
            let later = inner.waiters.split_off(&(to + 1));
            std::mem::replace(&mut inner.waiters, later)
        };
        for tx in ready.into_values().flatten() {
            let _ = tx.send(());
        }
    }

    /// Moves the position back to `to` if it is ahead (the log it tracks
    /// was cut back); waiters stay queued.
    pub fn lower_to(&self, to: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.current = inner.current.min(to);
    }

    /// Follows a position published on a `watch` (from another thread, or
    /// a task on another runtime): advances to each value it sees, so the
    /// waiters are woken from the runtime this runs on, one cross-thread
    /// wake-up per change instead of one per waiter. Ends when the `watch`'s
    /// last sender is gone.
    pub async fn follow(self: Arc<Self>, mut position: watch::Receiver<u64>) {
        loop {
            let lsn = *position.borrow_and_update();
            self.advance(lsn);
            if position.changed().await.is_err() {
                return;
            }
        }
    }

    /// Resolves once the position reaches `lsn`.
    pub async fn wait_for(&self, lsn: u64) {
        let rx = {
            let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            if inner.current >= lsn {
                return;
            }
            let (tx, rx) = oneshot::channel();
            inner.waiters.entry(lsn).or_default().push(tx);
            rx
        };
        // A dropped notifier never resolves the waiter: the caller's own
        // deadline ends the wait.
        if rx.await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn advances_wake_exactly_the_covered_waiters() {
        let n = std::sync::Arc::new(LsnNotifier::new(5));
        n.wait_for(3).await; // already covered
        let waiter = |lsn| {
            let n = n.clone();
            tokio::spawn(async move { n.wait_for(lsn).await })
        };
        let (a, b) = (waiter(7), waiter(9));
        tokio::task::yield_now().await;
        n.advance(8);
        a.await.unwrap();
        assert!(!b.is_finished());
        n.advance(4); // never backwards
        assert_eq!(n.current(), 8);
        n.advance(9);
        b.await.unwrap();
    }
}
