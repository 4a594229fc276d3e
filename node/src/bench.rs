//! Benchmarks: they measure and print; they never fail on a timing.
//!
//! - [`repl_bench`]: the REPL's `BENCH n` (n sequential PUTs, then FLUSH).
//! - [`engine_bench`]: `kv bench engine`, durable writes from many threads,
//!   to show group commit scaling.
//! - [`recovery_bench`]: `kv bench recovery`, open time from a snapshot
//!   versus a full WAL replay, each measured in a fresh child process so its
//!   peak memory is its own.
//!
//! Wall-clock time is read here on purpose: benchmarks are about real time.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::engine::{Engine, EngineConfig, Result};
use crate::storage::FsStorage;

/// The result of `BENCH n`, printed as one line.
#[derive(Debug, Clone)]
pub struct BenchLine {
    pub n: u64,
    pub batch: u32,
    pub total: Duration,
    pub fsyncs: u64,
}

impl fmt::Display for BenchLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.total.as_secs_f64().max(1e-9);
        write!(
            f,
            "BENCH n={} batch={} total_ms={} ops_per_sec={} fsyncs={}",
            self.n,
            self.batch,
            self.total.as_millis(),
            (self.n as f64 / secs).round() as u64,
            self.fsyncs
        )
    }
}

/// A 100-byte value derived from `i` (printable, so GET shows it sensibly).
fn bench_value(i: u64, len: usize) -> Vec<u8> {
    let mut v = format!("v{i:015}").into_bytes();
    v.resize(len, b'.');
    v
}

/// `BENCH n`: n sequential PUTs of 100-byte values under the current batch
/// setting, then a FLUSH; counts the WAL syncs it caused.
pub fn repl_bench(engine: &Engine, n: u64) -> Result<BenchLine> {
    let before = engine.stats().fsyncs;
    let start = Instant::now();
    for i in 0..n {
        engine.put(format!("bench:{i:010}").into_bytes(), bench_value(i, 100))?;
    }
    engine.flush()?;
    let total = start.elapsed();
    Ok(BenchLine {
        n,
        batch: engine.batch(),
        total,
        fsyncs: engine.stats().fsyncs - before,
    })
}

/// A small, fast PRNG (xorshift64*) so each writer's keys differ.
pub(crate) struct Rng(u64);

impl Rng {
    /// A stream for `seed` (any value; zero is mapped away).
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let x = self.next().to_le_bytes();
            chunk.copy_from_slice(&x[..chunk.len()]);
        }
    }
}

/// Settings of `kv bench engine`.
#[derive(Debug, Clone)]
pub struct EngineBenchArgs {
    pub writers: Vec<usize>,
    pub ops: u64,
    pub key_size: usize,
    pub value_size: usize,
    pub data_dir: PathBuf,
}

/// One row of `kv bench engine`.
#[derive(Debug, Clone, Serialize)]
pub struct EngineBenchRow {
    pub writers: usize,
    pub ops: u64,
    pub seconds: f64,
    pub ops_per_sec: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub fsyncs: u64,
    pub records_per_fsync: f64,
}

/// Latencies in microseconds, in an HDR histogram (`hdrhistogram`: three
/// significant digits, so exact up to 2,048 µs and within 0.1% above, up
/// to an hour; longer counts as an hour): a fixed few hundred kilobytes
/// however many writes are timed, and histograms of concurrent writers
/// merge. All share one layout (fixed bounds): `add` across auto-resized
/// histograms of different ranges miscounted in a test (7.6).
#[derive(Debug, Clone)]
pub struct Latencies(hdrhistogram::Histogram<u64>);

/// The longest latency a [`Latencies`] tells apart: an hour, in µs.
const LATENCY_US_MAX: u64 = 3_600_000_000;

impl Latencies {
    /// An empty histogram.
    pub fn new() -> anyhow::Result<Self> {
        Ok(Latencies(
            hdrhistogram::Histogram::new_with_bounds(1, LATENCY_US_MAX, 3)
                .context("create a latency histogram")?,
        ))
    }

    /// Records one latency.
    pub fn record(&mut self, us: u64) {
        self.0.saturating_record(us);
    }

    /// Adds every latency of `other`.
    pub fn merge(&mut self, other: &Latencies) -> anyhow::Result<()> {
        self.0.add(&other.0).context("merge latency histograms")
    }

    /// How many latencies were recorded.
    pub fn len(&self) -> u64 {
        self.0.len()
    }

    /// True if none was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `p`th percentile (0..=100); 0 if empty.
    pub fn percentile(&self, p: f64) -> u64 {
        if self.0.is_empty() {
            return 0;
        }
        self.0.value_at_quantile(p / 100.0)
    }
}

/// Runs one writer count: a fresh engine in its own directory, `ops` durable
/// PUTs split over `writers` threads.
pub fn engine_bench_one(args: &EngineBenchArgs, writers: usize) -> anyhow::Result<EngineBenchRow> {
    let dir = args.data_dir.join(format!("engine-w{writers}"));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clear {}", dir.display()))?;
    }
    let mut config = EngineConfig::new(&dir);
    config.snapshot_wal_bytes = 0;
    config.key_bytes_max = config.key_bytes_max.max(args.key_size);
    config.value_bytes_max = config.value_bytes_max.max(args.value_size);
    let engine = Arc::new(Engine::open(Arc::new(FsStorage), config).context("open bench engine")?);
    let per_writer = args.ops / writers as u64;
    let start = Instant::now();
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let engine = engine.clone();
            let (key_size, value_size) = (args.key_size, args.value_size);
            std::thread::spawn(move || -> anyhow::Result<Vec<u64>> {
                let mut rng =
                    Rng(0x9E37_79B9_7F4A_7C15 ^ (w as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
                // A plain vector while the clock runs; one histogram at the end.
                let mut lat = Vec::with_capacity(per_writer as usize);
                for _ in 0..per_writer {
                    let mut key = vec![0u8; key_size];
                    let mut value = vec![0u8; value_size];
                    rng.fill(&mut key);
                    rng.fill(&mut value);
                    let t = Instant::now();
                    engine.put(key, value)?;
                    lat.push(t.elapsed().as_micros() as u64);
                }
                Ok(lat)
            })
        })
        .collect();
    let mut samples = Vec::with_capacity(handles.len());
    for h in handles {
        match h.join() {
            Ok(r) => samples.push(r.context("bench writer")?),
            Err(_) => bail!("a bench writer panicked"),
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let mut latencies = Latencies::new()?;
    for us in samples.iter().flatten() {
        latencies.record(*us);
    }
    let fsyncs = engine.stats().fsyncs;
    drop(engine);
    std::fs::remove_dir_all(&dir).with_context(|| format!("clean {}", dir.display()))?;
    let ops = latencies.len();
    Ok(EngineBenchRow {
        writers,
        ops,
        seconds,
        ops_per_sec: ops as f64 / seconds,
        p50_us: latencies.percentile(50.0),
        p99_us: latencies.percentile(99.0),
        fsyncs,
        records_per_fsync: ops as f64 / fsyncs.max(1) as f64,
    })
}

/// The table header of `kv bench engine`.
pub const ENGINE_BENCH_HEADER: &str =
    "writers        ops   seconds      ops/s   p50_us   p99_us    fsyncs  records/fsync";

impl fmt::Display for EngineBenchRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:>7} {:>10} {:>9.3} {:>10.0} {:>8} {:>8} {:>9} {:>14.1}",
            self.writers,
            self.ops,
            self.seconds,
            self.ops_per_sec,
            self.p50_us,
            self.p99_us,
            self.fsyncs,
            self.records_per_fsync
        )
    }
}

/// Settings of `kv bench recovery`.
#[derive(Debug, Clone)]
pub struct RecoveryBenchArgs {
    pub keys: u64,
    pub wal_tail: u64,
    pub key_size: usize,
    pub value_size: usize,
    pub data_dir: PathBuf,
    pub runs: usize,
}

/// What one `kv bench open` child reports.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct OpenReport {
    pub open_ms: f64,
    pub snapshot_lsn: Option<u64>,
    pub records_replayed: u64,
    pub keys: usize,
    pub peak_rss_mib: f64,
}

/// Peak resident memory of this process (`VmHWM`), in MiB.
pub fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// `kv bench open`: opens the engine in `dir` once and reports.
pub fn open_once(dir: &Path) -> anyhow::Result<OpenReport> {
    let start = Instant::now();
    let engine =
        Engine::open(Arc::new(FsStorage), EngineConfig::new(dir)).context("open engine")?;
    let open_ms = start.elapsed().as_secs_f64() * 1000.0;
    let r = engine.recovery();
    Ok(OpenReport {
        open_ms,
        snapshot_lsn: r.snapshot_lsn,
        records_replayed: r.records_replayed,
        keys: r.keys,
        peak_rss_mib: peak_rss_mib(),
    })
}

fn fill(dir: &Path, args: &RecoveryBenchArgs, snapshot: bool) -> anyhow::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clear {}", dir.display()))?;
    }
    let mut config = EngineConfig::new(dir);
    config.snapshot_wal_bytes = 0;
    config.batch = 4096;
    let engine = Engine::open(Arc::new(FsStorage), config).context("open engine to fill")?;
    let mut rng = Rng(42);
    let put = |rng: &mut Rng| -> Result<u64> {
        let mut key = vec![0u8; args.key_size];
        let mut value = vec![0u8; args.value_size];
        rng.fill(&mut key);
        rng.fill(&mut value);
        engine.put(key, value)
    };
    for _ in 0..args.keys {
        put(&mut rng)?;
    }
    if snapshot {
        engine.snapshot()?;
        for _ in 0..args.wal_tail {
            put(&mut rng)?;
        }
    }
    engine.flush()?;
    Ok(())
}

/// `kv bench recovery`: builds a full-WAL directory and a snapshot-plus-tail
/// directory with the same keys, then times `runs` opens of each in child
/// processes (`exe bench open --data-dir D`).
pub fn recovery_bench(
    exe: &Path,
    args: &RecoveryBenchArgs,
) -> anyhow::Result<Vec<(String, Vec<OpenReport>)>> {
    let mut out = Vec::new();
    for (label, snapshot) in [("full WAL replay", false), ("snapshot + WAL tail", true)] {
        let dir = args.data_dir.join(if snapshot {
            "recovery-snap"
        } else {
            "recovery-wal"
        });
        eprintln!("filling {} ({} keys)...", dir.display(), args.keys);
        fill(&dir, args, snapshot)?;
        let mut runs = Vec::new();
        for _ in 0..args.runs {
            let output = std::process::Command::new(exe)
                .args(["bench", "open", "--data-dir"])
                .arg(&dir)
                .output()
                .context("run kv bench open")?;
            if !output.status.success() {
                bail!(
                    "kv bench open failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            runs.push(
                serde_json::from_slice(&output.stdout).context("parse kv bench open output")?,
            );
        }
        std::fs::remove_dir_all(&dir).with_context(|| format!("clean {}", dir.display()))?;
        out.push((label.to_owned(), runs));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_ranks() {
        let of = |values: &[u64]| {
            let mut l = Latencies::new().unwrap();
            for v in values {
                l.record(*v);
            }
            l
        };
        let v = of(&(1..=100).collect::<Vec<_>>());
        assert_eq!(v.percentile(50.0), 50);
        assert_eq!(v.percentile(99.0), 99);
        assert_eq!(of(&[7]).percentile(99.0), 7);
        assert_eq!(of(&[]).percentile(50.0), 0);
        // Two writers' histograms merge; large values keep 3 digits.
        let mut a = of(&[1_000_000; 99]);
        a.merge(&of(&[10])).unwrap();
        assert_eq!(a.len(), 100);
        assert_eq!(a.percentile(1.0), 10);
        assert!(a.percentile(50.0).abs_diff(1_000_000) <= 1_000);
        let mut zero = of(&[0, 0]);
        zero.record(u64::MAX);
        assert_eq!(zero.percentile(50.0), 0);
        assert!(zero.percentile(100.0) >= LATENCY_US_MAX);
    }

    #[test]
    fn bench_line_has_the_documented_form() {
        let line = BenchLine {
            n: 10000,
            batch: 5,
            total: Duration::from_millis(96),
            fsyncs: 2000,
        };
        assert_eq!(
            line.to_string(),
            "BENCH n=10000 batch=5 total_ms=96 ops_per_sec=104167 fsyncs=2000"
        );
    }
}
