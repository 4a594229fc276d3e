//! The command-line client: `kv put/get/del/status` against a cluster.
//!
//! It tries the endpoints in order, follows NOT_LEADER redirects (the error
//! carries the leader's address), and says "outcome unknown" when the
//! cluster did — it never turns that into "failed".

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use kv_proto::v1 as pb;
use pb::kv_client::KvClient;
use tonic::transport::Channel;

use super::batch_client::BatchClient;
use crate::server::LEADER_METADATA;
use crate::server::config::NodeConfig;
use crate::server::env::{Dialer, TcpDialer};
use crate::tls::Transport;

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

async fn connect(
    dialer: &dyn Dialer,
    transport: &Transport,
    addr: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<KvClient<Channel>> {
    // A dead or cut-off node answers no SYN: give connecting a third of the
    // call's time, so the other endpoints get their turn.
    let connect_timeout = (timeout / 3).max(Duration::from_millis(100));
    let endpoint = transport
        .endpoint(addr)?
        .connect_timeout(connect_timeout)
        .timeout(timeout);
    let channel = tokio::time::timeout(connect_timeout, dialer.dial(endpoint))
        .await
        .map_err(|_| anyhow::anyhow!("connect to {addr}: no answer within {connect_timeout:?}"))?
        .with_context(|| format!("connect to {addr}"))?;
    Ok(KvClient::new(channel))
}

/// What a plaintext client is told when the node spoke no HTTP/2 to it.
const PLAINTEXT_HINT: &str =
    "(the node may serve TLS: pass --cacert, or set KV_CACERT, to connect with TLS)";

/// True if a call failed in the HTTP/2 connection itself (as when
/// plaintext meets a TLS listener), not with a service's answer.
fn is_h2_failure(status: &tonic::Status) -> bool {
    let message = status.message();
    matches!(
        status.code(),
        tonic::Code::Unknown | tonic::Code::Internal | tonic::Code::Cancelled
    ) && (message.contains("h2 protocol error")
        || message == "transport error"
        || message == "operation was canceled")
}

/// A client bound to a list of endpoints.
#[derive(Debug, Clone)]
pub struct Client {
    endpoints: Vec<SocketAddr>,
    timeout: Duration,
    dialer: Arc<dyn Dialer>,
    transport: Transport,
    /// The endpoint that answered last (the leader, usually): tried first.
    last_good: Arc<std::sync::Mutex<Option<SocketAddr>>>,
}

/// What a call against the cluster failed with.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The cluster answered with an error (not a redirect): the request was
    /// refused and took no effect.
    #[error("{}", .0.message())]
    Status(tonic::Status),
    /// The request was sent and may or may not take effect: the node said
    /// "outcome unknown", or a write's call broke or hit the client's
    /// deadline after it was sent. Never retried.
    #[error("{}", .0.message())]
    OutcomeUnknown(tonic::Status),
    /// No endpoint could be reached or none led.
    #[error("{0}")]
    Unreachable(String),
}

/// True if a node answered "outcome unknown" (a write it appended but
/// could not get acknowledged in time; it may still commit).
fn says_outcome_unknown(status: &tonic::Status) -> bool {
    status.message().starts_with("outcome unknown")
}

impl CallError {
    /// The failure a call ended with once `status` came back and is not
    /// retried: unknown if the node said so, or if a write (`idempotent`
    /// false) lost its call after sending it — tonic's own codes for that
    /// are CANCELLED (the client's deadline) and UNKNOWN (a broken
    /// connection), which a node never answers with; else a refusal.
    fn from_status(status: tonic::Status, idempotent: bool) -> CallError {
        let lost = matches!(status.code(), tonic::Code::Cancelled | tonic::Code::Unknown);
        if says_outcome_unknown(&status) || (!idempotent && lost) {
            CallError::OutcomeUnknown(status)
        } else {
            CallError::Status(status)
        }
    }
}

impl Client {
    /// A client over `endpoints` on the real network, each call bounded by
    /// `timeout`.
    pub fn new(endpoints: Vec<SocketAddr>, timeout: Duration) -> Self {
        Client::with_dialer(endpoints, timeout, Arc::new(TcpDialer))
    }

    /// A client that reaches the endpoints through `dialer`.
    pub fn with_dialer(
        endpoints: Vec<SocketAddr>,
        timeout: Duration,
        dialer: Arc<dyn Dialer>,
    ) -> Self {
        Client {
            endpoints,
            timeout,
            dialer,
            transport: Transport::plaintext(),
            last_good: Arc::default(),
        }
    }

    /// This client, its connections secured as `transport` says.
    pub fn with_transport(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }

    /// Runs `call` against the endpoints, following redirects, until one
    /// answers or `2 × timeout` has passed (rounds over every endpoint with
    /// a growing pause between them, so an election can finish).
    ///
    /// Only refusals that prove nothing was done are retried elsewhere: a
    /// failed connect, or "not leader". Any other failure after the request
    /// was sent is returned as it is — for a write its outcome is unknown,
    /// and retrying it at another node could apply it twice — unless
    /// `idempotent` (reads), which try the next endpoint.
    pub async fn call<T, F, Fut>(&self, idempotent: bool, mut call: F) -> Result<T, CallError>
    where
        F: FnMut(KvClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout * 2;
        let mut pause = Duration::from_millis(25);
        let mut last_error = String::from("no endpoints");
        loop {
            let mut queue: Vec<SocketAddr> = self.endpoints.clone();
            let last_good = *self
                .last_good
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(addr) = last_good {
                queue.insert(0, addr);
            }
            let mut tried = Vec::new();
            while let Some(addr) = (!queue.is_empty()).then(|| queue.remove(0)) {
                if tried.contains(&addr) {
                    continue;
                }
                tried.push(addr);
                let client = match connect(&*self.dialer, &self.transport, addr, self.timeout).await
                {
                    Ok(c) => c,
                    Err(e) => {
                        last_error = format!("{e:#}");
                        if !self.transport.is_tls() && last_error.contains("http2 error") {
                            last_error = format!("{last_error} {PLAINTEXT_HINT}");
                        }
                        tracing::debug!(%addr, error = %last_error, "connect failed");
                        continue;
                    }
                };
                let reply = call(client).await;
                if let Err(status) = &reply {
                    tracing::debug!(%addr, code = ?status.code(), message = status.message(), "call failed");
                }
                match reply {
                    Ok(reply) => {
                        *self
                            .last_good
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(addr);
                        return Ok(reply.into_inner());
                    }
                    // "Not leader" (FAILED_PRECONDITION saying so): try the
                    // leader it names, else the next endpoint. Another
                    // failed precondition (a fixed leader refusing a
                    // transfer) is a refusal like any other.
                    Err(status)
                        if status.code() == tonic::Code::FailedPrecondition
                            && status.message().starts_with("not leader") =>
                    {
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
                    Err(status) if idempotent && !says_outcome_unknown(&status) => {
                        last_error = format!("{addr}: {}", status.message());
                        if !self.transport.is_tls() && is_h2_failure(&status) {
                            last_error = format!("{last_error} {PLAINTEXT_HINT}");
                        }
                    }
                    // Plaintext spoken to a TLS listener breaks the HTTP/2
                    // connection; whether a request ran cannot be told
                    // from here, so it is not retried, but the error says
                    // what is likely wrong.
                    Err(status) if !self.transport.is_tls() && is_h2_failure(&status) => {
                        let message = format!("{addr}: {} {PLAINTEXT_HINT}", status.message());
                        return Err(CallError::Status(tonic::Status::new(
                            status.code(),
                            message,
                        )));
                    }
                    Err(status) => return Err(CallError::from_status(status, idempotent)),
                }
            }
            if tokio::time::Instant::now() + pause > deadline {
                return Err(CallError::Unreachable(last_error));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }
}

impl Client {
    /// `Put`, with redirects followed.
    pub async fn put(&self, req: pb::PutRequest) -> Result<pb::WriteReply, CallError> {
        self.call(false, |mut c| {
            let req = req.clone();
            async move { c.put(req).await }
        })
        .await
    }

    /// `Delete`, with redirects followed.
    pub async fn delete(&self, req: pb::DeleteRequest) -> Result<pb::WriteReply, CallError> {
        self.call(false, |mut c| {
            let req = req.clone();
            async move { c.delete(req).await }
        })
        .await
    }

    /// `TransferLeader`, sent to the leader (redirects followed). Returns
    /// once the target campaigns and the old leader has stepped down.
    /// UNAVAILABLE is an unknown outcome here: the leader could not
    /// confirm that the target campaigns, and stepped down anyway.
    pub async fn transfer_leader(&self, target: u64) -> Result<pb::TransferLeaderReply, CallError> {
        let reply = self
            .call(false, |mut c| async move {
                c.transfer_leader(pb::TransferLeaderRequest { target })
                    .await
            })
            .await;
        match reply {
            Err(CallError::Status(s)) if s.code() == tonic::Code::Unavailable => {
                Err(CallError::OutcomeUnknown(s))
            }
            other => other,
        }
    }

    /// `Get`, with redirects followed.
    pub async fn get(&self, req: pb::GetRequest) -> Result<pb::GetReply, CallError> {
        self.call(true, |mut c| {
            let req = req.clone();
            async move { c.get(req).await }
        })
        .await
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
    "node  role       term  vote  leader  last_lsn  durable  commit  applied  snapshot  lag  digest            keys"
}

/// Formats a status reply as a row (`lag` is the leader's view, if known).
pub fn status_row(s: &pb::StatusReply, lag: Option<u64>) -> String {
    format!(
        "{:<5} {:<10} {:<5} {:<5} {:<7} {:<9} {:<8} {:<7} {:<8} {:<9} {:<4} {:016x}  {}",
        s.node_id,
        s.role,
        s.term,
        if s.voted_for == 0 {
            "-".to_owned()
        } else {
            s.voted_for.to_string()
        },
        if s.leader_id == 0 {
            "-".to_owned()
        } else {
            s.leader_id.to_string()
        },
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
    transport: &Transport,
    endpoints: &[SocketAddr],
    timeout: Duration,
) -> Vec<(SocketAddr, Result<pb::StatusReply, String>)> {
    let mut out = Vec::new();
    for addr in endpoints {
        let reply = match connect(&TcpDialer, transport, *addr, timeout).await {
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

/// How `kv bench cluster`'s clients send their writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchApi {
    /// The clients sharing a connection share one `Kv.Batch` stream.
    Batch,
    /// One unary `Kv.Put` call per write.
    Unary,
}

/// One row of `kv bench cluster`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterBenchRow {
    pub api: BenchApi,
    pub clients: usize,
    pub ops: u64,
    pub seconds: f64,
    pub ops_per_sec: f64,
    pub p50_us: u64,
    pub p99_us: u64,
}

/// The table header of `kv bench cluster`.
pub const CLUSTER_BENCH_HEADER: &str =
    "api     clients        ops   seconds      ops/s   p50_us   p99_us";

impl std::fmt::Display for ClusterBenchRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<7} {:>7} {:>10} {:>9.3} {:>10.0} {:>8} {:>8}",
            match self.api {
                BenchApi::Batch => "batch",
                BenchApi::Unary => "unary",
            },
            self.clients,
            self.ops,
            self.seconds,
            self.ops_per_sec,
            self.p50_us,
            self.p99_us
        )
    }
}

/// A benchmark client's way to the leader.
enum Writer {
    Unary(KvClient<Channel>),
    Batch(BatchClient),
}

impl Writer {
    async fn put(&mut self, req: pb::PutRequest) -> Result<pb::WriteReply, tonic::Status> {
        match self {
            Writer::Unary(client) => client.put(req).await.map(tonic::Response::into_inner),
            Writer::Batch(stream) => stream.put(req).await,
        }
    }
}

/// Clients per HTTP/2 connection in the benchmark (streams multiplex).
const CLIENTS_PER_CONNECTION: usize = 32;

/// What each client count of `kv bench cluster` writes, and how.
#[derive(Debug, Clone, Copy)]
pub struct BenchLoad {
    /// Writes in all.
    pub ops: u64,
    pub key_size: usize,
    pub value_size: usize,
    pub api: BenchApi,
}

/// `kv bench cluster`: `clients` concurrent clients write `ops` random keys
/// in all (each waits for its write, at the cluster's default
/// acknowledgement level, before sending the next) to the leader, over one
/// HTTP/2 connection per [`CLIENTS_PER_CONNECTION`] clients, as `api` says.
pub async fn bench_cluster(
    transport: &Transport,
    endpoints: &[SocketAddr],
    clients: usize,
    load: BenchLoad,
    timeout: Duration,
) -> anyhow::Result<ClusterBenchRow> {
    let BenchLoad {
        ops,
        key_size,
        value_size,
        api,
    } = load;
    let statuses = status_all(transport, endpoints, timeout).await;
    let leader = statuses
        .iter()
        .find(|(_, s)| s.as_ref().is_ok_and(|s| s.role == "leader"))
        .map(|(addr, _)| *addr)
        .ok_or_else(|| anyhow::anyhow!("no leader among {endpoints:?}"))?;
    let mut channels = Vec::new();
    for _ in 0..clients.div_ceil(CLIENTS_PER_CONNECTION) {
        channels.push(
            transport
                .endpoint(leader)?
                .connect_timeout(timeout)
                .timeout(timeout)
                .tcp_nodelay(true)
                // A dead connection breaks a batch stream within two timeouts.
                .http2_keep_alive_interval(timeout)
                .keep_alive_timeout(timeout)
                .connect()
                .await
                .with_context(|| format!("connect to {leader}"))?,
        );
    }
    let mut streams = Vec::new();
    if api == BenchApi::Batch {
        for channel in &channels {
            streams.push(
                BatchClient::open(channel.clone(), timeout)
                    .await
                    .map_err(|s| {
                        anyhow::anyhow!("open a batch stream to {leader}: {}", s.message())
                    })?,
            );
        }
    }
    let per_client = ops / clients as u64;
    let start = std::time::Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let mut client = match api {
            BenchApi::Batch => Writer::Batch(streams[c / CLIENTS_PER_CONNECTION].clone()),
            BenchApi::Unary => {
                Writer::Unary(KvClient::new(channels[c / CLIENTS_PER_CONNECTION].clone()))
            }
        };
        tasks.push(tokio::spawn(async move {
            let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ ((c as u64 + 1) << 32);
            let mut next = move || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state
            };
            // A plain vector while the clock runs (a histogram per client
            // would be a large allocation each, touched at random).
            let mut lat = Vec::with_capacity(per_client as usize);
            for _ in 0..per_client {
                let key: Vec<u8> = (0..key_size).map(|_| b'a' + (next() % 26) as u8).collect();
                let value = vec![b'v'; value_size];
                let t = std::time::Instant::now();
                client
                    .put(pb::PutRequest {
                        key,
                        value,
                        ack: pb::AckLevel::Default as i32,
                    })
                    .await
                    .map_err(|s| anyhow::anyhow!("put: {}", s.message()))?;
                lat.push(t.elapsed().as_micros() as u64);
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let mut samples = Vec::with_capacity(tasks.len());
    for t in tasks {
        samples.push(t.await??);
    }
    let seconds = start.elapsed().as_secs_f64();
    let mut latencies = crate::bench::Latencies::new()?;
    for us in samples.iter().flatten() {
        latencies.record(*us);
    }
    Ok(ClusterBenchRow {
        api,
        clients,
        ops: latencies.len(),
        seconds,
        ops_per_sec: latencies.len() as f64 / seconds,
        p50_us: latencies.percentile(50.0),
        p99_us: latencies.percentile(99.0),
    })
}
