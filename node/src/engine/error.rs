//! The engine's error type: what went wrong, where, and whether it is fatal.
//!
//! Fatal errors (corruption found on open, a failed write or sync that
//! poisoned the engine) are kept apart from a caller's bad input, which
//! changes nothing and can simply be corrected and retried.

use std::io;
use std::path::PathBuf;

/// Result alias for engine operations.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// Everything the engine can report.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// An I/O call failed. `op` names the step (e.g. "sync wal segment").
    /// (The OS error is part of the message, not a separate `source`, so a
    /// printed error chain shows it once.)
    #[error("{op} {}: {error}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        error: io::Error,
    },

    /// Bytes on disk that recovery must not accept: mid-log damage, damage in
    /// a sealed segment, an LSN gap. The engine refuses to open.
    #[error("corruption in {} at offset {offset}{}: {reason}", file.display(), lsn_text(*lsn))]
    Corrupt {
        file: PathBuf,
        offset: u64,
        /// The LSN the reader expected at that offset, when known.
        lsn: Option<u64>,
        reason: String,
    },

    /// An earlier write or sync failed; the engine accepts no more writes and
    /// must be restarted (recovery re-reads what is really on disk).
    #[error("engine poisoned by an earlier I/O failure ({cause}); restart to recover")]
    Poisoned { cause: String },

    /// Another process has the data directory open.
    #[error("data directory {} is in use by another process", dir.display())]
    Locked { dir: PathBuf },

    /// A key over the configured maximum; nothing was written.
    #[error("key is {len} bytes, over the maximum of {max}")]
    KeyTooLarge { len: usize, max: usize },

    /// A value over the configured maximum; nothing was written.
    #[error("value is {len} bytes, over the maximum of {max}")]
    ValueTooLarge { len: usize, max: usize },

    /// The empty key is not a valid key.
    #[error("key is empty")]
    EmptyKey,

    /// A configuration that cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A request that contradicts the log (e.g. appending at a wrong LSN).
    #[error("invalid log operation: {0}")]
    InvalidLogOp(String),
}

fn lsn_text(lsn: Option<u64>) -> String {
    match lsn {
        Some(l) => format!(" (LSN {l})"),
        None => String::new(),
    }
}

impl EngineError {
    /// Builds an [`EngineError::Io`] for `op` on `path`.
    pub fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> EngineError {
        let path = path.into();
        move |error| EngineError::Io { op, path, error }
    }

    /// True if the engine cannot go on after this error (restart needed).
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            EngineError::Io { .. } | EngineError::Corrupt { .. } | EngineError::Poisoned { .. }
        )
    }
}
