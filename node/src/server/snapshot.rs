//! Snapshot transfer between nodes: the leader streams its newest snapshot
//! to a follower that needs records its log no longer holds, and the
//! follower writes it to a temp file, verifies it and installs it.
//!
//! Neither side holds the snapshot in memory. The leader reads chunk N from
//! the open snapshot file only when the stream is polled for it (after chunk
//! N-1 was taken), through the node's [`Offload`](super::env::Offload); the
//! open handle keeps the file readable even if newer snapshots remove it
//! meanwhile. The follower writes each chunk to `snap-<lsn>-<n>.snap.recv`
//! as it arrives, checking offsets and the announced size, and at the last
//! chunk the engine syncs, decodes and verifies the file and installs it
//! (see [`Engine::install_received_snapshot`](crate::engine::Engine)). A
//! stream that fails, stalls or is refused leaves no temp file behind (and
//! a crash leaves one the next open removes).
//!
//! This module does not decide when a follower needs a snapshot (the
//! replicator does) nor whether installing it is safe (the engine does).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kv_cluster::replica::Input;
use kv_proto::v1 as pb;
use pb::replication_client::ReplicationClient;
use tonic::{Status, Streaming};

use super::auth::Caller;
use super::{Node, engine_status, join_error, lock};
use crate::engine::EngineError;
use crate::engine::snapshot::{Receive, SnapshotFile};

/// Bytes per snapshot chunk on the wire.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
/// The largest snapshot a follower accepts.
pub const SNAPSHOT_BYTES_MAX: u64 = 16 << 30;

/// The chunks of `file` as a stream that reads each one only when it is
/// polled for (so at most one chunk is in memory here, plus what the
/// transport buffers). A read failure ends the stream early (the follower
/// refuses a stream without its last chunk) and is left in `failure`.
fn chunk_stream(
    file: SnapshotFile,
    from: pb::Sender,
    offload: super::env::Offload,
    failure: Arc<Mutex<Option<String>>>,
) -> impl futures_util::Stream<Item = pb::SnapshotChunk> + Send + 'static {
    let total = file.len();
    futures_util::stream::unfold(Some(0u64), move |next| {
        let (file, from, failure) = (file.clone(), from.clone(), failure.clone());
        async move {
            let offset = next?;
            let reader = file.clone();
            let read = offload
                .run(move || reader.read_chunk(offset, SNAPSHOT_CHUNK_BYTES))
                .await;
            let data = match read {
                Ok(Ok(data)) if !data.is_empty() => data,
                Ok(Ok(_)) => {
                    *lock(&failure) = Some(format!("empty read at offset {offset} of {total}"));
                    return None;
                }
                Ok(Err(e)) => {
                    *lock(&failure) = Some(e.to_string());
                    return None;
                }
                Err(e) => {
                    *lock(&failure) = Some(format!("snapshot read task failed: {e}"));
                    return None;
                }
            };
            let end = offset + data.len() as u64;
            let last = end >= total;
            let chunk = pb::SnapshotChunk {
                from: Some(from),
                lsn: file.lsn(),
                term: file.term(),
                offset,
                last,
                data,
                total_bytes: total,
            };
            Some((chunk, (!last).then_some(end)))
        }
    })
}

/// How a snapshot stream ended on the follower's side.
enum Received {
    /// Every chunk arrived and is in the temp file.
    Complete(Receive),
    /// The sender's term is stale: refuse, with our term.
    Stale(pb::SnapshotAck),
}

impl Node {
    /// Leader: streams the newest snapshot to a follower that is behind the
    /// log, in chunks read from the file as the stream is polled, and moves
    /// its progress to the snapshot on success.
    pub(super) async fn send_snapshot(&self, peer: u64, term: u64) -> anyhow::Result<()> {
        let engine = self.engine.clone();
        let Some(file) = self
            .env
            .offload
            .run(move || engine.newest_snapshot())
            .await??
        else {
            anyhow::bail!("follower {peer} is behind the log, and there is no snapshot to send");
        };
        let (lsn, total) = (file.lsn(), file.len());
        let addr = self
            .config
            .peer_addr_of(peer)
            .ok_or_else(|| anyhow::anyhow!("no address for node {peer}"))?;
        tracing::info!(peer, lsn, bytes = total, "sending snapshot");
        let rpc = Duration::from_millis(self.config.rpc_timeout_ms);
        let endpoint = self
            .peer_endpoint(addr)?
            .http2_keep_alive_interval(Duration::from_millis(self.config.heartbeat_ms.max(100)))
            .keep_alive_timeout(rpc);
        let channel = self.env.dialer.dial(endpoint).await?;
        let chunks = total.div_ceil(SNAPSHOT_CHUNK_BYTES as u64);
        let failure = Arc::new(Mutex::new(None));
        let stream = chunk_stream(
            file,
            self.sender_to(peer, term),
            self.env.offload,
            failure.clone(),
        );
        // A deadline that grows with the snapshot: one RPC timeout per chunk
        // (and one for the install), so a stalled transfer ends and is
        // retried, and a large one is not cut short.
        let deadline = rpc.saturating_mul(u32::try_from(chunks + 1).unwrap_or(u32::MAX));
        let reply = tokio::time::timeout(
            deadline,
            ReplicationClient::new(channel).install_snapshot(stream),
        )
        .await
        .map_err(|_| anyhow::anyhow!("snapshot to follower {peer} not done within {deadline:?}"))?;
        // A local read failure explains the follower's refusal better than
        // the refusal does.
        if let Some(why) = lock(&failure).take() {
            anyhow::bail!("reading snapshot {lsn} for follower {peer} failed: {why}");
        }
        let ack = reply?.into_inner();
        let ready = self.step(Input::SnapshotSent {
            peer,
            sent_in: term,
            term: ack.term,
            lsn: ack.success.then_some(ack.lsn),
        });
        self.carry_out(ready).await?;
        if ack.term > term {
            anyhow::bail!("follower {peer} is in term {}: stepped down", ack.term);
        }
        if !ack.success {
            anyhow::bail!("follower {peer} refused the snapshot: {}", ack.error);
        }
        Ok(())
    }

    /// Follower: receives a snapshot stream into a temp file and installs
    /// it. On any failure the temp file is removed.
    /// Every chunk must come from the member `caller` is (see `auth`).
    pub(super) async fn receive_snapshot(
        &self,
        caller: Caller,
        mut chunks: Streaming<pb::SnapshotChunk>,
    ) -> Result<pb::SnapshotAck, Status> {
        let mut recv = None;
        let received = self.receive_chunks(caller, &mut chunks, &mut recv).await;
        let recv = match received {
            Ok(Received::Complete(recv)) => recv,
            Ok(Received::Stale(ack)) => {
                self.discard(recv).await;
                return Ok(ack);
            }
            Err(status) => {
                self.discard(recv).await;
                return Err(status);
            }
        };
        let _no_appends_meanwhile = self.append_lock.lock().await;
        let engine = self.engine.clone();
        let installed = self
            .env
            .offload
            .run(move || engine.install_received_snapshot(recv))
            .await
            .map_err(join_error)?
            .map_err(|e| match e {
                EngineError::InvalidLogOp(why) => Status::invalid_argument(why),
                other => engine_status(other),
            })?;
        tracing::info!(lsn = installed, "installed the leader's snapshot");
        let ready = self.step(Input::SnapshotInstalled { lsn: installed });
        self.carry_out(ready).await.map_err(engine_status)?;
        Ok(pb::SnapshotAck {
            term: self.term(),
            success: true,
            lsn: installed,
            error: String::new(),
        })
    }

    /// Reads the stream into a temp file until its last chunk. `recv` holds
    /// the temp file once the first chunk arrived, so the caller can remove
    /// it whatever happens here.
    async fn receive_chunks(
        &self,
        caller: Caller,
        chunks: &mut Streaming<pb::SnapshotChunk>,
        recv: &mut Option<Receive>,
    ) -> Result<Received, Status> {
        let silence = Duration::from_millis(self.config.rpc_timeout_ms * 2);
        loop {
            let chunk = match tokio::time::timeout(silence, chunks.message()).await {
                Ok(Ok(Some(chunk))) => chunk,
                Ok(Ok(None)) => {
                    return Err(Status::invalid_argument(
                        "snapshot stream ended before its last chunk",
                    ));
                }
                Ok(Err(status)) => return Err(status),
                Err(_) => return Err(Status::deadline_exceeded("snapshot stream went silent")),
            };
            let from = self.check_sender(chunk.from.as_ref(), "snapshot chunk")?;
            caller.may_claim(Some(from.node_id))?;
            if !self.accept_snapshot_from(from).await? {
                return Ok(Received::Stale(pb::SnapshotAck {
                    term: self.term(),
                    success: false,
                    lsn: 0,
                    error: format!("stale term {}", from.term),
                }));
            }
            let mut r = match recv.take() {
                Some(r) => r,
                None => {
                    if chunk.total_bytes > SNAPSHOT_BYTES_MAX {
                        return Err(Status::invalid_argument(
                            "snapshot larger than announced or allowed",
                        ));
                    }
                    let engine = self.engine.clone();
                    let (lsn, total) = (chunk.lsn, chunk.total_bytes);
                    self.env
                        .offload
                        .run(move || engine.begin_snapshot_receive(lsn, total))
                        .await
                        .map_err(join_error)?
                        .map_err(engine_status)?
                }
            };
            if r.lsn() != chunk.lsn || r.received() != chunk.offset {
                *recv = Some(r);
                return Err(Status::invalid_argument("snapshot chunks out of order"));
            }
            if r.total_bytes() != chunk.total_bytes
                || r.received() + chunk.data.len() as u64 > r.total_bytes()
            {
                *recv = Some(r);
                return Err(Status::invalid_argument(
                    "snapshot larger than announced or allowed",
                ));
            }
            let last = chunk.last;
            let (r, written) = self
                .env
                .offload
                .run(move || {
                    let written = r.write(chunk.offset, &chunk.data);
                    (r, written)
                })
                .await
                .map_err(join_error)?;
            if let Err(e) = written {
                *recv = Some(r);
                return Err(match e {
                    EngineError::InvalidLogOp(why) => Status::invalid_argument(why),
                    other => engine_status(other),
                });
            }
            if last {
                if !r.is_complete() {
                    let why = format!(
                        "snapshot stream's last chunk ends at byte {} of {}",
                        r.received(),
                        r.total_bytes()
                    );
                    *recv = Some(r);
                    return Err(Status::invalid_argument(why));
                }
                return Ok(Received::Complete(r));
            }
            *recv = Some(r);
        }
    }

    /// Removes an unfinished receive's temp file off the async threads.
    async fn discard(&self, recv: Option<Receive>) {
        if let Some(r) = recv {
            // A failed task already dropped (and so removed) it.
            let _ = self.env.offload.run(move || drop(r)).await;
        }
    }
}
