//! The `Kv.Batch` stream: many callers' commands over one gRPC stream.
//!
//! A unary call costs the node an HTTP/2 stream of its own: headers to
//! decode, a task to spawn, the service stack to run, headers, data and
//! trailers to encode. For a 100-byte write that work is most of the
//! leader's CPU time. A client that serves many concurrent callers over one
//! connection (an application server, `kv bench cluster`) can instead send
//! their commands as messages of one long-lived stream, each with an id, and
//! get each outcome back with that id, in completion order. TiKV's clients
//! do the same (its `BatchCommands` RPC).
//!
//! * [`serve`], the node side: appends each write as its message arrives, in
//!   command order, then answers it when it is acknowledged at its level;
//!   outcomes finishing together go out in one message of about 1 MiB at
//!   most. A message of more than [`COMMANDS_PER_MESSAGE_MAX`] commands ends
//!   the stream with INVALID_ARGUMENT (none of them started), as garbage
//!   ends it with the decoding error; with 4,096 commands in flight, the
//!   node reads no further until some are answered.
//! * [`BatchClient`], the client side: a cloneable handle whose calls are
//!   gathered into messages by one driver task.
//!
//! A command means exactly what its unary call means, with the same checks
//! and errors ([`Node::append_write`] and [`Node::acknowledged`] serve
//! both); an error is that command's outcome and the stream goes on.
//!
//! What it does not do: follow redirects. A command sent to a follower fails
//! "not leader" with the leader's address, and the caller opens a stream
//! there. A stream that breaks leaves its writes' outcomes unknown, as a
//! broken unary call does.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, ready};
use futures_util::stream::{FuturesUnordered, StreamExt};
use kv_proto::v1 as pb;
use pb::command::Op as CommandOp;
use pb::outcome::Result as OutcomeResult;
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

use super::{AckLevel, LEADER_METADATA, Node};
use crate::engine::Op;
use crate::metrics::Api;

/// Commands one stream may have in flight at the node. Beyond it the node
/// stops reading the stream until some are answered (back-pressure through
/// HTTP/2 flow control); with [`COMMANDS_PER_MESSAGE_MAX`], a stream never
/// has more than their sum started.
const IN_FLIGHT_MAX: usize = 4096;

/// The most commands one request message may carry: the node ends a stream
/// that sends more with INVALID_ARGUMENT (and starts none of them); the
/// client never gathers more.
pub const COMMANDS_PER_MESSAGE_MAX: usize = 1024;
/// The client stops adding commands to a message once their keys and
/// values reach this many bytes, well under the node's 4 MiB message limit.
const MESSAGE_BYTES_TARGET: usize = 1 << 20;
/// The node stops adding outcomes to a reply once it is this large (it
/// always sends at least one: a Get's value may be up to `value_bytes_max`).
const REPLY_BYTES_TARGET: usize = 1 << 20;
/// The largest reply the client accepts: the target plus one outcome,
/// with room for a node configured with values far above the 1 MiB default.
const REPLY_BYTES_MAX: usize = 64 << 20;

/// Node side: serves one `Batch` stream until the client ends it, it breaks,
/// or the node stops; then answers every command already read and ends.
pub(super) async fn serve(
    node: Arc<Node>,
    mut inbound: Streaming<pb::BatchRequest>,
    replies: mpsc::Sender<Result<pb::BatchReply, Status>>,
) {
    let mut running: FuturesUnordered<BoxFuture<'static, pb::Outcome>> = FuturesUnordered::new();
    let mut stopping = node.stopping.subscribe();
    let mut reading = true;
    // Why the stream ends in an error, once what was started is answered.
    let mut error: Option<Status> = None;
    loop {
        tokio::select! {
            biased;
            Some(first) = running.next(), if !running.is_empty() => {
                // What finished with it goes in the same message, up to a size.
                let mut bytes = first.encoded_len();
                let mut outcomes = vec![first];
                while bytes < REPLY_BYTES_TARGET {
                    let Some(Some(outcome)) = running.next().now_or_never() else {
                        break;
                    };
                    bytes += outcome.encoded_len();
                    outcomes.push(outcome);
                }
                if replies.send(Ok(pb::BatchReply { outcomes })).await.is_err() {
                    return; // the client is gone
                }
            }
            () = stopped(&mut stopping), if reading => reading = false,
            message = inbound.message(), if reading && running.len() < IN_FLIGHT_MAX => {
                match message {
                    Ok(Some(batch)) if batch.commands.len() > COMMANDS_PER_MESSAGE_MAX => {
                        error = Some(Status::invalid_argument(format!(
                            "a batch message holds {} commands, more than {COMMANDS_PER_MESSAGE_MAX}; \
                             none of them was started",
                            batch.commands.len()
                        )));
                        reading = false;
                    }
                    Ok(Some(batch)) => {
                        for command in batch.commands {
                            running.push(start(&node, command));
                        }
                    }
                    Ok(None) => reading = false,
                    Err(status) => {
                        // Garbage or a broken connection: read no more, answer
                        // what was read (if the client is still there).
                        tracing::debug!(%status, "batch stream broke");
                        error = Some(status);
                        reading = false;
                    }
                }
            }
            else => {
                if let Some(status) = error {
                    let _ = replies.send(Err(status)).await;
                }
                return;
            }
        }
    }
}

/// Returns once the node is stopping.
async fn stopped(stopping: &mut tokio::sync::watch::Receiver<bool>) {
    // The guard `wait_for` returns is dropped here, before any other await.
    let _ = stopping.wait_for(|s| *s).await;
}

/// Starts one command: a write is checked and appended now, in command
/// order; the returned future waits for its acknowledgement.
fn start(node: &Arc<Node>, command: pb::Command) -> BoxFuture<'static, pb::Outcome> {
    let id = command.id;
    match command.op {
        Some(CommandOp::Put(req)) => write(node, id, node.put_op(req)),
        Some(CommandOp::Delete(req)) => write(node, id, node.delete_op(req)),
        Some(CommandOp::Get(req)) => {
            let node = node.clone();
            async move {
                let reply = node.timed_get(Api::Batch, req).await;
                outcome(id, reply.map(OutcomeResult::Get))
            }
            .boxed()
        }
        None => ready(outcome(
            id,
            Err(Status::invalid_argument(
                "a batch command without an operation",
            )),
        ))
        .boxed(),
    }
}

fn write(
    node: &Arc<Node>,
    id: u64,
    op: Result<(Op, AckLevel), Status>,
) -> BoxFuture<'static, pb::Outcome> {
    let start = std::time::Instant::now();
    let appended = op.and_then(|(op, level)| {
        node.append_write(op)
            .map(|appended| (appended, level))
            .inspect_err(|status| node.metrics.write_failed(Api::Batch, status))
    });
    match appended {
        Err(status) => ready(outcome(id, Err(status))).boxed(),
        Ok((appended, level)) => {
            let node = node.clone();
            async move {
                let acked = node.acknowledged(appended, level).await;
                node.metrics.write_done(Api::Batch, level, start, &acked);
                outcome(
                    id,
                    acked.map(|lsn| OutcomeResult::Write(node.write_reply(lsn))),
                )
            }
            .boxed()
        }
    }
}

fn outcome(id: u64, result: Result<OutcomeResult, Status>) -> pb::Outcome {
    let result = result.unwrap_or_else(|status| OutcomeResult::Failure(failure(&status)));
    pb::Outcome {
        id,
        result: Some(result),
    }
}

/// A command's error as it travels in an outcome.
fn failure(status: &Status) -> pb::Failure {
    pb::Failure {
        code: status.code() as i32,
        message: status.message().to_owned(),
        leader_addr: status
            .metadata()
            .get(LEADER_METADATA)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
    }
}

/// The error a unary call would have returned, back from an outcome.
fn status_of(failure: pb::Failure) -> Status {
    let mut status = Status::new(Code::from_i32(failure.code), failure.message);
    if !failure.leader_addr.is_empty()
        && let Ok(addr) = MetadataValue::try_from(failure.leader_addr.as_str())
    {
        status.metadata_mut().insert(LEADER_METADATA, addr);
    }
    status
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_carries_code_message_and_leader_back_and_forth() {
        let mut status = Status::failed_precondition("not leader; the leader is node 2");
        status.metadata_mut().insert(
            LEADER_METADATA,
            MetadataValue::from_static("127.0.0.1:7002"),
        );
        let back = status_of(failure(&status));
        assert_eq!(back.code(), Code::FailedPrecondition);
        assert_eq!(back.message(), status.message());
        assert_eq!(
            back.metadata().get(LEADER_METADATA).unwrap(),
            "127.0.0.1:7002"
        );
        let plain = status_of(failure(&Status::invalid_argument("key is too large")));
        assert_eq!(plain.code(), Code::InvalidArgument);
        assert!(plain.metadata().get(LEADER_METADATA).is_none());
    }

    #[test]
    fn an_unknown_code_from_the_wire_is_not_a_panic() {
        let s = status_of(pb::Failure {
            code: 9999,
            message: "?".into(),
            leader_addr: "\n not an address".into(),
        });
        assert_eq!(s.code(), Code::Unknown);
        assert!(s.metadata().get(LEADER_METADATA).is_none());
    }
}
