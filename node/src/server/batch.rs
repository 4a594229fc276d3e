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
//! * [`BatchClient`](crate::client::batch_client::BatchClient), the client
//!   side (in [`crate::client`]): a cloneable handle whose calls are
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

use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, ready};
use futures_util::stream::{FuturesUnordered, StreamExt};
use kv_proto::v1 as pb;
use pb::command::Op as CommandOp;
use pb::outcome::Result as OutcomeResult;
use prost::Message as _;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use super::convert::failure;
use super::{AckLevel, Node};
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
/// The node stops adding outcomes to a reply once it is this large (it
/// always sends at least one: a Get's value may be up to `value_bytes_max`).
const REPLY_BYTES_TARGET: usize = 1 << 20;

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
