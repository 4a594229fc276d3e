//! The client API path: [`KvService`] (the `Kv` gRPC service) and what
//! the node does for each client request. A write is checked and appended
//! at the leader ([`Node::append_write`]), then waited on until it is
//! acknowledged at its level, within the write timeout
//! ([`Node::acknowledged`]); a default read is served by the leader once
//! the read barrier and the lease allow ([`Node::confirm_read`]), a STALE
//! one from this node's applied state. `Kv.Batch` commands go through the
//! same functions (`batch.rs`).
//!
//! It does not ship records to followers (`leader.rs`), decide when a
//! level is satisfied (`kv_cluster::AckLevel`), or forward a request: a
//! node that does not lead answers NOT_LEADER, naming the leader.

use std::sync::Arc;
use std::time::Duration;

use kv_cluster::AckLevel;
use kv_proto::v1 as pb;
use pb::kv_server::Kv;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use kv_cluster::replica::{Input, Refused, Verdict, WriteStatus};

use super::{EngineView, Node, batch, convert, engine_status, join_error};
use crate::engine::Op;
use crate::metrics::Api;

/// A write appended at the leader, not yet acknowledged.
#[derive(Debug, Clone, Copy)]
pub(super) struct Appended {
    lsn: u64,
    /// The term this node led when it appended the record, which is the
    /// record's term: its identity with `lsn` (a new leader may fill the
    /// LSN with another record).
    term: u64,
}

impl Node {
    /// The operation and acknowledgement level of a Put.
    pub(super) fn put_op(&self, req: pb::PutRequest) -> Result<(Op, AckLevel), Status> {
        let level = self.ack_level(req.ack)?;
        let op = Op::Put {
            key: req.key,
            value: req.value,
        };
        Ok((op, level))
    }

    /// The operation and acknowledgement level of a Delete.
    pub(super) fn delete_op(&self, req: pb::DeleteRequest) -> Result<(Op, AckLevel), Status> {
        let level = self.ack_level(req.ack)?;
        Ok((Op::Delete { key: req.key }, level))
    }

    /// The reply to a write acknowledged at LSN `lsn`.
    pub(super) fn write_reply(&self, lsn: u64) -> pb::WriteReply {
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
    pub(super) async fn write(&self, op: Op, level: AckLevel) -> Result<u64, Status> {
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
    pub(super) async fn timed_get(
        &self,
        api: Api,
        req: pb::GetRequest,
    ) -> Result<pb::GetReply, Status> {
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
    pub(super) fn append_write(&self, op: Op) -> Result<Appended, Status> {
        let (key, value) = match &op {
            Op::Put { key, value } => (key.as_slice(), Some(value.as_slice())),
            Op::Delete { key } => (key.as_slice(), None),
        };
        self.engine.validate(key, value).map_err(engine_status)?;
        // The core's verdict and the append under the core's lock: the
        // record is stamped with the term the core leads, and a transfer
        // that starts later finds it in the log it waits for the target to
        // hold.
        let (lsn, term) = {
            let mut core = self.core();
            let ready = core.step(self.now(), Input::Propose, &EngineView(&self.engine));
            let Some(term) = ready.propose else {
                drop(core);
                return Err(match ready.verdict {
                    Some(Verdict::Refused(r)) => self.refusal_status(r),
                    _ => self.not_leader(),
                });
            };
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
    pub(super) async fn acknowledged(
        &self,
        appended: Appended,
        level: AckLevel,
    ) -> Result<u64, Status> {
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
        // Our own durability counts towards the majority: the core runs the
        // commit rule once per durable LSN (the first writer to see it asks).
        let durable = self.engine.durable_lsn();
        let checked = self
            .commit_checked
            .fetch_max(durable, std::sync::atomic::Ordering::AcqRel);
        if checked < durable {
            let ready = self.step(Input::Durable { lsn: durable });
            if let Some(commit) = ready.commit {
                self.publish_commit(commit).map_err(engine_status)?;
            }
        }
        let status = || {
            self.core()
                .write_status(&EngineView(&self.engine), lsn, term, level)
        };
        let wait = async {
            if level == AckLevel::Quorum {
                // The common case: one targeted wake-up.
                self.commit_waiters.wait_for(lsn).await;
                return status();
            }
            let mut commit_rx = self.commit_tx.subscribe();
            loop {
                commit_rx.borrow_and_update();
                let now = status();
                if now != WriteStatus::Pending {
                    return now;
                }
                // `all` also waits on followers' progress, which moves with
                // every ack; recheck at the heartbeat pace too.
                let beat = Duration::from_millis(self.config.heartbeat_ms);
                if let Ok(Err(_)) = tokio::time::timeout(beat, commit_rx.changed()).await {
                    return WriteStatus::Pending;
                }
            }
        };
        let outcome = tokio::select! {
            biased;
            reached = wait => reached,
            () = &mut deadline => WriteStatus::Pending,
        };
        match outcome {
            WriteStatus::Acknowledged => Ok(lsn),
            WriteStatus::Pending => {
                Err(unknown(&format!("was not acknowledged at level {level:?}")))
            }
            WriteStatus::Replaced { by } => Err(Status::aborted(format!(
                "the write at LSN {lsn} did not take effect: a new leader's record (term {by}) replaced it"
            ))),
            WriteStatus::Unknown => Err(unknown("could no longer be told from its log")),
        }
    }

    /// Leader: waits until a default read may be served: the core's verdict
    /// (this node leads, hands nothing over, its commit LSN covers the read
    /// barrier, and with elections its lease holds), within the write
    /// timeout.
    pub(super) async fn confirm_read(&self) -> Result<(), Status> {
        let timeout = Duration::from_millis(self.config.write_timeout_ms);
        let deadline = tokio::time::Instant::now() + timeout;
        let poll = Duration::from_millis((self.config.heartbeat_ms / 4).clamp(1, 5));
        loop {
            let refused = match self.step(Input::Read).verdict {
                Some(Verdict::Ok) => return Ok(()),
                Some(Verdict::Refused(r)) => r,
                None => return Err(Status::internal("the core gave no verdict on a read")),
            };
            match refused {
                Refused::Barrier { barrier } => {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    if tokio::time::timeout(left, self.commit_waiters.wait_for(barrier))
                        .await
                        .is_err()
                    {
                        return Err(self.refusal_status(refused));
                    }
                }
                Refused::NoLease if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(poll).await;
                }
                other => return Err(self.refusal_status(other)),
            }
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
