//! `etcd-bench`: write throughput and latency of an etcd cluster, measured
//! the way `kv bench cluster` measures kv, so that
//! `scripts/bench-cluster-vs-etcd.sh` can set the two side by side.
//!
//! What it measures: for each client count C in `--clients`, C concurrent
//! client tasks together perform `--ops` puts (task `i` does `ops / C`, plus
//! one of the remainder if `i < ops % C`). Each task awaits its put before it
//! sends the next one (closed loop, one outstanding request per client), so
//! the latency of a put is the time from sending it to getting etcd's reply,
//! i.e. until the write is committed by a majority and applied. etcd is run
//! with its default durability (fsync of the WAL on commit).
//!
//! How:
//! * The leader is found first: `status()` on the given endpoints gives the
//!   leader's member id, `member_list()` gives that member's client URLs, and
//!   the one among `--endpoints` is used. Every put goes to the leader only
//!   (a follower would forward it, adding a hop kv's benchmark doesn't have).
//!   The leader is looked up again before each client count.
//! * Connections: one `etcd_client::Client` (= one HTTP/2 connection) per 32
//!   client tasks, shared by cloning, as `kv bench cluster` shares one tonic
//!   channel per 32 clients. Each connection is warmed with a `status()` call
//!   before the clock starts.
//! * Workload, identical to `kv bench cluster`: keys of exactly `--key-size`
//!   random lowercase letters (per-task xorshift64 with the same seeds, so both
//!   systems get the same keys), values of `--value-size` bytes of `v`.
//! * Output per C: clients, ops, seconds, ops_per_sec, p50_us, p99_us
//!   (nearest-rank percentiles over every put's latency in microseconds), as
//!   a table or, with `--json`, one JSON object per line with those fields.
//!
//! Any failed put aborts the run with an error (a benchmark that dropped
//! writes would overstate throughput).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use etcd_client::{Client, ConnectOptions};
use serde::Serialize;

/// The same allocator as the `kv` binary (which is also kv's load
/// generator), so neither side's client pays more for malloc than the other.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Client tasks sharing one connection (HTTP/2 streams multiplex); the same
/// number `kv bench cluster` uses.
const CLIENTS_PER_CONNECTION: usize = 32;

/// Table header, aligned with `Row`'s `Display` (same layout as kv's).
const HEADER: &str = "clients        ops   seconds      ops/s   p50_us   p99_us";

/// Write load against an etcd cluster: per client count, ops/s and p50/p99
/// latency of puts sent to the leader.
#[derive(Parser, Debug)]
#[command(name = "etcd-bench", version, about)]
struct Args {
    /// etcd client endpoints, host:port,... (the leader is found among them).
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
    /// Concurrent client counts to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    clients: Vec<usize>,
    /// Total puts per client count.
    #[arg(long, default_value_t = 20000)]
    ops: u64,
    /// Key length in bytes.
    #[arg(long, default_value_t = 16)]
    key_size: usize,
    /// Value length in bytes.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Per-request deadline in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
    /// TLS: verify etcd's certificates against this CA (PEM); the
    /// endpoints are then dialed as https://.
    #[arg(long)]
    cacert: Option<std::path::PathBuf>,
}

/// One line of results (field names are the JSON interface).
#[derive(Debug, Serialize)]
struct Row {
    clients: usize,
    ops: u64,
    seconds: f64,
    ops_per_sec: f64,
    p50_us: u64,
    p99_us: u64,
}

impl std::fmt::Display for Row {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:>7} {:>10} {:>9.3} {:>10.0} {:>8} {:>8}",
            self.clients, self.ops, self.seconds, self.ops_per_sec, self.p50_us, self.p99_us
        )
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.clients.contains(&0) {
        bail!("--clients: a client count must be at least 1");
    }
    if args.ops == 0 {
        bail!("--ops must be at least 1");
    }
    let dial = Dial {
        timeout: Duration::from_millis(args.timeout_ms),
        ca_pem: match &args.cacert {
            Some(path) => {
                Some(std::fs::read(path).with_context(|| format!("read {}", path.display()))?)
            }
            None => None,
        },
    };
    if !args.json {
        println!("{HEADER}");
    }
    for &clients in &args.clients {
        let leader = find_leader(&args.endpoints, &dial).await?;
        let row = bench(&leader, clients, &args, &dial).await?;
        if args.json {
            println!("{}", serde_json::to_string(&row)?);
        } else {
            println!("{row}");
        }
    }
    Ok(())
}

/// How every connection is made: deadlines, and TLS with `--cacert`.
#[derive(Debug, Clone)]
struct Dial {
    timeout: Duration,
    ca_pem: Option<Vec<u8>>,
}

impl Dial {
    fn options(&self) -> ConnectOptions {
        let options = ConnectOptions::new()
            .with_timeout(self.timeout)
            .with_connect_timeout(self.timeout);
        match &self.ca_pem {
            Some(pem) => options.with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(pem)),
            ),
            None => options,
        }
    }

    /// The URL to dial for `host:port`.
    fn url(&self, endpoint: &str) -> String {
        let scheme = if self.ca_pem.is_some() { "https" } else { "http" };
        format!("{scheme}://{endpoint}")
    }

    async fn connect(&self, endpoint: &str) -> Result<Client, etcd_client::Error> {
        Client::connect([self.url(endpoint)], Some(self.options())).await
    }
}

/// Strips `http://` / `https://` and a trailing `/` from a client URL, so it
/// can be compared with a `host:port` endpoint.
fn host_port(url: &str) -> &str {
    let s = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .unwrap_or(url);
    s.trim_end_matches('/')
}

/// The endpoint (one of `endpoints`) of the current leader.
///
/// Asks each endpoint for its status until one names a leader, then maps the
/// leader's member id to its client URLs. Only an address from `endpoints`
/// is ever returned, so the benchmark talks to no address it wasn't given.
async fn find_leader(endpoints: &[String], dial: &Dial) -> anyhow::Result<String> {
    let mut errors = Vec::new();
    for ep in endpoints {
        let attempt = async {
            let mut c = dial.connect(ep).await?;
            let leader_id = c.status().await?.leader();
            if leader_id == 0 {
                bail!("{ep} knows no leader yet");
            }
            let members = c.member_list().await?;
            let member = members
                .members()
                .iter()
                .find(|m| m.id() == leader_id)
                .with_context(|| format!("leader id {leader_id:x} not in the member list"))?;
            let urls: Vec<&str> = member.client_urls().iter().map(|u| host_port(u)).collect();
            endpoints
                .iter()
                .find(|e| urls.contains(&e.as_str()))
                .cloned()
                .with_context(|| {
                    format!(
                        "leader {leader_id:x} advertises {urls:?}, none of which is in --endpoints"
                    )
                })
        };
        match attempt.await {
            Ok(leader) => return Ok(leader),
            Err(e) => errors.push(format!("{ep}: {e:#}")),
        }
    }
    bail!("no leader found: {}", errors.join("; "))
}

/// One client count: `clients` tasks doing `args.ops` puts in all on `leader`.
async fn bench(leader: &str, clients: usize, args: &Args, dial: &Dial) -> anyhow::Result<Row> {
    // The connection pool, each connection established (and its HTTP/2
    // handshake done) before the clock starts.
    let mut pool = Vec::new();
    for _ in 0..clients.div_ceil(CLIENTS_PER_CONNECTION) {
        let mut c = dial
            .connect(leader)
            .await
            .with_context(|| format!("connect to {leader}"))?;
        c.status()
            .await
            .with_context(|| format!("status of {leader}"))?;
        pool.push(c);
    }

    let (ops, key_size, value_size) = (args.ops, args.key_size, args.value_size);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for c in 0..clients {
        let mut kv = pool[c / CLIENTS_PER_CONNECTION].kv_client();
        let n = ops / clients as u64 + u64::from((c as u64) < ops % clients as u64);
        tasks.push(tokio::spawn(async move {
            // xorshift64, seeded per task exactly as in `kv bench cluster`.
            let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ ((c as u64 + 1) << 32);
            let mut next = move || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state
            };
            let mut lat = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let key: Vec<u8> = (0..key_size).map(|_| b'a' + (next() % 26) as u8).collect();
                let value = vec![b'v'; value_size];
                let t = Instant::now();
                kv.put(key, value, None).await.context("put")?;
                lat.push(t.elapsed().as_micros() as u64);
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let mut latencies = Vec::with_capacity(ops as usize);
    for t in tasks {
        latencies.extend(t.await??);
    }
    let seconds = start.elapsed().as_secs_f64();

    latencies.sort_unstable();
    // Nearest-rank percentile.
    let pick = |p: f64| {
        let rank = ((p / 100.0) * latencies.len() as f64).ceil() as usize;
        latencies
            .get(rank.clamp(1, latencies.len().max(1)) - 1)
            .copied()
            .unwrap_or(0)
    };
    Ok(Row {
        clients,
        ops: latencies.len() as u64,
        seconds,
        ops_per_sec: latencies.len() as f64 / seconds,
        p50_us: pick(50.0),
        p99_us: pick(99.0),
    })
}
