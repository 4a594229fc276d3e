//! kv's deterministic simulation (see the README's Simulation section):
//! whole clusters of the real node code under turmoil ([`harness`]), over
//! the network seams in [`net`], on disks that forget what was never synced
//! (`kv_node::storage::SimStorage`), with every client history checked by a
//! per-key linearizability checker ([`linearizability`]), and a stranger
//! whose forged replication messages the node's identity check must
//! refuse ([`stranger`]).

pub mod harness;
/// The checker, shared with `kv verify`.
pub use kv_node::linearizability;
pub mod net;
pub mod rng;
pub mod stranger;
