//! The command-line client: `kv put/get/del/status` against a cluster.
//!
//! It tries the endpoints in order, follows NOT_LEADER redirects (the error
//! carries the leader's address), and says "outcome unknown" when the
//! cluster did — it never turns that into "failed".

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use kv_proto::v1 as pb;
use pb::kv_client::KvClient;
use tonic::transport::Channel;

use super::LEADER_METADATA;
use super::config::NodeConfig;

/// The members' addresses from `configs/node*.toml` (in `dir`), in order.
pub fn endpoints_from_configs(dir: &Path) -> anyhow::Result<Vec<SocketAddr>> {
    let mut addrs = Vec::new();
    let entries = std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))?;
    let mut paths: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    for path in paths {
        let config = NodeConfig::load(&path)?;
        for m in config.members {
            if !addrs.contains(&m.addr) {
                addrs.push(m.addr);
            }
        }
    }
    if addrs.is_empty() {
        bail!("no cluster members found in {}", dir.display());
    }
    Ok(addrs)
}

async fn connect(addr: SocketAddr, timeout: Duration) -> anyhow::Result<KvClient<Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await
        .with_context(|| format!("connect to {addr}"))?;
    Ok(KvClient::new(channel))
}

/// A client bound to a list of endpoints.
#[derive(Debug, Clone)]
pub struct Client {
    endpoints: Vec<SocketAddr>,
    timeout: Duration,
}

/// What a call against the cluster failed with.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The cluster answered with an error (not a redirect).
    #[error("{}", .0.message())]
    Status(tonic::Status),
    /// No endpoint could be reached or none led.
    #[error("{0}")]
    Unreachable(String),
}

impl Client {
    /// A client over `endpoints`, each call bounded by `timeout`.
    pub fn new(endpoints: Vec<SocketAddr>, timeout: Duration) -> Self {
        Client { endpoints, timeout }
    }

    /// Runs `call` against the endpoints in turn, following redirects.
    pub async fn call<T, F, Fut>(&self, mut call: F) -> Result<T, CallError>
    where
        F: FnMut(KvClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut queue: Vec<SocketAddr> = self.endpoints.clone();
        let mut tried = Vec::new();
        let mut last_error = String::from("no endpoints");
        while let Some(addr) = (!queue.is_empty()).then(|| queue.remove(0)) {
            if tried.contains(&addr) {
                continue;
            }
            tried.push(addr);
            let client = match connect(addr, self.timeout).await {
                Ok(c) => c,
                Err(e) => {
                    last_error = format!("{e:#}");
                    continue;
                }
            };
            match call(client).await {
                Ok(reply) => return Ok(reply.into_inner()),
                Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                    let leader = status
                        .metadata()
                        .get(LEADER_METADATA)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<SocketAddr>().ok());
                    last_error = status.message().to_owned();
                    if let Some(leader) = leader {
                        queue.insert(0, leader);
                    }
                }
                Err(status)
                    if status.code() == tonic::Code::Unavailable
                        && !status.message().starts_with("outcome unknown") =>
                {
                    last_error = format!("{addr}: {}", status.message());
                }
                Err(status) => return Err(CallError::Status(status)),
            }
        }
        Err(CallError::Unreachable(last_error))
    }
}

/// `--ack` values.
pub fn parse_ack(s: &str) -> anyhow::Result<pb::AckLevel> {
    Ok(match s {
        "local" => pb::AckLevel::Local,
        "quorum" => pb::AckLevel::Quorum,
        "all" => pb::AckLevel::All,
        "default" => pb::AckLevel::Default,
        other => bail!("--ack {other}: expected local, quorum or all"),
    })
}

/// One line per node for `kv status`.
pub fn status_header() -> &'static str {
    "node  role      term  leader  last_lsn  durable  commit  applied  snapshot  lag  digest            keys"
}

/// Formats a status reply as a row (`lag` is the leader's view, if known).
pub fn status_row(s: &pb::StatusReply, lag: Option<u64>) -> String {
    format!(
        "{:<5} {:<9} {:<5} {:<7} {:<9} {:<8} {:<7} {:<8} {:<9} {:<4} {:016x}  {}",
        s.node_id,
        s.role,
        s.term,
        s.leader_id,
        s.last_lsn,
        s.durable_lsn,
        s.commit_lsn,
        s.applied_lsn,
        s.snapshot_lsn,
        lag.map_or("-".to_owned(), |l| l.to_string()),
        s.digest,
        s.keys
    )
}

/// `kv status`: asks every endpoint directly (no redirects).
pub async fn status_all(
    endpoints: &[SocketAddr],
    timeout: Duration,
) -> Vec<(SocketAddr, Result<pb::StatusReply, String>)> {
    let mut out = Vec::new();
    for addr in endpoints {
        let reply = match connect(*addr, timeout).await {
            Ok(mut c) => c
                .status(pb::StatusRequest {})
                .await
                .map(|r| r.into_inner())
                .map_err(|s| s.message().to_owned()),
            Err(e) => Err(format!("{e:#}")),
        };
        out.push((*addr, reply));
    }
    out
}
