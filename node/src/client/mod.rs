//! The clients of a cluster: what `kv put/get/del/status`, `kv shell`,
//! `kv transfer-leader`, `kv verify` and `kv bench cluster` use to talk to
//! the nodes over gRPC.
//!
//! * [`cluster_client`]: a client over a list of endpoints that follows
//!   NOT_LEADER redirects and keeps an unknown outcome apart from a
//!   refusal; `kv status` and `kv bench cluster`.
//! * [`batch_client`]: many callers' commands over one `Kv.Batch` stream.
//! * [`shell`]: `kv shell`, the REPL's commands against a cluster.
//!
//! What it does not do: serve anything or decide anything about
//! replication (that is [`crate::server`]); a client only sends requests
//! and reports what came back.

pub mod batch_client;
pub mod cluster_client;
pub mod shell;
