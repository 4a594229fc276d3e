//! Follower side of replication: an append is taken only from this term's
//! leader ([`Node::accept_leader`], which also follows it and restarts the
//! election timer; a higher term is persisted first), its new records are
//! appended after the log-matching check, a conflicting suffix truncated
//! durably first ([`Node::accept_append`]), and each batch is acknowledged
//! once it is durable, applying what the leader's commit LSN covers
//! ([`Node::acknowledge`]).
//!
//! It does not decide log matching or what to truncate
//! (`kv_cluster::follower_append`), read the append stream or check who
//! sent it (`services.rs`, `auth.rs`), or receive snapshots (`snapshot.rs`).

use std::time::Duration;

use kv_cluster::{
    AppendMeta, AppendVerdict, LogView, Refusal, TermAction, follower_append, observe_term,
};
use kv_proto::v1 as pb;
use tonic::Status;

use super::election::Role;
use super::{Node, engine_status, join_error, lock};
use crate::engine::{Engine, Record};

/// A follower's answer to one append, possibly waiting for durability.
#[derive(Debug)]
pub(super) enum PendingAck {
    /// Send as is (a refusal).
    Ready(pb::AppendAck),
    /// Send once everything through `batch_last` is durable.
    WhenDurable { batch_last: u64, commit_lsn: u64 },
    /// The stream carried something unacceptable: send the error, close.
    Failed(Status),
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
    /// Follower: checks the sender of an append or snapshot: our cluster, a
    /// member, and (fixed leader) the configured one. `Ok(false)` if its
    /// term is stale (the caller refuses, with our term); a higher term is
    /// persisted first. On success the sender is this term's leader: we
    /// follow it and restart the election timer.
    pub(super) async fn accept_leader(&self, from: &pb::Sender) -> Result<bool, Status> {
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
    pub(super) async fn accept_append(&self, req: pb::AppendRequest) -> Result<PendingAck, Status> {
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
    pub(super) async fn acknowledge(&self, pending: PendingAck) -> Result<pb::AppendAck, Status> {
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
}
