//! Follower side of replication: each append request goes to the core
//! ([`Input::Append`]: is the sender this term's leader, does the batch
//! match our log, what to truncate, what to append, a higher term adopted
//! first); this carries the verdict out — the new term durably first, a
//! conflicting suffix truncated durably, the new records appended — and
//! acknowledges each batch once it is durable, applying the commit LSN the
//! core derives from it ([`Node::acknowledge`]).
//!
//! It does not decide anything of the protocol (the core does), read the
//! append stream or check who sent it (`services.rs`, `auth.rs`), or
//! receive snapshots (`snapshot.rs`).

use std::time::Duration;

use kv_cluster::AppendMeta;
use kv_cluster::replica::{self, Broken, Gated, Input, Message};
use kv_proto::v1 as pb;
use tonic::Status;

use super::{Node, engine_status, join_error};
use crate::engine::Record;

/// A follower's answer to one append, possibly waiting for durability.
#[derive(Debug)]
pub(super) enum PendingAck {
    /// Send as is (a refusal).
    Ready(pb::AppendAck),
    /// Send once the log is durable through `batch_last` (the gate says so).
    WhenDurable { ack: Gated, batch_last: u64 },
    /// The stream carried something unacceptable: send the error, close.
    Failed(Status),
}

/// The status a rule broken by a leader's message ends the stream with.
pub(super) fn broken_status(broken: Broken) -> Status {
    match broken {
        Broken::Stranger(m) => Status::permission_denied(m),
        Broken::SecondLeader(m) => Status::failed_precondition(m),
        Broken::Malformed(m) => Status::invalid_argument(m),
    }
}

fn ack_to_proto(ack: replica::AppendAck, last_lsn: u64) -> pb::AppendAck {
    pb::AppendAck {
        term: ack.term,
        success: ack.success,
        durable_lsn: ack.durable_lsn,
        last_lsn: if ack.success { last_lsn } else { ack.last_lsn },
        error: ack.error,
    }
}

impl Node {
    /// Follower: is the sender of a snapshot (its envelope checked by
    /// [`Node::check_sender`]) this term's leader? `Ok(false)` if its term
    /// is stale; a higher term is persisted first.
    pub(super) async fn accept_snapshot_from(&self, from: &pb::Sender) -> Result<bool, Status> {
        let ready = self.step(Input::SnapshotOffer {
            from: from.node_id,
            term: from.term,
        });
        if let Some(broken) = ready.error.clone() {
            return Err(broken_status(broken));
        }
        let accepted = ready.accepted == Some(true);
        self.carry_out(ready).await.map_err(engine_status)?;
        Ok(accepted)
    }

    /// Follower: checks one append request and appends its new records (not
    /// yet durable). The acknowledgement is sent by [`Node::acknowledge`]
    /// once they are durable, so the next batch can be appended meanwhile
    /// and share the same sync.
    pub(super) async fn accept_append(&self, req: pb::AppendRequest) -> Result<PendingAck, Status> {
        let _one_at_a_time = self.append_lock.lock().await;
        // A stranger is refused before its records are looked at, and a
        // damaged record before the core sees the request: bad input
        // changes nothing.
        let from = self.check_sender(req.from.as_ref(), "append")?;
        if self.config.leader.is_some_and(|l| l != from.node_id) {
            // The core refuses it too; here it is refused before decoding.
            return Err(Status::permission_denied(format!(
                "node {} is not the leader of this cluster",
                from.node_id
            )));
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
        let batch_last = meta.prev_lsn + meta.records.len() as u64;
        let ready = self.step(Input::Append(replica::AppendRequest {
            from: from.node_id,
            term: from.term,
            meta,
            commit: req.commit_lsn,
        }));
        if let Some(broken) = ready.error.clone() {
            return Err(broken_status(broken));
        }
        let (truncate_after, append_from) = (ready.truncate_after, ready.append_from);
        // A new term is durable before anything is acknowledged in it.
        let mut out = self.carry_out(ready).await.map_err(engine_status)?;
        let Some(ack) = out.pop() else {
            return Err(Status::internal("the core gave no answer to an append"));
        };
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
        if let Some(from) = append_from {
            let new: Vec<Record> = records.into_iter().skip(from).collect();
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
        if ack.needs().log == 0 {
            // A refusal (stale term, mismatch) or an empty heartbeat at the
            // start of the log: nothing to wait for.
            return match ack.release(self.durability()) {
                Ok(Message::AppendAck { ack, .. }) => {
                    Ok(PendingAck::Ready(ack_to_proto(ack, self.engine.last_lsn())))
                }
                other => Err(Status::internal(format!("unexpected answer {other:?}"))),
            };
        }
        Ok(PendingAck::WhenDurable { ack, batch_last })
    }

    /// Follower: waits until an accepted batch is durable, applies what the
    /// core says is committed now (as far as the batches vouch our log
    /// matches the leader's), and releases the acknowledgement.
    pub(super) async fn acknowledge(&self, pending: PendingAck) -> Result<pb::AppendAck, Status> {
        let (gated, batch_last) = match pending {
            PendingAck::Ready(ack) => return Ok(ack),
            PendingAck::Failed(status) => return Err(status),
            PendingAck::WhenDurable { ack, batch_last } => (ack, batch_last),
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
        let ready = self.step(Input::Durable { lsn: batch_last });
        self.carry_out(ready).await.map_err(engine_status)?;
        match gated.release(self.durability()) {
            Ok(Message::AppendAck { ack, .. }) => Ok(ack_to_proto(ack, self.engine.last_lsn())),
            Ok(other) => Err(Status::internal(format!("unexpected answer {other:?}"))),
            Err(gated) => Err(Status::unavailable(format!(
                "the acknowledgement is not yet durable ({:?})",
                gated.needs()
            ))),
        }
    }
}
