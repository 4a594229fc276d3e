//! What real `kv serve` processes show operators: the Prometheus endpoint
//! (`metrics_listen`) after known traffic, the gRPC health service's
//! transitions when a follower loses its leader and gets it back, and
//! JSON log lines (`log_format = "json"`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// `GET path` over plain HTTP/1.1: (status line, body).
fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

/// A scrape: every sample line as `name{labels}` → value.
fn scrape(addr: SocketAddr) -> BTreeMap<String, f64> {
    let (status, body) = http_get(addr, "/metrics");
    assert!(status.contains("200"), "{status}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap();
            (name.to_owned(), value.parse().unwrap())
        })
        .collect()
}

fn sample(m: &BTreeMap<String, f64>, name: &str) -> f64 {
    *m.get(name)
        .unwrap_or_else(|| panic!("no {name} in the scrape: {m:#?}"))
}

/// Writes and reads of known kinds, then a scrape of the leader and of a
/// follower: the histograms count exactly those requests, the gauges
/// match what `Status` says at the same moment.
#[test]
fn metrics_after_known_traffic_match_status() {
    // Small enough that these writes trigger an automatic snapshot.
    let cluster =
        Cluster::start_elected("metrics_listen = {metrics_listen}\nsnapshot_wal_bytes = 256\n");
    let leader = cluster.wait_leader();
    let endpoint = cluster.endpoint(leader);
    for i in 0..5 {
        let out = cluster.kv(&["put", &format!("k{i}"), "v"], &endpoint);
        assert!(out.status.success(), "{out:?}");
    }
    for i in 0..2 {
        let out = cluster.kv(&["put", &format!("a{i}"), "v", "--ack", "all"], &endpoint);
        assert!(out.status.success(), "{out:?}");
    }
    assert_eq!(cluster.get("k1"), "v");
    // Batch-stream writes: as many as the bench reports it made.
    let bench = cluster.kv(
        &[
            "bench",
            "cluster",
            "--api",
            "batch",
            "--clients",
            "4",
            "--ops",
            "40",
        ],
        &endpoint,
    );
    assert!(bench.status.success(), "{bench:?}");
    let table = String::from_utf8_lossy(&bench.stdout);
    let row = table.lines().last().unwrap();
    let batch_ops: f64 = row.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(batch_ops > 0.0, "{table}");
    cluster.wait_converged();
    let addr = cluster.metrics_addrs[leader - 1];
    // Followers' lag reaches 0 with their next acknowledgement.
    let start = Instant::now();
    let (m, status) = loop {
        let before = cluster.status_of(leader).unwrap();
        let m = scrape(addr);
        let after = cluster.status_of(leader).unwrap();
        let caught_up = (1..=3).filter(|id| *id != leader).all(|id| {
            m.get(&format!("kv_follower_lag_records{{follower=\"{id}\"}}")) == Some(&0.0)
        });
        if before == after && caught_up {
            break (m, after);
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no steady scrape"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let quorum = "kv_write_duration_seconds_count{api=\"unary\",ack=\"quorum\"}";
    assert_eq!(sample(&m, quorum), 5.0);
    let all = "kv_write_duration_seconds_count{api=\"unary\",ack=\"all\"}";
    assert_eq!(sample(&m, all), 2.0);
    let read = "kv_read_duration_seconds_count{api=\"unary\",consistency=\"leader\"}";
    assert_eq!(sample(&m, read), 1.0);
    let batch = "kv_write_duration_seconds_count{api=\"batch\",ack=\"quorum\"}";
    assert_eq!(sample(&m, batch), batch_ops);
    assert_eq!(sample(&m, "kv_commit_lsn"), status.commit_lsn as f64);
    assert_eq!(sample(&m, "kv_last_lsn"), status.last_lsn as f64);
    assert_eq!(sample(&m, "kv_durable_lsn"), status.durable_lsn as f64);
    assert_eq!(sample(&m, "kv_applied_lsn"), status.applied_lsn as f64);
    assert_eq!(sample(&m, "kv_term"), status.term as f64);
    assert_eq!(sample(&m, "kv_leader_id"), leader as f64);
    assert_eq!(sample(&m, "kv_keys"), status.keys as f64);
    assert_eq!(sample(&m, "kv_snapshot_lsn"), status.snapshot_lsn as f64);
    assert!(status.snapshot_lsn > 0, "no snapshot was taken: {status:?}");
    assert!(sample(&m, "kv_snapshots_total") >= 1.0);
    assert!(sample(&m, "kv_snapshot_bytes") > 0.0);
    assert!(sample(&m, "kv_snapshot_duration_seconds_count") >= 1.0);
    assert_eq!(sample(&m, "kv_role{role=\"leader\"}"), 1.0);
    assert_eq!(sample(&m, "kv_role{role=\"follower\"}"), 0.0);
    assert_eq!(sample(&m, "kv_engine_poisoned"), 0.0);
    assert_eq!(sample(&m, "kv_healthy"), 1.0);
    assert!(sample(&m, "kv_leader_changes_total") >= 1.0);
    assert!(sample(&m, "kv_wal_bytes") > 0.0);
    assert!(sample(&m, "kv_wal_written_bytes_total") > 0.0);
    // Every record of this term (its first entry and the writes) was made
    // durable by some fsync.
    assert!(sample(&m, "kv_wal_fsync_duration_seconds_count") >= 1.0);
    assert!(sample(&m, "kv_wal_fsync_records_sum") >= 8.0 + batch_ops);
    for id in (1..=3).filter(|id| *id != leader) {
        let connected = format!("kv_follower_connected{{follower=\"{id}\"}}");
        assert_eq!(sample(&m, &connected), 1.0);
    }

    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let f = scrape(cluster.metrics_addrs[follower - 1]);
    assert_eq!(sample(&f, "kv_role{role=\"follower\"}"), 1.0);
    assert_eq!(sample(&f, "kv_role{role=\"leader\"}"), 0.0);
    assert_eq!(sample(&f, "kv_leader_id"), leader as f64);
    assert_eq!(sample(&f, "kv_term"), status.term as f64);
    assert_eq!(
        f.get(quorum).copied().unwrap_or(0.0),
        0.0,
        "a follower counted writes it did not serve"
    );

    let (not_found, _) = http_get(addr, "/other");
    assert!(not_found.contains("404"), "{not_found}");
}

/// The health verdict a node gives for `service`.
fn health(addr: SocketAddr, service: &str) -> Option<i32> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .ok()?
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_millis(500))
            .connect()
            .await
            .ok()?;
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .ok()?;
        Some(reply.into_inner().status)
    })
}

/// Waits (up to `limit`) until `addr` reports `want` for both service
/// names; returns how long that took.
fn wait_health(addr: SocketAddr, want: ServingStatus, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let now: Vec<Option<i32>> = ["", "kv.v1.Kv"].iter().map(|s| health(addr, s)).collect();
        if now.iter().all(|s| *s == Some(want as i32)) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "health of {addr} is {now:?}, not {want:?}, after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SERVING with a leader; a follower whose peers are killed turns
/// NOT_SERVING once no leader was known for twice the election timeout
/// (300 ms here), not before; SERVING again when they are back.
#[test]
fn health_follows_whether_a_leader_is_known() {
    let mut cluster = Cluster::start_elected("election_timeout_ms = 300\n");
    let leader = cluster.wait_leader();
    for id in cluster.ids() {
        wait_health(
            cluster.addrs[id - 1],
            ServingStatus::Serving,
            Duration::from_secs(5),
        );
    }
    let survivor = cluster.ids().find(|id| *id != leader).unwrap();
    let others: Vec<usize> = cluster.ids().filter(|id| *id != survivor).collect();
    // The survivor follows the leader right now (no election under way).
    cluster.wait_until(Duration::from_secs(10), "the survivor follows", |c| {
        let (s, l) = (c.status_of(survivor), c.status_of(leader));
        matches!((s, l), (Some(s), Some(l))
            if s.role == "follower" && s.leader_id == leader as u64 && s.term == l.term
                && l.role == "leader")
    });
    for id in &others {
        cluster.kill(*id);
    }
    let addr = cluster.addrs[survivor - 1];
    let took = wait_health(addr, ServingStatus::NotServing, Duration::from_secs(10));
    let log_path = cluster.dir.path().join(format!("node{survivor}.log"));
    let log = || std::fs::read_to_string(&log_path).unwrap();
    // It heard the leader just before the kill, so it counts a leader as
    // known for another election timeout, then twice that without one.
    assert!(
        took >= Duration::from_millis(600),
        "NOT_SERVING {took:?} after its peers died: sooner than 2 x election timeout; node {survivor}: {}",
        log()
    );
    for id in &others {
        cluster.start_node(*id);
    }
    cluster.wait_leader();
    wait_health(addr, ServingStatus::Serving, Duration::from_secs(10));
    let log = log();
    assert!(
        log.contains("health: NOT_SERVING") && log.contains("health: SERVING again"),
        "{log}"
    );
}

/// `log_format = "json"`: every line `kv serve` writes is a JSON object
/// with a level and a message, the start-up lines among them.
#[test]
fn json_logs_are_one_object_per_line() {
    let cluster = Cluster::start_elected_n(1, "log_format = \"json\"\n");
    cluster.wait_leader();
    let log_path = cluster.dir.path().join("node1.log");
    let log = std::fs::read_to_string(&log_path).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: not JSON: {l:?}")))
        .collect();
    let messages: Vec<&str> = lines
        .iter()
        .map(|v| {
            assert!(v["level"].is_string(), "{v}");
            v["fields"]["message"].as_str().unwrap_or_default()
        })
        .collect();
    for wanted in ["opened", "listening on"] {
        assert!(
            messages.iter().any(|m| m.contains(wanted)),
            "no {wanted:?} line in {messages:?}"
        );
    }
}
