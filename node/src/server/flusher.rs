//! The node's flusher: one OS thread that runs the engine's group commit
//! rounds and publishes the durable LSN to async waiters.
//!
//! Async code never blocks on the engine: a writer appends with
//! `Engine::submit`/`append_records` (a few microseconds under a lock),
//! kicks the flusher, and awaits the durable LSN on a `watch`. Every round
//! makes everything appended before it durable with one `fdatasync`, so
//! concurrent writers share syncs without one blocked thread each. (The
//! simulation will drive `Engine::flush_step` from a task instead.)

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::time::Duration;

use tokio::sync::watch;

use super::notify::LsnNotifier;
use crate::engine::Engine;

/// How often the flusher looks for work nobody kicked it for (e.g. records
/// a blocking engine call flushed itself) and republishes the durable LSN.
const IDLE_CHECK: Duration = Duration::from_millis(5);

/// Handle to the flusher thread; it stops when every handle is dropped.
#[derive(Debug, Clone)]
pub struct Flusher {
    kick: SyncSender<()>,
    durable: Arc<LsnNotifier>,
}

impl Flusher {
    /// Starts the flusher for `engine`, publishing the durable LSN on
    /// `durable_tx` (for replicators) and to its writers.
    pub fn start(engine: Arc<Engine>, durable_tx: watch::Sender<u64>) -> std::io::Result<Flusher> {
        let (kick, kicked) = sync_channel(1);
        let durable = Arc::new(LsnNotifier::new(engine.durable_lsn()));
        let publish_to = durable.clone();
        std::thread::Builder::new()
            .name("kv-flusher".into())
            .spawn(move || run(&engine, &kicked, &durable_tx, &publish_to))?;
        Ok(Flusher { kick, durable })
    }

    /// Asks for a round soon (never blocks).
    pub fn kick(&self) {
        let _ = self.kick.try_send(());
    }

    /// Waits until `lsn` is durable (kicking the flusher first).
    pub async fn durable(&self, lsn: u64) {
        self.kick();
        self.durable.wait_for(lsn).await;
    }
}

fn run(
    engine: &Arc<Engine>,
    kicked: &Receiver<()>,
    durable_tx: &watch::Sender<u64>,
    writers: &LsnNotifier,
) {
    let publish_all = || {
        let durable = engine.durable_lsn();
        writers.advance(durable);
        durable_tx.send_if_modified(|d| publish(d, durable));
    };
    loop {
        match kicked.recv_timeout(IDLE_CHECK) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        loop {
            match engine.flush_step() {
                Ok(true) => publish_all(),
                Ok(false) => break,
                Err(e) => {
                    // Poisoned: waiters time out with "outcome unknown",
                    // which is the truth after a failed fsync.
                    tracing::error!(error = %e, "flush failed; the node takes no more writes");
                    return;
                }
            }
        }
        publish_all();
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
