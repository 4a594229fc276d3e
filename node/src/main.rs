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
use kv_node::timer::FlushTimer;
use kv_node::{Engine, EngineConfig, FsStorage};

/// kv: a crash-consistent key-value node.
#[derive(Parser, Debug)]
#[command(name = "kv", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
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
    /// Open a data directory once and print a JSON report (used by
    /// `bench recovery`, in a child process).
    Open {
        #[arg(long)]
        data_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kv: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
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
        Cmd::Bench(b) => bench_cmd(b),
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

fn bench_cmd(cmd: BenchCmd) -> anyhow::Result<ExitCode> {
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
        BenchCmd::Open { data_dir } => {
            let report = bench::open_once(&data_dir)?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}
