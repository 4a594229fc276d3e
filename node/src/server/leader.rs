//! Leader side of replication: one replicator per follower and term
//! ([`Node::replicate`]) that probes where the follower stands, then ships
//! the durable records it lacks (from the cache of recent records in wire
//! form, or from the WAL for a follower far behind, or a snapshot when the
//! log no longer holds them) within the flow-control window, heartbeats
//! when idle, and takes the follower's acknowledgements in order
//! ([`Node::handle_ack`]); and the commit rule, run over every member's
//! durable LSN while this node leads the term ([`Node::advance_commit`]).
//!
//! It does not decide the rules it follows (progress, back-up on a refusal
//! and the commit rule are `kv_cluster`'s), take client writes
//! (`kv_api.rs`), stream snapshots (`snapshot.rs`), or campaign and step
//! down (`election.rs`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use kv_cluster::{Progress, TermAction, observe_term, quorum_commit};
use kv_proto::v1 as pb;
use pb::replication_client::ReplicationClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::config::Member;
use super::election::Role;
use super::{Node, RECENT_RECORDS_MAX, convert, join_engine_error, lock};
use crate::engine::{EngineError, Op, Record};

/// The leader's view of one follower.
#[derive(Debug, Clone)]
pub(super) struct Follower {
    pub(super) progress: Progress,
    pub(super) connected: bool,
    /// The send time (on the election clock) of the newest request it
    /// acknowledged in this term (the leader's lease and check quorum
    /// count these).
    pub(super) acked_sent: Option<tokio::time::Instant>,
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

impl Node {
    /// Leader: forgets every follower's progress and lease evidence (on
    /// stepping down; `become_leader` starts afresh).
    pub(super) fn forget_followers(&self) {
        let last = self.engine.last_lsn();
        for f in lock(&self.followers).values_mut() {
            f.progress = Progress::new(last);
            f.connected = false;
            f.acked_sent = None;
        }
    }

    /// Every member's durable LSN (the leader's first).
    pub(super) fn durable_lsns(&self) -> Vec<u64> {
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
    pub(super) fn advance_commit(&self, term: u64) -> Result<(), EngineError> {
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

    pub(super) fn remember(&self, lsn: u64, term: u64, op: Op) {
        let wire = convert::to_proto(&Record { lsn, term, op });
        let mut recent = lock(&self.recent);
        recent.insert(lsn, wire);
        while recent.len() > RECENT_RECORDS_MAX {
            recent.pop_first();
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

    pub(super) fn update_follower(&self, id: u64, f: impl FnOnce(&mut Follower)) {
        if let Some(follower) = lock(&self.followers).get_mut(&id) {
            f(follower);
        }
    }

    pub(super) fn progress_of(&self, id: u64) -> Option<Progress> {
        lock(&self.followers).get(&id).map(|f| f.progress.clone())
    }

    /// Leader: keeps one follower up to date, reconnecting forever.
    /// Leader of `term`: keeps one follower up to date, reconnecting, until
    /// it no longer leads that term.
    pub(super) async fn replicate(self: Arc<Self>, peer: Member, term: u64) {
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

    pub(super) fn sender(&self) -> pb::Sender {
        self.sender_in(self.term())
    }

    /// This node as the sender of a message of `term` (a replicator keeps
    /// the term it leads, whatever the node's term has become meanwhile).
    pub(super) fn sender_in(&self, term: u64) -> pb::Sender {
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
}
