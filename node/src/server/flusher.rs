//! The node's flusher: it runs the engine's group commit rounds and
//! publishes the durable LSN to async waiters. With [`Offload::Threads`]
//! (`kv serve`) it is one OS thread; with [`Offload::Inline`] (in-memory
//! storage, the deterministic simulation) a tokio task on the node's
//! runtime, so no thread escapes simulated time.
//!
//! Async code never blocks on the engine: a writer appends with
//! `Engine::submit`/`append_records` (a few microseconds under a lock),
//! kicks the flusher, and awaits its LSN on an [`LsnNotifier`]. Every round
//! makes everything appended before it durable with one `fdatasync`, so
//! concurrent writers share syncs without one blocked thread each.
//!
//! The flusher thread never wakes writers itself: a wake-up from another
//! thread costs the runtime an `eventfd` write each, and a round can cover
//! hundreds of writers. It sends the durable LSN to a relay task on the
//! node's runtime (one cross-thread wake-up per round), which advances the
//! writers' notifier from there.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use super::env::Offload;
use super::notify::LsnNotifier;
use crate::engine::Engine;

/// How often the flusher looks for work nobody kicked it for (e.g. records
/// a blocking engine call flushed itself) and republishes the durable LSN.
const IDLE_CHECK: Duration = Duration::from_millis(5);

/// Handle to the flusher; it stops when every handle is dropped.
#[derive(Debug, Clone)]
pub struct Flusher {
    kick: Kick,
    durable: Arc<LsnNotifier>,
    engine: Arc<Engine>,
}

/// How a flusher is asked for a round.
#[derive(Debug, Clone)]
enum Kick {
    Thread(SyncSender<()>),
    Task(Arc<Notify>),
}

impl Flusher {
    /// Starts the flusher for `engine`, publishing the durable LSN on
    /// `durable_tx` (for replicators) and to its writers. It must be called
    /// inside the tokio runtime its writers run on (it spawns the task
    /// flusher, or the relay of the thread flusher, there).
    ///
    /// `sync_latency` (task flusher only; zero in `kv serve`) is simulated
    /// time let pass between writing a round and syncing it, as a real
    /// disk's fsync takes: a simulated power loss can then fall between the
    /// two and find records written but not durable.
    pub fn start(
        engine: Arc<Engine>,
        durable_tx: watch::Sender<u64>,
        offload: Offload,
        sync_latency: Duration,
    ) -> std::io::Result<Flusher> {
        let durable = Arc::new(LsnNotifier::new(engine.durable_lsn()));
        let publish_to = durable.clone();
        let handle_engine = engine.clone();
        let kick = match offload {
            Offload::Threads => {
                let (kick, kicked) = sync_channel(1);
                let (relay_tx, relay_rx) = watch::channel(engine.durable_lsn());
                tokio::spawn(publish_to.follow(relay_rx));
                std::thread::Builder::new()
                    .name("kv-flusher".into())
                    .spawn(move || run(&engine, &kicked, &durable_tx, &relay_tx))?;
                Kick::Thread(kick)
            }
            Offload::Inline => {
                let kick = Arc::new(Notify::new());
                tokio::spawn(run_task(
                    engine,
                    kick.clone(),
                    durable_tx,
                    publish_to,
                    sync_latency,
                ));
                Kick::Task(kick)
            }
        };
        Ok(Flusher {
            kick,
            durable,
            engine: handle_engine,
        })
    }

    /// Asks for a round soon (never blocks).
    pub fn kick(&self) {
        match &self.kick {
            Kick::Thread(tx) => {
                let _ = tx.try_send(());
            }
            Kick::Task(notify) => notify.notify_one(),
        }
    }

    /// Waits until `lsn` is durable (kicking the flusher first).
    ///
    /// The published position only moves forward, but the log can be cut
    /// back under it (a follower's truncation, a snapshot install), and
    /// its LSNs then written again: so the engine has the last word, and a
    /// stale position is lowered and waited on again.
    pub async fn durable(&self, lsn: u64) {
        loop {
            self.kick();
            self.durable.wait_for(lsn).await;
            let actual = self.engine.durable_lsn();
            if actual >= lsn {
                return;
            }
            self.durable.lower_to(actual);
        }
    }
}

/// How a flusher tells its writers the durable LSN.
#[derive(Clone, Copy)]
enum Writers<'a> {
    /// It advances their notifier itself (the task flusher, which runs on
    /// their runtime).
    Direct(&'a LsnNotifier),
    /// It sends the LSN to the relay task on their runtime, after every
    /// round, changed or not: a writer that lowered the notifier (the log
    /// was cut back under it) kicks a round and must see the notifier
    /// advanced again, even to a value sent before.
    Relay(&'a watch::Sender<u64>),
}

/// Runs rounds until nothing is left to write or sync, publishing after
/// each. False if the engine failed (poisoned): the flusher then stops, and
/// waiters time out with "outcome unknown", the truth after a failed fsync.
fn flush_all(engine: &Engine, durable_tx: &watch::Sender<u64>, writers: Writers<'_>) -> bool {
    let publish_all = || {
        let durable = engine.durable_lsn();
        match writers {
            Writers::Direct(notifier) => notifier.advance(durable),
            Writers::Relay(relay) => {
                relay.send_replace(durable);
            }
        }
        durable_tx.send_if_modified(|d| publish(d, durable));
    };
    loop {
        match engine.flush_step() {
            Ok(true) => publish_all(),
            Ok(false) => break,
            Err(e) => {
                tracing::error!(error = %e, "flush failed; the node takes no more writes");
                return false;
            }
        }
    }
    publish_all();
    true
}

/// The task flusher ([`Offload::Inline`]): rounds and snapshots run on the
/// task itself. It ends when every [`Flusher`] handle is gone.
async fn run_task(
    engine: Arc<Engine>,
    kick: Arc<Notify>,
    durable_tx: watch::Sender<u64>,
    writers: Arc<LsnNotifier>,
    sync_latency: Duration,
) {
    loop {
        tokio::select! {
            biased;
            () = kick.notified() => {}
            () = tokio::time::sleep(IDLE_CHECK) => {}
        }
        if Arc::strong_count(&kick) == 1 {
            return;
        }
        if !sync_latency.is_zero() {
            match engine.write_step() {
                Ok(true) => tokio::time::sleep(sync_latency).await,
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(error = %e, "write failed; the node takes no more writes");
                    return;
                }
            }
        }
        if !flush_all(&engine, &durable_tx, Writers::Direct(&writers)) {
            return;
        }
        engine.maybe_snapshot();
    }
}

/// The thread flusher ([`Offload::Threads`]).
fn run(
    engine: &Arc<Engine>,
    kicked: &Receiver<()>,
    durable_tx: &watch::Sender<u64>,
    relay: &watch::Sender<u64>,
) {
    loop {
        match kicked.recv_timeout(IDLE_CHECK) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        if !flush_all(engine, durable_tx, Writers::Relay(relay)) {
            return;
        }
        if engine.snapshot_due() {
            // Off this thread: a snapshot must not stall group commit.
            let engine = engine.clone();
            let spawned = std::thread::Builder::new()
                .name("kv-snapshot".into())
                .spawn(move || engine.maybe_snapshot());
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "could not start the snapshot thread");
            }
        }
    }
}

fn publish(current: &mut u64, durable: u64) -> bool {
    if durable > *current {
        *current = durable;
        true
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{EngineConfig, Op, Record};
    use crate::storage::{SimOptions, SimStorage};

    fn records(range: std::ops::RangeInclusive<u64>) -> Vec<Record> {
        range
            .map(|lsn| Record {
                lsn,
                term: 1,
                op: Op::Put {
                    key: format!("k{lsn}").into_bytes(),
                    value: b"v".to_vec(),
                },
            })
            .collect()
    }

    /// After the log is cut back below what was published as durable, and
    /// the same LSNs are appended again, waiting for one of them waits for
    /// its new fsync (the simulation found a follower taking a commit LSN
    /// beyond its durable log after a snapshot install this way).
    #[tokio::test(flavor = "current_thread")]
    async fn a_log_cut_back_makes_the_published_durable_position_wait_again() {
        cut_back_then_wait(Offload::Inline).await;
    }

    /// The same with the thread flusher and its relay (as in `kv serve`):
    /// the relay must advance the lowered notifier again, even to an LSN it
    /// had sent before.
    #[tokio::test(flavor = "current_thread")]
    async fn the_thread_flusher_wakes_a_writer_again_after_a_log_cut_back() {
        cut_back_then_wait(Offload::Threads).await;
    }

    async fn cut_back_then_wait(offload: Offload) {
        let mut config = EngineConfig::new("/kv");
        config.replicated = true;
        let engine = Arc::new(
            Engine::open(Arc::new(SimStorage::new(SimOptions::default())), config).unwrap(),
        );
        let (durable_tx, _rx) = watch::channel(0);
        let flusher = Flusher::start(
            engine.clone(),
            durable_tx,
            offload,
            Duration::from_millis(5),
        )
        .unwrap();
        let wait = |lsn| tokio::time::timeout(Duration::from_secs(10), flusher.durable(lsn));
        engine.append_records(records(1..=10)).unwrap();
        wait(10).await.expect("LSN 10 never reported durable");
        assert_eq!(engine.durable_lsn(), 10);
        engine.truncate_after(4).unwrap();
        engine.append_records(records(5..=8)).unwrap();
        assert_eq!(engine.durable_lsn(), 4);
        wait(8)
            .await
            .expect("LSN 8, appended again after the cut-back, never reported durable");
        assert!(
            engine.durable_lsn() >= 8,
            "LSN 8 reported durable while the engine has {}",
            engine.durable_lsn()
        );
    }
}
