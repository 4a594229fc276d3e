//! The `kv` binary: `kv repl`, `kv check`, `kv bench ...`, the cluster
//! client commands and `kv completion`.
//!
//! Only argument parsing, logging set-up and wiring live here; every command
//! is a library function so tests can call it directly.

use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};

use kv_node::bench::{self, ENGINE_BENCH_HEADER, EngineBenchArgs, RecoveryBenchArgs};
use kv_node::cli::{self, Bytes, WriteOut};
use kv_node::client::cluster_client::{self, Client};
use kv_node::repl::Repl;
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

/// The exit codes, as `kv --help` prints them (README: "Exit codes").
const EXIT_CODES: &str = "\
Exit codes of the client commands (put, get, del, status, transfer-leader):
  0  success (a key not found is a success: `(nil)`, or \"found\": false)
  1  local failure (a config or certificate file, I/O)
  2  usage error (bad flag or value, malformed --hex input)
  3  refused: the cluster answered with an error; nothing was done
  4  unreachable: no node answered, or none led, within 2 x --timeout-ms
     (kv status: some endpoint did not answer)
  5  outcome unknown: a write may or may not take effect (kv transfer-leader:
     the target was not seen leading)
`kv check` exits 2 when recovery would refuse the directory.";

/// kv: a crash-consistent key-value node.
#[derive(Parser, Debug)]
#[command(name = "kv", version, about, after_help = EXIT_CODES)]
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
    /// Prints `OK lsn=N`, or `{"lsn":N,"term":T}` with `-w json`.
    #[command(after_help = EXIT_CODES)]
    Put {
        /// The key (its bytes as given; hex digits with --hex).
        key: OsString,
        /// The value (its bytes as given; hex digits with --hex).
        value: OsString,
        #[command(flatten)]
        target: Target,
        /// Acknowledgement level: local, quorum or all (default: the cluster's).
        #[arg(long, default_value = "default", value_parser = ["default", "local", "quorum", "all"])]
        ack: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Read a key from the cluster. Prints the value's bytes as they are, or
    /// `(nil)`; with `-w json` one object (`found`, `value_base64`, ...).
    #[command(after_help = EXIT_CODES)]
    Get {
        /// The key (its bytes as given; hex digits with --hex).
        key: OsString,
        #[command(flatten)]
        target: Target,
        /// `stale`: read from the first endpoint that answers, whatever its
        /// role, and print the applied LSN the value reflects.
        #[arg(long, default_value = "leader", value_parser = ["leader", "stale"])]
        consistency: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Remove a key from the cluster.
    #[command(after_help = EXIT_CODES)]
    Del {
        /// The key (its bytes as given; hex digits with --hex).
        key: OsString,
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value = "default", value_parser = ["default", "local", "quorum", "all"])]
        ack: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// The REPL's commands (PUT/GET/DEL/SIZE/FLUSH/HELP/EXIT) against the
    /// cluster instead of a local data directory.
    Shell {
        #[command(flatten)]
        target: Target,
    },
    /// One row per node: role, term, leader, LSNs, lag, state digest
    /// (`-w json`: `{"nodes":[...]}`). Exits 4 if an endpoint did not answer.
    #[command(after_help = EXIT_CODES)]
    Status {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Hand leadership over to node ID (planned maintenance): the leader
    /// stops taking requests, waits until ID's log has caught up, tells it to
    /// campaign, and steps down. Waits until ID is seen leading.
    #[command(after_help = EXIT_CODES)]
    TransferLeader {
        /// The member to lead next.
        id: u64,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// A bounded, linearizability-checked workload against the cluster
    /// through its public API (concurrent puts, reads and deletes of a few
    /// keys), then a check that every acknowledged write is at its LSN in
    /// every node's log. Prints operations, unknown outcomes and the
    /// verdict, and a counterexample on a violation. Exit codes: 0 pass,
    /// 6 violation (or no verdict), 1 local failure.
    Verify {
        /// How long the workload runs, in seconds.
        #[arg(long, default_value_t = 10)]
        secs: u64,
        /// Concurrent clients.
        #[arg(long, default_value_t = 8)]
        clients: usize,
        /// Keys they share.
        #[arg(long, default_value_t = 4)]
        keys: usize,
        /// Read with `stale` consistency from these endpoints instead of at
        /// the leader. Not linearizable: for seeing the checker catch a
        /// stale read.
        #[arg(long, value_delimiter = ',')]
        stale_reads_from: Vec<std::net::SocketAddr>,
        #[command(flatten)]
        target: Target,
        /// Output format: `table` (text) or `json`.
        #[arg(short = 'w', long, value_enum, default_value_t = WriteOut::Table, env = "KV_WRITE_OUT")]
        write_out: WriteOut,
    },
    /// Print a shell completion script: `kv completion bash > /etc/bash_completion.d/kv`,
    /// `kv completion zsh > ~/.zfunc/_kv`, `kv completion fish > ~/.config/fish/completions/kv.fish`.
    Completion {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// How a client command prints its answer.
#[derive(Args, Debug, Clone)]
struct OutputArgs {
    /// Output format: `table` (text) or `json` (one object per line; field
    /// names in README).
    #[arg(short = 'w', long, value_enum, default_value_t = WriteOut::Table, env = "KV_WRITE_OUT")]
    write_out: WriteOut,
    /// Keys and values on the command line are hex digits, and values are
    /// printed as hex (in JSON: `key_hex`/`value_hex` instead of base64).
    #[arg(long)]
    hex: bool,
}

impl OutputArgs {
    fn bytes(&self) -> Bytes {
        if self.hex { Bytes::Hex } else { Bytes::Raw }
    }

    fn json(&self) -> bool {
        self.write_out == WriteOut::Json
    }
}

/// Prints `value` as one line of JSON.
fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// `kv cluster up configs/`: run `kv serve` for each config file and
    /// supervise them: a node that exits is reported (and, with
    /// `--restart`, started again); the others keep serving.
    Up {
        /// Directory of node configuration files.
        #[arg(default_value = "configs")]
        dir: PathBuf,
        /// Where each node's log goes (`<log-dir>/node<id>.log`).
        #[arg(long, default_value = "logs")]
        log_dir: PathBuf,
        /// Start a node again when it exits (after 1 s, doubling up to
        /// 30 s while it keeps dying within 10 s). Without it, a node that
        /// exits stays down and the others keep serving.
        #[arg(long)]
        restart: bool,
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
    #[arg(long, value_delimiter = ',', env = "KV_ENDPOINTS")]
    endpoints: Vec<std::net::SocketAddr>,
    /// Directory of node configs to take endpoints from.
    #[arg(long, default_value = "configs", env = "KV_CONFIGS")]
    configs: PathBuf,
    /// Per-request deadline in milliseconds.
    #[arg(long, default_value_t = 10_000, env = "KV_TIMEOUT_MS")]
    timeout_ms: u64,
}

impl Target {
    /// `--endpoints`, or the members listed in `--configs`.
    fn endpoints(&self) -> anyhow::Result<Vec<std::net::SocketAddr>> {
        if self.endpoints.is_empty() {
            cluster_client::endpoints_from_configs(&self.configs)
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
        #[arg(long, value_enum, default_value_t = cluster_client::BenchApi::Batch)]
        api: cluster_client::BenchApi,
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
            ExitCode::from(cli::exit_code(&e))
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
            let mut out = std::io::stdout().lock();
            if stdin.is_terminal() {
                kv_node::lineedit::run("kv> ", |line| {
                    kv_node::client::shell::run_line(&client, &rt, line, &mut out)
                })?;
            } else {
                kv_node::client::shell::run(&client, &rt, stdin.lock(), &mut out, false)
                    .context("shell I/O")?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Completion { shell } => {
            let mut out = std::io::stdout().lock();
            clap_complete::generate(shell, &mut Cli::command(), "kv", &mut out);
            out.flush().context("write the completion script")?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Cluster(ClusterCmd::Up {
            dir,
            log_dir,
            restart,
        }) => cluster_up(&dir, &log_dir, restart),
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
            out,
        } => {
            let req = pb::PutRequest {
                key: cli::decode_arg(key, out.hex)?,
                value: cli::decode_arg(value, out.hex)?,
                ack: cluster_client::parse_ack(&ack)? as i32,
            };
            let reply =
                runtime()?.block_on(async { anyhow::Ok(target.client(&tls)?.put(req).await?) })?;
            print_write(&reply, &out)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Del {
            key,
            target,
            ack,
            out,
        } => {
            let req = pb::DeleteRequest {
                key: cli::decode_arg(key, out.hex)?,
                ack: cluster_client::parse_ack(&ack)? as i32,
            };
            let reply = runtime()?
                .block_on(async { anyhow::Ok(target.client(&tls)?.delete(req).await?) })?;
            print_write(&reply, &out)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Get {
            key,
            target,
            consistency,
            out,
        } => {
            let consistency = match consistency.as_str() {
                "stale" => pb::ReadConsistency::Stale,
                _ => pb::ReadConsistency::Default,
            };
            let key = cli::decode_arg(key, out.hex)?;
            let req = pb::GetRequest {
                key: key.clone(),
                consistency: consistency as i32,
            };
            runtime()?.block_on(async {
                let reply = target.client(&tls)?.get(req).await?;
                if out.json() {
                    print_json(&cli::get_json(&key, &reply, out.bytes()))?;
                } else {
                    let stale = consistency == pb::ReadConsistency::Stale;
                    let mut stdout = std::io::stdout().lock();
                    stdout.write_all(&cli::get_text(&reply, out.bytes(), stale))?;
                    stdout.flush()?;
                }
                Ok(ExitCode::SUCCESS)
            })
        }
        Cmd::Verify {
            secs,
            clients,
            keys,
            stale_reads_from,
            target,
            write_out,
        } => runtime()?.block_on(async {
            let endpoints = target.endpoints()?;
            let transport = tls.transport()?;
            let timeout = Duration::from_millis(target.timeout_ms);
            let client = target.client(&tls)?;
            let reader = if stale_reads_from.is_empty() {
                client.clone()
            } else {
                Client::new(stale_reads_from.clone(), timeout).with_transport(transport.clone())
            };
            let plan = kv_node::verify::VerifyPlan {
                duration: Duration::from_secs(secs),
                clients: clients.max(1),
                keys,
                stale_reads: !stale_reads_from.is_empty(),
                check_budget: Duration::from_secs(60),
            };
            let report =
                kv_node::verify::verify(client, reader, &transport, &endpoints, &plan).await;
            if write_out == WriteOut::Json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", kv_node::verify::render(&report));
            }
            Ok(ExitCode::from(if report.passed() {
                cli::exit::OK
            } else {
                cli::exit::VIOLATION
            }))
        }),
        Cmd::TransferLeader { id, target, out } => runtime()?.block_on(async {
            let endpoints = target.endpoints()?;
            let transport = tls.transport()?;
            let timeout = Duration::from_millis(target.timeout_ms);
            let reply = target.client(&tls)?.transfer_leader(id).await?;
            // The old leader has stepped down and `id` is campaigning: wait
            // until some node reports it leading a later term.
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                let leading = cluster_client::status_all(&transport, &endpoints, timeout)
                    .await
                    .into_iter()
                    .filter_map(|(_, r)| r.ok())
                    .find(|s| s.role == "leader" && s.term > reply.term);
                let timed_out = tokio::time::Instant::now() >= deadline;
                if leading.is_none() && !timed_out {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                let transferred = leading.as_ref().is_some_and(|s| s.node_id == id);
                if out.json() {
                    print_json(&cli::TransferJson {
                        transferred,
                        target: id,
                        from_term: reply.term,
                        leader_id: leading.as_ref().map(|s| s.node_id),
                        term: leading.as_ref().map(|s| s.term),
                    })?;
                } else {
                    match &leading {
                        Some(s) if transferred => println!("OK node {id} leads term {}", s.term),
                        Some(s) => println!(
                            "node {} leads term {} (node {id} campaigned but lost)",
                            s.node_id, s.term
                        ),
                        None => println!(
                            "node {id} was told to campaign, but no leader of a term after {} \
                             was seen within {} ms",
                            reply.term, target.timeout_ms
                        ),
                    }
                }
                return Ok(ExitCode::from(if transferred {
                    cli::exit::OK
                } else {
                    cli::exit::UNKNOWN
                }));
            }
        }),
        Cmd::Status { target, out } => runtime()?.block_on(async {
            let endpoints = target.endpoints()?;
            let replies = cluster_client::status_all(
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
            let all_ok = replies.iter().all(|(_, r)| r.is_ok());
            let lag_of = |s: &pb::StatusReply| {
                if s.role == "leader" {
                    Some(0)
                } else {
                    lags.get(&s.node_id).copied()
                }
            };
            if out.json() {
                let nodes = replies
                    .into_iter()
                    .map(|(addr, reply)| match reply {
                        Ok(s) => cli::NodeJson {
                            endpoint: addr.to_string(),
                            reachable: true,
                            status: Some(cli::NodeStatusJson::new(&s, lag_of(&s))),
                            error: None,
                        },
                        Err(e) => cli::NodeJson {
                            endpoint: addr.to_string(),
                            reachable: false,
                            status: None,
                            error: Some(e),
                        },
                    })
                    .collect();
                print_json(&cli::StatusJson { nodes })?;
            } else {
                println!("{}", cluster_client::status_header());
                let mut alarms = Vec::new();
                for (addr, reply) in replies {
                    match reply {
                        Ok(s) => {
                            println!("{}", cluster_client::status_row(&s, lag_of(&s)));
                            if !s.alarm.is_empty() {
                                alarms.push(format!("ALARM node {}: {}", s.node_id, s.alarm));
                            }
                        }
                        Err(e) => println!("{addr}: unreachable: {e}"),
                    }
                }
                // After the table, so scripts reading its columns are unaffected.
                for alarm in alarms {
                    println!("{alarm}");
                }
            }
            Ok(ExitCode::from(if all_ok {
                cli::exit::OK
            } else {
                cli::exit::UNREACHABLE
            }))
        }),
    }
}

/// `kv put`/`kv del`'s answer.
fn print_write(reply: &pb::WriteReply, out: &OutputArgs) -> anyhow::Result<()> {
    if out.json() {
        print_json(&cli::WriteJson::from(reply))
    } else {
        println!("OK lsn={}", reply.lsn);
        Ok(())
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

fn cluster_up(
    dir: &std::path::Path,
    log_dir: &std::path::Path,
    restart: bool,
) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("find own executable")?;
    let clean = runtime()?.block_on(kv_node::supervisor::cluster_up(
        &exe,
        dir,
        log_dir,
        restart,
        shutdown_signal(),
    ))?;
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
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
    let mut out = std::io::stdout().lock();
    let repl = Repl::new(engine);
    if stdin.is_terminal() {
        let mut ended = false;
        kv_node::lineedit::run("kv> ", |line| {
            let flow = repl.run_line(line, &mut out)?;
            out.flush()?;
            ended = flow == kv_node::repl::Flow::Exit;
            Ok(flow)
        })?;
        if !ended {
            repl.finish(&mut out).context("REPL I/O")?;
        }
    } else {
        repl.run(stdin.lock(), &mut out, false)
            .context("REPL I/O")?;
    }
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
                println!("{}", cluster_client::CLUSTER_BENCH_HEADER);
            }
            for c in clients {
                if c == 0 {
                    anyhow::bail!("--clients: a client count must be at least 1");
                }
                let load = cluster_client::BenchLoad {
                    ops,
                    key_size,
                    value_size,
                    api,
                };
                let row = cluster_client::bench_cluster(
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
