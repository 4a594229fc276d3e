//! The `kv` binary: `kv repl`, `kv check`, `kv bench ...`.
//!
//! Only argument parsing, logging set-up and wiring live here; every command
//! is a library function so tests can call it directly.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use kv_node::bench::{self, ENGINE_BENCH_HEADER, EngineBenchArgs, RecoveryBenchArgs};
use kv_node::repl::Repl;
use kv_node::server::client::{self, Client};
use kv_node::server::config::{LogFormat, NodeConfig};
use kv_node::server::{self, Node};
use kv_node::timer::FlushTimer;
use kv_node::tls::Transport;
use kv_node::{Engine, EngineConfig, FsStorage};
use kv_proto::v1 as pb;

/// mimalloc instead of glibc's malloc: a node allocates and frees many small
/// buffers per request (gRPC frames, records, wake-ups), and glibc's
/// consolidating free lists cost the leader about a fifth of its CPU per
/// write (measured with `kv bench cluster`, see README).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// kv: a crash-consistent key-value node.
#[derive(Parser, Debug)]
#[command(name = "kv", version, about)]
struct Cli {
    #[command(flatten)]
    tls: TlsArgs,
    #[command(subcommand)]
    command: Cmd,
}

/// How the client commands secure their connections (flags as etcdctl's).
/// None given: plaintext.
#[derive(Args, Debug, Clone, Default)]
struct TlsArgs {
    /// Verify the nodes' certificates against this CA (PEM): TLS on.
    #[arg(long, global = true, env = "KV_CACERT", value_name = "PEM")]
    cacert: Option<PathBuf>,
    /// Present this client certificate (PEM), for nodes that demand one.
    #[arg(
        id = "tls_cert",
        long = "cert",
        global = true,
        env = "KV_CERT",
        value_name = "PEM",
        requires = "tls_key"
    )]
    cert: Option<PathBuf>,
    /// The client certificate's private key (PEM, mode 600).
    #[arg(
        id = "tls_key",
        long = "key",
        global = true,
        env = "KV_KEY",
        value_name = "PEM",
        requires = "tls_cert"
    )]
    key: Option<PathBuf>,
}

impl TlsArgs {
    fn transport(&self) -> anyhow::Result<Transport> {
        let identity = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some(kv_node::tls::IdentityFiles::load(cert, key)?),
            _ => None,
        };
        match &self.cacert {
            Some(ca) => Ok(Transport::tls(
                &kv_node::tls::read_certs(ca)?,
                identity.as_ref(),
            )),
            None if identity.is_some() => {
                anyhow::bail!("--cert needs --cacert (the CA the nodes' certificates chain to)")
            }
            None => Ok(Transport::plaintext()),
        }
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The single-node REPL over a local data directory (reads commands from
    /// a terminal or a pipe; type HELP).
    Repl(EngineArgs),
    /// Verify a data directory offline and print what recovery would do,
    /// changing nothing. Exits 0 if it would open, 2 if it would refuse.
    Check(EngineArgs),
    /// Benchmarks (they print tables; they never fail on a timing).
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Run one cluster node (see configs/). SIGINT/SIGTERM stop it cleanly.
    Serve {
        /// The node's configuration file.
        #[arg(long)]
        config: PathBuf,
        /// Stop cleanly (as on SIGTERM: a final sync) when standard input
        /// reaches end of file; anything read from it is ignored. For a
        /// parent that starts the node with a pipe as stdin and keeps the
        /// write end: when the parent dies for any reason, SIGKILL
        /// included, the kernel closes that end and the node stops instead
        /// of living on as an orphan. `kv cluster up` and the tests use it.
        #[arg(long)]
        exit_on_stdin_eof: bool,
    },
    /// Start every node configured in a directory (`configs/*.toml`) as child
    /// processes, logs to files; SIGINT/SIGTERM stop them all cleanly.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Certificates for TLS (`kv certs init`: a development CA and
    /// certificates for the nodes and clients).
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Set a key on the cluster (sent to the leader; redirects are followed).
    Put {
        key: String,
        value: String,
        #[command(flatten)]
        target: Target,
        /// Acknowledgement level: local, quorum or all (default: the cluster's).
        #[arg(long, default_value = "default")]
        ack: String,
    },
    /// Read a key from the cluster.
    Get {
        key: String,
        #[command(flatten)]
        target: Target,
        /// `stale`: read from the first endpoint that answers, whatever its
        /// role, and print the applied LSN the value reflects.
        #[arg(long, default_value = "leader")]
        consistency: String,
    },
    /// Remove a key from the cluster.
    Del {
        key: String,
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value = "default")]
        ack: String,
    },
    /// The REPL's commands (PUT/GET/DEL/SIZE/FLUSH/HELP/EXIT) against the
    /// cluster instead of a local data directory.
    Shell {
        #[command(flatten)]
        target: Target,
    },
    /// One row per node: role, term, leader, LSNs, lag, state digest.
    Status {
        #[command(flatten)]
        target: Target,
    },
    /// Hand leadership over to node ID (planned maintenance): the leader
    /// stops taking requests, waits until ID's log has caught up, tells it to
    /// campaign, and steps down. Waits until ID is seen leading.
    TransferLeader {
        /// The member to lead next.
        id: u64,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// `kv cluster up configs/`: run `kv serve` for each config file.
    Up {
        /// Directory of node configuration files.
        #[arg(default_value = "configs")]
        dir: PathBuf,
        /// Where each node's log goes (`<log-dir>/node<id>.log`).
        #[arg(long, default_value = "logs")]
        log_dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum CertsCmd {
    /// Write a new CA (`ca.pem`, `ca-key.pem`), `node<N>.pem` +
    /// `node<N>-key.pem` for nodes 1..=N and `<client>.pem` +
    /// `<client>-key.pem` per client into a directory; keys are mode 600.
    /// A quick start for development clusters, not a PKI.
    Init {
        /// Directory to write into (created on demand).
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// Node certificates to make (member ids 1..=N).
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        /// Client certificates to make, by name (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "admin")]
        clients: Vec<String>,
        /// Host names and IP addresses the node certificates are good for
        /// (where clients and peers dial them), comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "127.0.0.1,localhost")]
        hosts: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Replace certificates already there.
        #[arg(long)]
        force: bool,
    },
}

/// Where the client commands send their requests.
#[derive(Args, Debug, Clone)]
struct Target {
    /// host:port,... (default: the members listed in configs/*.toml).
    #[arg(long, value_delimiter = ',')]
    endpoints: Vec<std::net::SocketAddr>,
    /// Directory of node configs to take endpoints from.
    #[arg(long, default_value = "configs")]
    configs: PathBuf,
    /// Per-request deadline in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
}

impl Target {
    /// `--endpoints`, or the members listed in `--configs`.
    fn endpoints(&self) -> anyhow::Result<Vec<std::net::SocketAddr>> {
        if self.endpoints.is_empty() {
            client::endpoints_from_configs(&self.configs)
        } else {
            Ok(self.endpoints.clone())
        }
    }

    fn client(&self, tls: &TlsArgs) -> anyhow::Result<Client> {
        Ok(
            Client::new(self.endpoints()?, Duration::from_millis(self.timeout_ms))
                .with_transport(tls.transport()?),
        )
    }
}

#[derive(Args, Debug, Clone)]
struct EngineArgs {
    /// Data directory (created on demand).
    #[arg(long, default_value = "kv-data")]
    data_dir: PathBuf,
    /// Sync every N writes (1: every write is durable before OK).
    #[arg(long, default_value_t = 1)]
    batch: u32,
    /// In batch mode, the longest a write stays unsynced (ms).
    #[arg(long, default_value_t = 100)]
    flush_interval_ms: u64,
    /// Longest key accepted (bytes).
    #[arg(long, default_value_t = 1024)]
    key_bytes_max: usize,
    /// Longest value accepted (bytes).
    #[arg(long, default_value_t = 1 << 20)]
    value_bytes_max: usize,
    /// WAL segment size bound (bytes).
    #[arg(long, default_value_t = 64 << 20)]
    segment_bytes_max: u64,
    /// Automatic snapshot after this many WAL bytes (0: never).
    #[arg(long, default_value_t = 64 << 20)]
    snapshot_wal_bytes: u64,
}

impl EngineArgs {
    fn config(&self) -> EngineConfig {
        let mut c = EngineConfig::new(&self.data_dir);
        c.batch = self.batch;
        c.flush_interval_ms = self.flush_interval_ms;
        c.key_bytes_max = self.key_bytes_max;
        c.value_bytes_max = self.value_bytes_max;
        c.segment_bytes_max = self.segment_bytes_max;
        c.snapshot_wal_bytes = self.snapshot_wal_bytes;
        c
    }
}

#[derive(Subcommand, Debug)]
enum BenchCmd {
    /// Durable writes from many threads: group commit scaling.
    Engine {
        /// Writer thread counts to run, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
        writers: Vec<usize>,
        /// Total operations per writer count.
        #[arg(long, default_value_t = 20000)]
        ops: u64,
        #[arg(long, default_value_t = 16)]
        key_size: usize,
        #[arg(long, default_value_t = 100)]
        value_size: usize,
        /// Where to put the bench data (a fresh subdirectory per run).
        #[arg(long, default_value = "kv-bench-data")]
        data_dir: PathBuf,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Open time from a snapshot vs. a full WAL replay, with peak memory.
    Recovery {
        #[arg(long, default_value_t = 1_000_000)]
        keys: u64,
        /// Writes after the snapshot (the WAL tail replayed on top of it).
        #[arg(long, default_value_t = 10_000)]
        wal_tail: u64,
        #[arg(long, default_value_t = 16)]
        key_size: usize,
        #[arg(long, default_value_t = 100)]
        value_size: usize,
        #[arg(long, default_value = "kv-bench-data")]
        data_dir: PathBuf,
        /// Opens per case (each in a fresh process).
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Write load against a running cluster: per client count, ops/s and
    /// p50/p99 latency (each write acknowledged at the cluster's default level).
    Cluster {
        /// Concurrent client counts to run, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
        clients: Vec<usize>,
        /// Total writes per client count.
        #[arg(long, default_value_t = 20000)]
        ops: u64,
        #[arg(long, default_value_t = 16)]
        key_size: usize,
        #[arg(long, default_value_t = 100)]
        value_size: usize,
        /// How the clients' writes travel: `batch` multiplexes the clients
        /// sharing a connection over one `Kv.Batch` stream (kv's client for
        /// many callers); `unary` makes one `Kv.Put` call per write.
        #[arg(long, value_enum, default_value_t = client::BenchApi::Batch)]
        api: client::BenchApi,
        #[command(flatten)]
        target: Target,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Open a data directory once and print a JSON report (used by
    /// `bench recovery`, in a child process).
    Open {
        #[arg(long)]
        data_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `kv serve` sets up its logging once its configuration says how.
    if !matches!(cli.command, Cmd::Serve { .. }) {
        init_logging(LogFormat::Text, "warn");
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kv: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let tls = cli.tls;
    match cli.command {
        Cmd::Repl(args) => repl(&args),
        Cmd::Check(args) => {
            let report = kv_node::check::check(&args.config())?;
            print!("{}", report.text);
            Ok(if report.would_open {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        Cmd::Bench(b) => bench_cmd(b, &tls),
        Cmd::Serve {
            config,
            exit_on_stdin_eof,
        } => serve(&config, exit_on_stdin_eof),
        Cmd::Shell { target } => {
            let client = target.client(&tls)?;
            let rt = runtime()?;
            let stdin = std::io::stdin();
            let prompt = stdin.is_terminal();
            let mut out = std::io::stdout().lock();
            kv_node::server::shell::run(&client, &rt, stdin.lock(), &mut out, prompt)
                .context("shell I/O")?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Cluster(ClusterCmd::Up { dir, log_dir }) => cluster_up(&dir, &log_dir),
        Cmd::Certs(CertsCmd::Init {
            out,
            nodes,
            clients,
            hosts,
            days,
            force,
        }) => {
            let plan = kv_node::certs::InitPlan {
                nodes,
                clients,
                hosts,
                days,
                force,
            };
            for path in kv_node::certs::init(&out, &plan)? {
                println!("wrote {}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Put {
            key,
            value,
            target,
            ack,
        } => {
            let req = pb::PutRequest {
                key: key.into_bytes(),
                value: value.into_bytes(),
                ack: client::parse_ack(&ack)? as i32,
            };
            let reply =
                runtime()?.block_on(async { anyhow::Ok(target.client(&tls)?.put(req).await?) })?;
            println!("OK lsn={}", reply.lsn);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Del { key, target, ack } => {
            let req = pb::DeleteRequest {
                key: key.into_bytes(),
                ack: client::parse_ack(&ack)? as i32,
            };
            let reply = runtime()?
                .block_on(async { anyhow::Ok(target.client(&tls)?.delete(req).await?) })?;
            println!("OK lsn={}", reply.lsn);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Get {
            key,
            target,
            consistency,
        } => {
            let consistency = match consistency.as_str() {
                "leader" => pb::ReadConsistency::Default,
                "stale" => pb::ReadConsistency::Stale,
                other => anyhow::bail!("--consistency {other}: expected leader or stale"),
            };
            let req = pb::GetRequest {
                key: key.into_bytes(),
                consistency: consistency as i32,
            };
            runtime()?.block_on(async {
                let reply = target.client(&tls)?.get(req).await?;
                let value = if reply.found {
                    String::from_utf8_lossy(&reply.value).into_owned()
                } else {
                    "(nil)".to_owned()
                };
                if consistency == pb::ReadConsistency::Stale {
                    println!("{value}\t(applied LSN {})", reply.applied_lsn);
                } else {
                    println!("{value}");
                }
                Ok(ExitCode::SUCCESS)
            })
        }
        Cmd::TransferLeader { id, target } => runtime()?.block_on(async {
            let endpoints = target.endpoints()?;
            let transport = tls.transport()?;
            let timeout = Duration::from_millis(target.timeout_ms);
            let reply = target.client(&tls)?.transfer_leader(id).await?;
            // The old leader has stepped down and `id` is campaigning: wait
            // until some node reports it leading a later term.
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                let leading = client::status_all(&transport, &endpoints, timeout)
                    .await
                    .into_iter()
                    .filter_map(|(_, r)| r.ok())
                    .find(|s| s.role == "leader" && s.term > reply.term);
                match leading {
                    Some(s) if s.node_id == id => {
                        println!("OK node {id} leads term {}", s.term);
                        return Ok(ExitCode::SUCCESS);
                    }
                    Some(s) => {
                        println!(
                            "node {} leads term {} (node {id} campaigned but lost)",
                            s.node_id, s.term
                        );
                        return Ok(ExitCode::from(2));
                    }
                    None if tokio::time::Instant::now() >= deadline => {
                        println!(
                            "node {id} was told to campaign, but no leader of a term after {} \
                             was seen within {} ms",
                            reply.term, target.timeout_ms
                        );
                        return Ok(ExitCode::from(2));
                    }
                    None => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }),
        Cmd::Status { target } => runtime()?.block_on(async {
            let endpoints = target.endpoints()?;
            let replies = client::status_all(
                &tls.transport()?,
                &endpoints,
                Duration::from_millis(target.timeout_ms),
            )
            .await;
            let lags: std::collections::BTreeMap<u64, u64> = replies
                .iter()
                .filter_map(|(_, r)| r.as_ref().ok())
                .filter(|r| r.role == "leader")
                .flat_map(|r| r.followers.iter().map(|f| (f.node_id, f.lag)))
                .collect();
            println!("{}", client::status_header());
            let mut all_ok = true;
            for (addr, reply) in replies {
                match reply {
                    Ok(s) => {
                        let lag = if s.role == "leader" {
                            Some(0)
                        } else {
                            lags.get(&s.node_id).copied()
                        };
                        println!("{}", client::status_row(&s, lag));
                    }
                    Err(e) => {
                        all_ok = false;
                        println!("{addr}: unreachable: {e}");
                    }
                }
            }
            Ok(if all_ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")
}

/// Logging to stderr with `tracing`: `RUST_LOG` if set, else `default`.
fn init_logging(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// `kv serve`'s default log filter: info from kv's own crates (start and
/// stop, elections, transfers, snapshots shipped, health changes: rare
/// events, none per request), warnings from the rest. `kv` matches every
/// target that starts with it (`kv_node` too).
const SERVE_LOG: &str = "warn,kv=info";

fn serve(config_path: &std::path::Path, exit_on_stdin_eof: bool) -> anyhow::Result<ExitCode> {
    // Watch stdin from the start: a parent that dies while the engine
    // recovers still stops the node as soon as it can serve (an EOF stays
    // seen).
    let lifeline = if exit_on_stdin_eof {
        Some(stdin_eof().context("start the stdin lifeline thread")?)
    } else {
        None
    };
    let config = NodeConfig::load(config_path)?;
    init_logging(config.log_format, SERVE_LOG);
    // The recorder first: the engine and the node take their handles from it.
    let metrics = match config.metrics_listen {
        Some(addr) => Some((kv_node::metrics::bind(addr)?, kv_node::metrics::install()?)),
        None => None,
    };
    let start = Instant::now();
    let engine = Engine::open(Arc::new(FsStorage), config.engine_config())
        .with_context(|| format!("open data directory {}", config.data_dir.display()))?;
    tracing::info!(
        "node {} opened {} in {:.1} ms: {}",
        config.node_id,
        config.data_dir.display(),
        start.elapsed().as_secs_f64() * 1000.0,
        engine.recovery()
    );
    let (listen, peer_listen) = (config.listen, config.peer_listen);
    let mut env = server::env::NodeEnv::default();
    let server_tls = match &config.tls {
        Some(settings) => {
            let tls = kv_node::tls::NodeTls::load(settings, config.node_id)?;
            env.peer_transport = tls.peer_transport;
            env.peer_auth = Arc::new(server::auth::Certificates);
            Some(tls.server)
        }
        None => None,
    };
    let security = match &config.tls {
        Some(t) if t.client_cert_auth => "TLS, client certificates demanded",
        Some(_) => "TLS",
        None => "plaintext",
    };
    if config.tls.is_none()
        && std::iter::once(listen)
            .chain(peer_listen)
            .any(|a| !a.ip().is_loopback())
    {
        tracing::warn!(
            %listen,
            "plaintext on an address other than loopback (allow_plaintext_non_loopback): \
             anyone who reaches it can act as a member"
        );
    }
    // One thread runs all of a node's async work: a node is one core's worth
    // of request handling, and a single-threaded runtime saves the
    // cross-thread wake-ups (measured: ~15% more writes/s at 256 clients).
    // Fsyncs run on the flusher thread, never on this one.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?
        .block_on(async move {
            let node = Node::with_env(config, Arc::new(engine), env)
                .context("start the flusher thread")?;
            if let Some((listener, handle)) = metrics {
                let addr = listener.local_addr()?;
                let scraped = node.clone();
                kv_node::metrics::serve(listener, handle, move || scraped.publish_gauges())?;
                tracing::info!("metrics on http://{addr}/metrics");
            }
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("listen on {listen}"))?;
            let peer_listener = match peer_listen {
                Some(addr) => Some(
                    tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("listen on {addr} (peer_listen)"))?,
                ),
                None => None,
            };
            match peer_listen {
                Some(peers) => {
                    tracing::info!(
                        "node listening on {listen} (clients), {peers} (peers); {security}"
                    )
                }
                None => {
                    tracing::info!("node listening on {listen} (clients and peers); {security}")
                }
            }
            let shutdown = async move {
                match lifeline {
                    Some(eof) => tokio::select! {
                        () = shutdown_signal() => {}
                        _ = eof => tracing::info!(
                            "standard input closed (--exit-on-stdin-eof): stopping"
                        ),
                    },
                    None => shutdown_signal().await,
                }
            };
            server::serve(node, listener, peer_listener, server_tls, shutdown).await?;
            tracing::info!("node stopped cleanly");
            Ok(ExitCode::SUCCESS)
        })
}

fn cluster_up(dir: &std::path::Path, log_dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    let mut configs: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    configs.sort();
    if configs.is_empty() {
        anyhow::bail!("no *.toml node configurations in {}", dir.display());
    }
    std::fs::create_dir_all(log_dir).with_context(|| format!("create {}", log_dir.display()))?;
    let exe = std::env::current_exe().context("find own executable")?;
    runtime()?.block_on(async move {
        let mut children = Vec::new();
        for path in &configs {
            let config = NodeConfig::load(path)?;
            let log_path = log_dir.join(format!("node{}.log", config.node_id));
            let log = std::fs::File::create(&log_path)
                .with_context(|| format!("create {}", log_path.display()))?;
            // The lifeline (see `stdin_eof`): if this process dies, even by
            // SIGKILL, every node sees its stdin close and stops cleanly.
            let child = tokio::process::Command::new(&exe)
                .arg("serve")
                .arg("--config")
                .arg(path)
                .arg("--exit-on-stdin-eof")
                .stdin(std::process::Stdio::piped())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("start node {}", config.node_id))?;
            eprintln!(
                "kv: node {} on {} (pid {}), log {}",
                config.node_id,
                config.listen,
                child.id().unwrap_or(0),
                log_path.display()
            );
            children.push(child);
        }
        // Held apart from the children: `Child::wait` closes a child's
        // stdin first, which would cut every lifeline at once.
        let lifelines: Vec<tokio::process::ChildStdin> =
            children.iter_mut().filter_map(|c| c.stdin.take()).collect();
        eprintln!("kv: cluster up; Ctrl-C or SIGTERM stops it");
        let first_exit = async {
            let waits = children.iter_mut().map(|c| Box::pin(c.wait()));
            futures_select_first(waits).await
        };
        let stopped_early = tokio::select! {
            _ = shutdown_signal() => false,
            _ = first_exit => true,
        };
        // Stop every node cleanly: SIGTERM makes each one sync and exit.
        for child in &children {
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
        }
        let mut clean = !stopped_early;
        for child in &mut children {
            match child.wait().await {
                Ok(status) if status.success() => {}
                _ => clean = false,
            }
        }
        drop(lifelines);
        eprintln!("kv: cluster stopped");
        Ok(if clean {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    })
}

/// Resolves when the first of `futures` does.
async fn futures_select_first<F: std::future::Future + Unpin>(futures: impl Iterator<Item = F>) {
    let mut futures: Vec<F> = futures.collect();
    std::future::poll_fn(|cx| {
        for f in &mut futures {
            if std::pin::Pin::new(f).poll(cx).is_ready() {
                return std::task::Poll::Ready(());
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// The lifeline of `kv serve --exit-on-stdin-eof`: resolves once standard
/// input reaches end of file (or fails to read).
///
/// Why stdin EOF rather than the alternatives (`unsafe` is forbidden, so
/// `prctl(PR_SET_PDEATHSIG)` is out):
/// - Polling `parent_id()` for a change has a start-up race: a parent that
///   dies before the child first asks leaves the child recording its new
///   parent (init or a subreaper) as the one to watch, forever. A closed
///   pipe stays closed, so an EOF is seen however late the child looks.
/// - EOF arrives the moment the kernel closes the parent's descriptors, on
///   any death, with no polling interval and no wake-ups while it lives.
/// - The cost: stdin belongs to the lifeline, and the write end must stay
///   with the parent alone (std and tokio open pipes close-on-exec, so the
///   parent's other children do not inherit it).
///
/// A plain thread, not tokio's stdin: tokio reads stdin on its blocking
/// pool, and dropping the runtime waits for that read, which on SIGTERM
/// would never return. This thread is never joined; the process exits
/// around it.
fn stdin_eof() -> std::io::Result<tokio::sync::oneshot::Receiver<()>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("stdin-lifeline".into())
        .spawn(move || {
            use std::io::Read;
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 512];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::warn!("reading standard input: {e}; treating it as closed");
                        break;
                    }
                }
            }
            let _ = tx.send(());
        })?;
    Ok(rx)
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

fn repl(args: &EngineArgs) -> anyhow::Result<ExitCode> {
    let config = args.config();
    let start = Instant::now();
    let engine = Engine::open(Arc::new(FsStorage), config.clone())
        .with_context(|| format!("open data directory {}", config.data_dir.display()))?;
    eprintln!(
        "kv: opened {} in {:.1} ms: {}",
        config.data_dir.display(),
        start.elapsed().as_secs_f64() * 1000.0,
        engine.recovery()
    );
    let engine = Arc::new(engine);
    let _timer = FlushTimer::start(
        engine.clone(),
        Duration::from_millis(config.flush_interval_ms.max(1)),
    );
    let stdin = std::io::stdin();
    let prompt = stdin.is_terminal();
    let mut out = std::io::stdout().lock();
    Repl::new(engine)
        .run(stdin.lock(), &mut out, prompt)
        .context("REPL I/O")?;
    Ok(ExitCode::SUCCESS)
}

fn bench_cmd(cmd: BenchCmd, tls: &TlsArgs) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCmd::Engine {
            writers,
            ops,
            key_size,
            value_size,
            data_dir,
            json,
        } => {
            let args = EngineBenchArgs {
                writers: writers.clone(),
                ops,
                key_size,
                value_size,
                data_dir,
            };
            if !json {
                println!("{ENGINE_BENCH_HEADER}");
            }
            for w in writers {
                if w == 0 {
                    anyhow::bail!("--writers: a writer count must be at least 1");
                }
                let row = bench::engine_bench_one(&args, w)?;
                if json {
                    println!("{}", serde_json::to_string(&row)?);
                } else {
                    println!("{row}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        BenchCmd::Recovery {
            keys,
            wal_tail,
            key_size,
            value_size,
            data_dir,
            runs,
        } => {
            let exe = std::env::current_exe().context("find own executable")?;
            let args = RecoveryBenchArgs {
                keys,
                wal_tail,
                key_size,
                value_size,
                data_dir,
                runs: runs.max(1),
            };
            let results = bench::recovery_bench(&exe, &args)?;
            println!(
                "case                    keys   snapshot_lsn  replayed   open_ms(median)  open_ms(max)  peak_rss_mib"
            );
            for (label, runs) in results {
                let mut ms: Vec<f64> = runs.iter().map(|r| r.open_ms).collect();
                ms.sort_by(f64::total_cmp);
                let r = &runs[0];
                let rss = runs.iter().map(|r| r.peak_rss_mib).fold(0.0, f64::max);
                println!(
                    "{label:<20} {:>8} {:>14} {:>9} {:>16.1} {:>13.1} {:>13.1}",
                    r.keys,
                    r.snapshot_lsn.map_or("-".to_owned(), |l| l.to_string()),
                    r.records_replayed,
                    ms[ms.len() / 2],
                    ms[ms.len() - 1],
                    rss
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        BenchCmd::Cluster {
            clients,
            ops,
            key_size,
            value_size,
            api,
            target,
            json,
        } => runtime()?.block_on(async {
            let endpoints = target.endpoints()?;
            let transport = tls.transport()?;
            if !json {
                println!("{}", client::CLUSTER_BENCH_HEADER);
            }
            for c in clients {
                if c == 0 {
                    anyhow::bail!("--clients: a client count must be at least 1");
                }
                let load = client::BenchLoad {
                    ops,
                    key_size,
                    value_size,
                    api,
                };
                let row = client::bench_cluster(
                    &transport,
                    &endpoints,
                    c,
                    load,
                    Duration::from_millis(target.timeout_ms),
                )
                .await?;
                if json {
                    println!("{}", serde_json::to_string(&row)?);
                } else {
                    println!("{row}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }),
        BenchCmd::Open { data_dir } => {
            let report = bench::open_once(&data_dir)?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}
