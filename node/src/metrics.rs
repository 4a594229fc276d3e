//! Prometheus metrics: the names and units of everything a node exports,
//! the handles the write path records into, and the `GET /metrics`
//! endpoint (`metrics_listen`).
//!
//! The engine and the node record through the `metrics` facade; `kv
//! serve` installs `metrics-exporter-prometheus`'s recorder as the global
//! one ([`install`]) before it opens the engine, and serves its rendering
//! over HTTP/1.1 (hyper) on a thread of its own ([`serve`]), never on the
//! node's runtime. Without an installed recorder (the REPL, the tests, the
//! simulation) every handle is a no-op.
//!
//! Cost on the write path: the handles are registered once (at engine open
//! and node start) and kept, so a write does one `Instant::now()` and one
//! histogram record (an append to the exporter's lock-free bucket, drained
//! at each scrape or upkeep); an fsync round does the same once. Positions,
//! the term, the role, followers' progress and the WAL size are not
//! instrumented at all: the scrape reads them ([`serve`]'s `refresh`) just
//! before it renders.
//!
//! It does not decide health (`server::observe`) or keep history: a
//! scrape shows the values at that moment, and histograms since start.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_cluster::AckLevel;
use metrics::{Counter, Histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Write latency, from arrival to acknowledgement at its level
/// (`api`, `ack` labels); acknowledged writes only.
pub const WRITE_SECONDS: &str = "kv_write_duration_seconds";
/// Writes that failed (`api`, `code` labels: the gRPC code).
pub const WRITE_ERRORS: &str = "kv_write_errors_total";
/// Read latency (`api`, `consistency` labels); served reads only.
pub const READ_SECONDS: &str = "kv_read_duration_seconds";
/// Reads that failed (`api`, `code`).
pub const READ_ERRORS: &str = "kv_read_errors_total";
/// One WAL `fdatasync` of group commit.
pub const FSYNC_SECONDS: &str = "kv_wal_fsync_duration_seconds";
/// Records one group-commit `fdatasync` made durable.
pub const FSYNC_RECORDS: &str = "kv_wal_fsync_records";
/// Bytes written to WAL segments.
pub const WAL_WRITTEN_BYTES: &str = "kv_wal_written_bytes_total";
/// Bytes the WAL's segments hold now.
pub const WAL_BYTES: &str = "kv_wal_bytes";
/// Snapshots written by this node.
pub const SNAPSHOTS: &str = "kv_snapshots_total";
/// Time to write one snapshot (encode, WAL sync, durable write, clean-up).
pub const SNAPSHOT_SECONDS: &str = "kv_snapshot_duration_seconds";
/// Size of the newest snapshot this node wrote.
pub const SNAPSHOT_BYTES: &str = "kv_snapshot_bytes";
/// Times this node learned of a new leader (itself included).
pub const LEADER_CHANGES: &str = "kv_leader_changes_total";

/// The gauges read at scrape time: (name, help).
pub const GAUGES: &[(&str, &str)] = &[
    ("kv_last_lsn", "LSN of the last record appended here"),
    (
        "kv_durable_lsn",
        "LSN through which the log is durable here",
    ),
    ("kv_commit_lsn", "the commit LSN as this node knows it"),
    (
        "kv_applied_lsn",
        "LSN of the last record applied to the map",
    ),
    ("kv_snapshot_lsn", "LSN of the newest snapshot on disk"),
    ("kv_keys", "keys in the map"),
    ("kv_term", "the current term"),
    ("kv_leader_id", "the leader this node knows (0: none)"),
    (
        "kv_role",
        "1 for this node's role (role label), 0 for the others",
    ),
    (
        "kv_follower_lag_records",
        "leader only: records a follower's durable log is behind the leader's last LSN",
    ),
    (
        "kv_follower_inflight_bytes",
        "leader only: bytes sent to a follower and not yet acknowledged",
    ),
    (
        "kv_follower_connected",
        "leader only: 1 while the replication stream to a follower is up",
    ),
    (
        "kv_engine_poisoned",
        "1 once a failed write or sync poisoned the engine (it takes no more writes)",
    ),
    (
        "kv_divergence_alarm",
        "1 once this replica's state failed the leader's digest checkpoint (it serves no reads)",
    ),
    (
        "kv_healthy",
        "1 while the gRPC health service reports SERVING",
    ),
];

/// Histogram buckets for durations: 50 µs to 10 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];
/// Histogram buckets for records per fsync: powers of two.
const RECORDS_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0, 16384.0,
];
/// How often histogram samples are drained when nobody scrapes.
const UPKEEP: Duration = Duration::from_secs(5);

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("configure the Prometheus recorder: {0}")]
    Build(#[from] metrics_exporter_prometheus::BuildError),
    #[error("install the metrics recorder: another one is installed")]
    Installed,
    #[error("listen on {addr} (metrics_listen): {error}")]
    Listen {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("start the metrics thread or its runtime: {0}")]
    Thread(std::io::Error),
}

/// Installs the Prometheus recorder as this process's global recorder and
/// describes every metric. Call it before the engine opens: handles taken
/// before it are no-ops.
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(FSYNC_RECORDS.into()), RECORDS_BUCKETS)?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|_| MetricsError::Installed)?;
    describe();
    Ok(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_histogram!(
        WRITE_SECONDS,
        Unit::Seconds,
        "write latency from arrival to acknowledgement at its level"
    );
    describe_counter!(WRITE_ERRORS, "writes that failed, by gRPC code");
    describe_histogram!(READ_SECONDS, Unit::Seconds, "read latency");
    describe_counter!(READ_ERRORS, "reads that failed, by gRPC code");
    describe_histogram!(FSYNC_SECONDS, Unit::Seconds, "one WAL fdatasync");
    describe_histogram!(FSYNC_RECORDS, "records one WAL fdatasync made durable");
    describe_counter!(
        WAL_WRITTEN_BYTES,
        Unit::Bytes,
        "bytes written to WAL segments"
    );
    describe_gauge!(WAL_BYTES, Unit::Bytes, "bytes the WAL segments hold");
    describe_counter!(SNAPSHOTS, "snapshots written");
    describe_histogram!(SNAPSHOT_SECONDS, Unit::Seconds, "time to write a snapshot");
    describe_gauge!(
        SNAPSHOT_BYTES,
        Unit::Bytes,
        "size of the newest snapshot written"
    );
    describe_counter!(LEADER_CHANGES, "times this node learned of a new leader");
    for (name, help) in GAUGES {
        describe_gauge!(*name, *help);
    }
}

/// Serves `GET /metrics` on `listener` from a thread of its own (with a
/// single-threaded runtime): each scrape calls `refresh` (which sets the
/// gauges read at scrape time), then renders. Anything else is 404. Runs
/// until the process exits.
pub fn serve(
    listener: std::net::TcpListener,
    handle: PrometheusHandle,
    refresh: impl Fn() + Send + Sync + 'static,
) -> Result<(), MetricsError> {
    listener
        .set_nonblocking(true)
        .map_err(MetricsError::Thread)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(MetricsError::Thread)?;
    let refresh: Arc<dyn Fn() + Send + Sync> = Arc::new(refresh);
    std::thread::Builder::new()
        .name("kv-metrics".into())
        .spawn(move || runtime.block_on(run(listener, handle, refresh)))
        .map_err(MetricsError::Thread)?;
    Ok(())
}

async fn run(
    listener: std::net::TcpListener,
    handle: PrometheusHandle,
    refresh: Arc<dyn Fn() + Send + Sync>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "metrics listener failed; no metrics served");
            return;
        }
    };
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP);
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::debug!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (handle, refresh) = (handle.clone(), refresh.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let reply = respond(&req, &handle, &*refresh);
                async move { Ok::<_, std::convert::Infallible>(reply) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            // With a timer, a client that sends no request headers within
            // hyper's header-read timeout (30 s) is dropped.
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    }
}

type Body = http_body_util::Full<hyper::body::Bytes>;

fn respond<B>(
    req: &hyper::Request<B>,
    handle: &PrometheusHandle,
    refresh: &(dyn Fn() + Send + Sync),
) -> hyper::Response<Body> {
    let mut reply = hyper::Response::new(Body::default());
    if req.method() != hyper::Method::GET || req.uri().path() != "/metrics" {
        *reply.status_mut() = hyper::StatusCode::NOT_FOUND;
        *reply.body_mut() = Body::from("only GET /metrics is served here\n");
        return reply;
    }
    refresh();
    *reply.body_mut() = Body::from(handle.render());
    reply.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    reply
}

/// Binds `addr` for [`serve`] (at start, so a taken port fails the start).
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, MetricsError> {
    std::net::TcpListener::bind(addr).map_err(|error| MetricsError::Listen { addr, error })
}

/// The engine's handles (one fsync round, one snapshot).
#[derive(Debug, Clone)]
pub struct EngineMetrics {
    pub fsync_seconds: Histogram,
    pub fsync_records: Histogram,
    pub wal_written_bytes: Counter,
    pub snapshots: Counter,
    pub snapshot_seconds: Histogram,
    pub snapshot_bytes: metrics::Gauge,
}

impl EngineMetrics {
    /// Handles on the global recorder (no-ops without one).
    pub fn new() -> Self {
        EngineMetrics {
            fsync_seconds: metrics::histogram!(FSYNC_SECONDS),
            fsync_records: metrics::histogram!(FSYNC_RECORDS),
            wal_written_bytes: metrics::counter!(WAL_WRITTEN_BYTES),
            snapshots: metrics::counter!(SNAPSHOTS),
            snapshot_seconds: metrics::histogram!(SNAPSHOT_SECONDS),
            snapshot_bytes: metrics::gauge!(SNAPSHOT_BYTES),
        }
    }
}

impl Default for EngineMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Which client API a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// One gRPC call per request.
    Unary,
    /// A command of a `Kv.Batch` stream.
    Batch,
}

impl Api {
    fn label(self) -> &'static str {
        match self {
            Api::Unary => "unary",
            Api::Batch => "batch",
        }
    }
}

const APIS: [Api; 2] = [Api::Unary, Api::Batch];
const ACKS: [(AckLevel, &str); 3] = [
    (AckLevel::Local, "local"),
    (AckLevel::Quorum, "quorum"),
    (AckLevel::All, "all"),
];

fn ack_index(level: AckLevel) -> usize {
    match level {
        AckLevel::Local => 0,
        AckLevel::Quorum => 1,
        AckLevel::All => 2,
    }
}

/// The node's request handles, registered once: a request records into
/// one of them (an array index, no lookup).
#[derive(Debug, Clone)]
pub struct NodeMetrics {
    /// `[api][ack]`.
    writes: [[Histogram; 3]; 2],
    /// `[api][stale]`.
    reads: [[Histogram; 2]; 2],
    /// Times this node learned of a new leader.
    pub leader_changes: Counter,
}

impl NodeMetrics {
    /// Handles on the global recorder (no-ops without one).
    pub fn new() -> Self {
        let writes = APIS.map(|api| {
            ACKS.map(
                |(_, ack)| metrics::histogram!(WRITE_SECONDS, "api" => api.label(), "ack" => ack),
            )
        });
        let reads = APIS.map(|api| {
            ["leader", "stale"].map(|consistency| {
                metrics::histogram!(READ_SECONDS, "api" => api.label(), "consistency" => consistency)
            })
        });
        NodeMetrics {
            writes,
            reads,
            leader_changes: metrics::counter!(LEADER_CHANGES),
        }
    }

    /// A write that arrived at `start` ended with `result`.
    pub fn write_done<T>(
        &self,
        api: Api,
        level: AckLevel,
        start: Instant,
        result: &Result<T, tonic::Status>,
    ) {
        match result {
            Ok(_) => {
                self.writes[api as usize][ack_index(level)].record(start.elapsed().as_secs_f64())
            }
            Err(status) => self.write_failed(api, status),
        }
    }

    /// A write failed before it was appended (or after).
    pub fn write_failed(&self, api: Api, status: &tonic::Status) {
        error(WRITE_ERRORS, api, status.code());
    }

    /// A read that arrived at `start` ended with `result`.
    pub fn read_done<T>(
        &self,
        api: Api,
        stale: bool,
        start: Instant,
        result: &Result<T, tonic::Status>,
    ) {
        match result {
            Ok(_) => {
                self.reads[api as usize][usize::from(stale)].record(start.elapsed().as_secs_f64())
            }
            Err(status) => error(READ_ERRORS, api, status.code()),
        }
    }
}

impl Default for NodeMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Counts a failed request (the cold path: a registry lookup is fine).
fn error(name: &'static str, api: Api, code: tonic::Code) {
    let code = match code {
        tonic::Code::InvalidArgument => "invalid_argument",
        tonic::Code::FailedPrecondition => "failed_precondition",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::Aborted => "aborted",
        tonic::Code::DeadlineExceeded => "deadline_exceeded",
        tonic::Code::Internal => "internal",
        _ => "other",
    };
    metrics::counter!(name, "api" => api.label(), "code" => code).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Handles taken from a recorder show in its rendering under the
    /// names and labels the README documents (a local recorder: the
    /// global one belongs to `kv serve`).
    #[test]
    fn handles_render_under_their_names() {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
            .unwrap()
            .build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let m = NodeMetrics::new();
            let start = Instant::now();
            m.write_done(Api::Batch, AckLevel::All, start, &Ok::<(), _>(()));
            m.write_done(Api::Unary, AckLevel::Quorum, start, &Ok::<(), _>(()));
            m.write_done(Api::Unary, AckLevel::Quorum, start, &Ok::<(), _>(()));
            m.read_done(Api::Unary, true, start, &Ok::<(), _>(()));
            m.write_done::<()>(
                Api::Unary,
                AckLevel::Quorum,
                start,
                &Err(tonic::Status::unavailable("x")),
            );
            m.leader_changes.increment(1);
        });
        let text = handle.render();
        for line in [
            "kv_write_duration_seconds_count{api=\"unary\",ack=\"quorum\"} 2",
            "kv_write_duration_seconds_count{api=\"batch\",ack=\"all\"} 1",
            "kv_read_duration_seconds_count{api=\"unary\",consistency=\"stale\"} 1",
            "kv_write_errors_total{api=\"unary\",code=\"unavailable\"} 1",
            "kv_leader_changes_total 1",
        ] {
            assert!(text.contains(line), "{line:?} not in:\n{text}");
        }
    }
}
