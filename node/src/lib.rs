//! kv: a crash-consistent key-value node.
//!
//! This crate holds the local engine ([`engine`]) behind one narrow storage
//! seam ([`storage`]), and the parts of the `kv` binary that sit on top of it:
//! the single-node REPL ([`repl`]), the offline checker ([`check`]), the
//! benchmarks ([`bench`]) and the flush timer ([`timer`]).
//!
//! It does not (yet) hold networking or replication; those arrive with the
//! cluster and are designed for: records carry a term, the log can be read
//! from an LSN, appended at given LSNs and durably truncated.

pub mod bench;
pub mod check;
pub mod engine;
pub mod repl;
pub mod storage;
pub mod timer;

pub use engine::{Engine, EngineConfig, EngineError, EngineStats};
pub use storage::{FsStorage, SimOptions, SimStorage, Storage};
