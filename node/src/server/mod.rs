//! `kv serve`: one cluster node — the engine in replicated mode, the client
//! API, and WAL shipping from the leader (elected, or fixed by
//! configuration) to the followers.
//!
//! The leader appends a client's write to its own WAL and makes it durable
//! (group commit), then the per-follower replicators ship it; followers
//! check the sender, the term, log matching and every record's CRC, append
//! the same records at the same LSNs, make them durable, acknowledge, and
//! apply what the leader's commit LSN covers. Every protocol decision, and
//! all protocol state, is the core's ([`kv_cluster::replica::Replica`],
//! behind one lock in the [`Node`]); this module is its runtime
//! ([`runtime`]): it feeds the core its inputs and carries out its effects.
//!
//! A term or vote is durable before anything that depends on it leaves the
//! node (the core gates those messages); a node refuses a lower term, and
//! a leader or candidate that sees a higher one steps down.
//!
//! A follower that needs records the leader's log no longer holds gets the
//! leader's newest snapshot, streamed in chunks, installed durably, and then
//! the log after it.
//!
//! This file holds the [`Node`] itself (its state, construction, who leads,
//! its status) and what every part shares: the
//! refusals that redirect a client to the leader, the checks on a peer's
//! request, and the mapping of engine errors to gRPC statuses. The rest is
//! by responsibility: `kv_api.rs` the client API ([`KvService`]),
//! `batch.rs` the `Kv.Batch` stream, `leader.rs` the leader's replicators,
//! `follower.rs` the follower's append handling, `snapshot.rs` snapshot
//! transfer, [`runtime`] stepping the core and carrying out its effects
//! (persisting the term and vote, the election timer, vote and `TimeoutNow`
//! RPCs, leadership transfer), `services.rs` the peer service and
//! [`serve`]. It does not decide protocol rules (the core does) or talk to
//! a cluster as a client ([`crate::client`]).

pub mod auth;
pub mod batch;
pub mod config;
pub mod convert;
pub mod env;
pub mod flusher;
mod follower;
mod kv_api;
mod leader;
pub mod notify;
pub mod observe;
pub mod runtime;
mod services;
mod snapshot;
pub mod term;

pub use kv_api::KvService;
pub use services::{ReplicationService, serve, serve_incoming};

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use kv_cluster::replica::{HardState, Replica, TransferOutcome};
use kv_cluster::{AckLevel, LogView};
use kv_proto::v1 as pb;
use tokio::sync::watch;
use tonic::{Request, Status};

use crate::engine::{Engine, EngineError};
use auth::PeerConn;
use config::NodeConfig;
use env::NodeEnv;
use flusher::Flusher;
pub use kv_cluster::replica::Role;
use notify::LsnNotifier;

/// The term a new cluster starts in.
const FIRST_TERM: u64 = 1;
/// Metadata key naming the leader's address on a NOT_LEADER error.
pub const LEADER_METADATA: &str = "kv-leader";
/// Records the leader keeps in memory for shipping (older ones are read
/// back from the WAL).
const RECENT_RECORDS_MAX: usize = 1 << 16;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One node of the cluster.
pub struct Node {
    config: NodeConfig,
    engine: Arc<Engine>,
    /// All protocol state: term, vote, role, leader, timers, follower
    /// progress, lease evidence, read barrier, transfer (see [`runtime`]).
    core: Mutex<Replica>,
    /// The newest hard state version of `core` that is durable in `TERM`.
    persisted: AtomicU64,
    /// That hard state: what this node reports (a term or vote still
    /// being persisted has not happened yet, as far as anyone outside can
    /// tell).
    durable_hard: Mutex<HardState>,
    /// Serialises writes of `TERM`.
    term_lock: tokio::sync::Mutex<()>,
    /// Where the core's time starts (its clock counts microseconds since).
    started: tokio::time::Instant,
    /// This node, for the tasks its effects spawn.
    me: Weak<Node>,
    /// The outcome of the latest leadership transfer, for whoever waits.
    transfer_done: watch::Sender<Option<TransferOutcome>>,
    /// The commit LSN (the value; `commit_waiters` wakes writers).
    commit_tx: watch::Sender<u64>,
    /// Writers waiting for the commit LSN to cover theirs.
    commit_waiters: LsnNotifier,
    /// The durable LSN, published by the flusher (replicators wake on it).
    durable_tx: watch::Sender<u64>,
    /// Runs group commit rounds for async writers.
    flusher: Flusher,
    /// Leader only: recently written records by LSN, already in wire form
    /// (encoded and CRC'd once, however many followers they go to).
    recent: Mutex<BTreeMap<u64, pb::LogRecord>>,
    /// Leader only: the durable LSN for which the commit rule last ran, so
    /// it runs once per group commit rather than once per writer.
    commit_checked: std::sync::atomic::AtomicU64,
    /// Follower only: appends are handled one at a time.
    append_lock: tokio::sync::Mutex<()>,
    /// Serialises publishing the commit LSN.
    commit_lock: Mutex<()>,
    /// Set when the node begins to shut down: long-lived streams end.
    stopping: watch::Sender<bool>,
    /// Every task the node spawns: `serve` waits for them before its final
    /// sync, so none outlives the node (see [`Node::spawn`]).
    tasks: tokio_util::task::TaskTracker,
    /// How it dials peers and runs blocking engine work.
    env: NodeEnv,
    /// Request latency and event counters (see [`crate::metrics`]).
    metrics: crate::metrics::NodeMetrics,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("node_id", &self.config.node_id)
            .finish_non_exhaustive()
    }
}

/// The engine as the core sees this node's log.
pub(super) struct EngineView<'a>(pub(super) &'a Engine);

impl LogView for EngineView<'_> {
    fn last_lsn(&self) -> u64 {
        self.0.last_lsn()
    }
    fn term_at(&self, lsn: u64) -> Option<u64> {
        self.0.term_at(lsn)
    }
    fn commit_lsn(&self) -> u64 {
        self.0.commit_lsn()
    }
    fn durable_lsn(&self) -> u64 {
        self.0.durable_lsn()
    }
}

/// Maps an engine error to a gRPC status.
fn engine_status(e: EngineError) -> Status {
    match e {
        EngineError::KeyTooLarge { .. }
        | EngineError::ValueTooLarge { .. }
        | EngineError::EmptyKey => Status::invalid_argument(e.to_string()),
        EngineError::Poisoned { .. } => Status::unavailable(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

fn join_error(e: tokio::task::JoinError) -> Status {
    Status::internal(format!("engine task failed: {e}"))
}

fn join_engine_error(e: tokio::task::JoinError) -> EngineError {
    EngineError::InvalidLogOp(format!("engine task failed: {e}"))
}

impl Node {
    /// A node over an opened engine (in replicated mode) on the real
    /// network, with blocking work on threads: see [`Node::with_env`].
    pub fn new(config: NodeConfig, engine: Arc<Engine>) -> anyhow::Result<Arc<Node>> {
        Node::with_env(config, engine, NodeEnv::default())
    }

    /// A node over an opened engine (in replicated mode): loads its term
    /// (persisting the first one on a new node) and starts its flusher.
    /// `env` says how it dials peers and where blocking work runs. It must
    /// be called inside the tokio runtime the node will serve on.
    pub fn with_env(
        config: NodeConfig,
        engine: Arc<Engine>,
        env: NodeEnv,
    ) -> anyhow::Result<Arc<Node>> {
        let storage = engine.storage();
        let mut persisted = term::load(&*storage, &config.data_dir)?;
        if persisted.term < FIRST_TERM {
            persisted = term::TermState {
                term: FIRST_TERM,
                voted_for: None,
            };
            term::persist(&*storage, &config.data_dir, persisted)?;
        }
        engine.set_term(persisted.term);
        let seed = env.seed ^ config.node_id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let hard = HardState {
            term: persisted.term,
            voted_for: persisted.voted_for,
        };
        let core = Replica::new(
            runtime::core_config(&config),
            hard,
            &EngineView(&engine),
            0,
            seed,
        );
        let commit = engine.commit_lsn();
        let durable_tx = watch::channel(engine.durable_lsn()).0;
        let flusher = Flusher::start(
            engine.clone(),
            durable_tx.clone(),
            env.offload,
            env.sync_latency,
        )?;
        let started = env.clock.now();
        Ok(Arc::new_cyclic(|me| Node {
            config,
            engine,
            core: Mutex::new(core),
            persisted: AtomicU64::new(0),
            durable_hard: Mutex::new(hard),
            term_lock: tokio::sync::Mutex::new(()),
            started,
            me: me.clone(),
            transfer_done: watch::channel(None).0,
            commit_tx: watch::channel(commit).0,
            commit_waiters: LsnNotifier::new(commit),
            durable_tx,
            flusher,
            recent: Mutex::new(BTreeMap::new()),
            commit_checked: std::sync::atomic::AtomicU64::new(0),
            append_lock: tokio::sync::Mutex::new(()),
            commit_lock: Mutex::new(()),
            stopping: watch::channel(false).0,
            tasks: tokio_util::task::TaskTracker::new(),
            env,
            metrics: crate::metrics::NodeMetrics::new(),
        }))
    }

    /// Spawns a task of this node that is dropped when the node stops
    /// (replicators, campaigns, timers: work that must not go on after
    /// shutdown, and that holds nothing a client waits for).
    pub(super) fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut stopping = self.stopping.subscribe();
        self.tasks.spawn(async move {
            tokio::select! {
                biased;
                _ = stopping.wait_for(|s| *s) => {}
                () = task => {}
            }
        });
    }

    /// Spawns a task of this node that ends by itself once the node stops
    /// (a stream that answers what it already read first); shutdown waits
    /// for it, for a bounded time.
    pub(super) fn spawn_draining(
        &self,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        self.tasks.spawn(task);
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The current term, as persisted (the core may be a step ahead while
    /// a new term is written).
    pub fn term(&self) -> u64 {
        lock(&self.durable_hard).term
    }

    /// This node's role now.
    pub fn role(&self) -> Role {
        self.core().role()
    }

    /// True while this node leads its term.
    fn leads(&self) -> bool {
        self.role() == Role::Leader
    }

    /// True while this node leads `term` (replicators of an older term stop).
    pub(super) fn leads_in(&self, term: u64) -> bool {
        self.core().leads_in(term)
    }

    /// The refusal for a request only the leader serves: names the leader
    /// (and its address, for redirects) when this node knows it.
    fn not_leader(&self) -> Status {
        let leader = self.core().leader();
        match leader.filter(|l| *l != self.config.node_id) {
            Some(leader) => self.redirect(leader, |addr| {
                format!("not leader; the leader is node {leader} at {addr}")
            }),
            None => Status::failed_precondition(format!(
                "not leader, and no leader is known in term {} (an election may be under way); retry",
                self.term()
            )),
        }
    }

    /// A "not leader" refusal (FAILED_PRECONDITION, which clients retry
    /// elsewhere) pointing clients at node `to`: `message` gets its address,
    /// and the address goes in the redirect metadata.
    fn redirect(&self, to: u64, message: impl FnOnce(&str) -> String) -> Status {
        let addr = self
            .config
            .addr_of(to)
            .map(|a| a.to_string())
            .unwrap_or_default();
        let mut status = Status::failed_precondition(message(&addr));
        if let Ok(v) = addr.parse() {
            status.metadata_mut().insert(LEADER_METADATA, v);
        }
        status
    }

    /// Checks the envelope of a message between nodes before anything
    /// else looks at it: a sender is named, of our cluster and another
    /// member, and the message is meant for this node. (A message for
    /// another member reached us through an address that no longer, or
    /// never did, lead to that member; answering it would count our log as
    /// theirs.) Whether that member may send it now is the core's to
    /// decide.
    fn check_sender<'a>(
        &self,
        from: Option<&'a pb::Sender>,
        what: &str,
    ) -> Result<&'a pb::Sender, Status> {
        let from =
            from.ok_or_else(|| Status::invalid_argument(format!("{what} without a sender")))?;
        if from.cluster_id != self.config.cluster_id {
            return Err(Status::permission_denied(format!(
                "cluster id {:?} is not ours ({:?})",
                from.cluster_id, self.config.cluster_id
            )));
        }
        if from.to != self.config.node_id {
            return Err(Status::permission_denied(format!(
                "the message is meant for node {}, and this is node {}: \
                 check the members' addresses",
                from.to, self.config.node_id
            )));
        }
        if from.node_id == self.config.node_id || self.config.addr_of(from.node_id).is_none() {
            return Err(Status::permission_denied(format!(
                "node {} is not another member of this cluster",
                from.node_id
            )));
        }
        Ok(from)
    }

    /// A unary replication request, once its caller is shown to be the
    /// sender it claims (see [`auth`]); refused with `PERMISSION_DENIED`
    /// otherwise, before anything looks at it.
    fn authorized<T>(
        &self,
        req: Request<T>,
        sender: impl Fn(&T) -> Option<&pb::Sender>,
    ) -> Result<T, Status> {
        let caller = self.env.peer_auth.identify(&PeerConn::of(&req))?;
        let req = req.into_inner();
        caller.may_claim(sender(&req).map(|f| f.node_id))?;
        Ok(req)
    }

    /// An endpoint for another member's peer listener at `addr`: secured
    /// as this node's `peer_transport` says, connecting within an RPC
    /// timeout. Callers add their own deadlines and keepalives.
    fn peer_endpoint(
        &self,
        addr: std::net::SocketAddr,
    ) -> anyhow::Result<tonic::transport::Endpoint> {
        let rpc = Duration::from_millis(self.config.rpc_timeout_ms);
        Ok(self.env.peer_transport.endpoint(addr)?.connect_timeout(rpc))
    }

    fn ack_level(&self, requested: i32) -> Result<AckLevel, Status> {
        match pb::AckLevel::try_from(requested) {
            Ok(pb::AckLevel::Default) => Ok(self.config.ack.into()),
            Ok(pb::AckLevel::Local) => Ok(AckLevel::Local),
            Ok(pb::AckLevel::Quorum) => Ok(AckLevel::Quorum),
            Ok(pb::AckLevel::All) => Ok(AckLevel::All),
            Err(_) => Err(Status::invalid_argument(format!(
                "unknown ack level {requested}"
            ))),
        }
    }

    /// This node's status, as the `Status` call reports it.
    pub fn status(&self) -> pb::StatusReply {
        let stats = self.engine.stats();
        let core = self.core();
        let (role, leader_id) = (core.role(), core.leader());
        let hard = *lock(&self.durable_hard);
        let followers = if role == Role::Leader {
            core.peers()
                .iter()
                .map(|(id, f)| pb::FollowerStatus {
                    node_id: *id,
                    match_lsn: f.progress.match_lsn,
                    next_lsn: f.progress.next_lsn,
                    lag: stats.last_lsn.saturating_sub(f.progress.match_lsn),
                    connected: f.connected,
                })
                .collect()
        } else {
            Vec::new()
        };
        drop(core);
        pb::StatusReply {
            node_id: self.config.node_id,
            role: role.name().into(),
            term: hard.term,
            leader_id: leader_id.unwrap_or(0),
            last_lsn: stats.last_lsn,
            durable_lsn: stats.durable_lsn,
            commit_lsn: self.engine.commit_lsn(),
            applied_lsn: stats.applied_lsn,
            snapshot_lsn: stats.snapshot_lsn,
            digest: stats.digest,
            keys: stats.keys as u64,
            followers,
            cluster_id: self.config.cluster_id.clone(),
            leader_addr: leader_id
                .and_then(|l| self.config.addr_of(l))
                .map(|a| a.to_string())
                .unwrap_or_default(),
            voted_for: hard.voted_for.unwrap_or(0),
            elections: self.config.elections(),
            alarm: self
                .engine
                .divergence()
                .map_or_else(String::new, |d| d.to_string()),
        }
    }
}
