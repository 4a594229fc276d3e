//! `kv verify`: a bounded, linearizability-checked workload against a live
//! cluster through its public API, then a check of every node's log.
//!
//! 1. **Workload.** `clients` concurrent tasks, for `secs` seconds, each in
//!    a closed loop: a put of a value unique to the run (50%), a read (40%)
//!    or a delete (10%) of one of `keys` keys of its own namespace
//!    (`kv-verify/<run>/<n>`, so an earlier run's keys do not interfere).
//!    Each operation is recorded with its call and return times (one
//!    monotonic clock) and its outcome. A write that failed in any way is
//!    recorded as *unknown* (it may have taken effect), never as "not
//!    done", so no failure can be mistaken for a violation; a read that
//!    failed observed nothing and is left out.
//! 2. **Linearizability** of that history, key by key
//!    ([`crate::linearizability`], the simulation's checker): a verdict,
//!    and on a violation the key's operations and the longest linearizable
//!    prefix.
//! 3. **Logs.** Every acknowledged write must be, on every node, the record
//!    at the LSN its acknowledgement named (`Kv.Record`); records already
//!    folded into a snapshot are counted as compacted, nodes that do not
//!    answer as unreachable.
//!
//! Not here: multi-key or transactional checks, durability across a
//! restart of the whole cluster, or fault injection (the caller's: a test
//! kills and stops nodes meanwhile).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kv_proto::v1 as pb;

use crate::client::cluster_client::Client;
use crate::linearizability::{self, Input, Operation, Output, Verdict};
use crate::tls::Transport;

/// What `kv verify` runs.
#[derive(Debug, Clone)]
pub struct VerifyPlan {
    /// How long the workload runs.
    pub duration: Duration,
    /// Concurrent clients.
    pub clients: usize,
    /// Keys the clients share (few: operations collide).
    pub keys: usize,
    /// Read consistency of the workload's reads (`stale`: any node's
    /// applied state, which is *not* linearizable: for showing that the
    /// checker catches stale reads).
    pub stale_reads: bool,
    /// Time the checker may search (then "unknown").
    pub check_budget: Duration,
}

/// What `kv verify` found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    pub operations: usize,
    pub writes_acknowledged: usize,
    pub reads: usize,
    pub unknown: usize,
    pub failed_reads: usize,
    /// `linearizable`, `violation` or `unknown` (the search ran out of time).
    pub verdict: String,
    /// On a violation: the key's history and the longest linearizable prefix.
    pub counterexample: Option<String>,
    /// Acknowledged writes found at their LSN, per node checked.
    pub log_records_checked: usize,
    pub log_records_compacted: usize,
    pub log_nodes_unreachable: Vec<String>,
    /// Acknowledged writes missing from, or different at their LSN in, a
    /// node's log.
    pub log_mismatches: Vec<String>,
}

impl VerifyReport {
    /// True if nothing was found wrong (an "unknown" verdict is not a
    /// violation, but not a pass either).
    pub fn passed(&self) -> bool {
        self.verdict == "linearizable" && self.log_mismatches.is_empty()
    }
}

struct Acked {
    key: Vec<u8>,
    value: Option<Vec<u8>>,
    lsn: u64,
}

fn ns_since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Runs the plan against the cluster `client` reaches (reads through
/// `reader`), then checks every node in `endpoints`.
pub async fn verify(
    client: Client,
    reader: Client,
    transport: &Transport,
    endpoints: &[SocketAddr],
    plan: &VerifyPlan,
) -> VerifyReport {
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let start = Instant::now();
    let history: Arc<Mutex<Vec<Operation>>> = Arc::default();
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let failed_reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in 0..plan.clients {
        let (client, reader) = (client.clone(), reader.clone());
        let (history, acked, failed_reads) = (history.clone(), acked.clone(), failed_reads.clone());
        let (duration, keys, stale) = (plan.duration, plan.keys.max(1), plan.stale_reads);
        tasks.push(tokio::spawn(async move {
            let mut rng = crate::bench::Rng::new(run ^ (c as u64 + 1));
            let mut seq = 0u64;
            while start.elapsed() < duration {
                let k = rng.next() % keys as u64;
                let key = format!("kv-verify/{run:x}/{k}").into_bytes();
                let roll = rng.next() % 10;
                let call = ns_since(start);
                let (input, output) = if roll < 5 {
                    seq += 1;
                    let value = format!("{c}-{seq}").into_bytes();
                    let reply = client
                        .put(pb::PutRequest {
                            key: key.clone(),
                            value: value.clone(),
                            ack: pb::AckLevel::Quorum as i32,
                        })
                        .await;
                    let output = written(&acked, &key, Some(&value), reply);
                    (Input::Put(value), output)
                } else if roll < 9 {
                    let consistency = if stale {
                        pb::ReadConsistency::Stale
                    } else {
                        pb::ReadConsistency::Default
                    };
                    let reply = reader
                        .get(pb::GetRequest {
                            key: key.clone(),
                            consistency: consistency as i32,
                        })
                        .await;
                    match reply {
                        Ok(r) => (Input::Get, Output::Read(r.found.then_some(r.value))),
                        Err(_) => {
                            failed_reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            continue;
                        }
                    }
                } else {
                    let reply = client
                        .delete(pb::DeleteRequest {
                            key: key.clone(),
                            ack: pb::AckLevel::Quorum as i32,
                        })
                        .await;
                    let output = written(&acked, &key, None, reply);
                    (Input::Delete, output)
                };
                let ret = ns_since(start).max(call);
                lock(&history).push(Operation {
                    client: c as u64,
                    key,
                    input,
                    output,
                    call,
                    ret,
                });
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let history = std::mem::take(&mut *lock(&history));
    let acked = std::mem::take(&mut *lock(&acked));
    let verdict = linearizability::check(&history, plan.check_budget);
    let (verdict, counterexample) = match verdict {
        Verdict::Ok => ("linearizable", None),
        Verdict::Illegal { explanation, .. } => ("violation", Some(explanation)),
        Verdict::Unknown { .. } => ("unknown", None),
    };
    let mut report = VerifyReport {
        operations: history.len(),
        writes_acknowledged: acked.len(),
        reads: history
            .iter()
            .filter(|op| matches!(op.input, Input::Get))
            .count(),
        unknown: history
            .iter()
            .filter(|op| op.output == Output::Unknown)
            .count(),
        failed_reads: failed_reads.load(std::sync::atomic::Ordering::Relaxed),
        verdict: verdict.to_owned(),
        counterexample,
        log_records_checked: 0,
        log_records_compacted: 0,
        log_nodes_unreachable: Vec::new(),
        log_mismatches: Vec::new(),
    };
    check_logs(transport, endpoints, &acked, &mut report).await;
    report
}

/// A write's outcome for the history; an acknowledged one is kept for the
/// log check. Any failure is "unknown": it may have taken effect.
fn written(
    acked: &Mutex<Vec<Acked>>,
    key: &[u8],
    value: Option<&[u8]>,
    reply: Result<pb::WriteReply, crate::client::cluster_client::CallError>,
) -> Output {
    match reply {
        Ok(r) => {
            lock(acked).push(Acked {
                key: key.to_vec(),
                value: value.map(<[u8]>::to_vec),
                lsn: r.lsn,
            });
            Output::Written
        }
        Err(_) => Output::Unknown,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Every acknowledged write, on every node, at its LSN. A node is given
/// time to catch up (its durable LSN reaching the highest acknowledged
/// one) before its log is read.
async fn check_logs(
    transport: &Transport,
    endpoints: &[SocketAddr],
    acked: &[Acked],
    report: &mut VerifyReport,
) {
    let highest = acked.iter().map(|a| a.lsn).max().unwrap_or(0);
    let by_lsn: BTreeMap<u64, &Acked> = acked.iter().map(|a| (a.lsn, a)).collect();
    for &addr in endpoints {
        let Ok(endpoint) = transport.endpoint(addr) else {
            report.log_nodes_unreachable.push(addr.to_string());
            continue;
        };
        let endpoint = endpoint
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5));
        let Ok(channel) = endpoint.connect().await else {
            report.log_nodes_unreachable.push(addr.to_string());
            continue;
        };
        let mut node = pb::kv_client::KvClient::new(channel);
        // Up to 10 s for the node to hold everything acknowledged.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match node.status(pb::StatusRequest {}).await {
                Ok(s) if s.get_ref().durable_lsn >= highest => break,
                Ok(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                _ => break,
            }
        }
        for (&lsn, write) in &by_lsn {
            let reply = match node.record(pb::RecordRequest { lsn }).await {
                Ok(r) => r.into_inner(),
                Err(status) => {
                    report.log_mismatches.push(format!(
                        "{addr}: LSN {lsn}: unreadable: {}",
                        status.message()
                    ));
                    continue;
                }
            };
            if reply.compacted {
                report.log_records_compacted += 1;
                continue;
            }
            let expected = |r: &pb::LogRecord| {
                r.key == write.key
                    && match &write.value {
                        Some(v) => !r.delete && &r.value == v,
                        None => r.delete,
                    }
            };
            match reply.record {
                Some(r) if expected(&r) => report.log_records_checked += 1,
                Some(r) => report.log_mismatches.push(format!(
                    "{addr}: LSN {lsn} holds {} of {:?} in term {}, not the acknowledged {} of {:?}",
                    if r.delete { "a delete" } else { "a put" },
                    String::from_utf8_lossy(&r.key),
                    r.term,
                    if write.value.is_some() { "put" } else { "delete" },
                    String::from_utf8_lossy(&write.key),
                )),
                None => report
                    .log_mismatches
                    .push(format!("{addr}: LSN {lsn} (acknowledged) is not in its log")),
            }
        }
    }
}

/// The report as people read it.
pub fn render(report: &VerifyReport) -> String {
    let mut out = format!(
        "operations {}: {} writes acknowledged, {} reads, {} unknown outcomes ({} reads failed and were left out)\n\
         linearizability: {}\n\
         logs: {} acknowledged records found at their LSN, {} compacted into snapshots, {} mismatches{}\n",
        report.operations,
        report.writes_acknowledged,
        report.reads,
        report.unknown,
        report.failed_reads,
        report.verdict,
        report.log_records_checked,
        report.log_records_compacted,
        report.log_mismatches.len(),
        if report.log_nodes_unreachable.is_empty() {
            String::new()
        } else {
            format!("; unreachable: {}", report.log_nodes_unreachable.join(", "))
        }
    );
    if let Some(counterexample) = &report.counterexample {
        // The explanation lists the key's whole history; the violation is
        // just after the prefix it names, near the top.
        const SHOWN: usize = 60;
        out.push_str("counterexample:\n");
        let lines: Vec<&str> = counterexample.lines().collect();
        for line in lines.iter().take(SHOWN) {
            out.push_str(line);
            out.push('\n');
        }
        if lines.len() > SHOWN {
            out.push_str(&format!(
                "  ... {} more ops of this key (all of them with -w json)\n",
                lines.len() - SHOWN
            ));
        }
    }
    for m in report.log_mismatches.iter().take(20) {
        out.push_str(&format!("  {m}\n"));
    }
    out.push_str(if report.passed() {
        "verdict: PASS\n"
    } else if report.verdict == "unknown" && report.log_mismatches.is_empty() {
        "verdict: UNKNOWN (the checker ran out of time; shorten the run or use more keys)\n"
    } else {
        "verdict: FAIL\n"
    });
    out
}
