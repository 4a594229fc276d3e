//! A cluster of real `kv serve` processes on 127.0.0.1 (3 members unless a
//! test asks for 4 or 5; test-chosen ports, temporary data directories),
//! driven with the real `kv` client and, for malformed replication traffic,
//! a raw gRPC client. Every node is started with the stdin lifeline
//! (`common::process`), so none outlives a killed test binary.
//!
//! Covered, with node 1 as a fixed leader: convergence (same applied LSN
//! and digest everywhere), redirects from a follower, a SIGKILLed follower
//! catching up through the log and through a snapshot install, a SIGKILLed
//! leader (also under concurrent load) losing no `quorum` write, `outcome
//! unknown` without a majority (and `local` succeeding), a stale leader
//! fenced by a higher term, bad input and bad replication traffic (wrong
//! cluster id, non-member sender, bad CRC) refused before any WAL, gRPC
//! health and reflection, `kv cluster up`, `kv shell`, SIGTERM of one node.
//! With elections: the elected leader SIGKILLed repeatedly and `kv
//! transfer-leader` under load, losing no `quorum` write. The `Kv.Batch`
//! stream: each command answered as its unary call would be, garbage
//! closing the stream with nothing written, and SIGKILL of the elected
//! leader under batch load. With 4 and 5 members (elections on): a majority
//! is three, so a 4-member cluster commits with one member down but not
//! with two, and a 5-member one elects and commits with two down (the
//! leader among them) but not with three; SIGKILL of a 5-member cluster's
//! leader under load loses no `quorum` write. The lifeline: a SIGKILLed
//! test process or `kv cluster up` leaves no node or REPL running. The
//! README's Tests section lists the details.

// Tests unwrap: a failed unwrap is a test failure with its reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::process::{self, KV, Pid};
use kv_proto::v1 as pb;
use nix::sys::signal::Signal;

#[test]
fn writes_replicate_and_every_node_converges() {
    let cluster = Cluster::start();
    for i in 0..20 {
        cluster.put(&format!("k{i}"), &format!("v{i}")).unwrap();
    }
    let out = cluster.kv(&["del", "k3"], &cluster.endpoint(1));
    assert!(out.status.success());
    assert_eq!(cluster.get("k7"), "v7");
    assert_eq!(cluster.get("k3"), "(nil)");
    let (applied, _) = cluster.wait_converged();
    assert_eq!(applied, 21);
    for id in 1..=3 {
        let s = cluster.status_of(id).unwrap();
        assert_eq!(s.keys, 19, "node {id}");
        assert_eq!(s.commit_lsn, 21, "node {id}");
        assert_eq!(s.role, if id == 1 { "leader" } else { "follower" });
    }
    // A stale read on a follower reports the applied LSN it reflects.
    let out = cluster.kv(
        &["get", "k7", "--consistency", "stale"],
        &cluster.endpoint(2),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim_end(),
        "v7\t(applied LSN 21)"
    );
    // `kv status` prints one row per node.
    let out = cluster.kv(&["status"], &cluster.all_endpoints());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 4, "{text}");
}

#[test]
fn a_write_sent_to_a_follower_lands_on_the_leader() {
    let cluster = Cluster::start();
    let out = cluster.kv(&["put", "redirected", "yes"], &cluster.endpoint(3));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let leader = cluster.status_of(1).unwrap();
    assert_eq!(leader.last_lsn, 1);
    assert_eq!(cluster.get("redirected"), "yes");
}

#[test]
fn a_killed_follower_catches_up_after_restart() {
    let mut cluster = Cluster::start();
    for i in 0..10 {
        cluster.put(&format!("a{i}"), "1").unwrap();
    }
    cluster.kill(3);
    // A majority (leader + node 2) still commits.
    for i in 0..30 {
        cluster.put(&format!("b{i}"), "2").unwrap();
    }
    let lagging = cluster.status_of(1).unwrap();
    let node3 = lagging.followers.iter().find(|f| f.node_id == 3).unwrap();
    assert!(node3.lag > 0 && !node3.connected, "{node3:?}");
    cluster.start_node(3);
    let (applied, _) = cluster.wait_converged();
    assert_eq!(applied, 40);
}

#[test]
fn a_killed_leader_keeps_every_quorum_acknowledged_write() {
    let mut cluster = Cluster::start();
    let mut acked = Vec::new();
    for i in 0..40 {
        let key = format!("q{i}");
        if cluster.put(&key, &format!("v{i}")).is_ok() {
            acked.push((key, format!("v{i}")));
        }
        if i == 25 {
            cluster.kill(1);
            cluster.start_node(1);
        }
    }
    assert!(acked.len() >= 30, "most writes succeed: {}", acked.len());
    cluster.wait_converged();
    for (key, value) in &acked {
        assert_eq!(&cluster.get(key), value);
        // And on every follower, read locally.
        for id in 2..=3 {
            let out = cluster.kv(
                &["get", key, "--consistency", "stale"],
                &cluster.endpoint(id),
            );
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.starts_with(value.as_str()), "node {id}, {key}: {text}");
        }
    }
}

#[test]
fn oversized_keys_and_values_are_invalid_arguments() {
    let cluster = Cluster::start();
    let key = "k".repeat(1025);
    let out = cluster.kv(&["put", &key, "v"], &cluster.endpoint(1));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("key is 1025 bytes"), "{err}");
    assert_eq!(cluster.status_of(1).unwrap().last_lsn, 0, "nothing written");
}

fn raw_append(addr: SocketAddr, req: pb::AppendRequest) -> Result<pb::AppendAck, tonic::Status> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut client =
            pb::replication_client::ReplicationClient::connect(format!("http://{addr}"))
                .await
                .unwrap();
        let mut acks = client
            .append(tokio_stream::iter(vec![req]))
            .await?
            .into_inner();
        match acks.message().await? {
            Some(ack) => Ok(ack),
            None => Err(tonic::Status::aborted("no ack")),
        }
    })
}

/// Streams one (last) snapshot chunk from `from` to the node at `addr`.
fn raw_snapshot(
    addr: SocketAddr,
    from: Option<pb::Sender>,
) -> Result<pb::SnapshotAck, tonic::Status> {
    let chunk = pb::SnapshotChunk {
        from,
        lsn: 5,
        term: 1,
        offset: 0,
        data: b"not a snapshot".to_vec(),
        last: true,
        total_bytes: 14,
    };
    runtime().block_on(async move {
        let mut client =
            pb::replication_client::ReplicationClient::connect(format!("http://{addr}"))
                .await
                .unwrap();
        Ok(client
            .install_snapshot(tokio_stream::iter(vec![chunk]))
            .await?
            .into_inner())
    })
}

/// A sender `node_id` of cluster `cluster_id`, in term 1, to node 2.
fn sender(cluster_id: &str, node_id: u64) -> Option<pb::Sender> {
    Some(pb::Sender {
        cluster_id: cluster_id.into(),
        node_id,
        term: 1,
        to: 2,
    })
}

#[test]
fn bad_replication_traffic_is_refused_and_never_reaches_the_wal() {
    let cluster = Cluster::start();
    let follower = cluster.addrs[1];
    let record = pb::LogRecord {
        lsn: 1,
        term: 1,
        key: b"x".to_vec(),
        value: b"y".to_vec(),
        delete: false,
        crc: 0,
    };
    let check = |req: pb::AppendRequest, code: tonic::Code| {
        let err = raw_append(follower, req).unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
    };
    let base = pb::AppendRequest {
        from: sender(&cluster.cluster_id, 1),
        prev_lsn: 0,
        prev_term: 0,
        records: vec![record.clone()],
        commit_lsn: 0,
        ..Default::default()
    };
    // Strangers, on the append stream and the snapshot stream alike: a
    // wrong cluster id, a non-member, this node itself, a member that is
    // not the (fixed) leader, and the leader's message meant for node 3.
    let mut misaddressed = sender(&cluster.cluster_id, 1).unwrap();
    misaddressed.to = 3;
    let strangers = [
        sender("other", 1),
        sender(&cluster.cluster_id, 9),
        sender(&cluster.cluster_id, 2),
        sender(&cluster.cluster_id, 3),
        Some(misaddressed),
    ];
    for from in strangers {
        check(
            pb::AppendRequest {
                from: from.clone(),
                ..base.clone()
            },
            tonic::Code::PermissionDenied,
        );
        let err = raw_snapshot(follower, from.clone()).unwrap_err();
        assert_eq!(
            err.code(),
            tonic::Code::PermissionDenied,
            "snapshot from {from:?}: {err:?}"
        );
    }
    // A record whose CRC does not match.
    check(base.clone(), tonic::Code::InvalidArgument);
    // Records that are not consecutive.
    let mut gap = record.clone();
    gap.lsn = 5;
    check(
        pb::AppendRequest {
            records: vec![gap],
            ..base.clone()
        },
        tonic::Code::InvalidArgument,
    );
    let s = cluster.status_of(2).unwrap();
    assert_eq!((s.last_lsn, s.keys), (0, 0), "nothing reached the WAL");
    // The follower still serves its real leader.
    cluster.put("after", "garbage").unwrap();
    cluster.wait_converged();
}

#[test]
fn without_a_majority_a_quorum_write_is_outcome_unknown_and_local_succeeds() {
    let mut cluster = Cluster::start();
    cluster.kill(2);
    cluster.kill(3);
    let out = cluster.kv(&["put", "lonely", "1"], &cluster.endpoint(1));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("outcome unknown"), "{err}");
    // On a batch stream, the client's own deadline ends the wait first.
    runtime().block_on(async {
        let channel = connect(cluster.addrs[0]).await;
        let stream =
            kv_node::client::batch_client::BatchClient::open(channel, Duration::from_millis(300))
                .await
                .unwrap();
        let err = stream.put(put_req("batched", "1")).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(
            err.message()
                .contains("outcome unknown: no answer on the batch stream within 300 ms"),
            "{err:?}"
        );
    });
    // `local` needs only the leader's own fsync.
    let out = cluster.kv(
        &["put", "local", "1", "--ack", "local"],
        &cluster.endpoint(1),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Uncommitted writes are invisible to reads at the leader...
    assert_eq!(cluster.get("local"), "(nil)");
    // ...until a majority is back: then both writes commit.
    cluster.start_node(2);
    cluster.wait_until(Duration::from_secs(20), "the writes commit", |c| {
        c.status_of(1).is_some_and(|s| s.commit_lsn == 3)
    });
    assert_eq!(cluster.get("lonely"), "1");
    assert_eq!(cluster.get("local"), "1");
    assert_eq!(cluster.get("batched"), "1", "an unknown outcome may commit");
}

#[test]
fn nodes_serve_grpc_health_and_reflection() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let cluster = Cluster::start();
    let url = format!("http://{}", cluster.addrs[1]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let channel = tonic::transport::Endpoint::from_shared(url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = HealthClient::new(channel.clone());
        let reply = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "kv.v1.Kv".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.status, ServingStatus::Serving as i32);

        let mut reflection = ServerReflectionClient::new(channel);
        let request = tonic_reflection::pb::v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut replies = reflection
            .server_reflection_info(tokio_stream::iter(vec![request]))
            .await
            .unwrap()
            .into_inner();
        let reply = replies.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
            panic!("unexpected reflection reply {reply:?}");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for wanted in ["kv.v1.Kv", "kv.v1.Replication", "grpc.health.v1.Health"] {
            assert!(
                names.iter().any(|n| n == wanted),
                "{wanted} not in {names:?}"
            );
        }
    });
}

#[test]
fn kv_cluster_up_starts_every_node_and_sigterm_stops_them_cleanly() {
    // Reuse the config writer, but run the nodes through `kv cluster up`.
    let mut cluster = Cluster::start();
    for id in 1..=3 {
        cluster.kill(id);
    }
    let configs = cluster.dir.path().join("configs");
    std::fs::create_dir_all(&configs).unwrap();
    for id in 1..=3 {
        std::fs::copy(cluster.config(id), configs.join(format!("node{id}.toml"))).unwrap();
    }
    let logs = cluster.dir.path().join("logs");
    let mut up = Command::new(KV)
        .args(["cluster", "up"])
        .arg(&configs)
        .arg("--log-dir")
        .arg(&logs)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    cluster.wait_until(Duration::from_secs(20), "all three nodes answer", |c| {
        (1..=3).all(|id| c.status_of(id).is_some())
    });
    cluster.put("up", "yes").unwrap();
    let status = Command::new("kill")
        .args(["-TERM", &up.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = up.wait().unwrap();
    assert!(exit.success(), "kv cluster up exited with {exit:?}");
    for id in 1..=3 {
        let log = std::fs::read_to_string(logs.join(format!("node{id}.log"))).unwrap();
        assert!(log.contains("stopped cleanly"), "node {id} log: {log}");
        assert!(cluster.status_of(id).is_none(), "node {id} still answers");
    }
}

#[test]
fn kv_shell_runs_the_repl_commands_against_the_cluster() {
    use std::io::Write;
    let cluster = Cluster::start();
    let mut shell = Command::new(KV)
        .args(["shell", "--endpoints", &cluster.endpoint(2)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let script = "PUT a hello world\nGET a\nput b 2\nSIZE\nDEL a\nget a\nFLUSH\nSNAP\nFROB\nEXIT\n";
    shell
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = shell.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[..7],
        ["OK", "hello world", "OK", "2", "OK", "(nil)", "OK"],
        "{text}"
    );
    assert!(
        lines[7].starts_with("ERR this command acts on a local engine"),
        "{text}"
    );
    assert_eq!(lines[8], "ERR unknown command 'FROB' (try HELP)");
    assert_eq!(lines.len(), 9);
}

#[test]
fn a_stale_leader_is_fenced_by_a_higher_term() {
    let mut cluster = Cluster::start();
    cluster.put("before", "1").unwrap();
    cluster.wait_converged();
    for id in 1..=3 {
        cluster.kill(id);
    }
    // The followers have seen term 7 (as if a newer leader had been elected):
    // the configured leader, still in term 1, is now stale.
    for id in 2..=3 {
        let dir = cluster.dir.path().join(format!("node{id}"));
        let raised = kv_node::server::term::TermState {
            term: 7,
            voted_for: None,
        };
        kv_node::server::term::persist(&kv_node::FsStorage, &dir, raised).unwrap();
    }
    for id in 1..=3 {
        cluster.start_node(id);
    }
    // Its appends are refused with term 7; it persists that term and steps
    // down instead of accepting writes it could never commit.
    cluster.wait_until(
        Duration::from_secs(20),
        "the stale leader steps down",
        |c| {
            c.status_of(1)
                .is_some_and(|s| s.term == 7 && s.role == "follower")
        },
    );
    let out = cluster.kv(&["put", "after", "2"], &cluster.endpoint(1));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not leader"));
    for id in 2..=3 {
        let s = cluster.status_of(id).unwrap();
        assert_eq!(
            (s.term, s.last_lsn),
            (7, 1),
            "node {id} took nothing from the stale leader"
        );
    }
    // The raised term is durable on the old leader too.
    cluster.kill(1);
    let dir = cluster.dir.path().join("node1");
    assert_eq!(
        kv_node::server::term::load(&kv_node::FsStorage, &dir)
            .unwrap()
            .term,
        7
    );
}

#[test]
fn a_follower_behind_the_leaders_log_catches_up_through_snapshot_install() {
    // Small segments and frequent snapshots, so the leader deletes the WAL
    // a stopped follower would need.
    let mut cluster = Cluster::start_with("segment_bytes_max = 4096\nsnapshot_wal_bytes = 8192");
    cluster.put("early", "1").unwrap();
    cluster.wait_converged();
    cluster.kill(3);
    cluster.bench_writes(800, 100);
    // Restart the leader so the records are not in its memory either.
    cluster.kill(1);
    cluster.start_node(1);
    let leader = cluster.status_of(1).unwrap();
    assert!(
        leader.snapshot_lsn > 2,
        "the leader snapshotted: {leader:?}"
    );
    let first_wal = cluster.first_wal_lsn(1);
    // With those records gone from the leader's WAL and memory, catching up
    // is possible only through snapshot install.
    assert!(
        first_wal > 2,
        "the leader deleted the WAL node 3 needs (first LSN {first_wal})"
    );
    cluster.start_node(3);
    let (applied, _) = cluster.wait_converged();
    assert_eq!(applied, 801);
    let node3 = cluster.status_of(3).unwrap();
    assert!(
        node3.snapshot_lsn > 2,
        "node 3 installed a snapshot: {node3:?}"
    );
    // And it keeps following after the install.
    cluster.put("late", "2").unwrap();
    cluster.wait_converged();
}

/// A snapshot of several chunks (about 5 MiB of state, 1 MiB chunks)
/// streams from the leader's file into the follower's temp file and
/// installs: the follower converges, holds the snapshot, and no temp file
/// is left behind.
#[test]
fn a_snapshot_of_many_chunks_streams_to_a_follower_and_installs() {
    let mut cluster =
        Cluster::start_with("segment_bytes_max = 262144\nsnapshot_wal_bytes = 1048576");
    cluster.put("early", "1").unwrap();
    cluster.wait_converged();
    cluster.kill(3);
    cluster.bench_writes(5000, 1000);
    cluster.kill(1);
    cluster.start_node(1);
    let first_wal = cluster.first_wal_lsn(1);
    assert!(
        first_wal > 2,
        "the leader deleted the WAL node 3 needs (first LSN {first_wal})"
    );
    cluster.start_node(3);
    let (applied, _) = cluster.wait_converged();
    assert_eq!(applied, 5001);
    let node3 = cluster.status_of(3).unwrap();
    assert!(
        node3.snapshot_lsn > 2,
        "node 3 installed a snapshot: {node3:?}"
    );
    let files: Vec<(String, u64)> = std::fs::read_dir(cluster.dir.path().join("node3"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().into_string().unwrap(),
                e.metadata().unwrap().len(),
            )
        })
        .collect();
    let installed = format!("snap-{:020}.snap", node3.snapshot_lsn);
    let size = files
        .iter()
        .find(|(name, _)| *name == installed)
        .map(|(_, len)| *len);
    assert!(
        size.is_some_and(|len| len > 3 << 20),
        "a snapshot of several 1 MiB chunks: {files:?}"
    );
    assert!(
        !files.iter().any(|(name, _)| name.ends_with(".snap.recv")),
        "no temp file left: {files:?}"
    );
    cluster.put("late", "2").unwrap();
    cluster.wait_converged();
}

#[test]
fn sigkill_of_the_leader_under_concurrent_load_loses_no_quorum_write() {
    let mut cluster = Cluster::start();
    let load = Load::start(&cluster, 8);
    std::thread::sleep(Duration::from_millis(500));
    cluster.kill(1);
    std::thread::sleep(Duration::from_millis(200));
    cluster.start_node(1);
    std::thread::sleep(Duration::from_millis(500));
    let acked = load.stop();
    assert!(
        acked.len() > 100,
        "the load ran: {} writes acknowledged",
        acked.len()
    );
    cluster.wait_converged();
    assert_every_node_has(&cluster, &acked);
}

#[test]
fn sigterm_stops_a_single_node_cleanly_while_the_others_run() {
    let mut cluster = Cluster::start();
    cluster.put("a", "1").unwrap();
    for id in [2, 1] {
        let mut child = cluster.nodes[id - 1].take().unwrap();
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "node {id} did not stop on SIGTERM (the others still run)"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "node {id}: {status:?}");
        let log =
            std::fs::read_to_string(cluster.dir.path().join(format!("node{id}.log"))).unwrap();
        assert!(log.contains("stopped cleanly"), "node {id}: {log}");
        cluster.start_node(id);
    }
    cluster.put("b", "2").unwrap();
    let (applied, _) = cluster.wait_converged();
    assert_eq!(applied, 2);
}

/// Elections: SIGKILL the elected leader under a write load, three times. A
/// new leader takes writes each time, the old one rejoins as a follower,
/// and every write acknowledged at `quorum` is on every node at the end.
#[test]
fn killing_the_elected_leader_repeatedly_fails_over_and_loses_no_quorum_write() {
    let mut cluster = Cluster::start_elected("election_timeout_ms = 300\n");
    cluster.wait_leader();
    let load = Load::start(&cluster, 4);
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(400));
        let old = cluster.wait_leader();
        let before = load.acked();
        let killed = Instant::now();
        cluster.kill(old);
        // A new leader takes writes: the acknowledged count grows again.
        cluster.wait_until(
            Duration::from_secs(20),
            &format!("round {round}: writes resume after node {old} was killed"),
            |_| load.acked() > before + 10,
        );
        let new = cluster.wait_leader();
        assert_ne!(new, old, "round {round}: a new leader");
        eprintln!(
            "round {round}: node {old} killed, node {new} leads; writes resumed within {:?}",
            killed.elapsed()
        );
        cluster.start_node(old);
        cluster.wait_until(
            Duration::from_secs(20),
            &format!("round {round}: node {old} rejoins as a follower"),
            |c| {
                c.status_of(old)
                    .is_some_and(|s| s.role == "follower" && s.leader_id != 0)
            },
        );
    }
    let acked = load.stop();
    cluster.wait_converged();
    assert_every_node_has(&cluster, &acked);
}

/// `kv transfer-leader` moves leadership to the named follower while
/// writers keep writing (their requests are redirected, none is lost), and
/// then back; the old leader follows the new one. A fixed-leader cluster
/// refuses a transfer.
#[test]
fn transfer_leader_hands_over_under_load_and_loses_no_quorum_write() {
    let cluster = Cluster::start_elected("election_timeout_ms = 300\n");
    let first = cluster.wait_leader();
    let load = Load::start(&cluster, 4);
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        let old = cluster.wait_leader();
        let target = old % 3 + 1;
        let before = load.acked();
        let started = Instant::now();
        let out = cluster.kv(
            &["transfer-leader", &target.to_string()],
            &cluster.all_endpoints(),
        );
        assert!(
            out.status.success(),
            "round {round}: transfer to node {target}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            said.starts_with(&format!("OK node {target} leads term")),
            "{said}"
        );
        assert_eq!(cluster.wait_leader(), target, "round {round}");
        let old_status = cluster.status_of(old).unwrap();
        assert_eq!(old_status.role, "follower", "round {round}: {old_status:?}");
        cluster.wait_until(
            Duration::from_secs(20),
            &format!("round {round}: writes go on after the transfer to node {target}"),
            |_| load.acked() > before + 10,
        );
        eprintln!(
            "round {round}: node {old} -> node {target} in {:?}",
            started.elapsed()
        );
    }
    assert_ne!(first, 0);
    let acked = load.stop();
    cluster.wait_converged();
    assert_every_node_has(&cluster, &acked);

    // Bad targets are refused, and change nothing.
    let leader = cluster.wait_leader();
    let refused = |out: Output, why: &str| {
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success() && stderr.contains(why), "{stderr}");
    };
    refused(
        cluster.kv(&["transfer-leader", "9"], &cluster.all_endpoints()),
        "not a member",
    );
    assert_eq!(cluster.wait_leader(), leader);
    let fixed = Cluster::start();
    refused(
        fixed.kv(&["transfer-leader", "2"], &fixed.all_endpoints()),
        "elections are off",
    );
}

/// Every acknowledged write is on every node, with its value (stale reads,
/// so each node answers for itself).
/// With `load` running on an elected cluster: `writes` acknowledged, a
/// SIGKILL of the leader, `writes` more acknowledged while it stays down,
/// and a new leader. Returns the old leader and every acknowledged write.
fn kill_the_leader_under(
    cluster: &mut Cluster,
    load: Load,
    writes: usize,
) -> (usize, Vec<(String, String)>) {
    let old = cluster.wait_leader();
    cluster.wait_until(
        Duration::from_secs(20),
        &format!("{writes} writes before the kill"),
        |_| load.acked() >= writes,
    );
    cluster.kill(old);
    let before = load.acked();
    cluster.wait_until(
        Duration::from_secs(20),
        &format!("{writes} more writes after node {old} was killed"),
        |_| load.acked() >= before + writes,
    );
    let acked = load.stop();
    assert_ne!(cluster.wait_leader(), old, "a new leader");
    (old, acked)
}

fn assert_every_node_has(cluster: &Cluster, acked: &[(String, String)]) {
    assert_nodes_have(cluster, &cluster.ids().collect::<Vec<_>>(), acked);
}

/// Every acknowledged write is on each of the nodes `ids`.
fn assert_nodes_have(cluster: &Cluster, ids: &[usize], acked: &[(String, String)]) {
    use kv_node::client::cluster_client::Client;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for &id in ids {
        let client = Client::new(vec![cluster.addrs[id - 1]], Duration::from_millis(2000));
        for (key, value) in acked {
            let req = pb::GetRequest {
                key: key.clone().into_bytes(),
                consistency: pb::ReadConsistency::Stale as i32,
            };
            let reply = rt.block_on(client.get(req)).unwrap();
            assert!(
                reply.found && reply.value == value.as_bytes(),
                "node {id} lost {key}"
            );
        }
    }
}

/// Writers putting unique keys at `quorum` until stopped, remembering what
/// was acknowledged.
struct Load {
    acked: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    writers: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(cluster: &Cluster, writers: usize) -> Load {
        use kv_node::client::cluster_client::Client;
        let acked = std::sync::Arc::<std::sync::Mutex<Vec<(String, String)>>>::default();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writers = (0..writers)
            .map(|w| {
                let (endpoints, acked, stop) = (cluster.addrs.clone(), acked.clone(), stop.clone());
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    let client = Client::new(endpoints, Duration::from_millis(2000));
                    let mut i = 0;
                    while !stop.load(std::sync::atomic::Ordering::Acquire) {
                        let (key, value) = (format!("w{w}-{i}"), format!("v{w}-{i}"));
                        let req = pb::PutRequest {
                            key: key.clone().into_bytes(),
                            value: value.clone().into_bytes(),
                            ack: pb::AckLevel::Quorum as i32,
                        };
                        if rt.block_on(client.put(req)).is_ok() {
                            acked.lock().unwrap().push((key, value));
                        } else {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        i += 1;
                    }
                })
            })
            .collect();
        Load {
            acked,
            stop,
            writers,
        }
    }

    /// `callers` concurrent writers sharing one `Kv.Batch` stream, opened
    /// to each node in turn until one leads, and reopened whenever it breaks
    /// or its node stops leading.
    fn start_batch(cluster: &Cluster, callers: usize) -> Load {
        let acked = std::sync::Arc::<std::sync::Mutex<Vec<(String, String)>>>::default();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (addrs, shared, stopping) = (cluster.addrs.clone(), acked.clone(), stop.clone());
        let writer = std::thread::spawn(move || {
            runtime().block_on(async move {
                let mut round = 0;
                while !stopping.load(std::sync::atomic::Ordering::Acquire) {
                    round += 1;
                    let addr = addrs[round % addrs.len()];
                    let opened = async {
                        let channel =
                            tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                                .ok()?
                                .connect_timeout(Duration::from_millis(500))
                                .connect()
                                .await
                                .ok()?;
                        kv_node::client::batch_client::BatchClient::open(
                            channel,
                            Duration::from_secs(5),
                        )
                        .await
                        .ok()
                    };
                    let Some(stream) = opened.await else {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    };
                    let tasks: Vec<_> = (0..callers)
                        .map(|c| {
                            let (stream, acked, stop) =
                                (stream.clone(), shared.clone(), stopping.clone());
                            tokio::spawn(async move {
                                let mut i = 0;
                                while !stop.load(std::sync::atomic::Ordering::Acquire) {
                                    let key = format!("b{c}-{round}-{i}");
                                    let value = format!("v{i}");
                                    i += 1;
                                    match stream.put(put_req(&key, &value)).await {
                                        Ok(_) => acked.lock().unwrap().push((key, value)),
                                        // Broken, or not the leader: next node.
                                        Err(e)
                                            if e.message().contains("batch stream")
                                                || e.code() == tonic::Code::FailedPrecondition =>
                                        {
                                            return;
                                        }
                                        // Outcome unknown (e.g. no majority yet): go on.
                                        Err(_) => {
                                            tokio::time::sleep(Duration::from_millis(20)).await
                                        }
                                    }
                                }
                            })
                        })
                        .collect();
                    for t in tasks {
                        t.await.unwrap();
                    }
                }
            });
        });
        Load {
            acked,
            stop,
            writers: vec![writer],
        }
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Stops the writers; what they had acknowledged.
    fn stop(self) -> Vec<(String, String)> {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        for w in self.writers {
            w.join().unwrap();
        }
        self.acked.lock().unwrap().clone()
    }
}

/// A current-thread runtime for a test's own gRPC calls.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A gRPC channel to `addr`.
async fn connect(addr: SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn batch_client(addr: SocketAddr) -> kv_node::client::batch_client::BatchClient {
    let channel = connect(addr).await;
    kv_node::client::batch_client::BatchClient::open(channel, Duration::from_secs(10))
        .await
        .unwrap()
}

fn put_req(key: &str, value: &str) -> pb::PutRequest {
    pb::PutRequest {
        key: key.into(),
        value: value.into(),
        ack: pb::AckLevel::Quorum as i32,
    }
}

#[test]
fn the_batch_stream_answers_each_command_as_its_unary_call_would() {
    let cluster = Cluster::start();
    let rt = runtime();
    rt.block_on(async {
        let stream = batch_client(cluster.addrs[0]).await;
        // Many concurrent callers on one stream, each with its own outcome.
        let mut callers = Vec::new();
        for c in 0..16 {
            let stream = stream.clone();
            callers.push(tokio::spawn(async move {
                let mut lsns = Vec::new();
                for i in 0..10 {
                    let reply = stream
                        .put(put_req(&format!("c{c}-{i}"), &format!("v{c}-{i}")))
                        .await
                        .unwrap();
                    lsns.push(reply.lsn);
                }
                lsns
            }));
        }
        let mut lsns = Vec::new();
        for caller in callers {
            lsns.extend(caller.await.unwrap());
        }
        lsns.sort_unstable();
        assert_eq!(lsns, (1..=160).collect::<Vec<u64>>(), "one LSN per write");

        // Many more callers at once than a message carries (1,024) or a
        // node keeps in flight per stream (4,096): all are answered.
        let many: Vec<_> = (0..10_000)
            .map(|i| {
                let stream = stream.clone();
                tokio::spawn(async move { stream.put(put_req(&format!("m{i}"), "x")).await })
            })
            .collect();
        for call in many {
            call.await.unwrap().unwrap();
        }

        // A bad command fails alone, with the unary call's error; the
        // commands around it and later ones still succeed.
        let (bad, good) = tokio::join!(
            stream.put(put_req(&"k".repeat(1025), "v")),
            stream.put(put_req("after-bad", "ok")),
        );
        let bad = bad.unwrap_err();
        assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");
        assert!(bad.message().contains("key is 1025 bytes"), "{bad:?}");
        assert_eq!(good.unwrap().lsn, 10_161, "the bad key took no LSN");

        let del = stream
            .delete(pb::DeleteRequest {
                key: b"c0-0".to_vec(),
                ack: pb::AckLevel::Default as i32,
            })
            .await
            .unwrap();
        assert_eq!(del.lsn, 10_162);
        let get = |key: &str| pb::GetRequest {
            key: key.into(),
            consistency: pb::ReadConsistency::Default as i32,
        };
        let read = stream.get(get("c3-7")).await.unwrap();
        assert!(read.found);
        assert_eq!(read.value, b"v3-7");
        assert!(!stream.get(get("c0-0")).await.unwrap().found);

        // Outcomes that finish together but are too big for one message
        // (8 values of 900 KiB: over the 4 MiB message limit) come in
        // several.
        let big = "x".repeat(900 << 10);
        for i in 0..8 {
            stream.put(put_req(&format!("big{i}"), &big)).await.unwrap();
        }
        assert_eq!(stream.get(get("big0")).await.unwrap().value.len(), 900 << 10);
        let gets: Vec<_> = (0..8)
            .map(|i| {
                let stream = stream.clone();
                tokio::spawn(async move { stream.get(get(&format!("big{i}"))).await })
            })
            .collect();
        for g in gets {
            assert_eq!(g.await.unwrap().unwrap().value.len(), 900 << 10);
        }
        // The node keeps each reply small, whatever the client accepts: a
        // plain client with gRPC's default 4 MiB limit gets all eight Gets
        // of one message answered.
        let channel = connect(cluster.addrs[0]).await;
        let commands = (0..8)
            .map(|i| pb::Command {
                id: i,
                op: Some(pb::command::Op::Get(get(&format!("big{i}")))),
            })
            .collect();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(pb::BatchRequest { commands }).await.unwrap();
        let mut replies = pb::kv_client::KvClient::new(channel)
            .batch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let mut answered = 0;
        while answered < 8 {
            let reply = replies.message().await.unwrap().unwrap();
            for o in reply.outcomes {
                assert!(matches!(o.result, Some(pb::outcome::Result::Get(ref g)) if g.value.len() == 900 << 10));
                answered += 1;
            }
        }
        drop(tx);

        // At a follower, writes fail "not leader", naming the leader.
        let follower = batch_client(cluster.addrs[1]).await;
        let refused = follower.put(put_req("x", "y")).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        let leader = cluster.addrs[0].to_string();
        assert_eq!(
            refused
                .metadata()
                .get(kv_node::server::LEADER_METADATA)
                .unwrap(),
            leader.as_str()
        );
        // ...and a stale read is served there, once the follower applied it.
        let started = Instant::now();
        loop {
            let stale = follower
                .get(pb::GetRequest {
                    key: b"after-bad".to_vec(),
                    consistency: pb::ReadConsistency::Stale as i32,
                })
                .await
                .unwrap();
            assert_eq!(stale.node_id, 2);
            if stale.found {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "{stale:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    // The unary API sees the same state.
    assert_eq!(cluster.get("c15-9"), "v15-9");
    assert_eq!(cluster.get("c0-0"), "(nil)");
    let (applied, _) = cluster.wait_converged();
    assert_eq!(applied, 10_170);
}

#[test]
fn garbage_on_the_batch_stream_closes_it_and_writes_nothing() {
    let cluster = Cluster::start();
    let rt = runtime();
    rt.block_on(async {
        let channel = connect(cluster.addrs[0]).await;
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        // A message that does not decode as a BatchRequest: field 1 (the
        // commands) as a varint, not length-delimited.
        let garbage = pb::WriteReply { lsn: 7, term: 1 };
        let codec = tonic_prost::ProstCodec::<pb::WriteReply, pb::BatchReply>::default();
        let path = http::uri::PathAndQuery::from_static("/kv.v1.Kv/Batch");
        let mut replies = grpc
            .streaming(
                tonic::Request::new(tokio_stream::iter(vec![garbage])),
                path,
                codec,
            )
            .await
            .unwrap()
            .into_inner();
        // The node ends the stream with the decoding error, answering nothing.
        let next = tokio::time::timeout(Duration::from_secs(5), replies.message())
            .await
            .expect("the node closes the stream");
        let err = next.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Internal, "{err:?}");
        assert!(err.message().contains("decode"), "{err:?}");

        // A message with more commands than allowed: refused whole.
        let channel = connect(cluster.addrs[0]).await;
        let commands = (0..=kv_node::server::batch::COMMANDS_PER_MESSAGE_MAX as u64)
            .map(|id| pb::Command {
                id,
                op: Some(pb::command::Op::Put(put_req(&format!("over{id}"), "v"))),
            })
            .collect();
        let mut replies = pb::kv_client::KvClient::new(channel)
            .batch(tokio_stream::iter(vec![pb::BatchRequest { commands }]))
            .await
            .unwrap()
            .into_inner();
        let err = replies.message().await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("1025 commands"), "{err:?}");
    });
    let s = cluster.status_of(1).unwrap();
    assert_eq!((s.last_lsn, s.keys), (0, 0), "nothing reached the WAL");
    cluster.put("after", "garbage").unwrap();
    cluster.wait_converged();
}

#[test]
fn sigkill_of_the_leader_under_batch_load_loses_no_quorum_write() {
    // Elected, so the killed leader can stay down: what it acknowledged must
    // already be on the majority that elects the next one.
    let mut cluster = Cluster::start_elected("election_timeout_ms = 300\n");
    let load = Load::start_batch(&cluster, 32);
    let (old, acked) = kill_the_leader_under(&mut cluster, load, 200);
    cluster.start_node(old);
    cluster.wait_converged();
    assert_every_node_has(&cluster, &acked);
}

/// Set in the re-executed test binary that plays the intermediate process
/// of [`a_sigkilled_test_process_leaves_no_kv_serve_or_kv_repl_behind`]:
/// the cluster directory whose node 1 it starts.
const LIFELINE_DIR_ENV: &str = "KV_TEST_LIFELINE_DIR";

/// The intermediate: starts node 1 of the cluster in `dir` with the same
/// helper every test uses, and a `kv repl` the way the REPL tests do (stdin
/// piped and held), prints their pids, and lives until its own stdin (a
/// pipe from the outer test, so it cannot outlive that either) closes.
fn lifeline_intermediate(dir: &std::path::Path) {
    use std::io::{BufRead, BufReader, Read, Write};
    let log = std::fs::File::create(dir.join("node1.log")).unwrap();
    let node = process::serve(&dir.join("node1.toml"), log);
    let mut repl = Command::new(KV)
        .args(["repl", "--data-dir"])
        .arg(dir.join("repl"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut repl_in = repl.stdin.take().unwrap();
    let mut repl_out = BufReader::new(repl.stdout.take().unwrap());
    repl_in.write_all(b"PUT lifeline 1\n").unwrap();
    let mut reply = String::new();
    repl_out.read_line(&mut reply).unwrap();
    assert_eq!(reply, "OK\n");
    println!("lifeline pids: serve {} repl {}", node.id(), repl.id());
    std::io::stdout().flush().unwrap();
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    // Reached only if the outer test ended first: the children follow us
    // through their lifelines as we exit.
    drop((node, repl, repl_in, repl_out));
}

/// The lifeline, end to end: an intermediate process (this test binary,
/// re-executed) starts `kv serve` and `kv repl` as the tests do and is then
/// SIGKILLed, so no `Drop` of its runs. Both children must be gone within
/// a few seconds, the node after its clean-stop path, leaving the port and
/// both data directories free.
#[test]
fn a_sigkilled_test_process_leaves_no_kv_serve_or_kv_repl_behind() {
    use std::io::{BufRead, BufReader, Write};
    if let Some(dir) = std::env::var_os(LIFELINE_DIR_ENV) {
        lifeline_intermediate(std::path::Path::new(&dir));
        return;
    }
    // A one-member cluster: its config, then its node stopped so the
    // intermediate can start it.
    let mut cluster = Cluster::build(1, "", "leader = 1\n");
    cluster.kill(1);
    let mut intermediate = Command::new(std::env::current_exe().unwrap())
        .args([
            "a_sigkilled_test_process_leaves_no_kv_serve_or_kv_repl_behind",
            "--exact",
            "--nocapture",
        ])
        .env(LIFELINE_DIR_ENV, cluster.dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(intermediate.stdout.take().unwrap()).lines();
    let pids = loop {
        let line = lines
            .next()
            .expect("the intermediate printed its children's pids")
            .unwrap();
        if let Some(rest) = line.strip_prefix("lifeline pids: ") {
            break rest.to_owned();
        }
    };
    let pid = |name: &str| -> Pid {
        let n: u32 = pids
            .split_whitespace()
            .skip_while(|w| *w != name)
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        Pid::of(n).unwrap_or_else(|| panic!("{name} (pid {n}) runs"))
    };
    let (serve, repl) = (pid("serve"), pid("repl"));
    // If a check below fails, the children must not outlive the test.
    let _reap = process::KillOnDrop(vec![serve, repl]);
    cluster.wait_until(Duration::from_secs(20), "node 1 answers", |c| {
        c.status_of(1).is_some()
    });

    intermediate.kill().unwrap();
    let status = intermediate.wait().unwrap();
    assert!(!status.success(), "the intermediate was killed: {status:?}");
    let limit = Duration::from_secs(5);
    assert!(
        serve.gone_within(limit),
        "kv serve (pid {}) still runs {limit:?} after its parent was SIGKILLed",
        serve.pid
    );
    assert!(
        repl.gone_within(limit),
        "kv repl (pid {}) still runs {limit:?} after its parent was SIGKILLed",
        repl.pid
    );
    let log = std::fs::read_to_string(cluster.dir.path().join("node1.log")).unwrap();
    assert!(
        log.contains("standard input closed") && log.contains("stopped cleanly"),
        "node 1 took the clean-stop path: {log}"
    );
    // The port and the data directory are free again...
    cluster.start_node(1);
    cluster.put("after", "1").unwrap();
    // ...and so is the REPL's, with its write synced at EOF.
    let mut again = Command::new(KV)
        .args(["repl", "--data-dir"])
        .arg(cluster.dir.path().join("repl"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    again
        .stdin
        .take()
        .unwrap()
        .write_all(b"GET lifeline\n")
        .unwrap();
    let out = again.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1\n");
}

/// `kv cluster up` gives its nodes the lifeline: SIGKILL it (so it cannot
/// stop them itself) and every node stops cleanly within a few seconds.
#[test]
fn sigkill_of_kv_cluster_up_stops_every_node() {
    use std::io::{BufRead, BufReader};
    let mut cluster = Cluster::start();
    for id in cluster.ids() {
        cluster.kill(id);
    }
    let configs = cluster.dir.path().join("configs");
    std::fs::create_dir_all(&configs).unwrap();
    for id in cluster.ids() {
        std::fs::copy(cluster.config(id), configs.join(format!("node{id}.toml"))).unwrap();
    }
    let logs = cluster.dir.path().join("logs");
    let mut up = Command::new(KV)
        .args(["cluster", "up"])
        .arg(&configs)
        .arg("--log-dir")
        .arg(&logs)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // "kv: node 1 on 127.0.0.1:... (pid N), log ..."
    let mut nodes = Vec::new();
    for line in BufReader::new(up.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.starts_with("kv: cluster up") {
            break;
        }
        if let Some(rest) = line.split("(pid ").nth(1) {
            let n: u32 = rest.split(')').next().unwrap().parse().unwrap();
            nodes.push(Pid::of(n).unwrap_or_else(|| panic!("{line}: the node runs")));
        }
    }
    assert_eq!(nodes.len(), 3, "one pid per node");
    let _reap = process::KillOnDrop(nodes.clone());
    cluster.wait_until(Duration::from_secs(20), "all three nodes answer", |c| {
        c.ids().all(|id| c.status_of(id).is_some())
    });
    cluster.put("up", "yes").unwrap();

    up.kill().unwrap();
    up.wait().unwrap();
    for (i, node) in nodes.iter().enumerate() {
        assert!(
            node.gone_within(Duration::from_secs(5)),
            "node {} (pid {}) still runs 5 s after `kv cluster up` was SIGKILLed",
            i + 1,
            node.pid
        );
    }
    for id in cluster.ids() {
        let log = std::fs::read_to_string(logs.join(format!("node{id}.log"))).unwrap();
        assert!(
            log.contains("standard input closed") && log.contains("stopped cleanly"),
            "node {id} log: {log}"
        );
        assert!(cluster.status_of(id).is_none(), "node {id} still answers");
    }
}

/// `kv put KEY VALUE --ack quorum` at `endpoints`: Ok, or the client's
/// error text.
fn put_quorum(cluster: &Cluster, key: &str, endpoints: &str) -> Result<(), String> {
    let out = cluster.kv(&["put", key, "v", "--ack", "quorum"], endpoints);
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `count` quorum writes `{prefix}{i}` that must all succeed, recorded in
/// `acked`.
fn put_all(cluster: &Cluster, prefix: &str, count: usize, acked: &mut Vec<(String, String)>) {
    for i in 0..count {
        let key = format!("{prefix}{i}");
        if let Err(e) = put_quorum(cluster, &key, &cluster.all_endpoints()) {
            panic!("{key}: {e}");
        }
        acked.push((key, "v".to_owned()));
    }
}

/// With the members in `down` stopped, a quorum write at `leader` must
/// end `outcome unknown` and take effect nowhere: no live node commits or
/// applies it.
fn assert_quorum_write_is_unknown(cluster: &Cluster, leader: usize, down: &[usize], key: &str) {
    let Err(err) = put_quorum(cluster, key, &cluster.endpoint(leader)) else {
        panic!("{key}: a quorum write was acknowledged with {down:?} down");
    };
    assert!(err.contains("outcome unknown"), "{key}: {err}");
    // "... the write at LSN N was not acknowledged ..."
    let lsn: u64 = err
        .split("the write at LSN ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no LSN in {err}"));
    for id in cluster.ids().filter(|id| !down.contains(id)) {
        let s = cluster.status_of(id).unwrap();
        assert!(
            s.commit_lsn < lsn,
            "node {id} committed LSN {lsn} with {down:?} down: {s:?}"
        );
        let out = cluster.kv(
            &["get", key, "--consistency", "stale"],
            &cluster.endpoint(id),
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.starts_with("(nil)"), "node {id} applied {key}: {text}");
    }
}

/// Four members, elections on: a majority of four is three. With one down
/// the other three commit; with two down a quorum write is `outcome
/// unknown` and no node commits it (two of four are no majority); with one
/// back, writes resume and nothing acknowledged was lost.
#[test]
fn four_members_commit_with_one_down_but_not_with_two() {
    // A 1 s election timeout: the leader notices it lost its majority (and
    // steps down) well after the write below has reached it.
    let mut cluster = Cluster::start_elected_n(4, "election_timeout_ms = 1000\n");
    let leader = cluster.wait_leader();
    let followers: Vec<usize> = cluster.ids().filter(|id| *id != leader).collect();
    let mut acked = Vec::new();
    put_all(&cluster, "all-up-", 5, &mut acked);

    cluster.kill(followers[0]);
    put_all(&cluster, "one-down-", 5, &mut acked);
    // Everything in the leader's log is committed (its own term's first
    // entry and the ten writes), with a member down.
    let s = cluster.status_of(leader).unwrap();
    assert_eq!(s.commit_lsn, s.last_lsn, "{s:?}");
    assert!(s.commit_lsn >= 10, "{s:?}");

    cluster.kill(followers[1]);
    assert_quorum_write_is_unknown(&cluster, leader, &followers[..2], "two-down");

    cluster.start_node(followers[0]);
    cluster.wait_until(Duration::from_secs(20), "writes resume", |c| {
        put_quorum(c, "resumed", &c.all_endpoints()).is_ok()
    });
    acked.push(("resumed".to_owned(), "v".to_owned()));
    put_all(&cluster, "one-back-", 5, &mut acked);
    let live: Vec<usize> = cluster.ids().filter(|id| *id != followers[1]).collect();
    cluster.wait_converged_among(&live);
    assert_nodes_have(&cluster, &live, &acked);
    cluster.start_node(followers[1]);
    cluster.wait_converged();
    assert_every_node_has(&cluster, &acked);
}

/// Five members, elections on: with two down, the leader among them, the
/// other three elect a new leader and commit quorum writes; with a third
/// down they do not.
#[test]
fn five_members_elect_and_commit_with_two_down_but_not_with_three() {
    let mut cluster = Cluster::start_elected_n(5, "election_timeout_ms = 1000\n");
    let old = cluster.wait_leader();
    let old_term = cluster.status_of(old).unwrap().term;
    let mut acked = Vec::new();
    put_all(&cluster, "all-up-", 5, &mut acked);

    let follower = cluster.ids().find(|id| *id != old).unwrap();
    cluster.kill(old);
    cluster.kill(follower);
    let down = [old, follower];
    cluster.wait_until(Duration::from_secs(20), "a new leader is elected", |c| {
        c.ids()
            .filter_map(|id| c.status_of(id))
            .any(|s| s.role == "leader" && s.term > old_term)
    });
    let leader = cluster.wait_leader();
    assert!(!down.contains(&leader), "node {leader} leads");
    put_all(&cluster, "two-down-", 5, &mut acked);

    let third = cluster
        .ids()
        .find(|id| *id != leader && !down.contains(id))
        .unwrap();
    cluster.kill(third);
    assert_quorum_write_is_unknown(&cluster, leader, &[old, follower, third], "three-down");

    // Everyone back: every acknowledged write is everywhere.
    for id in [old, follower, third] {
        cluster.start_node(id);
    }
    cluster.wait_converged();
    assert_every_node_has(&cluster, &acked);
}

/// Five members, fixed leader 1, whose members table names node 2's
/// address for nodes 3, 4 and 5 (which are down): node 2 refuses what is
/// meant for them, so its answers count once, and with two of five up a
/// quorum write is `outcome unknown` and commits nowhere. (Were node 2 to
/// answer as 3, 4 and 5, leader 1 would count four copies and commit.)
#[test]
fn a_member_reached_at_another_members_address_is_not_counted_twice() {
    let mut cluster = Cluster::build(5, "", "leader = 1\n");
    let mut acked = Vec::new();
    put_all(&cluster, "all-up-", 3, &mut acked);
    for id in [1, 3, 4, 5] {
        cluster.kill(id);
    }
    let config = cluster.config(1);
    let mut text = std::fs::read_to_string(&config).unwrap();
    for id in [3, 4, 5] {
        let (theirs, node2) = (cluster.endpoint(id), cluster.endpoint(2));
        text = text.replace(
            &format!("addr = \"{theirs}\""),
            &format!("addr = \"{node2}\""),
        );
    }
    std::fs::write(&config, text).unwrap();
    cluster.start_node(1);
    assert_quorum_write_is_unknown(&cluster, 1, &[3, 4, 5], "misaddressed");
    let log = std::fs::read_to_string(cluster.dir.path().join("node1.log")).unwrap();
    // Warned once, though node 1 retried all along.
    let warned = log
        .matches("is meant for node 3, and this is node 2")
        .count();
    assert_eq!(warned, 1, "node 2's refusal of node 3's messages:\n{log}");
    // The acknowledged writes are still there.
    assert_nodes_have(&cluster, &[1, 2], &acked);
}

/// Five members: SIGKILL of the elected leader under a write load. A new
/// leader takes writes while the old one is still down (so what it
/// acknowledged must be on the majority that elected the next one), and
/// every quorum write is on every node at the end.
#[test]
fn sigkill_of_the_leader_of_five_under_load_loses_no_quorum_write() {
    let mut cluster = Cluster::start_elected_n(5, "election_timeout_ms = 300\n");
    let load = Load::start(&cluster, 4);
    let (old, acked) = kill_the_leader_under(&mut cluster, load, 100);
    let live: Vec<usize> = cluster.ids().filter(|id| *id != old).collect();
    cluster.wait_converged_among(&live);
    assert_nodes_have(&cluster, &live, &acked);
    cluster.start_node(old);
    cluster.wait_converged();
    assert_every_node_has(&cluster, &acked);
}

#[test]
fn sigterm_of_the_leader_hands_over_so_writes_resume_before_an_election_timeout() {
    // A long election timeout: without the hand-over the others would wait
    // it out (3-6 s) before one of them campaigns.
    let mut cluster = Cluster::start_elected("election_timeout_ms = 3000");
    let old = cluster.wait_leader();
    cluster.put("before", "1").unwrap();
    cluster.wait_converged();
    let old_term = cluster.status_of(old).unwrap().term;
    let mut child = cluster.nodes[old - 1].take().unwrap();
    let started = Instant::now();
    process::signal(child.id(), Signal::SIGTERM);
    let exit = child.wait().unwrap();
    let stopped = started.elapsed();
    assert!(exit.success(), "the old leader exited with {exit:?}");
    let others: Vec<String> = cluster
        .ids()
        .filter(|id| *id != old)
        .map(|id| cluster.endpoint(id))
        .collect();
    let out = cluster.kv(&["put", "after", "2"], &others.join(","));
    let resumed = started.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new = cluster.wait_leader();
    assert_ne!(new, old);
    assert!(cluster.status_of(new).unwrap().term > old_term);
    eprintln!(
        "SIGTERM of leader {old}: it stopped after {stopped:?}; a write succeeded at node {new} {resumed:?} after the signal"
    );
    assert!(
        resumed < Duration::from_millis(1500),
        "writes resumed only {resumed:?} after SIGTERM: no hand-over (the election timeout is 3 s)"
    );
    assert_eq!(cluster.get("before"), "1");
}

/// `kv cluster up` over `cluster`'s configs, stderr to `<dir>/up-<tag>.err`,
/// once every node answers and one leads.
fn cluster_up(
    cluster: &Cluster,
    tag: &str,
    extra: &[&str],
) -> (std::process::Child, std::path::PathBuf) {
    let configs = cluster.dir.path().join("configs");
    std::fs::create_dir_all(&configs).unwrap();
    for id in cluster.ids() {
        std::fs::copy(cluster.config(id), configs.join(format!("node{id}.toml"))).unwrap();
    }
    let err = cluster.dir.path().join(format!("up-{tag}.err"));
    let up = Command::new(KV)
        .args(["cluster", "up"])
        .arg(&configs)
        .arg("--log-dir")
        .arg(cluster.dir.path().join(format!("logs-{tag}")))
        .args(extra)
        .stdin(Stdio::piped())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    cluster.wait_until(Duration::from_secs(20), "all three nodes answer", |c| {
        c.ids().all(|id| c.status_of(id).is_some())
    });
    cluster.wait_leader();
    (up, err)
}

/// The pid `kv cluster up` reported for node `id` most recently.
fn reported_pid(err: &std::path::Path, id: usize) -> u32 {
    let text = std::fs::read_to_string(err).unwrap();
    let prefix = format!("kv: node {id} on ");
    let line = text.lines().rev().find(|l| l.starts_with(&prefix)).unwrap();
    let pid = line
        .split("(pid ")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    pid.parse().unwrap()
}

fn wait_for_line(cluster: &Cluster, err: &std::path::Path, line: &str) {
    cluster.wait_until(
        Duration::from_secs(20),
        &format!("cluster up says {line:?}"),
        |_| std::fs::read_to_string(err).unwrap().contains(line),
    );
}

#[test]
fn kv_cluster_up_keeps_the_others_serving_and_can_restart_a_node_that_died() {
    let mut cluster = Cluster::start_elected("");
    for id in cluster.ids() {
        cluster.kill(id);
    }
    // Without --restart: node 3 is killed, said so, and stays down; the
    // others keep serving.
    let (mut up, err) = cluster_up(&cluster, "plain", &[]);
    let pid = reported_pid(&err, 3);
    process::signal(pid, Signal::SIGKILL);
    wait_for_line(
        &cluster,
        &err,
        "kv: node 3 was killed by signal 9 (SIGKILL); the others keep serving",
    );
    cluster.put("with-two", "1").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        cluster.status_of(3).is_none(),
        "node 3 came back without --restart"
    );
    assert!(up.try_wait().unwrap().is_none(), "kv cluster up exited");
    process::signal(up.id(), Signal::SIGTERM);
    assert!(up.wait().unwrap().success(), "the two left stop cleanly");
    // With --restart: node 2 killed is started again and catches up.
    let (mut up, err) = cluster_up(&cluster, "restart", &["--restart"]);
    let pid = reported_pid(&err, 2);
    process::signal(pid, Signal::SIGKILL);
    wait_for_line(
        &cluster,
        &err,
        "kv: node 2 was killed by signal 9 (SIGKILL); restarting it in 1 s",
    );
    cluster.put("while-restarting", "1").unwrap();
    wait_for_line(&cluster, &err, "kv: restarting node 2");
    assert_ne!(reported_pid(&err, 2), pid);
    cluster.wait_converged();
    assert_eq!(cluster.status_of(2).unwrap().keys, 2);
    process::signal(up.id(), Signal::SIGTERM);
    assert!(
        up.wait().unwrap().success(),
        "Ctrl-C still stops all cleanly"
    );
    for id in cluster.ids() {
        assert!(cluster.status_of(id).is_none(), "node {id} still answers");
    }
}

/// Rewrites, in node `id`'s stopped WAL, the record that puts `key` with
/// `value` as a put of `key` with `lie` (same length, valid CRC): a disk
/// that returns other bytes than were written, undetectably.
fn lie_in_wal(cluster: &Cluster, id: usize, key: &[u8], value: &[u8], lie: &[u8]) {
    use kv_node::engine::record::{
        RECORD_PAYLOAD_BYTES_MAX, SEGMENT_HEADER_BYTES, SegmentHeader, decode_record, encode_record,
    };
    use kv_node::engine::{Op, Record};
    assert_eq!(value.len(), lie.len());
    let dir = cluster.dir.path().join(format!("node{id}"));
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|x| x != "wal") {
            continue;
        }
        let mut bytes = std::fs::read(&path).unwrap();
        let salt = SegmentHeader::decode(&bytes[..SEGMENT_HEADER_BYTES])
            .unwrap()
            .salt;
        let mut at = SEGMENT_HEADER_BYTES;
        while let Ok((Record { lsn, term, op }, used)) =
            decode_record(&bytes[at..], salt, RECORD_PAYLOAD_BYTES_MAX)
        {
            if let Op::Put { key: k, value: v } = &op
                && k == key
                && v == value
            {
                let mut forged = Vec::new();
                let op = Op::Put {
                    key: key.to_vec(),
                    value: lie.to_vec(),
                };
                encode_record(&mut forged, salt, lsn, term, &op);
                assert_eq!(forged.len(), used);
                bytes[at..at + used].copy_from_slice(&forged);
                std::fs::write(&path, &bytes).unwrap();
                return;
            }
            at += used;
        }
    }
    panic!("no record puts {key:?} in node {id}'s WAL");
}

#[test]
fn a_replica_whose_disk_lied_raises_the_divergence_alarm_and_serves_no_reads() {
    let mut cluster = Cluster::start();
    for i in 0..10 {
        cluster
            .put(&format!("k{i}"), &format!("value-{i}"))
            .unwrap();
    }
    cluster.wait_converged();
    cluster.kill(3);
    lie_in_wal(&cluster, 3, b"k5", b"value-5", b"VALUE-5");
    let started = Instant::now();
    cluster.start_node(3);
    cluster.wait_until(Duration::from_secs(10), "node 3 raises the alarm", |c| {
        c.status_of(3).is_some_and(|s| !s.alarm.is_empty())
    });
    let alarm = cluster.status_of(3).unwrap().alarm;
    eprintln!("alarm {:?} after restart: {alarm}", started.elapsed());
    assert!(alarm.contains("diverged at LSN"), "{alarm}");
    // It serves no read, not even a stale one: the lie never reaches a client.
    let out = cluster.kv(
        &["get", "k5", "--consistency", "stale"],
        &cluster.endpoint(3),
    );
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("VALUE"));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("diverged"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The others still agree and serve; `kv status` shows the alarm.
    assert!(cluster.status_of(1).unwrap().alarm.is_empty());
    assert!(cluster.status_of(2).unwrap().alarm.is_empty());
    assert_eq!(cluster.get("k5"), "value-5");
    let out = cluster.kv(&["status"], &cluster.all_endpoints());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ALARM node 3: state diverged"), "{text}");
    // Its health says so too (the others' does not).
    let health = |id: usize| {
        use tonic_health::pb::health_client::HealthClient;
        runtime().block_on(async {
            let mut h = HealthClient::new(connect(cluster.addrs[id - 1]).await);
            h.check(tonic_health::pb::HealthCheckRequest {
                service: "kv.v1.Kv".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status
        })
    };
    use tonic_health::pb::health_check_response::ServingStatus;
    cluster.wait_until(
        Duration::from_secs(5),
        "node 3's health is NOT_SERVING",
        |_| health(3) == ServingStatus::NotServing as i32,
    );
    assert_eq!(health(1), ServingStatus::Serving as i32);
}

#[test]
fn kv_verify_passes_through_kills_and_stops_and_catches_stale_reads() {
    let mut cluster = Cluster::start_elected("");
    let leader = cluster.wait_leader();
    let endpoints = cluster.all_endpoints();
    let verify = |secs: &str, extra: &[&str]| {
        Command::new(KV)
            .args(["verify", "--secs", secs, "--clients", "6", "--keys", "3"])
            .args(extra)
            .args(["--endpoints", &endpoints, "--timeout-ms", "2000"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let run = verify("6", &[]);
    // Meanwhile: SIGKILL of a follower (restarted a second later), then
    // SIGSTOP of the leader for 1.5 s (an election happens behind its back).
    std::thread::sleep(Duration::from_millis(1000));
    let follower = if leader == 3 { 2 } else { 3 };
    cluster.kill(follower);
    std::thread::sleep(Duration::from_millis(1000));
    cluster.start_node(follower);
    let pid = cluster.nodes[leader - 1].as_ref().unwrap().id();
    process::signal(pid, Signal::SIGSTOP);
    std::thread::sleep(Duration::from_millis(1500));
    process::signal(pid, Signal::SIGCONT);
    let out = run.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "kv verify failed: {text}");
    assert!(text.contains("linearizability: linearizable"), "{text}");
    assert!(text.contains("verdict: PASS"), "{text}");
    assert!(text.contains(" 0 mismatches"), "{text}");
    // Planted: the workload's reads are stale reads from a follower, which
    // lags the leader's commit by up to a heartbeat: not linearizable, and
    // kv verify must say so.
    let follower = cluster.wait_leader() % 3 + 1;
    let run = verify("4", &["--stale-reads-from", &cluster.endpoint(follower)]);
    let out = run.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert_eq!(out.status.code(), Some(6), "{text}");
    assert!(text.contains("linearizability: violation"), "{text}");
    assert!(text.contains("counterexample:"), "{text}");
    assert!(text.contains("verdict: FAIL"), "{text}");
}
