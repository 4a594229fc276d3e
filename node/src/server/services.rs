//! A node on the network: the peer service [`ReplicationService`] (an
//! append stream is read here, each message's claimed sender checked
//! against the connection before the follower side looks at it, and
//! answered in order as batches become durable; snapshot, vote and
//! `TimeoutNow` requests go to their handlers), and [`serve`], which runs
//! the client and peer listeners with the health and reflection services,
//! starts a fixed leader's replicators and the election loop, and on
//! shutdown hands leadership over, ends the node's tasks and makes
//! everything written durable.
//!
//! It does not check a request itself (that is `follower.rs`,
//! `snapshot.rs` and `runtime.rs`, and `auth.rs` for who a connection
//! is), or serve the client API (`kv_api.rs`).

use std::sync::Arc;
use std::time::Duration;

use kv_proto::v1 as pb;
use pb::kv_server::KvServer;
use pb::replication_server::{Replication, ReplicationServer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::Node;
use super::auth::PeerConn;
use super::follower::PendingAck;
use super::kv_api::KvService;

/// The replication API (follower side).
#[derive(Debug, Clone)]
pub struct ReplicationService(pub Arc<Node>);

#[tonic::async_trait]
impl Replication for ReplicationService {
    type AppendStream = ReceiverStream<Result<pb::AppendAck, Status>>;

    async fn append(
        &self,
        req: Request<Streaming<pb::AppendRequest>>,
    ) -> Result<Response<Self::AppendStream>, Status> {
        let caller = self.0.env.peer_auth.identify(&PeerConn::of(&req))?;
        let mut inbound = req.into_inner();
        let node = self.0.clone();
        let (tx, rx) = mpsc::channel(64);
        // Batches are appended as they arrive; acknowledgements follow in
        // order as each batch becomes durable.
        let (pending_tx, mut pending_rx) = mpsc::channel::<PendingAck>(256);
        let acker = node.clone();
        node.spawn_draining(async move {
            while let Some(pending) = pending_rx.recv().await {
                let reply = acker.acknowledge(pending).await;
                let fatal = reply.is_err();
                if tx.send(reply).await.is_err() || fatal {
                    break;
                }
            }
        });
        // A silent stream is dropped: the leader heartbeats far more often.
        let silence = Duration::from_millis(node.config.rpc_timeout_ms * 2);
        let errors = pending_tx.clone();
        let mut stopping = node.stopping.subscribe();
        let reader = node.clone();
        reader.spawn_draining(async move {
            loop {
                let next = tokio::select! {
                    biased;
                    // Shutting down: end the stream (after the acks already
                    // owed), so a graceful stop does not wait for the leader.
                    _ = stopping.wait_for(|s| *s) => break,
                    next = tokio::time::timeout(silence, inbound.message()) => next,
                };
                let msg = match next {
                    Ok(Ok(Some(msg))) => msg,
                    Ok(Ok(None)) => break,
                    Ok(Err(status)) => {
                        tracing::debug!(%status, "append stream broke");
                        break;
                    }
                    Err(_) => {
                        tracing::debug!("append stream silent; dropping it");
                        break;
                    }
                };
                // A forged sender is refused before the message is looked at.
                let claimed = msg.from.as_ref().map(|f| f.node_id);
                let accepted = match caller.may_claim(claimed) {
                    Ok(()) => node.accept_append(msg).await,
                    Err(status) => Err(status),
                };
                match accepted {
                    Ok(pending) => {
                        if pending_tx.send(pending).await.is_err() {
                            break;
                        }
                    }
                    Err(status) => {
                        // Garbage, a stranger or a broken engine: report it
                        // after the acks before it, then close the stream.
                        let _ = errors.send(PendingAck::Failed(status)).await;
                        break;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn install_snapshot(
        &self,
        req: Request<Streaming<pb::SnapshotChunk>>,
    ) -> Result<Response<pb::SnapshotAck>, Status> {
        let caller = self.0.env.peer_auth.identify(&PeerConn::of(&req))?;
        Ok(Response::new(
            self.0.receive_snapshot(caller, req.into_inner()).await?,
        ))
    }

    async fn request_vote(
        &self,
        req: Request<pb::VoteRequest>,
    ) -> Result<Response<pb::VoteReply>, Status> {
        let req = self.0.authorized(req, |r| r.from.as_ref())?;
        Ok(Response::new(self.0.handle_vote(req).await?))
    }

    async fn timeout_now(
        &self,
        req: Request<pb::TimeoutNowRequest>,
    ) -> Result<Response<pb::TimeoutNowReply>, Status> {
        let req = self.0.authorized(req, |r| r.from.as_ref())?;
        Ok(Response::new(self.0.clone().handle_timeout_now(req).await?))
    }
}

/// Accepted connections with Nagle's algorithm off: small acks must not
/// wait for the peer's delayed ACK (tens of milliseconds per round trip).
fn incoming_nodelay(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        conn.set_nodelay(true)?;
        Ok(conn)
    })
}

/// Runs a node until `shutdown` resolves: serves clients on `client` and
/// the other members on `peer` (or on `client` too, without one; real TCP,
/// Nagle off, TLS as `tls` says), and on the leader replicates to every
/// follower. On shutdown everything written is made durable before this
/// returns.
pub async fn serve(
    node: Arc<Node>,
    client: tokio::net::TcpListener,
    peer: Option<tokio::net::TcpListener>,
    tls: Option<crate::tls::ServerTls>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_incoming(
        node,
        incoming_nodelay(client),
        peer.map(incoming_nodelay),
        tls,
        shutdown,
    )
    .await
}

/// [`serve`] over any streams of accepted connections (the listening seam:
/// a simulation passes its own).
pub async fn serve_incoming<I, IO, IE>(
    node: Arc<Node>,
    client: I,
    peer: Option<I>,
    tls: Option<crate::tls::ServerTls>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()>
where
    I: tokio_stream::Stream<Item = Result<IO, IE>>,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // On shutdown, end the replication streams this node serves first: a
    // graceful stop waits for open requests, and the leader never ends its
    // append stream by itself. Both listeners stop on `stopping`.
    let stopping = node.clone();
    let shutdown = async move {
        shutdown.await;
        // A leader hands over first, while it still serves (its followers
        // must catch up and the target must hear `TimeoutNow`).
        stopping.hand_over_before_stop().await;
        stopping.stopping.send_replace(true);
    };
    let stopped = |node: &Node| {
        let mut stopping = node.stopping.subscribe();
        async move {
            let _ = stopping.wait_for(|s| *s).await;
        }
    };
    if node.config.is_fixed_leader() && node.leads() {
        let term = node.term();
        for peer in node
            .config
            .members
            .iter()
            .filter(|m| m.id != node.config.node_id)
        {
            node.spawn(node.clone().replicate(peer.clone(), term));
        }
        // A lone leader commits by itself; others wait for acks.
        let ready = node.step(kv_cluster::replica::Input::Durable {
            lsn: node.engine.durable_lsn(),
        });
        node.carry_out(ready).await?;
    }
    if node.config.elections() {
        node.spawn(node.clone().run_elections());
    }
    // The standard gRPC health service and server reflection, so ordinary
    // gRPC tools (grpcurl, grpc_health_probe) work against a node.
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<KvServer<KvService>>().await;
    health
        .set_serving::<ReplicationServer<ReplicationService>>()
        .await;
    // From here on the verdict follows the node (see `observe`).
    node.spawn(node.clone().watch_health(health.clone()));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(kv_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let (client_tls, peer_tls) = match tls {
        Some(t) => (Some(t.client), Some(t.peer)),
        None => (None, None),
    };
    let builder = |tls: Option<tonic::transport::ServerTlsConfig>| match tls {
        Some(tls) => tonic::transport::Server::builder().tls_config(tls),
        None => Ok(tonic::transport::Server::builder()),
    };
    let replication = ReplicationServer::new(ReplicationService(node.clone()));
    let clients = builder(client_tls)?
        .add_service(health_service)
        .add_service(reflection)
        .add_service(KvServer::new(KvService(node.clone())))
        .add_optional_service(peer.is_none().then(|| replication.clone()))
        .serve_with_incoming_shutdown(client, stopped(&node));
    let peers = async {
        match peer {
            Some(peer) => {
                builder(peer_tls)?
                    .add_service(replication)
                    .serve_with_incoming_shutdown(peer, stopped(&node))
                    .await
            }
            None => Ok(()),
        }
    };
    tokio::try_join!(clients, peers, async {
        shutdown.await;
        Ok(())
    })?;
    // Every task of the node ends before the final sync (`stopping` is set
    // by the shutdown future above): those spawned with `Node::spawn` at
    // once, the streams once they answered what they read (bounded: a
    // client that reads no replies does not hold the stop).
    node.tasks.close();
    let drain = Duration::from_millis(node.config.rpc_timeout_ms * 2);
    if tokio::time::timeout(drain, node.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            tasks = node.tasks.len(),
            "tasks still running {drain:?} after the stop; stopping anyway"
        );
    }
    let engine = node.engine.clone();
    node.env.offload.run(move || engine.flush()).await??;
    Ok(())
}
