//! `kv serve`: one cluster node — the engine in replicated mode, the client
//! API, and WAL shipping from the leader (elected, see [`election`], or
//! fixed by configuration) to the followers.
//!
//! The leader appends a client's write to its own WAL and makes it durable
//! (group commit), then the per-follower replicators ship it; followers
//! check the sender, the term, log matching and every record's CRC, append
//! the same records at the same LSNs, make them durable, acknowledge, and
//! apply what the leader's commit LSN covers. The protocol decisions are
//! `kv_cluster`'s; this module carries them out.
//!
//! Terms are persisted before they are acted on; a node refuses a lower
//! term, and a leader or candidate that sees a higher one steps down.
//!
//! A follower that needs records the leader's log no longer holds gets the
//! leader's newest snapshot, streamed in chunks, installed durably, and then
//! the log after it.

pub mod auth;
pub mod batch;
pub mod config;
pub mod convert;
pub mod election;
pub mod env;
pub mod flusher;
pub mod notify;
pub mod observe;
mod snapshot;
pub mod term;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use kv_cluster::{
    AckLevel, AppendMeta, AppendVerdict, LogView, Progress, Refusal, TermAction, follower_append,
    observe_term, quorum_commit,
};
use kv_proto::v1 as pb;
use pb::kv_server::{Kv, KvServer};
use pb::replication_client::ReplicationClient;
use pb::replication_server::{Replication, ReplicationServer};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::engine::{Engine, EngineError, Op, Record};
use crate::metrics::Api;
use auth::PeerConn;
use config::{Member, NodeConfig};
use election::{ElectionState, Role};
use env::NodeEnv;
use flusher::Flusher;
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

/// The leader's view of one follower.
#[derive(Debug, Clone)]
struct Follower {
    progress: Progress,
    connected: bool,
    /// The send time (on the election clock) of the newest request it
    /// acknowledged in this term (the leader's lease and check quorum
    /// count these).
    acked_sent: Option<tokio::time::Instant>,
}

/// One append request in flight to a follower.
#[derive(Debug, Clone, Copy)]
struct Inflight {
    /// Its bytes, as counted by flow control.
    bytes: u64,
    /// When it was sent (on the election clock).
    sent_at: tokio::time::Instant,
    /// Sent before a refusal moved `next` back: its own refusal says
    /// nothing new, and acting on it would undo the back-up (with several
    /// requests in flight, forever).
    stale: bool,
}

impl Inflight {
    fn new(bytes: u64, sent_at: tokio::time::Instant) -> Self {
        Inflight {
            bytes,
            sent_at,
            stale: false,
        }
    }
}

/// A follower's answer to one append, possibly waiting for durability.
#[derive(Debug)]
enum PendingAck {
    /// Send as is (a refusal).
    Ready(pb::AppendAck),
    /// Send once everything through `batch_last` is durable.
    WhenDurable { batch_last: u64, commit_lsn: u64 },
    /// The stream carried something unacceptable: send the error, close.
    Failed(Status),
}

/// A write appended at the leader, not yet acknowledged.
#[derive(Debug, Clone, Copy)]
struct Appended {
    lsn: u64,
    /// The term this node led when it appended the record, which is the
    /// record's term: its identity with `lsn` (a new leader may fill the
    /// LSN with another record).
    term: u64,
}

/// One node of the cluster.
pub struct Node {
    config: NodeConfig,
    engine: Arc<Engine>,
    /// The current term; persisted (`TERM`) before it is acted on.
    term: AtomicU64,
    /// Role, known leader, vote, timers (see [`election`]).
    election: Mutex<ElectionState>,
    /// Serialises term and vote changes (persist, then publish).
    term_lock: tokio::sync::Mutex<()>,
    /// Leader only: every follower's progress.
    followers: Mutex<BTreeMap<u64, Follower>>,
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
    /// Serialises commit advancement.
    commit_lock: Mutex<()>,
    /// Set when the node begins to shut down: long-lived streams end.
    stopping: watch::Sender<bool>,
    /// Every task the node spawns: `serve` waits for them before its final
    /// sync, so none outlives the node (see [`Node::spawn`]).
    tasks: tokio_util::task::TaskTracker,
    /// How it dials peers and runs blocking engine work.
    env: NodeEnv,
    /// Leader only: reads wait until the commit LSN covers this LSN — the
    /// first entry of its term (elections), or the last LSN its log held
    /// when it started (fixed leader). After a restart or an election the
    /// commit LSN may be behind what was already committed and acknowledged.
    read_barrier: AtomicU64,
    /// Leader only: the member leadership is being handed to (0: none).
    /// While set, the leader takes no writes and serves no reads.
    transferring_to: AtomicU64,
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

/// The engine as `kv_cluster` sees a follower's log.
struct EngineView<'a>(&'a Engine);

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
        let term = persisted.term;
        engine.set_term(term);
        let (role, leader) = match config.leader {
            Some(l) if l == config.node_id => (Role::Leader, Some(l)),
            Some(l) => (Role::Follower, Some(l)),
            None => (Role::Follower, None),
        };
        let seed = env.seed ^ config.node_id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let election = ElectionState::new(role, leader, persisted.voted_for, seed, env.clock.now());
        let last = engine.last_lsn();
        let followers = config
            .members
            .iter()
            .filter(|m| m.id != config.node_id)
            .map(|m| {
                (
                    m.id,
                    Follower {
                        progress: Progress::new(last),
                        connected: false,
                        acked_sent: None,
                    },
                )
            })
            .collect();
        let commit = engine.commit_lsn();
        let durable_tx = watch::channel(engine.durable_lsn()).0;
        let flusher = Flusher::start(
            engine.clone(),
            durable_tx.clone(),
            env.offload,
            env.sync_latency,
        )?;
        Ok(Arc::new(Node {
            config,
            engine,
            term: AtomicU64::new(term),
            election: Mutex::new(election),
            term_lock: tokio::sync::Mutex::new(()),
            followers: Mutex::new(followers),
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
            read_barrier: AtomicU64::new(last),
            transferring_to: AtomicU64::new(0),
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

    /// The current term.
    pub fn term(&self) -> u64 {
        self.term.load(Ordering::Acquire)
    }

    /// True while this node leads its term.
    fn leads(&self) -> bool {
        self.role() == Role::Leader
    }

    /// Adopts a higher term: persisted durably first (with no vote), then
    /// acted on; a leader or candidate becomes a follower.
    async fn adopt_term(&self, new_term: u64) -> Result<(), EngineError> {
        let _one = self.term_lock.lock().await;
        if new_term <= self.term() {
            return Ok(());
        }
        self.adopt_term_locked(new_term).await
    }

    /// [`Node::adopt_term`] with `term_lock` held by the caller. The role
    /// is demoted before the new term is published, under one lock: no
    /// reader ever sees this node lead the new term.
    async fn adopt_term_locked(&self, new_term: u64) -> Result<(), EngineError> {
        self.persist_term(term::TermState {
            term: new_term,
            voted_for: None,
        })
        .await?;
        let mut e = lock(&self.election);
        if e.role == Role::Leader {
            tracing::warn!(new_term, "saw a higher term: this leader steps down");
        }
        self.step_down(&mut e);
        e.voted_for = None;
        // With a fixed leader, followers keep following it; the fixed
        // leader itself is deposed for good.
        e.leader = self.config.leader.filter(|l| *l != self.config.node_id);
        self.publish_term(&mut e, new_term);
        Ok(())
    }

    /// Leader: forgets every follower's progress and lease evidence (on
    /// stepping down; `become_leader` starts afresh).
    fn forget_followers(&self) {
        let last = self.engine.last_lsn();
        for f in lock(&self.followers).values_mut() {
            f.progress = Progress::new(last);
            f.connected = false;
            f.acked_sent = None;
        }
    }

    /// The refusal for a request only the leader serves: names the leader
    /// (and its address, for redirects) when this node knows it.
    fn not_leader(&self) -> Status {
        let leader = lock(&self.election).leader;
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

    /// Checks the sender of a request between nodes: present, of our
    /// cluster, and another member.
    fn check_peer(&self, from: Option<pb::Sender>, what: &str) -> Result<pb::Sender, Status> {
        let from =
            from.ok_or_else(|| Status::invalid_argument(format!("{what} without a sender")))?;
        if from.cluster_id != self.config.cluster_id {
            return Err(Status::permission_denied(format!(
                "cluster id {:?} is not ours ({:?})",
                from.cluster_id, self.config.cluster_id
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

    /// The commit LSN as the leader knows it.
    fn commit(&self) -> u64 {
        *self.commit_tx.borrow()
    }

    /// Every member's durable LSN (the leader's first).
    fn durable_lsns(&self) -> Vec<u64> {
        let mut durable = vec![self.engine.durable_lsn()];
        durable.extend(lock(&self.followers).values().map(|f| f.progress.match_lsn));
        durable
    }

    /// Leader of `term`: moves the commit LSN as far as the commit rule
    /// allows. Does nothing on a node that no longer leads `term`: its
    /// followers' progress describes an old leadership, and its log may
    /// since hold a new leader's records at those LSNs, so counting them
    /// could commit records no majority holds. The rule is computed while
    /// the election lock shows this node leading `term`; publishing a
    /// commit LSN computed so is safe even if it steps down right after.
    fn advance_commit(&self, term: u64) -> Result<(), EngineError> {
        let _one = lock(&self.commit_lock);
        let current = self.commit();
        let new = {
            let e = lock(&self.election);
            if e.role != Role::Leader || self.term() != term {
                return Ok(());
            }
            let durable = self.durable_lsns();
            quorum_commit(&durable, term, |l| self.engine.term_at(l), current)
        };
        if new > current {
            tracing::trace!(new, term = self.term(), "leader commit advances");
            self.engine.set_commit_lsn(new)?;
            self.commit_tx.send_replace(new);
            self.commit_waiters.advance(new);
        }
        Ok(())
    }

    fn remember(&self, lsn: u64, term: u64, op: Op) {
        let wire = convert::to_proto(&Record { lsn, term, op });
        let mut recent = lock(&self.recent);
        recent.insert(lsn, wire);
        while recent.len() > RECENT_RECORDS_MAX {
            recent.pop_first();
        }
    }

    /// The operation and acknowledgement level of a Put.
    fn put_op(&self, req: pb::PutRequest) -> Result<(Op, AckLevel), Status> {
        let level = self.ack_level(req.ack)?;
        let op = Op::Put {
            key: req.key,
            value: req.value,
        };
        Ok((op, level))
    }

    /// The operation and acknowledgement level of a Delete.
    fn delete_op(&self, req: pb::DeleteRequest) -> Result<(Op, AckLevel), Status> {
        let level = self.ack_level(req.ack)?;
        Ok((Op::Delete { key: req.key }, level))
    }

    /// The reply to a write acknowledged at LSN `lsn`.
    fn write_reply(&self, lsn: u64) -> pb::WriteReply {
        pb::WriteReply {
            lsn,
            term: self.term(),
        }
    }

    /// A Get: at the leader, the committed state; with STALE, this node's
    /// applied state.
    async fn get(&self, req: pb::GetRequest) -> Result<pb::GetReply, Status> {
        let stale =
            pb::ReadConsistency::try_from(req.consistency) == Ok(pb::ReadConsistency::Stale);
        if !stale && !self.leads() {
            return Err(self.not_leader());
        }
        if !stale {
            self.confirm_read().await?;
        }
        // A replica whose state failed the leader's checkpoint may hold
        // wrong values: it answers no read (the client tries another).
        if let Some(divergence) = self.engine.divergence() {
            return Err(Status::data_loss(format!(
                "node {}: {divergence}; it serves no reads",
                self.config.node_id
            )));
        }
        self.engine
            .validate(&req.key, None)
            .map_err(engine_status)?;
        // Applied state is committed state: the engine applies nothing else.
        let (value, applied_lsn) = self.engine.get_with_lsn(&req.key);
        Ok(pb::GetReply {
            found: value.is_some(),
            value: value.unwrap_or_default(),
            applied_lsn,
            node_id: self.config.node_id,
            term: self.term(),
        })
    }

    /// Leader: writes `op`, then waits until it is acknowledged at `level`.
    async fn write(&self, op: Op, level: AckLevel) -> Result<u64, Status> {
        let appended = self.append_write(op)?;
        self.acknowledged(appended, level).await
    }

    /// [`Node::write`], its latency or error counted under `api`.
    async fn timed_write(&self, api: Api, op: Op, level: AckLevel) -> Result<u64, Status> {
        let start = std::time::Instant::now();
        let result = self.write(op, level).await;
        self.metrics.write_done(api, level, start, &result);
        result
    }

    /// [`Node::get`], its latency or error counted under `api`.
    async fn timed_get(&self, api: Api, req: pb::GetRequest) -> Result<pb::GetReply, Status> {
        let start = std::time::Instant::now();
        let stale =
            pb::ReadConsistency::try_from(req.consistency) == Ok(pb::ReadConsistency::Stale);
        let result = self.get(req).await;
        self.metrics.read_done(api, stale, start, &result);
        result
    }

    /// Leader: the part of a write that does not wait: checks `op` and
    /// appends it (the flusher makes it durable with every other write
    /// appended meanwhile). Commands of one `Batch` message are appended in
    /// their order, one after the other.
    fn append_write(&self, op: Op) -> Result<Appended, Status> {
        let (key, value) = match &op {
            Op::Put { key, value } => (key.as_slice(), Some(value.as_slice())),
            Op::Delete { key } => (key.as_slice(), None),
        };
        self.engine.validate(key, value).map_err(engine_status)?;
        // The leads-check and the append under one election lock: term
        // and role change only under it, so the record is stamped with
        // the term this node leads, never with a term it adopted after
        // the check. No await from here to the append either: a transfer
        // that starts later finds this record in the log it waits for the
        // target to hold.
        let (lsn, term) = {
            let e = lock(&self.election);
            if e.role != Role::Leader {
                drop(e);
                return Err(self.not_leader());
            }
            self.refuse_while_transferring()?;
            let term = self.term();
            // Append without blocking; the flusher makes it durable
            // together with every other write appended meanwhile.
            let lsn = self.engine.submit(op.clone()).map_err(engine_status)?;
            assert_eq!(
                self.engine.term_at(lsn),
                Some(term),
                "the write at LSN {lsn} was stamped with another term than its leader's"
            );
            (lsn, term)
        };
        // The record's identity is (LSN, term): if this node is deposed
        // meanwhile, the LSN may be filled again by a new leader's record
        // and commit, which must not acknowledge this write.
        self.remember(lsn, term, op);
        Ok(Appended { lsn, term })
    }

    /// Leader: waits until the write appended as `appended` is acknowledged
    /// at `level`, within `write_timeout_ms`; returns its LSN.
    async fn acknowledged(&self, appended: Appended, level: AckLevel) -> Result<u64, Status> {
        let Appended { lsn, term } = appended;
        let unknown = |why: &str| {
            Status::unavailable(format!(
                "outcome unknown: the write at LSN {lsn} {why} within {} ms; it may still commit",
                self.config.write_timeout_ms
            ))
        };
        // One deadline (one timer) for both waits below.
        let timeout = Duration::from_millis(self.config.write_timeout_ms);
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        tokio::select! {
            biased;
            () = self.flusher.durable(lsn) => {}
            () = &mut deadline => return Err(unknown("was not made durable here")),
        }
        // Our own durability counts towards the majority: run the commit
        // rule once per durable LSN (the first writer to see it does).
        let durable = self.engine.durable_lsn();
        let checked = self
            .commit_checked
            .fetch_max(durable, std::sync::atomic::Ordering::AcqRel);
        if checked < durable {
            self.advance_commit(term).map_err(engine_status)?;
        }

        let wait = async {
            if level == AckLevel::Quorum {
                // The common case: one targeted wake-up.
                self.commit_waiters.wait_for(lsn).await;
                return true;
            }
            let mut commit_rx = self.commit_tx.subscribe();
            loop {
                let commit = *commit_rx.borrow_and_update();
                if level.satisfied(lsn, self.engine.durable_lsn(), commit, &self.durable_lsns()) {
                    return true;
                }
                // `all` also waits on followers' progress, which moves with
                // every ack; recheck at the heartbeat pace too.
                let beat = Duration::from_millis(self.config.heartbeat_ms);
                if let Ok(Err(_)) = tokio::time::timeout(beat, commit_rx.changed()).await {
                    return false;
                }
            }
        };
        let acknowledged = tokio::select! {
            biased;
            reached = wait => reached,
            () = &mut deadline => false,
        };
        if !acknowledged {
            return Err(unknown(&format!("was not acknowledged at level {level:?}")));
        }
        match self.engine.term_at(lsn) {
            Some(now) if now == term => Ok(lsn),
            Some(other) => Err(Status::aborted(format!(
                "the write at LSN {lsn} did not take effect: a new leader's record (term {other}) replaced it"
            ))),
            None => Err(unknown("could no longer be told from its log")),
        }
    }

    /// Leader: waits until a default read may be served: the commit LSN
    /// covers the read barrier (so no committed write is missed after a
    /// restart or an election), and, with elections, the lease says no
    /// other leader can exist (see [`election`]).
    async fn confirm_read(&self) -> Result<(), Status> {
        let timeout = Duration::from_millis(self.config.write_timeout_ms);
        let deadline = tokio::time::Instant::now() + timeout;
        let barrier = self.read_barrier.load(Ordering::Acquire);
        if self.commit() < barrier
            && tokio::time::timeout(timeout, self.commit_waiters.wait_for(barrier))
                .await
                .is_err()
        {
            return Err(Status::unavailable(format!(
                "the leader has not yet committed its log through LSN {barrier}; retry"
            )));
        }
        if !self.config.elections() {
            return Ok(());
        }
        let poll = Duration::from_millis((self.config.heartbeat_ms / 4).clamp(1, 5));
        loop {
            if !self.leads() {
                return Err(self.not_leader());
            }
            // A leader handing over gives up its lease first: the
            // target's voters no longer wait out the election timeout.
            self.refuse_while_transferring()?;
            if self.lease_valid() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::unavailable(
                    "this leader cannot confirm its leadership with a majority; retry",
                ));
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// Records from `from` for shipping: from memory if recent, else (for a
    /// follower further behind) from the WAL. Returns only a contiguous run;
    /// empty if `from` is recent but its writer has not recorded it yet (the
    /// replicator is woken again when it has).
    async fn records_from(
        &self,
        from: u64,
        max: usize,
        through: u64,
    ) -> Result<Vec<pb::LogRecord>, EngineError> {
        {
            let recent = lock(&self.recent);
            if recent
                .first_key_value()
                .is_some_and(|(first, _)| *first <= from)
                && recent
                    .get(&from)
                    .is_none_or(|r| self.engine.term_at(r.lsn) == Some(r.term))
            {
                return Ok(recent
                    .range(from..=through)
                    .zip(from..)
                    .take_while(|((lsn, _), expected)| *lsn == expected)
                    .take(max)
                    .map(|((_, r), _)| r.clone())
                    .collect());
            }
        }
        let engine = self.engine.clone();
        let mut records = self
            .env
            .offload
            .run(move || engine.read_from(from, max))
            .await
            .map_err(join_engine_error)??;
        records.retain(|r| r.lsn <= through);
        Ok(records.iter().map(convert::to_proto).collect())
    }

    fn is_recent(&self, lsn: u64) -> bool {
        lock(&self.recent).contains_key(&lsn)
    }

    fn update_follower(&self, id: u64, f: impl FnOnce(&mut Follower)) {
        if let Some(follower) = lock(&self.followers).get_mut(&id) {
            f(follower);
        }
    }

    fn progress_of(&self, id: u64) -> Option<Progress> {
        lock(&self.followers).get(&id).map(|f| f.progress.clone())
    }

    /// Leader: keeps one follower up to date, reconnecting forever.
    /// Leader of `term`: keeps one follower up to date, reconnecting, until
    /// it no longer leads that term.
    async fn replicate(self: Arc<Self>, peer: Member, term: u64) {
        let mut backoff = Duration::from_millis(50);
        loop {
            if !self.leads_in(term) {
                // A deposed leader must never replicate again.
                return;
            }
            match self.replicate_once(&peer, term).await {
                Ok(()) => {}
                Err(e) => tracing::debug!(peer = peer.id, error = %e, "replication stream ended"),
            }
            self.update_follower(peer.id, |f| {
                f.connected = false;
                f.progress.reset();
            });
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(1000));
        }
    }

    fn sender(&self) -> pb::Sender {
        self.sender_in(self.term())
    }

    /// This node as the sender of a message of `term` (a replicator keeps
    /// the term it leads, whatever the node's term has become meanwhile).
    fn sender_in(&self, term: u64) -> pb::Sender {
        pb::Sender {
            cluster_id: self.config.cluster_id.clone(),
            node_id: self.config.node_id,
            term,
        }
    }

    async fn replicate_once(&self, peer: &Member, term: u64) -> anyhow::Result<()> {
        let rpc = Duration::from_millis(self.config.rpc_timeout_ms);
        let endpoint = self
            .peer_endpoint(peer.peer())?
            .http2_keep_alive_interval(Duration::from_millis(self.config.heartbeat_ms.max(100)))
            .keep_alive_timeout(rpc)
            .keep_alive_while_idle(true);
        let channel = self.env.dialer.dial(endpoint).await?;
        let (tx, rx) = mpsc::channel::<pb::AppendRequest>(64);
        // Probe first: an empty append at our `next`, to learn where the
        // follower stands. Every request's send time is taken before it
        // can leave (the lease counts from it: a follower that heard it
        // waits an election timeout from when it heard it, which is later).
        let probe_sent = self.env.clock.now();
        self.send_heartbeat(peer.id, &tx, term).await?;
        let mut acks = ReplicationClient::new(channel)
            .append(ReceiverStream::new(rx))
            .await?
            .into_inner();
        self.update_follower(peer.id, |f| f.connected = true);
        // (last LSN, bytes, sent at) of each request in flight, in order:
        // one ack each.
        let mut inflight: VecDeque<Inflight> = VecDeque::from([Inflight::new(0, probe_sent)]);
        let mut durable_rx = self.durable_tx.subscribe();
        let mut tick = tokio::time::interval(Duration::from_millis(self.config.heartbeat_ms));
        let mut last_ack = tokio::time::Instant::now();
        loop {
            if !self.leads_in(term) {
                anyhow::bail!("no longer the leader of term {term}");
            }
            self.send_batches(peer.id, &tx, &mut inflight, term).await?;
            tokio::select! {
                biased;
                ack = acks.message() => {
                    let ack = ack?.ok_or_else(|| anyhow::anyhow!("follower closed the stream"))?;
                    last_ack = tokio::time::Instant::now();
                    let Some(sent) = inflight.pop_front() else {
                        anyhow::bail!("follower {} acknowledged more than was sent", peer.id);
                    };
                    if self.handle_ack(peer.id, ack, sent, term).await? {
                        // Everything still in flight was sent from the old
                        // `next`: its refusals are stale.
                        for later in &mut inflight {
                            later.stale = true;
                        }
                    }
                }
                changed = durable_rx.changed() => {
                    changed?;
                }
                _ = tick.tick() => {
                    if !inflight.is_empty() && last_ack.elapsed() > rpc {
                        anyhow::bail!("no acknowledgement within {rpc:?}");
                    }
                    if inflight.is_empty() {
                        let sent = self.env.clock.now();
                        self.send_heartbeat(peer.id, &tx, term).await?;
                        inflight.push_back(Inflight::new(0, sent));
                    }
                }
            }
        }
    }

    async fn send_heartbeat(
        &self,
        peer: u64,
        tx: &mpsc::Sender<pb::AppendRequest>,
        term: u64,
    ) -> anyhow::Result<()> {
        let next = self.progress_of(peer).map_or(1, |p| p.next_lsn);
        let prev_lsn = next - 1;
        let prev_term = self.engine.term_at(prev_lsn).unwrap_or(0);
        self.send_append(tx, term, prev_lsn, prev_term, Vec::new())
            .await
    }

    /// Queues one append of `term` (records after `prev_lsn`, with our
    /// commit LSN) on a follower's stream. A stream that takes nothing for
    /// an RPC timeout is stuck (a full HTTP/2 window on a dead connection):
    /// give up on it, so the replicator reconnects.
    async fn send_append(
        &self,
        tx: &mpsc::Sender<pb::AppendRequest>,
        term: u64,
        prev_lsn: u64,
        prev_term: u64,
        records: Vec<pb::LogRecord>,
    ) -> anyhow::Result<()> {
        // A checkpoint of our applied state, for the follower to compare
        // its own against when it has applied the same LSN.
        let (checkpoint_digest, checkpoint_lsn) = self.engine.digest();
        let req = pb::AppendRequest {
            from: Some(self.sender_in(term)),
            prev_lsn,
            prev_term,
            records,
            commit_lsn: self.commit(),
            checkpoint_lsn,
            checkpoint_digest,
        };
        let rpc = Duration::from_millis(self.config.rpc_timeout_ms);
        tokio::time::timeout(rpc, tx.send(req))
            .await
            .map_err(|_| anyhow::anyhow!("append stream took nothing for {rpc:?}"))??;
        Ok(())
    }

    async fn send_batches(
        &self,
        peer: u64,
        tx: &mpsc::Sender<pb::AppendRequest>,
        inflight: &mut VecDeque<Inflight>,
        term: u64,
    ) -> anyhow::Result<()> {
        let durable = self.engine.durable_lsn();
        loop {
            let Some(progress) = self.progress_of(peer) else {
                return Ok(());
            };
            let next = progress.next_lsn;
            if next > durable {
                return Ok(());
            }
            let behind_log = !self.is_recent(next) && next < self.engine.wal_first_lsn();
            if behind_log || self.engine.term_at(next - 1).is_none() {
                // The follower needs records this log no longer holds (or
                // ones whose predecessor's term it cannot vouch for).
                self.send_snapshot(peer, term).await?;
                continue;
            }
            let records = self
                .records_from(next, self.config.batch_records_max, durable)
                .await?;
            if records.is_empty() {
                return Ok(());
            }
            let bytes: u64 = records
                .iter()
                .map(|r| (r.key.len() + r.value.len() + 32) as u64)
                .sum();
            if !progress.can_send(bytes, self.config.inflight_bytes_max) {
                return Ok(());
            }
            let prev_lsn = next - 1;
            let Some(prev_term) = self.engine.term_at(prev_lsn) else {
                anyhow::bail!("the term of LSN {prev_lsn} is no longer known here");
            };
            let last = records[records.len() - 1].lsn;
            let sent = self.env.clock.now();
            self.send_append(tx, term, prev_lsn, prev_term, records)
                .await?;
            self.update_follower(peer, |f| f.progress.sent(last, bytes));
            inflight.push_back(Inflight::new(bytes, sent));
        }
    }

    /// Leader: handles a follower's answer to the request `sent`. Returns
    /// true if it backed up `next` (a fresh refusal).
    async fn handle_ack(
        &self,
        peer: u64,
        ack: pb::AppendAck,
        sent: Inflight,
        term: u64,
    ) -> anyhow::Result<bool> {
        let sent_at = sent.sent_at;
        // A stale request's bytes were written off by the refusal.
        let bytes = if sent.stale { 0 } else { sent.bytes };
        if let TermAction::StepDown { new_term } = observe_term(term, ack.term) {
            // A newer term exists: this leader is stale. Persist the term,
            // stop leading, end the stream.
            self.adopt_term(new_term).await?;
            anyhow::bail!("follower {peer} is in term {new_term}: stepped down");
        }
        if !self.leads_in(term) {
            anyhow::bail!("no longer the leader of term {term}");
        }
        if ack.term == term {
            // It follows us in this term: this counts for the lease.
            self.update_follower(peer, |f| {
                f.acked_sent = Some(f.acked_sent.map_or(sent_at, |t| t.max(sent_at)));
            });
        }
        if ack.success {
            self.update_follower(peer, |f| f.progress.acked(ack.durable_lsn, bytes));
            self.advance_commit(term)?;
            Ok(false)
        } else if sent.stale {
            tracing::trace!(peer, error = %ack.error, "stale refusal ignored");
            Ok(false)
        } else {
            tracing::debug!(peer, error = %ack.error, last = ack.last_lsn, "append refused; backing up");
            self.update_follower(peer, |f| f.progress.refused(ack.last_lsn + 1));
            Ok(true)
        }
    }

    /// Follower: checks the sender of an append or snapshot: our cluster, a
    /// member, and (fixed leader) the configured one. `Ok(false)` if its
    /// term is stale (the caller refuses, with our term); a higher term is
    /// persisted first. On success the sender is this term's leader: we
    /// follow it and restart the election timer.
    async fn accept_leader(&self, from: &pb::Sender) -> Result<bool, Status> {
        if from.cluster_id != self.config.cluster_id {
            return Err(Status::permission_denied(format!(
                "cluster id {:?} is not ours ({:?})",
                from.cluster_id, self.config.cluster_id
            )));
        }
        let fixed_other = self.config.leader.is_some_and(|l| l != from.node_id);
        if from.node_id == self.config.node_id
            || self.config.addr_of(from.node_id).is_none()
            || fixed_other
        {
            return Err(Status::permission_denied(format!(
                "node {} is not the leader of this cluster",
                from.node_id
            )));
        }
        match observe_term(self.term(), from.term) {
            TermAction::Reject { .. } => return Ok(false),
            TermAction::StepDown { new_term } => {
                self.adopt_term(new_term).await.map_err(engine_status)?;
            }
            TermAction::Accept => {}
        }
        let mut e = lock(&self.election);
        if self.term() != from.term {
            // The term moved on while we persisted: stale after all.
            return Ok(false);
        }
        match e.leader {
            Some(l) if l != from.node_id => {
                return Err(Status::failed_precondition(format!(
                    "node {l} leads term {}, not node {}",
                    from.term, from.node_id
                )));
            }
            _ => {}
        }
        if e.role == Role::Leader {
            return Err(Status::failed_precondition(format!(
                "this node leads term {} itself",
                from.term
            )));
        }
        e.role = Role::Follower;
        if e.leader != Some(from.node_id) {
            self.metrics.leader_changes.increment(1);
        }
        e.leader = Some(from.node_id);
        let now = self.env.clock.now();
        e.heard = now;
        e.reset_timer(Duration::from_millis(self.config.election_timeout_ms), now);
        Ok(true)
    }

    /// Follower: checks one append request and appends its new records (not
    /// yet durable). The acknowledgement is sent by [`Node::acknowledge`]
    /// once they are durable, so the next batch can be appended meanwhile
    /// and share the same sync.
    async fn accept_append(&self, req: pb::AppendRequest) -> Result<PendingAck, Status> {
        let _one_at_a_time = self.append_lock.lock().await;
        let from = req
            .from
            .ok_or_else(|| Status::invalid_argument("append without a sender"))?;
        if !self.accept_leader(&from).await? {
            // A stale leader: refuse, answering with our term (fencing).
            return Ok(self.refusal(format!("stale term {}", from.term)));
        }
        let records = req
            .records
            .into_iter()
            .map(Record::try_from)
            .collect::<Result<Vec<Record>, _>>()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let meta = AppendMeta {
            prev_lsn: req.prev_lsn,
            prev_term: req.prev_term,
            records: records.iter().map(|r| (r.lsn, r.term)).collect(),
        };
        let (truncate_after, append_from) = match follower_append(&EngineView(&self.engine), &meta)
        {
            AppendVerdict::Accept {
                truncate_after,
                append_from,
            } => (truncate_after, append_from),
            AppendVerdict::Refuse(Refusal::Malformed(why)) => {
                return Err(Status::invalid_argument(why));
            }
            AppendVerdict::Refuse(r) => {
                let mut refusal = self.refusal(format!("{r:?}"));
                if let (Refusal::Mismatch { prev_lsn, .. }, PendingAck::Ready(ack)) =
                    (&r, &mut refusal)
                {
                    ack.last_lsn = ack.last_lsn.min(prev_lsn.saturating_sub(1));
                }
                return Ok(refusal);
            }
        };
        tracing::trace!(
            prev_lsn = meta.prev_lsn,
            prev_term = meta.prev_term,
            records = ?meta.records.first().zip(meta.records.last()),
            ?truncate_after,
            append_from,
            "append accepted"
        );
        if let Some(lsn) = truncate_after {
            // Rare (a new leader's conflicting records): blocking is fine.
            let engine = self.engine.clone();
            self.env
                .offload
                .run(move || engine.truncate_after(lsn))
                .await
                .map_err(join_error)?
                .map_err(engine_status)?;
        }
        let new: Vec<Record> = records.into_iter().skip(append_from).collect();
        if !new.is_empty() {
            self.engine.append_records(new).map_err(engine_status)?;
        }
        if req.checkpoint_lsn > 0 {
            // The leader's state at an LSN it applied (so committed): ours
            // must be the same once we applied it.
            self.engine
                .expect_digest(req.checkpoint_lsn, req.checkpoint_digest);
            if let Some(divergence) = self.engine.divergence() {
                tracing::error!(%divergence, "divergence alarm: this replica serves no reads");
            }
        }
        Ok(PendingAck::WhenDurable {
            batch_last: meta.prev_lsn + meta.records.len() as u64,
            commit_lsn: req.commit_lsn,
        })
    }

    fn refusal(&self, error: String) -> PendingAck {
        PendingAck::Ready(pb::AppendAck {
            term: self.term(),
            success: false,
            durable_lsn: self.engine.durable_lsn(),
            last_lsn: self.engine.last_lsn(),
            error,
        })
    }

    /// Follower: waits until an accepted batch is durable, applies what the
    /// leader committed (as far as this batch vouches our log matches), and
    /// builds the acknowledgement.
    async fn acknowledge(&self, pending: PendingAck) -> Result<pb::AppendAck, Status> {
        let (batch_last, commit_lsn) = match pending {
            PendingAck::Ready(ack) => return Ok(ack),
            PendingAck::Failed(status) => return Err(status),
            PendingAck::WhenDurable {
                batch_last,
                commit_lsn,
            } => (batch_last, commit_lsn),
        };
        let timeout = Duration::from_millis(self.config.rpc_timeout_ms);
        if tokio::time::timeout(timeout, self.flusher.durable(batch_last))
            .await
            .is_err()
        {
            return Err(Status::unavailable(format!(
                "LSN {batch_last} did not become durable in time"
            )));
        }
        tracing::trace!(batch_last, commit_lsn, "follower commit");
        self.engine
            .set_commit_lsn(commit_lsn.min(batch_last))
            .map_err(engine_status)?;
        Ok(pb::AppendAck {
            term: self.term(),
            success: true,
            durable_lsn: self.engine.durable_lsn().min(batch_last),
            last_lsn: self.engine.last_lsn(),
            error: String::new(),
        })
    }

    /// This node's status, as the `Status` call reports it.
    pub fn status(&self) -> pb::StatusReply {
        let stats = self.engine.stats();
        let (role, leader_id, voted_for) = {
            let e = lock(&self.election);
            (e.role, e.leader, e.voted_for)
        };
        let leader = role == Role::Leader;
        let followers = if leader {
            lock(&self.followers)
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
        pb::StatusReply {
            node_id: self.config.node_id,
            role: role.name().into(),
            term: self.term(),
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
            voted_for: voted_for.unwrap_or(0),
            elections: self.config.elections(),
            alarm: self
                .engine
                .divergence()
                .map_or_else(String::new, |d| d.to_string()),
        }
    }
}

/// The client API.
#[derive(Debug, Clone)]
pub struct KvService(pub Arc<Node>);

#[tonic::async_trait]
impl Kv for KvService {
    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::WriteReply>, Status> {
        let (op, level) = self.0.put_op(req.into_inner())?;
        let lsn = self.0.timed_write(Api::Unary, op, level).await?;
        Ok(Response::new(self.0.write_reply(lsn)))
    }

    async fn delete(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::WriteReply>, Status> {
        let (op, level) = self.0.delete_op(req.into_inner())?;
        let lsn = self.0.timed_write(Api::Unary, op, level).await?;
        Ok(Response::new(self.0.write_reply(lsn)))
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetReply>, Status> {
        Ok(Response::new(
            self.0.timed_get(Api::Unary, req.into_inner()).await?,
        ))
    }

    type BatchStream = ReceiverStream<Result<pb::BatchReply, Status>>;

    async fn batch(
        &self,
        req: Request<Streaming<pb::BatchRequest>>,
    ) -> Result<Response<Self::BatchStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        self.0
            .spawn_draining(batch::serve(self.0.clone(), req.into_inner(), tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        Ok(Response::new(self.0.status()))
    }

    async fn record(
        &self,
        req: Request<pb::RecordRequest>,
    ) -> Result<Response<pb::RecordReply>, Status> {
        let lsn = req.into_inner().lsn;
        let engine = self.0.engine.clone();
        if lsn == 0 || lsn < engine.wal_first_lsn() {
            return Ok(Response::new(pb::RecordReply {
                found: false,
                compacted: lsn != 0,
                record: None,
            }));
        }
        if lsn > engine.durable_lsn() {
            return Ok(Response::new(pb::RecordReply::default()));
        }
        let records = self
            .0
            .env
            .offload
            .run(move || engine.read_from(lsn, 1))
            .await
            .map_err(join_error)?
            .map_err(engine_status)?;
        let record = records.into_iter().find(|r| r.lsn == lsn);
        Ok(Response::new(pb::RecordReply {
            found: record.is_some(),
            compacted: false,
            record: record.as_ref().map(convert::to_proto),
        }))
    }

    async fn transfer_leader(
        &self,
        req: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderReply>, Status> {
        let term = self.0.transfer_leadership(req.into_inner().target).await?;
        Ok(Response::new(pb::TransferLeaderReply { term }))
    }
}

/// The replication API (follower side).
#[derive(Debug, Clone)]
pub struct ReplicationService(pub Arc<Node>);

#[tonic::async_trait]
impl Replication for ReplicationService {
    type AppendStream = ReceiverStream<Result<pb::AppendAck, Status>>;

    async fn append(
        &self,
        req: Request<Streaming<pb::AppendRequest>>,
    ) -> Result<Response<Self::AppendStream>, Status> {
        let caller = self.0.env.peer_auth.identify(&PeerConn::of(&req))?;
        let mut inbound = req.into_inner();
        let node = self.0.clone();
        let (tx, rx) = mpsc::channel(64);
        // Batches are appended as they arrive; acknowledgements follow in
        // order as each batch becomes durable.
        let (pending_tx, mut pending_rx) = mpsc::channel::<PendingAck>(256);
        let acker = node.clone();
        node.spawn_draining(async move {
            while let Some(pending) = pending_rx.recv().await {
                let reply = acker.acknowledge(pending).await;
                let fatal = reply.is_err();
                if tx.send(reply).await.is_err() || fatal {
                    break;
                }
            }
        });
        // A silent stream is dropped: the leader heartbeats far more often.
        let silence = Duration::from_millis(node.config.rpc_timeout_ms * 2);
        let errors = pending_tx.clone();
        let mut stopping = node.stopping.subscribe();
        let reader = node.clone();
        reader.spawn_draining(async move {
            loop {
                let next = tokio::select! {
                    biased;
                    // Shutting down: end the stream (after the acks already
                    // owed), so a graceful stop does not wait for the leader.
                    _ = stopping.wait_for(|s| *s) => break,
                    next = tokio::time::timeout(silence, inbound.message()) => next,
                };
                let msg = match next {
                    Ok(Ok(Some(msg))) => msg,
                    Ok(Ok(None)) => break,
                    Ok(Err(status)) => {
                        tracing::debug!(%status, "append stream broke");
                        break;
                    }
                    Err(_) => {
                        tracing::debug!("append stream silent; dropping it");
                        break;
                    }
                };
                // A forged sender is refused before the message is looked at.
                let claimed = msg.from.as_ref().map(|f| f.node_id);
                let accepted = match caller.may_claim(claimed) {
                    Ok(()) => node.accept_append(msg).await,
                    Err(status) => Err(status),
                };
                match accepted {
                    Ok(pending) => {
                        if pending_tx.send(pending).await.is_err() {
                            break;
                        }
                    }
                    Err(status) => {
                        // Garbage, a stranger or a broken engine: report it
                        // after the acks before it, then close the stream.
                        let _ = errors.send(PendingAck::Failed(status)).await;
                        break;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn install_snapshot(
        &self,
        req: Request<Streaming<pb::SnapshotChunk>>,
    ) -> Result<Response<pb::SnapshotAck>, Status> {
        let caller = self.0.env.peer_auth.identify(&PeerConn::of(&req))?;
        Ok(Response::new(
            self.0.receive_snapshot(caller, req.into_inner()).await?,
        ))
    }

    async fn request_vote(
        &self,
        req: Request<pb::VoteRequest>,
    ) -> Result<Response<pb::VoteReply>, Status> {
        let req = self.0.authorized(req, |r| r.from.as_ref())?;
        Ok(Response::new(self.0.handle_vote(req).await?))
    }

    async fn timeout_now(
        &self,
        req: Request<pb::TimeoutNowRequest>,
    ) -> Result<Response<pb::TimeoutNowReply>, Status> {
        let req = self.0.authorized(req, |r| r.from.as_ref())?;
        Ok(Response::new(self.0.clone().handle_timeout_now(req).await?))
    }
}

/// Accepted connections with Nagle's algorithm off: small acks must not
/// wait for the peer's delayed ACK (tens of milliseconds per round trip).
fn incoming_nodelay(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        conn.set_nodelay(true)?;
        Ok(conn)
    })
}

/// Runs a node until `shutdown` resolves: serves clients on `client` and
/// the other members on `peer` (or on `client` too, without one; real TCP,
/// Nagle off, TLS as `tls` says), and on the leader replicates to every
/// follower. On shutdown everything written is made durable before this
/// returns.
pub async fn serve(
    node: Arc<Node>,
    client: tokio::net::TcpListener,
    peer: Option<tokio::net::TcpListener>,
    tls: Option<crate::tls::ServerTls>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_incoming(
        node,
        incoming_nodelay(client),
        peer.map(incoming_nodelay),
        tls,
        shutdown,
    )
    .await
}

/// [`serve`] over any streams of accepted connections (the listening seam:
/// a simulation passes its own).
pub async fn serve_incoming<I, IO, IE>(
    node: Arc<Node>,
    client: I,
    peer: Option<I>,
    tls: Option<crate::tls::ServerTls>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()>
where
    I: tokio_stream::Stream<Item = Result<IO, IE>>,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // On shutdown, end the replication streams this node serves first: a
    // graceful stop waits for open requests, and the leader never ends its
    // append stream by itself. Both listeners stop on `stopping`.
    let stopping = node.clone();
    let shutdown = async move {
        shutdown.await;
        // A leader hands over first, while it still serves (its followers
        // must catch up and the target must hear `TimeoutNow`).
        stopping.hand_over_before_stop().await;
        stopping.stopping.send_replace(true);
    };
    let stopped = |node: &Node| {
        let mut stopping = node.stopping.subscribe();
        async move {
            let _ = stopping.wait_for(|s| *s).await;
        }
    };
    if node.config.is_fixed_leader() && node.leads() {
        let term = node.term();
        for peer in node
            .config
            .members
            .iter()
            .filter(|m| m.id != node.config.node_id)
        {
            node.spawn(node.clone().replicate(peer.clone(), term));
        }
        // A lone leader commits by itself; others wait for acks.
        node.advance_commit(term)?;
    }
    if node.config.elections() {
        node.spawn(node.clone().run_elections());
    }
    // The standard gRPC health service and server reflection, so ordinary
    // gRPC tools (grpcurl, grpc_health_probe) work against a node.
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<KvServer<KvService>>().await;
    health
        .set_serving::<ReplicationServer<ReplicationService>>()
        .await;
    // From here on the verdict follows the node (see `observe`).
    node.spawn(node.clone().watch_health(health.clone()));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(kv_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let (client_tls, peer_tls) = match tls {
        Some(t) => (Some(t.client), Some(t.peer)),
        None => (None, None),
    };
    let builder = |tls: Option<tonic::transport::ServerTlsConfig>| match tls {
        Some(tls) => tonic::transport::Server::builder().tls_config(tls),
        None => Ok(tonic::transport::Server::builder()),
    };
    let replication = ReplicationServer::new(ReplicationService(node.clone()));
    let clients = builder(client_tls)?
        .add_service(health_service)
        .add_service(reflection)
        .add_service(KvServer::new(KvService(node.clone())))
        .add_optional_service(peer.is_none().then(|| replication.clone()))
        .serve_with_incoming_shutdown(client, stopped(&node));
    let peers = async {
        match peer {
            Some(peer) => {
                builder(peer_tls)?
                    .add_service(replication)
                    .serve_with_incoming_shutdown(peer, stopped(&node))
                    .await
            }
            None => Ok(()),
        }
    };
    tokio::try_join!(clients, peers, async {
        shutdown.await;
        Ok(())
    })?;
    // Every task of the node ends before the final sync (`stopping` is set
    // by the shutdown future above): those spawned with `Node::spawn` at
    // once, the streams once they answered what they read (bounded: a
    // client that reads no replies does not hold the stop).
    node.tasks.close();
    let drain = Duration::from_millis(node.config.rpc_timeout_ms * 2);
    if tokio::time::timeout(drain, node.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            tasks = node.tasks.len(),
            "tasks still running {drain:?} after the stop; stopping anyway"
        );
    }
    let engine = node.engine.clone();
    node.env.offload.run(move || engine.flush()).await??;
    Ok(())
}
