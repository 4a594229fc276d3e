//! The runtime around the consensus core: the node feeds
//! [`kv_cluster::replica::Replica`] its inputs (timer ticks, RPCs,
//! acknowledgements, durability) and carries the effects of each step out,
//! in the order [`Ready`] lists them: the hard state to `TERM` (durably,
//! with one persister at a time), the commit LSN to the engine and the
//! waiting writers, replicators for a new term, and messages — vote
//! requests and `TimeoutNow` as RPCs of their own, replies and
//! acknowledgements back to whoever asked, each only once the durability it
//! is gated on is reached.
//!
//! The core is the only owner of protocol state: term, vote, role, leader,
//! timers, follower progress, lease evidence, the read barrier and a
//! transfer under way all live in it, behind one lock, and every decision
//! about them is the core's. What is here is timing (the election timer's
//! tick, the transfer's wait), RPCs and their deadlines, and logging.
//!
//! Reads at the leader use a lease (see `REPLICATION.md`): its length is
//! [`LEASE_FRACTION`] of the election timeout, measured on the node's
//! monotonic [`super::env::Clock`], short enough to hold while clock rates
//! differ from true time by up to [`super::env::MAX_CLOCK_DRIFT`].
//!
//! It does not ship records (`leader.rs`), append them (`follower.rs`) or
//! serve clients (`kv_api.rs`); those call [`Node::step`] and
//! [`Node::carry_out`] for their protocol decisions.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use kv_cluster::replica::{
    self, Durability, Event, Gated, Input, Message, Ready, Refused, Replica, StepDown,
    TransferOutcome, Verdict,
};
use kv_proto::v1 as pb;
use pb::replication_client::ReplicationClient;
use tonic::Status;

use super::env::MAX_CLOCK_DRIFT;
use super::term::TermState;
use super::{EngineView, Node, lock};
use crate::engine::{EngineError, Op};

/// The lease, as a fraction of the election timeout: with every clock's
/// rate within `1 ± d` of true time (`d` = [`MAX_CLOCK_DRIFT`]), a lease of
/// `(1 - d) / (1 + d)` of the timeout on the leader's clock ends, in true
/// time, no later than the timeout on any follower's clock, after which a
/// follower may vote for someone else.
pub const LEASE_FRACTION: f64 = (1.0 - MAX_CLOCK_DRIFT) / (1.0 + MAX_CLOCK_DRIFT);

/// The core's configuration for this node (times in microseconds).
pub(super) fn core_config(config: &super::config::NodeConfig) -> replica::Config {
    let timeout = config.election_timeout_ms.saturating_mul(1000);
    replica::Config {
        id: config.node_id,
        members: config.members.iter().map(|m| m.id).collect(),
        fixed_leader: config.leader,
        election_timeout: timeout,
        // Rounded down: a shorter lease is the safe side.
        lease: (timeout as f64 * LEASE_FRACTION) as u64,
        transfer_timeout: config.write_timeout_ms.saturating_mul(1000),
        inflight_bytes_max: config.inflight_bytes_max,
    }
}

impl Node {
    /// Now, on the node's clock, as the core counts time (microseconds
    /// since the node was made).
    pub(super) fn now(&self) -> replica::Time {
        self.env.clock.since(self.started).as_micros() as u64
    }

    /// The core, locked (for reading; changes go through [`Node::step`]).
    pub(super) fn core(&self) -> std::sync::MutexGuard<'_, Replica> {
        lock(&self.core)
    }

    /// Steps the core with `input` now. Under the same lock: the engine's
    /// term follows the core's, and a new term's first entry is appended
    /// the moment the core takes office (nothing can step in between).
    pub(super) fn step(&self, input: Input) -> Ready {
        let mut core = self.core();
        let ready = core.step(self.now(), input, &EngineView(&self.engine));
        self.engine.set_term(core.term());
        if let (Some(term), Some(_)) = (ready.propose, ready.start_replicators) {
            match self.engine.submit_term_start() {
                Ok(lsn) => {
                    assert_eq!(
                        lsn,
                        core.read_barrier(),
                        "the term-start entry went elsewhere than the core expected"
                    );
                    drop(core);
                    // Records cached while leading an earlier term may
                    // since have been replaced: ship only this term's.
                    lock(&self.recent).clear();
                    self.remember(lsn, term, Op::term_start());
                }
                Err(error) => {
                    // The engine is poisoned: no write will be taken, and
                    // check quorum or a higher term ends this leadership.
                    tracing::error!(%error, "cannot append the term's first entry");
                }
            }
        }
        ready
    }

    /// What is durable now: the hard state version on disk and the log.
    pub(super) fn durability(&self) -> Durability {
        Durability {
            hard_state: self.persisted.load(Ordering::Acquire),
            log: self.engine.durable_lsn(),
        }
    }

    /// Carries out `ready` (see the module docs) and every step it leads to
    /// (a persist's `Persisted`). Returns the messages meant for the caller
    /// (replies, appends, acknowledgements), still gated: the caller
    /// releases each once it may leave.
    pub(super) async fn carry_out(&self, ready: Ready) -> Result<Vec<Gated>, EngineError> {
        if ready.is_empty()
            && self.persisted.load(Ordering::Acquire) >= self.core().hard_state_version()
        {
            // The common case on the replication path: nothing to do.
            return Ok(Vec::new());
        }
        let mut queue = std::collections::VecDeque::from([ready]);
        let mut out = Vec::new();
        while let Some(ready) = queue.pop_front() {
            self.note(&ready.events);
            // Also a hard state a step left unpersisted (its caller gave up
            // before carrying it out): nothing gated on it can leave before.
            let behind = self.persisted.load(Ordering::Acquire) < self.core().hard_state_version();
            if ready.persist.is_some() || behind {
                let version = self.persist_hard_state().await?;
                queue.push_back(self.step(Input::Persisted { version }));
            }
            if let Some(commit) = ready.commit {
                self.publish_commit(commit)?;
            }
            if let Some(term) = ready.start_replicators {
                self.took_office(term);
            }
            let durable = self.durability();
            for gated in ready.messages {
                // Requests of this node's own go out on tasks of their own;
                // they depend on the hard state persisted just above.
                let own = matches!(
                    gated.message(),
                    Message::Vote { .. } | Message::TimeoutNow { .. }
                );
                if !own {
                    out.push(gated);
                    continue;
                }
                match gated.release(durable) {
                    Ok(Message::Vote { to, req }) => self.ask_for_vote(to, req),
                    Ok(Message::TimeoutNow { to, req }) => self.tell_to_campaign(to, req.term),
                    Ok(_) => unreachable!("checked above"),
                    Err(gated) => tracing::error!(
                        needs = ?gated.needs(),
                        "a request of this node is gated on what is not durable; dropped"
                    ),
                }
            }
        }
        Ok(out)
    }

    /// Writes the core's hard state to `TERM` durably unless a version at
    /// least as new is there; returns the version on disk.
    async fn persist_hard_state(&self) -> Result<u64, EngineError> {
        let _one = self.term_lock.lock().await;
        let (version, hard) = {
            let core = self.core();
            (core.hard_state_version(), core.hard_state())
        };
        if self.persisted.load(Ordering::Acquire) < version {
            let storage = self.engine.storage();
            let dir = self.config.data_dir.clone();
            let state = TermState {
                term: hard.term,
                voted_for: hard.voted_for,
            };
            self.env
                .offload
                .run(move || super::term::persist(&*storage, &dir, state))
                .await
                .map_err(super::join_engine_error)??;
            let mut durable = lock(&self.durable_hard);
            if self.persisted.fetch_max(version, Ordering::AcqRel) < version {
                *durable = hard;
            }
        }
        Ok(self.persisted.load(Ordering::Acquire))
    }

    /// Makes `commit` the engine's commit LSN (applying what it covers)
    /// and wakes the writers it covers. Calls may race; the LSN only rises.
    pub(super) fn publish_commit(&self, commit: u64) -> Result<(), EngineError> {
        let _one = lock(&self.commit_lock);
        if commit <= *self.commit_tx.borrow() {
            return Ok(());
        }
        tracing::trace!(commit, "commit advances");
        self.engine.set_commit_lsn(commit)?;
        self.commit_tx.send_replace(commit);
        self.commit_waiters.advance(commit);
        Ok(())
    }

    /// Logs and counts what the core reports.
    fn note(&self, events: &[Event]) {
        for event in events {
            match event {
                Event::Campaigning { term, transfer } => {
                    if *transfer {
                        tracing::info!(term, "the leader handed over: campaigning");
                    } else {
                        tracing::info!(term, "election timeout: campaigning");
                    }
                }
                Event::BecameLeader { term, lsn } => {
                    self.metrics.leader_changes.increment(1);
                    tracing::info!(term, lsn, "won the election: leading");
                }
                Event::LeaderChanged { term, leader } => {
                    self.metrics.leader_changes.increment(1);
                    tracing::debug!(term, leader, "following a new leader");
                }
                Event::SteppedDown { term, why } => match why {
                    StepDown::HigherTerm => {
                        tracing::warn!(term, "saw a higher term: this leader steps down")
                    }
                    StepDown::NoQuorum => tracing::warn!(
                        term,
                        "no majority heard within the election timeout: stepping down"
                    ),
                    StepDown::Transfer => {
                        tracing::info!(term, "handed leadership over: stepped down")
                    }
                },
                Event::VoteGranted { term, candidate } => {
                    tracing::info!(term, candidate, "vote granted")
                }
                Event::TransferEnded { target, outcome } => {
                    tracing::info!(target, ?outcome, "leadership transfer ended");
                    self.transfer_done.send_replace(Some(outcome.clone()));
                }
                Event::BackedUp { peer, next } => {
                    tracing::debug!(peer, next, "append refused; backing up")
                }
            }
        }
    }

    /// A new leader of `term`: a replicator per follower, and the term's
    /// first entry committed like any write once it is durable.
    fn took_office(&self, term: u64) {
        let Some(node) = self.me.upgrade() else {
            return;
        };
        for peer in self
            .config
            .members
            .iter()
            .filter(|m| m.id != self.config.node_id)
        {
            self.spawn(node.clone().replicate(peer.clone(), term));
        }
        let barrier = self.core().read_barrier();
        self.spawn(async move {
            node.flusher.durable(barrier).await;
            let ready = node.step(Input::Durable {
                lsn: node.engine.durable_lsn(),
            });
            if let Err(e) = node.carry_out(ready).await {
                tracing::error!(error = %e, "commit failed");
            }
        });
    }

    /// The election timer (elections on): ticks the core a few times per
    /// election timeout; the core campaigns, steps a leader down that lost
    /// its majority, and ends a transfer past its deadline.
    pub(super) async fn run_elections(self: Arc<Self>) {
        let tick = Duration::from_millis((self.config.election_timeout_ms / 10).max(1));
        let mut stopping = self.stopping.subscribe();
        loop {
            tokio::select! {
                biased;
                _ = stopping.wait_for(|s| *s) => return,
                () = tokio::time::sleep(tick) => {}
            }
            let ready = self.step(Input::Tick);
            if let Err(e) = self.carry_out(ready).await {
                tracing::error!(error = %e, "cannot persist a new term; not campaigning");
            }
        }
    }

    /// A replication client to the member at `addr`, for one short call
    /// (every call on it has the RPC timeout as its deadline).
    async fn peer(
        &self,
        addr: std::net::SocketAddr,
    ) -> anyhow::Result<ReplicationClient<tonic::transport::Channel>> {
        let rpc = Duration::from_millis(self.config.rpc_timeout_ms);
        let endpoint = self.peer_endpoint(addr)?.timeout(rpc);
        let channel = tokio::time::timeout(rpc, self.env.dialer.dial(endpoint)).await??;
        Ok(ReplicationClient::new(channel))
    }

    /// Sends a vote request to `to` on a task of its own; its answer is
    /// stepped in when it comes.
    fn ask_for_vote(&self, to: u64, req: replica::VoteRequest) {
        let (Some(node), Some(addr)) = (self.me.upgrade(), self.config.peer_addr_of(to)) else {
            return;
        };
        let request = pb::VoteRequest {
            from: Some(self.sender_to(to, req.term)),
            last_lsn: req.last_lsn,
            last_term: req.last_term,
            transfer: req.transfer,
        };
        self.spawn(async move {
            let rpc = Duration::from_millis(node.config.rpc_timeout_ms);
            let asked = async {
                let mut peer = node.peer(addr).await?;
                let reply = tokio::time::timeout(rpc, peer.request_vote(request)).await??;
                anyhow::Ok(reply.into_inner())
            };
            let Ok(reply) = asked.await else { return };
            let ready = node.step(Input::VoteReply(replica::VoteReply {
                from: to,
                term: reply.term,
                granted: reply.granted,
                reason: reply.reason,
            }));
            if let Err(e) = node.carry_out(ready).await {
                tracing::error!(error = %e, "cannot persist a term seen in a vote reply");
            }
        });
    }

    /// Sends `TimeoutNow` (of `term`) to a transfer's target on a task of
    /// its own — not the transfer caller's, so the core hears how it went
    /// however that caller fares; no answer is an answer too.
    fn tell_to_campaign(&self, target: u64, term: u64) {
        let (Some(node), Some(addr)) = (self.me.upgrade(), self.config.peer_addr_of(target)) else {
            return;
        };
        self.spawn(async move {
            let rpc = Duration::from_millis(node.config.rpc_timeout_ms);
            let told = async {
                let mut peer = node.peer(addr).await?;
                let request = pb::TimeoutNowRequest {
                    from: Some(node.sender_to(target, term)),
                };
                let reply = tokio::time::timeout(rpc, peer.timeout_now(request)).await??;
                anyhow::Ok(reply.into_inner())
            };
            let reply = match told.await {
                Ok(r) => Some(replica::TimeoutNowReply {
                    from: target,
                    term: r.term,
                    started: r.started,
                    reason: r.reason,
                }),
                Err(e) => {
                    tracing::warn!(target, error = %e, "TimeoutNow unconfirmed");
                    None
                }
            };
            let ready = node.step(Input::TimeoutNowAnswered { target, reply });
            if let Err(e) = node.carry_out(ready).await {
                tracing::error!(error = %e, "cannot persist a term seen in a TimeoutNow reply");
            }
        });
    }

    /// The refusal of a client request the core turned down.
    pub(super) fn refusal_status(&self, refused: Refused) -> Status {
        match refused {
            Refused::NotLeader { .. } => self.not_leader(),
            Refused::Transferring { target } => self.redirect(target, |addr| {
                format!("not leader: handing leadership over to node {target} at {addr}; retry")
            }),
            Refused::Barrier { barrier } => Status::unavailable(format!(
                "the leader has not yet committed its log through LSN {barrier}; retry"
            )),
            Refused::NoLease => Status::unavailable(
                "this leader cannot confirm its leadership with a majority; retry",
            ),
            Refused::ElectionsOff => Status::failed_precondition(
                "elections are off (a fixed leader is configured): leadership cannot move",
            ),
            Refused::NotAMember { id } => {
                Status::invalid_argument(format!("node {id} is not a member of this cluster"))
            }
            Refused::TransferUnderWay { target } => {
                Status::aborted(format!("a transfer to node {target} is already under way"))
            }
        }
    }

    /// Leader: hands leadership over to `target` (`REPLICATION.md`, the
    /// transfer). Returns the term this node led once the target campaigns
    /// and this node stepped down. The core runs the transfer; this waits
    /// for its outcome, and a caller that gives up changes nothing about it.
    pub(super) async fn transfer_leadership(&self, target: u64) -> Result<u64, Status> {
        let term = self.term();
        let mut done = self.transfer_done.subscribe();
        let ready = self.step(Input::Transfer { target });
        match ready.verdict.clone() {
            Some(Verdict::Refused(r)) => return Err(self.refusal_status(r)),
            Some(Verdict::Ok) if target == self.config.node_id => return Ok(term),
            _ => {}
        }
        done.mark_unchanged();
        tracing::info!(term, target, "handing leadership over");
        self.carry_out(ready).await.map_err(super::engine_status)?;
        let wait = Duration::from_millis(
            self.config.write_timeout_ms * 2 + self.config.rpc_timeout_ms * 2,
        );
        let outcome = tokio::time::timeout(wait, async {
            loop {
                if done.changed().await.is_err() {
                    return None;
                }
                if let Some(o) = done.borrow_and_update().clone() {
                    return Some(o);
                }
            }
        })
        .await
        .ok()
        .flatten();
        match outcome {
            Some(TransferOutcome::HandedOver) => Ok(term),
            Some(TransferOutcome::Unconfirmed) => Err(Status::unavailable(format!(
                "could not confirm that node {target} campaigns; this node stepped down anyway \
                 (the target may be campaigning), so an election follows"
            ))),
            Some(TransferOutcome::TargetBehind { matched, last }) => {
                Err(Status::deadline_exceeded(format!(
                    "node {target} did not catch up within {} ms (it holds LSN {matched} of \
                     {last}); this node still leads",
                    self.config.write_timeout_ms
                )))
            }
            Some(TransferOutcome::TargetRefused { reason }) => Err(Status::aborted(format!(
                "node {target} did not campaign: {reason}; this node still leads"
            ))),
            Some(TransferOutcome::LostLeadership) => Err(Status::aborted(format!(
                "this node stopped leading term {term} during the transfer"
            ))),
            None => Err(Status::deadline_exceeded(format!(
                "the transfer to node {target} did not end within {wait:?}"
            ))),
        }
    }

    /// Before a graceful stop (SIGTERM): a leader with elections on hands
    /// leadership to its most caught-up connected follower, so the cluster
    /// need not wait out an election timeout (a rolling restart costs a
    /// transfer, not an election). Bounded by the transfer's own limits;
    /// on failure the node stops anyway. Returns the member it handed to.
    pub(super) async fn hand_over_before_stop(&self) -> Option<u64> {
        if !self.config.elections() || !self.leads() {
            return None;
        }
        let target = self.core().most_caught_up()?;
        tracing::info!(target, "stopping: handing leadership over first");
        match self.transfer_leadership(target).await {
            Ok(term) => {
                tracing::info!(target, term, "stopping: node {target} campaigns");
                Some(target)
            }
            Err(status) => {
                tracing::warn!(
                    target,
                    error = status.message(),
                    "stopping without a hand-over"
                );
                None
            }
        }
    }

    /// The `TimeoutNow` handler: the core campaigns at once if the sender
    /// leads our term (a leadership transfer).
    pub(super) async fn handle_timeout_now(
        &self,
        req: pb::TimeoutNowRequest,
    ) -> Result<pb::TimeoutNowReply, Status> {
        let from = self.check_sender(req.from.as_ref(), "TimeoutNow")?;
        let ready = self.step(Input::TimeoutNow(replica::TimeoutNow {
            from: from.node_id,
            term: from.term,
        }));
        let durable = self.durability();
        for gated in self.carry_out(ready).await.map_err(super::engine_status)? {
            if let Ok(Message::TimeoutNowReply { reply, .. }) = gated.release(durable) {
                return Ok(pb::TimeoutNowReply {
                    term: reply.term,
                    started: reply.started,
                    reason: reply.reason,
                });
            }
        }
        Err(Status::internal("the core gave no answer to TimeoutNow"))
    }

    /// The vote handler (`RequestVote`): the core decides; the reply leaves
    /// only once a granted vote is durable.
    pub(super) async fn handle_vote(&self, req: pb::VoteRequest) -> Result<pb::VoteReply, Status> {
        let from = self.check_sender(req.from.as_ref(), "vote request")?;
        let ready = self.step(Input::Vote(replica::VoteRequest {
            from: from.node_id,
            term: from.term,
            last_lsn: req.last_lsn,
            last_term: req.last_term,
            transfer: req.transfer,
        }));
        let out = self.carry_out(ready).await.map_err(super::engine_status)?;
        let durable = self.durability();
        for gated in out {
            match gated.release(durable) {
                Ok(Message::VoteReply { reply, .. }) => {
                    return Ok(pb::VoteReply {
                        term: reply.term,
                        granted: reply.granted,
                        reason: reply.reason,
                    });
                }
                Ok(_) => {}
                Err(_) => return Err(Status::internal("a vote reply is still gated")),
            }
        }
        Err(Status::internal(
            "the core gave no answer to a vote request",
        ))
    }
}

#[cfg(test)]
mod tests;
