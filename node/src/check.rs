//! `kv check`: verify a data directory offline and say what recovery would
//! do, without changing a byte.
//!
//! It reports every snapshot and segment on its own, then copies the files
//! into an in-memory [`SimStorage`] and runs the real recovery there, so the
//! verdict is exactly what `Engine::open` would do (same code, no second
//! implementation of the case table), while the real files stay untouched.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;

use crate::engine::snapshot::{self, parse_snapshot_name};
use crate::engine::wal::{parse_segment_name, scan_segment};
use crate::engine::{Engine, EngineConfig};
use crate::storage::{FsStorage, SimOptions, SimStorage, Storage};

/// The outcome of a check.
#[derive(Debug)]
pub struct CheckReport {
    /// Human-readable lines, one per file plus the verdict.
    pub text: String,
    /// True if the engine would open (possibly after cutting a torn tail).
    pub would_open: bool,
}

/// Checks the data directory `config.data_dir` (limits from `config`).
pub fn check(config: &EngineConfig) -> anyhow::Result<CheckReport> {
    let dir = &config.data_dir;
    let fs = FsStorage;
    if !dir.is_dir() {
        anyhow::bail!("{} is not a directory", dir.display());
    }
    let names = fs
        .list_dir(dir)
        .with_context(|| format!("list {}", dir.display()))?;
    let mut text = String::new();
    let _ = writeln!(text, "data directory {}", dir.display());
    // Take the lock only if its file exists (creating it would change the
    // directory); a running kv makes the report a moment's view.
    let _lock = if names.iter().any(|n| n == "LOCK") {
        match fs.lock_dir(dir) {
            Ok(guard) => Some(guard),
            Err(_) => {
                let _ = writeln!(
                    text,
                    "warning: a running kv holds this directory; files may change while they are read"
                );
                None
            }
        }
    } else {
        None
    };
    let payload_max = 4 + config.key_bytes_max + config.value_bytes_max;
    let sim = SimStorage::new(SimOptions {
        seed: 0,
        torn_tails: false,
        independent_names: false,
    });
    sim.create_dir_all(dir)?;
    for name in &names {
        let path = dir.join(name);
        let bytes = fs
            .read_file(&path)
            .with_context(|| format!("read {}", path.display()))?;
        if let Some(lsn) = parse_snapshot_name(name) {
            match snapshot::decode(&bytes) {
                Ok(s) => {
                    let _ = writeln!(
                        text,
                        "snapshot {name}: LSN {lsn}, term {}, {} keys, digest {:016x}: ok",
                        s.term,
                        s.map.len(),
                        s.digest
                    );
                }
                Err(reason) => {
                    let _ = writeln!(text, "snapshot {name}: does not verify: {reason}");
                }
            }
        } else if parse_segment_name(name).is_some() {
            match scan_segment(&bytes, payload_max, &mut |_| {}) {
                Ok(scan) => {
                    let first = scan.header.first_lsn;
                    let records = scan.records;
                    let range = if records == 0 {
                        "no records".to_owned()
                    } else {
                        format!("LSN {first}..={}", first + records - 1)
                    };
                    let _ = write!(text, "segment {name}: {range}, {} bytes", bytes.len());
                    match scan.damage {
                        None => {
                            let _ = writeln!(text, ": ok");
                        }
                        Some(d) => {
                            let after = match d.valid_record_after {
                                Some(at) => format!("; a valid later record at offset {at}"),
                                None => "; nothing valid after it".to_owned(),
                            };
                            let _ = writeln!(
                                text,
                                ": bad record at offset {} (LSN {}): {}{after}",
                                d.offset, d.lsn, d.reason
                            );
                        }
                    }
                }
                Err(reason) => {
                    let _ = writeln!(text, "segment {name}: {} bytes: {reason}", bytes.len());
                }
            }
        } else if snapshot::is_snapshot_recv(name) {
            let _ = writeln!(
                text,
                "leftover {name}: an interrupted snapshot receive from a leader (recovery removes it)"
            );
        } else if snapshot::is_snapshot_temp(name) {
            let _ = writeln!(
                text,
                "leftover {name}: an interrupted snapshot (recovery removes it)"
            );
        } else if name != "LOCK" {
            let _ = writeln!(text, "other file {name}: ignored");
        }
        let file = sim.create(&path)?;
        file.write_at(&bytes, 0)?;
        file.sync_data()?;
    }
    sim.sync_dir(dir)?;

    let mut sim_config = config.clone();
    sim_config.data_dir = dir.to_path_buf();
    let would_open = match Engine::open(Arc::new(sim), sim_config) {
        Ok(engine) => {
            let _ = writeln!(text, "verdict: recovers: {}", engine.recovery());
            true
        }
        Err(e) => {
            let _ = writeln!(text, "verdict: REFUSES to open: {e}");
            false
        }
    };
    Ok(CheckReport { text, would_open })
}

/// Convenience for tests: check `dir` with default limits.
pub fn check_dir(dir: &Path) -> anyhow::Result<CheckReport> {
    check(&EngineConfig::new(dir))
}
