//! Client side of the `Kv.Batch` stream: [`BatchClient`], a cloneable
//! handle through which many callers share one stream to one node; one
//! driver task gathers their calls into messages (at most
//! [`COMMANDS_PER_MESSAGE_MAX`] commands, about 1 MiB of keys and values)
//! and hands each outcome back to its caller.
//!
//! What it does not do: serve a stream (that is [`crate::server::batch`]),
//! follow redirects (a command sent to a follower fails "not leader" with
//! the leader's address; the caller opens a stream there), or retry: a
//! stream that breaks leaves its writes' outcomes unknown, as a broken
//! unary call does.

use std::collections::HashMap;
use std::time::Duration;

use kv_proto::v1 as pb;
use pb::command::Op as CommandOp;
use pb::outcome::Result as OutcomeResult;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

use crate::server::batch::COMMANDS_PER_MESSAGE_MAX;
use crate::server::convert::status_of;

/// The client stops adding commands to a message once their keys and
/// values reach this many bytes, well under the node's 4 MiB message limit.
const MESSAGE_BYTES_TARGET: usize = 1 << 20;
/// The largest reply the client accepts: the node's target (about 1 MiB)
/// plus one outcome, with room for a node configured with values far above
/// the 1 MiB default.
const REPLY_BYTES_MAX: usize = 64 << 20;

type Reply = Result<OutcomeResult, Status>;

/// Client side: a handle on one `Batch` stream to one node. Clones share
/// the stream; each call waits for its own command's outcome, and calls
/// made while a message is being sent go together in the next one.
///
/// A call's deadline bounds its caller, not the stream: give the channel
/// HTTP/2 keep-alive (`Endpoint::http2_keep_alive_interval`) so that a
/// dead connection breaks the stream, and every caller still waiting learns
/// its outcome is unknown, instead of each waiting out its deadline.
#[derive(Debug, Clone)]
pub struct BatchClient {
    calls: mpsc::UnboundedSender<(CommandOp, oneshot::Sender<Reply>)>,
    /// How long a call waits for its outcome.
    timeout: Duration,
}

impl BatchClient {
    /// Opens a `Batch` stream on `channel` (connected to one node); each
    /// call waits at most `timeout` for its outcome (then its outcome is
    /// unknown: it may still take effect).
    pub async fn open(channel: Channel, timeout: Duration) -> Result<Self, Status> {
        // Unbounded, so that the driver never blocks on a send and always
        // reads outcomes (a node that stops reading at its in-flight limit
        // must get its answers out). What it holds is bounded anyway: each
        // caller has one call in flight.
        let (requests, outbound) = mpsc::unbounded_channel();
        let replies = pb::kv_client::KvClient::new(channel)
            .max_decoding_message_size(REPLY_BYTES_MAX)
            .batch(UnboundedReceiverStream::new(outbound))
            .await?
            .into_inner();
        let (calls, incoming) = mpsc::unbounded_channel();
        tokio::spawn(drive(incoming, requests, replies));
        Ok(BatchClient { calls, timeout })
    }

    /// Put, as the unary `Kv.Put`.
    pub async fn put(&self, req: pb::PutRequest) -> Result<pb::WriteReply, Status> {
        match self.call(CommandOp::Put(req)).await? {
            OutcomeResult::Write(reply) => Ok(reply),
            other => Err(mismatch("Put", &other)),
        }
    }

    /// Delete, as the unary `Kv.Delete`.
    pub async fn delete(&self, req: pb::DeleteRequest) -> Result<pb::WriteReply, Status> {
        match self.call(CommandOp::Delete(req)).await? {
            OutcomeResult::Write(reply) => Ok(reply),
            other => Err(mismatch("Delete", &other)),
        }
    }

    /// Get, as the unary `Kv.Get`.
    pub async fn get(&self, req: pb::GetRequest) -> Result<pb::GetReply, Status> {
        match self.call(CommandOp::Get(req)).await? {
            OutcomeResult::Get(reply) => Ok(reply),
            other => Err(mismatch("Get", &other)),
        }
    }

    async fn call(&self, op: CommandOp) -> Reply {
        let (tx, rx) = oneshot::channel();
        self.calls
            .send((op, tx))
            .map_err(|_| Status::unavailable("the batch stream is closed"))?;
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(Status::unavailable(
                "outcome unknown: the batch stream closed before the answer",
            )),
            Err(_) => Err(Status::unavailable(format!(
                "outcome unknown: no answer on the batch stream within {} ms",
                self.timeout.as_millis()
            ))),
        }
    }
}

fn mismatch(call: &str, got: &OutcomeResult) -> Status {
    Status::internal(format!("the node answered a {call} with {got:?}"))
}

/// The client's driver: gathers calls into messages, hands each outcome to
/// its caller; when the stream breaks, every caller still waiting learns
/// that its outcome is unknown.
async fn drive(
    mut calls: mpsc::UnboundedReceiver<(CommandOp, oneshot::Sender<Reply>)>,
    requests: mpsc::UnboundedSender<pb::BatchRequest>,
    mut replies: Streaming<pb::BatchReply>,
) {
    let mut waiting: HashMap<u64, oneshot::Sender<Reply>> = HashMap::new();
    let mut next_id = 0u64;
    let broken = loop {
        tokio::select! {
            call = calls.recv() => {
                // Every handle dropped: dropping `requests` ends the stream.
                let Some(mut call) = call else { return };
                let mut commands = Vec::new();
                let mut bytes = 0;
                loop {
                    let (op, tx) = call;
                    bytes += command_bytes(&op);
                    next_id += 1;
                    waiting.insert(next_id, tx);
                    commands.push(pb::Command { id: next_id, op: Some(op) });
                    if commands.len() >= COMMANDS_PER_MESSAGE_MAX || bytes >= MESSAGE_BYTES_TARGET {
                        break;
                    }
                    match calls.try_recv() {
                        Ok(more) => call = more,
                        Err(_) => break,
                    }
                }
                if requests.send(pb::BatchRequest { commands }).is_err() {
                    break Status::unavailable("the batch stream was closed");
                }
            }
            reply = replies.message() => match reply {
                Ok(Some(reply)) => {
                    for outcome in reply.outcomes {
                        if let Some(tx) = waiting.remove(&outcome.id) {
                            let result = match outcome.result {
                                Some(OutcomeResult::Failure(f)) => Err(status_of(f)),
                                Some(result) => Ok(result),
                                None => Err(Status::internal("an outcome without a result")),
                            };
                            let _ = tx.send(result);
                        }
                    }
                }
                Ok(None) => break Status::unavailable("the node ended the batch stream"),
                Err(status) => break status,
            },
        }
    };
    for (_, tx) in waiting {
        let _ = tx.send(Err(Status::unavailable(format!(
            "outcome unknown: the batch stream broke ({})",
            broken.message()
        ))));
    }
}

fn command_bytes(op: &CommandOp) -> usize {
    match op {
        CommandOp::Put(p) => p.key.len() + p.value.len(),
        CommandOp::Delete(d) => d.key.len(),
        CommandOp::Get(g) => g.key.len(),
    }
}
