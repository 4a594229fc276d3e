//! The flush timer: in batch mode, bounds how long an acknowledged write can
//! stay unsynced.
//!
//! A plain OS thread that wakes every `flush_interval_ms` and calls
//! [`Engine::flush`] if anything is unsynced. It is the production driver; a
//! simulation drives [`Engine::flush_step`] from its own clock instead. The
//! thread stops when the [`FlushTimer`] is dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::engine::Engine;

/// A running flush timer; dropping it stops the thread.
#[derive(Debug)]
pub struct FlushTimer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FlushTimer {
    /// Starts a timer that flushes `engine` every `interval` when needed.
    pub fn start(engine: Arc<Engine>, interval: Duration) -> FlushTimer {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("kv-flush-timer".into())
            .spawn(move || {
                while !flag.load(Ordering::Acquire) {
                    std::thread::park_timeout(interval);
                    if flag.load(Ordering::Acquire) {
                        break;
                    }
                    if engine.has_unsynced()
                        && let Err(e) = engine.flush()
                    {
                        tracing::error!(error = %e, "timed flush failed");
                        break;
                    }
                }
            })
            .ok();
        FlushTimer { stop, thread }
    }
}

impl Drop for FlushTimer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}
