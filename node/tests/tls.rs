//! TLS clusters of real `kv serve` processes on 127.0.0.1: certificates
//! made by the test (`kv_node::certs`), a client and a peer listener per
//! node, mutual TLS between peers.
//!
//! Covered: a TLS cluster's core cases (writes, catch-up by snapshot
//! install, SIGKILL of the elected leader with failover, no `quorum` write
//! lost), gRPC health over TLS, `kv certs init` feeding `configs/tls/`; and
//! strangers refused with nothing changed (term, vote, log, leader): a
//! plaintext client, clients without a certificate or with one from
//! another CA when client certificates are demanded, a client certificate
//! on the peer service, node 3's certificate claiming to be node 2, a
//! foreign CA's node certificate, an expired certificate, and plaintext on
//! the peer port, each sending a higher-term vote request or append.

// Tests unwrap: a failed unwrap is a test failure with its reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::cluster::{Cluster, write_pair};
use common::process::KV;
use kv_node::certs::{Authority, Validity};
use kv_node::tls::Transport;
use kv_proto::v1 as pb;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim_end().to_owned()
}

#[test]
fn a_tls_cluster_replicates_catches_up_by_snapshot_and_fails_over() {
    // Small segments and frequent snapshots: a stopped follower's records
    // leave the leader's WAL, so it can catch up only by snapshot install.
    let mut cluster = Cluster::start_tls("segment_bytes_max = 4096\nsnapshot_wal_bytes = 8192", "");
    let leader = cluster.wait_leader();
    let mut acked = Vec::new();
    for i in 0..10 {
        cluster.put(&format!("k{i}"), &format!("v{i}")).unwrap();
        acked.push((format!("k{i}"), format!("v{i}")));
    }
    cluster.wait_converged();
    let behind = if leader == 3 { 2 } else { 3 };
    let behind_last = cluster.status_of(behind).unwrap().last_lsn;
    cluster.kill(behind);
    cluster.bench_writes(800, 100);
    let first_wal = cluster.first_wal_lsn(leader);
    assert!(
        first_wal > behind_last + 1,
        "the leader deleted the WAL node {behind} needs (first LSN {first_wal}, it has {behind_last})"
    );
    cluster.start_node(behind);
    let (applied, _) = cluster.wait_converged();
    assert!(applied > 800, "applied {applied}");
    // SIGKILL of the elected leader: another one takes over, over TLS,
    // and every acknowledged write is still there.
    cluster.kill(leader);
    let next = cluster.wait_leader();
    assert_ne!(next, leader);
    for i in 10..20 {
        cluster.put(&format!("k{i}"), &format!("v{i}")).unwrap();
        acked.push((format!("k{i}"), format!("v{i}")));
    }
    cluster.start_node(leader);
    cluster.wait_converged();
    for (k, v) in &acked {
        assert_eq!(&cluster.get(k), v);
    }
}

#[test]
fn health_answers_over_tls_and_a_plaintext_client_is_refused() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let cluster = Cluster::start_tls("", "");
    cluster.wait_leader();
    let addr = cluster.addrs[0];
    let transport = cluster.transport();
    let health = || {
        runtime().block_on(async {
            let channel = transport.endpoint(addr).unwrap().connect().await.unwrap();
            HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest {
                    service: "kv.v1.Kv".into(),
                })
                .await
                .unwrap()
                .into_inner()
                .status
        })
    };
    // Node 1 reports SERVING once it knows the leader, which may be a
    // little after the leader knows itself (and NOT_SERVING before, if the
    // election took over twice the timeout on a loaded machine).
    cluster.wait_until(
        Duration::from_secs(10),
        "node 1's health over TLS is SERVING",
        |_| health() == ServingStatus::Serving as i32,
    );
    // The CLI's TLS settings from the environment, as etcdctl's.
    let tls = cluster.tls.as_ref().unwrap();
    let out = std::process::Command::new(KV)
        .args(["put", "from-env", "1", "--endpoints"])
        .arg(cluster.all_endpoints())
        .env("KV_CACERT", tls.path("ca"))
        .env("KV_CERT", tls.path("admin"))
        .env("KV_KEY", tls.path("admin-key"))
        .output()
        .unwrap();
    ok(&out);
    assert_eq!(cluster.get("from-env"), "1");
    // A plaintext client: no answer, nothing written.
    let before = cluster.status_of(1).unwrap().last_lsn;
    let out = std::process::Command::new(KV)
        .args(["put", "x", "1", "--timeout-ms", "2000", "--endpoints"])
        .arg(cluster.all_endpoints())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--cacert"), "the error points at TLS: {err}");
    assert_eq!(cluster.status_of(1).unwrap().last_lsn, before);
}

/// Term, vote, last LSN and role of every node.
fn fingerprint(cluster: &Cluster) -> Vec<(u64, u64, u64, String)> {
    cluster
        .ids()
        .map(|id| {
            let s = cluster.status_of(id).unwrap();
            (s.term, s.voted_for, s.last_lsn, s.role)
        })
        .collect()
}

/// A vote request from `claimed` in a far higher term (transfer-marked, so
/// no lease would make a follower ignore it), over `transport` to member
/// `to` of cluster `cluster_id` at `addr`.
async fn forged_vote(
    transport: &Transport,
    (cluster_id, addr, to): (&str, SocketAddr, u64),
    claimed: u64,
) -> Result<pb::VoteReply, String> {
    let channel = match transport.endpoint(addr).unwrap().connect().await {
        Ok(c) => c,
        Err(e) => return Err(format!("connect: {e:?}")),
    };
    let mut client = pb::replication_client::ReplicationClient::new(channel);
    let request = pb::VoteRequest {
        from: Some(pb::Sender {
            cluster_id: cluster_id.into(),
            node_id: claimed,
            term: 1_000,
            to,
        }),
        last_lsn: u64::MAX / 2,
        last_term: 1_000,
        transfer: true,
    };
    match tokio::time::timeout(Duration::from_secs(5), client.request_vote(request)).await {
        Ok(Ok(reply)) => Ok(reply.into_inner()),
        Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
        Err(_) => Err("no answer".into()),
    }
}

/// An append from `claimed` in a far higher term that would, if accepted,
/// make the receiver adopt that term and truncate.
async fn forged_append(
    transport: &Transport,
    (cluster_id, addr, to): (&str, SocketAddr, u64),
    claimed: u64,
) -> Result<pb::AppendAck, String> {
    let channel = match transport.endpoint(addr).unwrap().connect().await {
        Ok(c) => c,
        Err(e) => return Err(format!("connect: {e:?}")),
    };
    let mut client = pb::replication_client::ReplicationClient::new(channel);
    let request = pb::AppendRequest {
        from: Some(pb::Sender {
            cluster_id: cluster_id.into(),
            node_id: claimed,
            term: 1_000,
            to,
        }),
        prev_lsn: 0,
        prev_term: 0,
        records: Vec::new(),
        commit_lsn: 0,
        ..Default::default()
    };
    let call = async {
        let mut acks = client
            .append(tokio_stream::iter(vec![request]))
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        match acks.message().await {
            Ok(Some(ack)) => Ok(ack),
            Ok(None) => Err("no ack".to_owned()),
            Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
        }
    };
    tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .unwrap_or_else(|_| Err("no answer".into()))
}

#[test]
fn strangers_are_refused_and_change_nothing() {
    let cluster = Cluster::start_tls("", "client_cert_auth = true");
    let tls = cluster.tls.as_ref().unwrap();
    let leader = cluster.wait_leader();
    cluster.put("before", "1").unwrap();
    cluster.wait_converged();
    // Strangers' certificates: a foreign CA's node 2 and client, and an
    // expired node 2 certificate from the cluster's own CA.
    let foreign = Authority::new("foreign", Validity::days(1)).unwrap();
    write_pair(&tls.dir, "foreign-ca", &foreign.issued);
    write_pair(
        &tls.dir,
        "foreign-node2",
        &foreign
            .node(2, &["127.0.0.1".into()], Validity::days(1))
            .unwrap(),
    );
    write_pair(
        &tls.dir,
        "foreign-admin",
        &foreign.client("admin", Validity::days(1)).unwrap(),
    );
    write_pair(
        &tls.dir,
        "expired-node2",
        &tls.ca
            .node(2, &["127.0.0.1".into()], Validity::expired())
            .unwrap(),
    );
    let before = fingerprint(&cluster);
    let peer = |id: usize| cluster.peer_addrs[id - 1];
    let targets: Vec<usize> = cluster.ids().collect();
    let cases: Vec<(&str, Transport, u64, &str)> = vec![
        // (who, how they connect, whom they claim to be, expected refusal)
        (
            "a client certificate on the peer service",
            tls.transport_as("ca", "admin"),
            2,
            "PermissionDenied",
        ),
        (
            "node 3's certificate claiming node 2",
            tls.transport_as("ca", "node3"),
            2,
            "PermissionDenied",
        ),
        (
            "a foreign CA's node 2",
            tls.transport_as("ca", "foreign-node2"),
            2,
            "",
        ),
        (
            "an expired node 2 certificate",
            tls.transport_as("ca", "expired-node2"),
            2,
            "",
        ),
        ("plaintext", Transport::plaintext(), 2, ""),
    ];
    runtime().block_on(async {
        for (who, transport, claimed, refusal) in &cases {
            for &id in &targets {
                if id as u64 == *claimed {
                    continue;
                }
                let to = (cluster.cluster_id.as_str(), peer(id), id as u64);
                let vote = forged_vote(transport, to, *claimed).await;
                let append = forged_append(transport, to, *claimed).await;
                for (what, outcome) in [
                    ("vote request", vote.map(|r| format!("{r:?}"))),
                    ("append", append.map(|r| format!("{r:?}"))),
                ] {
                    let err = outcome.expect_err(&format!("{who}: {what} to node {id} answered"));
                    assert!(
                        err.contains(refusal),
                        "{who}: {what} to node {id}: {err} (expected {refusal:?})"
                    );
                }
            }
        }
        // Clients without a certificate, or with a foreign CA's, are
        // refused on the client listener (client_cert_auth = true).
        let ca = std::fs::read(tls.path("ca")).unwrap();
        let foreign_identity = kv_node::tls::IdentityFiles::load(
            &tls.path("foreign-admin"),
            &tls.path("foreign-admin-key"),
        )
        .unwrap();
        for (who, transport) in [
            ("no client certificate", Transport::tls(&ca, None)),
            (
                "a foreign CA's client certificate",
                Transport::tls(&ca, Some(&foreign_identity)),
            ),
        ] {
            let client = kv_node::client::cluster_client::Client::new(
                cluster.addrs.clone(),
                Duration::from_millis(1500),
            )
            .with_transport(transport);
            let put = client
                .put(pb::PutRequest {
                    key: b"stranger".to_vec(),
                    value: b"1".to_vec(),
                    ack: pb::AckLevel::Default as i32,
                })
                .await;
            assert!(put.is_err(), "{who}: a write was accepted");
        }
    });
    // A vote request from node 2 itself, in a stale term: heard, not
    // granted, nothing changes either.
    let asked = if leader == 2 { 1 } else { leader };
    let genuine = runtime().block_on(async {
        let channel = tls
            .transport_as("ca", "node2")
            .endpoint(peer(asked))
            .unwrap()
            .connect()
            .await
            .unwrap();
        pb::replication_client::ReplicationClient::new(channel)
            .request_vote(pb::VoteRequest {
                from: Some(pb::Sender {
                    cluster_id: cluster.cluster_id.clone(),
                    node_id: 2,
                    term: 1,
                    to: asked as u64,
                }),
                last_lsn: 0,
                last_term: 0,
                transfer: false,
            })
            .await
    });
    let reply = genuine
        .expect("node 2's own certificate is heard")
        .into_inner();
    assert!(!reply.granted);
    assert_eq!(
        fingerprint(&cluster),
        before,
        "a stranger changed something"
    );
    assert_eq!(cluster.wait_leader(), leader);
    assert_eq!(cluster.get("stranger"), "(nil)");
    assert_eq!(cluster.get("before"), "1");
}

#[test]
fn kv_certs_init_makes_what_configs_tls_reads() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(KV)
        .args(["certs", "init", "--out"])
        .arg(dir.path().join("certs"))
        .args(["--nodes", "3", "--clients", "admin,ops"])
        .output()
        .unwrap();
    ok(&out);
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tls");
    for id in 1..=3u64 {
        let config =
            kv_node::server::config::NodeConfig::load(&shipped.join(format!("node{id}.toml")))
                .unwrap();
        let mut settings = config.tls.clone().unwrap();
        // configs/tls names paths relative to where kv runs.
        for path in [&mut settings.ca, &mut settings.cert, &mut settings.key] {
            *path = dir.path().join(&*path);
        }
        kv_node::tls::NodeTls::load(&settings, id).unwrap();
        // Another member's certificate is refused at start.
        let err = kv_node::tls::NodeTls::load(&settings, id % 3 + 1).unwrap_err();
        assert!(err.to_string().contains("names member"), "{err}");
    }
    for name in ["admin", "ops"] {
        kv_node::tls::IdentityFiles::load(
            &dir.path().join(format!("certs/{name}.pem")),
            &dir.path().join(format!("certs/{name}-key.pem")),
        )
        .unwrap();
    }
}
