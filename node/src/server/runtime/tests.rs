//! Tests of the runtime around the core: what the node carries out
//! (persisting before a vote reply leaves, the lease measured on the node's
//! clock, the transfer's RPCs, the replicator's send times, shutdown). The
//! protocol rules themselves are tested in `kv_cluster::replica`.

use super::*;
use crate::engine::Engine;
use crate::server::config::{Ack, Member, NodeConfig};
use crate::server::env::{Clock, NodeEnv, Offload, TcpDialer};
use crate::storage::{SimOptions, SimStorage};
use kv_cluster::replica::Role;
use tokio::sync::mpsc;
use tokio::time::Instant;

fn config() -> NodeConfig {
    let members = (1..=3)
        .map(|id| Member {
            id,
            addr: format!("127.0.0.1:{}", 1000 + id).parse().unwrap(),
            peer_addr: None,
        })
        .collect();
    NodeConfig {
        cluster_id: "c".into(),
        node_id: 1,
        listen: "127.0.0.1:1001".parse().unwrap(),
        peer_listen: None,
        tls: None,
        allow_plaintext_non_loopback: false,
        data_dir: "/kv".into(),
        leader: None,
        members,
        ack: Ack::Quorum,
        write_timeout_ms: 1000,
        rpc_timeout_ms: 200,
        heartbeat_ms: 20,
        election_timeout_ms: 60,
        batch_records_max: 16,
        inflight_bytes_max: 1 << 20,
        key_bytes_max: 64,
        value_bytes_max: 64,
        snapshot_wal_bytes: 0,
        segment_bytes_max: 1 << 20,
        metrics_listen: None,
        log_format: Default::default(),
    }
}

fn start(disk: &SimStorage) -> Arc<Node> {
    start_with(disk, config())
}

fn start_with(disk: &SimStorage, config: NodeConfig) -> Arc<Node> {
    let engine = Engine::open(Arc::new(disk.clone()), config.engine_config()).unwrap();
    let env = NodeEnv {
        dialer: Arc::new(TcpDialer),
        offload: Offload::Inline,
        clock: Clock::default(),
        sync_latency: Duration::ZERO,
        seed: 7,
        ..NodeEnv::default()
    };
    Node::with_env(config, Arc::new(engine), env).unwrap()
}

/// Makes `node` the leader of the next term, as the core would after
/// winning a vote (the other members are unreachable here).
async fn elect(node: &Arc<Node>) {
    // Past the largest election timeout.
    tokio::time::sleep(Duration::from_millis(
        2 * node.config.election_timeout_ms + 10,
    ))
    .await;
    let ready = node.step(Input::Tick);
    node.carry_out(ready).await.unwrap();
    assert_eq!(node.role(), Role::Candidate);
    let term = node.term();
    let ready = node.step(Input::VoteReply(replica::VoteReply {
        from: 2,
        term,
        granted: true,
        reason: String::new(),
    }));
    node.carry_out(ready).await.unwrap();
    assert_eq!(node.role(), Role::Leader);
}

/// Follower `peer` acknowledges, just now, everything the leader holds
/// durable (with the leader, a majority of 3): commits and a fresh lease.
async fn acknowledged_now(node: &Arc<Node>, peer: u64) {
    let last = node.engine.last_lsn();
    node.flusher.durable(last).await;
    let (next, term) = {
        let core = node.core();
        (core.next_for(peer).unwrap(), core.term())
    };
    // (Not `node.core()` inside the call: its guard would outlive the
    // argument and `step` would wait on the lock it holds.)
    let ready = node.step(Input::Ship {
        to: peer,
        term,
        prev_lsn: next - 1,
        last,
        bytes: 1,
    });
    let durable = node.durability();
    let sent = ready
        .messages
        .into_iter()
        .find_map(|g| match g.release(durable) {
            Ok(Message::Append { sent, .. }) => Some(sent),
            _ => None,
        })
        .expect("the leader ships");
    let ready = node.step(Input::AppendAck {
        ack: replica::AppendAck {
            from: peer,
            term: node.term(),
            success: true,
            durable_lsn: last,
            last_lsn: last,
            error: String::new(),
        },
        sent,
    });
    node.carry_out(ready).await.unwrap();
}

fn ask(candidate: u64, term: u64) -> pb::VoteRequest {
    pb::VoteRequest {
        from: Some(pb::Sender {
            cluster_id: "c".into(),
            node_id: candidate,
            term,
            to: 1,
        }),
        last_lsn: 0,
        last_term: 0,
        transfer: false,
    }
}

/// A vote is durable before it is granted: after a power loss right
/// after voting, the node refuses a second candidate in the same term.
#[tokio::test(flavor = "current_thread")]
async fn a_vote_survives_a_power_loss_right_after_it_was_granted() {
    let disk = SimStorage::new(SimOptions::default());
    let node = start(&disk);
    // Wait out the start-up window in which no vote is granted.
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert!(node.handle_vote(ask(2, 5)).await.unwrap().granted);
    drop(node);
    disk.crash();
    let node = start(&disk);
    tokio::time::sleep(Duration::from_millis(80)).await;
    let again = node.handle_vote(ask(3, 5)).await.unwrap();
    assert!(!again.granted, "voted twice in term 5: {again:?}");
    assert_eq!(node.status().voted_for, 2);
    // The same candidate asking again is fine; a later term is open.
    assert!(node.handle_vote(ask(2, 5)).await.unwrap().granted);
    assert!(node.handle_vote(ask(3, 6)).await.unwrap().granted);
}

/// A leader serves a read only while a majority's acknowledgements are
/// fresh (its lease); without them it refuses, however sure it is that
/// it leads.
#[tokio::test(flavor = "current_thread")]
async fn a_leader_without_a_fresh_majority_serves_no_read() {
    let disk = SimStorage::new(SimOptions::default());
    let mut config = config();
    config.write_timeout_ms = 100;
    let engine = Engine::open(Arc::new(disk.clone()), config.engine_config()).unwrap();
    let env = NodeEnv {
        dialer: Arc::new(TcpDialer),
        offload: Offload::Inline,
        clock: Clock::default(),
        sync_latency: Duration::ZERO,
        seed: 7,
        ..NodeEnv::default()
    };
    let node = Node::with_env(config, Arc::new(engine), env).unwrap();
    // It leads (as a partitioned old leader would believe it does), with
    // no acknowledgement yet: no lease, and its first entry uncommitted.
    elect(&node).await;
    let refused = node.confirm_read().await;
    assert!(refused.is_err(), "served a read with no lease");
    acknowledged_now(&node, 2).await;
    node.confirm_read().await.unwrap();
    // The lease runs out within the election timeout.
    tokio::time::sleep(Duration::from_millis(70)).await;
    assert!(
        node.confirm_read().await.is_err(),
        "the lease outlived its window"
    );
}

/// No vote for a candidate whose log is behind ours.
#[tokio::test(flavor = "current_thread")]
async fn no_vote_for_a_shorter_log() {
    let disk = SimStorage::new(SimOptions::default());
    let node = start(&disk);
    node.engine
        .append_records(vec![crate::engine::Record {
            lsn: 1,
            term: 1,
            op: Op::Put {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
            },
        }])
        .unwrap();
    tokio::time::sleep(Duration::from_millis(80)).await;
    let reply = node.handle_vote(ask(2, 5)).await.unwrap();
    assert!(!reply.granted, "granted to an empty log: {reply:?}");
    let mut longer = ask(3, 5);
    longer.last_lsn = 1;
    longer.last_term = 1;
    assert!(node.handle_vote(longer).await.unwrap().granted);
}

/// A candidate the leader handed over to gets a vote although the
/// voter heard from a leader just now; any other candidate does not.
/// Votes stay one per term.
#[tokio::test(flavor = "current_thread")]
async fn a_transfer_vote_is_not_held_back_by_a_recent_leader() {
    let disk = SimStorage::new(SimOptions::default());
    let node = start(&disk);
    // Just started, which counts as having heard a leader just now.
    let refused = node.handle_vote(ask(2, 5)).await.unwrap();
    assert!(!refused.granted, "{refused:?}");
    let mut transfer = ask(2, 5);
    transfer.transfer = true;
    assert!(node.handle_vote(transfer).await.unwrap().granted);
    let mut other = ask(3, 5);
    other.transfer = true;
    let again = node.handle_vote(other).await.unwrap();
    assert!(!again.granted, "voted twice in term 5: {again:?}");
}

/// While it hands leadership over, a leader takes no write and serves
/// no read, even with a fresh lease, and names the target to clients.
#[tokio::test(flavor = "current_thread")]
async fn a_leader_handing_over_refuses_reads_and_writes() {
    let disk = SimStorage::new(SimOptions::default());
    let node = start(&disk);
    elect(&node).await;
    acknowledged_now(&node, 3).await;
    node.confirm_read().await.unwrap();
    // Node 2 holds nothing yet: the transfer waits for it to catch up.
    let started = node.step(Input::Transfer { target: 2 });
    assert_eq!(started.verdict, Some(Verdict::Ok));
    let read = node.confirm_read().await.unwrap_err();
    assert_eq!(read.code(), tonic::Code::FailedPrecondition, "{read:?}");
    assert_eq!(
        read.metadata().get(super::super::LEADER_METADATA).unwrap(),
        "127.0.0.1:1002"
    );
    let last = node.engine.last_lsn();
    let put = Op::Put {
        key: b"k".to_vec(),
        value: b"v".to_vec(),
    };
    let write = node
        .write(put, kv_cluster::AckLevel::Quorum)
        .await
        .unwrap_err();
    assert_eq!(write.code(), tonic::Code::FailedPrecondition, "{write:?}");
    assert_eq!(node.engine.last_lsn(), last, "a refused write was appended");
}

/// `TimeoutNow` from a node that does not lead our term starts no
/// campaign.
#[tokio::test(flavor = "current_thread")]
async fn timeout_now_from_a_non_leader_starts_no_campaign() {
    let disk = SimStorage::new(SimOptions::default());
    let node = start(&disk);
    let term = node.term();
    let request = pb::TimeoutNowRequest {
        from: Some(pb::Sender {
            cluster_id: "c".into(),
            node_id: 2,
            term,
            to: 1,
        }),
    };
    let reply = node.clone().handle_timeout_now(request).await.unwrap();
    assert!(!reply.started, "{reply:?}");
    tokio::task::yield_now().await;
    assert_eq!(node.term(), term);
    assert_eq!(node.role(), Role::Follower);
}

/// A leader whose `TimeoutNow` goes unanswered steps down anyway: the
/// target may be campaigning with votes that skip the wait its lease
/// relies on. (Here nothing listens at node 2's address.)
#[tokio::test(flavor = "current_thread")]
async fn an_unconfirmed_handover_still_steps_down() {
    let disk = SimStorage::new(SimOptions::default());
    let node = start(&disk);
    elect(&node).await;
    acknowledged_now(&node, 2).await;
    let err = node.transfer_leadership(2).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert_eq!(node.role(), Role::Follower);
    assert!(
        node.confirm_read().await.is_err(),
        "served a read after handing over"
    );
}

/// `config()` with member `id` at `addr`.
fn with_member_at(id: u64, addr: std::net::SocketAddr) -> NodeConfig {
    let mut config = config();
    config.members.iter_mut().find(|m| m.id == id).unwrap().addr = addr;
    config
}

/// A leadership transfer whose caller gives up while `TimeoutNow` is
/// on its way (the future is dropped mid-RPC) still leaves this node
/// stepped down: the target may be campaigning with votes that skip
/// the wait the lease relies on. Here node 2's address accepts TCP
/// connections and never answers.
#[tokio::test(flavor = "current_thread")]
async fn a_transfer_whose_caller_gives_up_still_steps_down() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let disk = SimStorage::new(SimOptions::default());
    let node = start_with(&disk, with_member_at(2, silent.local_addr().unwrap()));
    elect(&node).await;
    acknowledged_now(&node, 2).await;
    // The RPC timeout is 200 ms: give up well before it.
    let gave_up =
        tokio::time::timeout(Duration::from_millis(50), node.transfer_leadership(2)).await;
    assert!(
        gave_up.is_err(),
        "the transfer ended by itself: {gave_up:?}"
    );
    // The transfer is the core's, not the caller's: no read is served
    // while `TimeoutNow` may be out, and the node steps down once it goes
    // unanswered.
    assert!(
        node.confirm_read().await.is_err(),
        "served a read after a dropped transfer"
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    while node.role() == Role::Leader {
        assert!(
            Instant::now() < deadline,
            "still leading after the transfer was dropped"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(node.core().transferring_to(), None);
    assert!(
        node.confirm_read().await.is_err(),
        "served a read after handing over"
    );
}

/// A transfer given up while the target is still catching up (no
/// `TimeoutNow` sent) leaves the leader leading and serving again.
#[tokio::test(flavor = "current_thread")]
async fn a_transfer_given_up_before_timeout_now_keeps_leading() {
    let disk = SimStorage::new(SimOptions::default());
    let mut config = config();
    config.write_timeout_ms = 200;
    let node = start_with(&disk, config);
    elect(&node).await;
    // Node 2 holds nothing of the log: the transfer waits for it.
    let gave_up =
        tokio::time::timeout(Duration::from_millis(50), node.transfer_leadership(2)).await;
    assert!(gave_up.is_err(), "{gave_up:?}");
    // At the transfer's deadline (the write timeout) the core gives up on
    // it, still leading: ticks carry the time in.
    tokio::time::sleep(Duration::from_millis(250)).await;
    acknowledged_now(&node, 3).await;
    let _ = node.step(Input::Tick);
    assert_eq!(node.role(), Role::Leader);
    assert_eq!(node.core().transferring_to(), None);
    node.confirm_read().await.unwrap();
}

/// A follower whose `Append` handler reads the first request (the
/// reconnect probe), notes when it heard it, and only then, after
/// `delay`, answers the stream and acknowledges that probe alone.
struct SlowFollower {
    heard: Arc<std::sync::Mutex<Vec<Instant>>>,
    delay: Duration,
}

#[tonic::async_trait]
impl pb::replication_server::Replication for SlowFollower {
    type AppendStream = tokio_stream::wrappers::ReceiverStream<Result<pb::AppendAck, Status>>;

    async fn append(
        &self,
        req: tonic::Request<tonic::Streaming<pb::AppendRequest>>,
    ) -> Result<tonic::Response<Self::AppendStream>, Status> {
        let mut inbound = req.into_inner();
        let probe = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("no probe"))?;
        self.heard.lock().unwrap().push(Instant::now());
        tokio::time::sleep(self.delay).await;
        let (tx, rx) = mpsc::channel(4);
        let ack = pb::AppendAck {
            term: probe.from.map_or(0, |f| f.term),
            success: true,
            durable_lsn: probe.prev_lsn,
            last_lsn: probe.prev_lsn,
            error: String::new(),
        };
        tx.send(Ok(ack)).await.unwrap();
        // Keep the stream open, acknowledging nothing more.
        tokio::spawn(async move {
            while let Ok(Some(_)) = inbound.message().await {}
            drop(tx);
        });
        Ok(tonic::Response::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
    }

    async fn install_snapshot(
        &self,
        _: tonic::Request<tonic::Streaming<pb::SnapshotChunk>>,
    ) -> Result<tonic::Response<pb::SnapshotAck>, Status> {
        Err(Status::unimplemented("test follower"))
    }

    async fn request_vote(
        &self,
        _: tonic::Request<pb::VoteRequest>,
    ) -> Result<tonic::Response<pb::VoteReply>, Status> {
        Err(Status::unimplemented("test follower"))
    }

    async fn timeout_now(
        &self,
        _: tonic::Request<pb::TimeoutNowRequest>,
    ) -> Result<tonic::Response<pb::TimeoutNowReply>, Status> {
        Err(Status::unimplemented("test follower"))
    }
}

/// The lease counts from when a request was sent, never from later: the
/// reconnect probe's send time is taken before it leaves, not when the
/// follower's stream answers (by then the follower has heard it, and
/// its own wait before voting started earlier than that).
#[tokio::test(flavor = "current_thread")]
async fn the_probe_counts_for_the_lease_from_before_it_was_sent() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heard = Arc::new(std::sync::Mutex::new(Vec::new()));
    let follower = SlowFollower {
        heard: heard.clone(),
        delay: Duration::from_millis(150),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::replication_server::ReplicationServer::new(follower))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let disk = SimStorage::new(SimOptions::default());
    let mut config = with_member_at(2, addr);
    config.rpc_timeout_ms = 1000;
    let node = start_with(&disk, config);
    // Taking office starts a replicator per follower.
    elect(&node).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    let acked_sent = loop {
        if let Some(sent) = node.core().peers()[&2].acked_sent {
            break node.started + Duration::from_micros(sent);
        }
        assert!(
            Instant::now() < deadline,
            "the probe was never acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let heard_at = *heard.lock().unwrap().last().unwrap();
    assert!(
        acked_sent <= heard_at,
        "the probe counts from {:?} after the follower heard it",
        acked_sent - heard_at
    );
}

/// Every task a node spawns ends when it stops: after `serve` returns,
/// nothing but the caller holds the node (here a fixed leader whose
/// replicators retry unreachable followers forever, and a running
/// election timer on a second node).
#[tokio::test(flavor = "current_thread")]
async fn no_task_outlives_a_stopped_node() {
    for leader in [Some(1), None] {
        let disk = SimStorage::new(SimOptions::default());
        let mut config = config();
        config.leader = leader;
        let node = start_with(&disk, config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(super::super::serve(
            node.clone(),
            listener,
            None,
            None,
            async {
                let _ = stopped.await;
            },
        ));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(Arc::strong_count(&node) > 1, "nothing ran");
        stop.send(()).unwrap();
        served.await.unwrap().unwrap();
        assert_eq!(
            Arc::strong_count(&node),
            1,
            "tasks of the node (leader {leader:?}) still run after it stopped"
        );
    }
}
