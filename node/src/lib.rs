//! kv: a crash-consistent key-value node.
//!
//! This crate holds the local engine ([`engine`]) behind one narrow storage
//! seam ([`storage`]), and the parts of the `kv` binary that sit on top of it:
//! the single-node REPL ([`repl`]), the offline checker ([`check`]), the
//! benchmarks ([`bench`]) and the flush timer ([`timer`]).
//!
//! The cluster node (`kv serve`, WAL shipping over gRPC) is [`server`];
//! the replication rules it follows are the `kv-cluster` crate's; the CLI
//! client and `kv shell` are [`client`]; [`supervisor`] runs a directory's
//! nodes (`kv cluster up`).
//! [`tls`] secures its connections and [`certs`] makes a development CA
//! and certificates (`kv certs init`); [`metrics`] exports Prometheus
//! metrics (`metrics_listen`); [`verify`] is `kv verify`.

pub mod bench;
pub mod certs;
pub mod check;
pub mod cli;
pub mod client;
pub mod engine;
pub mod linearizability;
pub mod lineedit;
pub mod metrics;
pub mod repl;
pub mod server;
pub mod storage;
pub mod supervisor;
pub mod timer;
pub mod tls;
pub mod verify;

pub use engine::{Engine, EngineConfig, EngineError, EngineStats};
pub use storage::{FsStorage, SimOptions, SimStorage, Storage};
