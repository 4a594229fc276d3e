//! Leader side of replication: one replicator per follower and term
//! ([`Node::replicate`]) that probes where the follower stands, then ships
//! the durable records it lacks (from the cache of recent records in wire
//! form, or from the WAL for a follower far behind, or a snapshot when the
//! log no longer holds them), heartbeats when idle, and feeds the
//! follower's acknowledgements, in order, to the core.
//!
//! Every decision is the core's: whether a batch may go (this node still
//! leads the term, the follower's `next`, flow control, only durable
//! records), what an acknowledgement means (progress, the lease, a back-up
//! over a refusal, a stale refusal ignored, the commit rule, a higher term).
//! What is here is the stream: dialing, reading records, deadlines.
//!
//! It does not take client writes (`kv_api.rs`), stream snapshots
//! (`snapshot.rs`), or campaign and step down (the core, via `runtime.rs`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use kv_cluster::replica::{Input, Message, Sent, cached_record_valid};
use kv_proto::v1 as pb;
use pb::replication_client::ReplicationClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::config::Member;
use super::{EngineView, Node, RECENT_RECORDS_MAX, convert, join_engine_error, lock};
use crate::engine::{EngineError, Op, Record};

impl Node {
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
                    .is_none_or(|r| cached_record_valid(&EngineView(&self.engine), r.lsn, r.term))
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

    /// Leader of `term`: keeps one follower up to date, reconnecting, until
    /// it no longer leads that term.
    pub(super) async fn replicate(self: Arc<Self>, peer: Member, term: u64) {
        let mut backoff = Duration::from_millis(50);
        // A refusal (another cluster, or another member, at this peer's
        // address) is a configuration error an operator must see: warned
        // when it starts or changes, not at every retry. It is forgotten
        // once the member answers an append, so a refusal that comes back
        // after replication worked is warned again; a stream that fails
        // otherwise between two refusals (a dial error, a timeout)
        // changes nothing.
        let mut refusal: Option<String> = None;
        loop {
            if !self.leads_in(term) {
                // A deposed leader must never replicate again.
                return;
            }
            let mut answered = false;
            let Err(e) = self.replicate_once(&peer, term, &mut answered).await;
            if answered {
                refusal = None;
            }
            match e.downcast_ref::<tonic::Status>() {
                Some(s) if s.code() == tonic::Code::PermissionDenied => {
                    if refusal.as_deref() != Some(s.message()) {
                        tracing::warn!(
                            peer = peer.id,
                            addr = %peer.peer(),
                            refusal = s.message(),
                            "the node at this member's address refuses us"
                        );
                        refusal = Some(s.message().to_owned());
                    }
                }
                _ => {
                    tracing::debug!(peer = peer.id, error = %e, "replication stream ended");
                }
            }
            let ready = self.step(Input::Disconnected {
                peer: peer.id,
                term,
            });
            let _ = self.carry_out(ready).await;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(1000));
        }
    }

    /// This node as the sender of a message of `term` to member `to` (a
    /// replicator keeps the term it leads, whatever the node's term has
    /// become meanwhile).
    pub(super) fn sender_to(&self, to: u64, term: u64) -> pb::Sender {
        pb::Sender {
            cluster_id: self.config.cluster_id.clone(),
            node_id: self.config.node_id,
            term,
            to,
        }
    }

    /// One replication stream to `peer`, until it fails or this node no
    /// longer leads `term`: it only ever ends in an error. Sets `answered`
    /// once the member has answered an append on it.
    async fn replicate_once(
        &self,
        peer: &Member,
        term: u64,
        answered: &mut bool,
    ) -> anyhow::Result<std::convert::Infallible> {
        let rpc = Duration::from_millis(self.config.rpc_timeout_ms);
        let endpoint = self
            .peer_endpoint(peer.peer())?
            .http2_keep_alive_interval(Duration::from_millis(self.config.heartbeat_ms.max(100)))
            .keep_alive_timeout(rpc)
            .keep_alive_while_idle(true);
        let channel = self.env.dialer.dial(endpoint).await?;
        let (tx, rx) = mpsc::channel::<pb::AppendRequest>(64);
        // What the core keeps of each request in flight, in order: one ack
        // each. The probe goes first: an empty append at our `next`, to
        // learn where the follower stands.
        let mut inflight: VecDeque<Sent> = VecDeque::new();
        self.send_heartbeat(peer.id, &tx, &mut inflight, term)
            .await?;
        let mut acks = ReplicationClient::new(channel)
            .append(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let _ = self.step(Input::Connected {
            peer: peer.id,
            term,
        });
        let mut durable_rx = self.durable_tx.subscribe();
        let mut tick = tokio::time::interval(Duration::from_millis(self.config.heartbeat_ms));
        let mut last_ack = tokio::time::Instant::now();
        loop {
            if !self.leads_in(term) {
                anyhow::bail!("no longer the leader of term {term}");
            }
            if let Err(e) = self.send_batches(peer.id, &tx, &mut inflight, term).await {
                return Err(closed_because(&mut acks, &tx, e, rpc, answered).await);
            }
            tokio::select! {
                biased;
                ack = acks.message() => {
                    let ack = ack?.ok_or_else(|| anyhow::anyhow!("follower closed the stream"))?;
                    *answered = true;
                    last_ack = tokio::time::Instant::now();
                    let Some(sent) = inflight.pop_front() else {
                        anyhow::bail!("follower {} acknowledged more than was sent", peer.id);
                    };
                    let ready = self.step(Input::AppendAck {
                        ack: kv_cluster::replica::AppendAck {
                            from: peer.id,
                            term: ack.term,
                            success: ack.success,
                            durable_lsn: ack.durable_lsn,
                            last_lsn: ack.last_lsn,
                            error: ack.error,
                        },
                        sent,
                    });
                    self.carry_out(ready).await?;
                    if ack.term > term {
                        anyhow::bail!("follower {} is in term {}: stepped down", peer.id, ack.term);
                    }
                }
                changed = durable_rx.changed() => {
                    changed?;
                }
                _ = tick.tick() => {
                    if !inflight.is_empty() && last_ack.elapsed() > rpc {
                        anyhow::bail!("no acknowledgement within {rpc:?}");
                    }
                    if inflight.is_empty()
                        && let Err(e) = self.send_heartbeat(peer.id, &tx, &mut inflight, term).await
                    {
                        return Err(closed_because(&mut acks, &tx, e, rpc, answered).await);
                    }
                }
            }
        }
    }

    /// Asks the core to send `peer` the records `prev_lsn + 1 ..= last`
    /// (none: a heartbeat); queues the request if it agrees.
    async fn ship(
        &self,
        peer: u64,
        tx: &mpsc::Sender<pb::AppendRequest>,
        inflight: &mut VecDeque<Sent>,
        (term, prev_lsn, last, bytes): (u64, u64, u64, u64),
        records: Vec<pb::LogRecord>,
    ) -> anyhow::Result<bool> {
        let ready = self.step(Input::Ship {
            to: peer,
            term,
            prev_lsn,
            last,
            bytes,
        });
        let durable = self.durability();
        for gated in ready.messages {
            let Ok(Message::Append { to, req, sent }) = gated.release(durable) else {
                continue;
            };
            assert_eq!(
                (to, req.meta.prev_lsn),
                (peer, prev_lsn),
                "the core answered another append than the one asked for"
            );
            self.send_append(tx, to, &req, records).await?;
            inflight.push_back(sent);
            return Ok(true);
        }
        Ok(false)
    }

    async fn send_heartbeat(
        &self,
        peer: u64,
        tx: &mpsc::Sender<pb::AppendRequest>,
        inflight: &mut VecDeque<Sent>,
        term: u64,
    ) -> anyhow::Result<()> {
        let Some(next) = self.core().next_for(peer) else {
            anyhow::bail!("node {peer} is not a follower here");
        };
        if !self
            .ship(
                peer,
                tx,
                inflight,
                (term, next - 1, next - 1, 0),
                Vec::new(),
            )
            .await?
        {
            anyhow::bail!("no longer the leader of term {term}");
        }
        Ok(())
    }

    /// Queues the core's append `req` to member `to`, with its `records`.
    async fn send_append(
        &self,
        tx: &mpsc::Sender<pb::AppendRequest>,
        to: u64,
        req: &kv_cluster::replica::AppendRequest,
        records: Vec<pb::LogRecord>,
    ) -> anyhow::Result<()> {
        // A checkpoint of our applied state, for the follower to compare
        // its own against when it has applied the same LSN.
        let (checkpoint_digest, checkpoint_lsn) = self.engine.digest();
        let req = pb::AppendRequest {
            from: Some(self.sender_to(to, req.term)),
            prev_lsn: req.meta.prev_lsn,
            prev_term: req.meta.prev_term,
            records,
            commit_lsn: req.commit,
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
        inflight: &mut VecDeque<Sent>,
        term: u64,
    ) -> anyhow::Result<()> {
        let durable = self.engine.durable_lsn();
        loop {
            let Some(next) = self.core().next_for(peer) else {
                return Ok(());
            };
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
            let Some(last) = records.last().map(|r| r.lsn) else {
                return Ok(());
            };
            let bytes: u64 = records
                .iter()
                .map(|r| (r.key.len() + r.value.len() + 32) as u64)
                .sum();
            if !self
                .ship(peer, tx, inflight, (term, next - 1, last, bytes), records)
                .await?
            {
                // Flow control (or this node no longer leads): wait for acks.
                return Ok(());
            }
        }
    }
}

/// Why a replication stream ended, given that a send into it failed with
/// `e`: if the follower's side closed the stream, its status (read within
/// `rpc`) says why (a refusal is the stream's status, and may close it
/// while we send). Acks queued before the status are dropped with the
/// stream, but still set `answered`.
async fn closed_because(
    acks: &mut tonic::Streaming<pb::AppendAck>,
    tx: &mpsc::Sender<pb::AppendRequest>,
    e: anyhow::Error,
    rpc: Duration,
    answered: &mut bool,
) -> anyhow::Error {
    if !tx.is_closed() {
        return e;
    }
    let outcome = tokio::time::timeout(rpc, async {
        loop {
            match acks.message().await {
                Ok(Some(_)) => *answered = true,
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
    })
    .await;
    match outcome {
        Ok(Some(status)) => status.into(),
        _ => e,
    }
}
