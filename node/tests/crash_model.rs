//! Crash consistency against a model, on the simulated disk.
//!
//! - `random_operations_with_crashes`: seeded random sequences of puts,
//!   deletes, flushes, batch changes, snapshots, I/O errors, process restarts
//!   and power losses (with torn unsynced tails). After every recovery the
//!   state must be a prefix of the accepted writes that contains every write
//!   the API promised durable (see `common::Model`).
//! - `crash_at_every_storage_operation`: a fixed workload that rolls
//!   segments and takes snapshots, stopped after each of its storage
//!   operations in turn and then power-cut: every crash point recovers.
//! - `snapshot_crash_points`: power loss at each step of the snapshot
//!   protocol (temp file, sync, rename, directory sync, old snapshot and
//!   segment deletion): recovery always yields the same state.
//! - `two_snapshots_in_one_run_survive_a_crash_after_every_operation`: two
//!   snapshots in one engine lifetime, a power loss after each storage
//!   operation: every acknowledged write is recovered.
//!
//! Seeds: `CRASH_SEEDS=n` runs more (default 60); a failure names its seed.

// Tests unwrap: a failed unwrap is a test failure with its reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{DIR, Model, Rng, config, contents, open};
use kv_node::engine::{Engine, EngineConfig, Op};
use kv_node::storage::{SimOptions, SimStorage};

fn small_config() -> EngineConfig {
    let mut c = config();
    c.segment_bytes_max = 4096;
    c.snapshot_wal_bytes = 16 * 1024;
    c.group_commit_records_max = 4;
    // Small preallocation: segments grow in zeroed steps that writes then
    // overwrite, so torn overwrites are exercised too.
    c.segment_preallocate_bytes = 1000;
    c
}

fn random_op(rng: &mut Rng, step: u64) -> Op {
    let key = format!("k{}", rng.below(24)).into_bytes();
    if rng.chance(20) {
        Op::Delete { key }
    } else {
        let len = rng.below(200) as usize;
        let mut value = format!("{step}:").into_bytes();
        value.resize(value.len() + len, b'a' + (step % 26) as u8);
        Op::Put { key, value }
    }
}

fn run_seed(seed: u64) {
    let sim = SimStorage::new(SimOptions {
        seed,
        torn_tails: true,
        independent_names: true,
    });
    let mut rng = Rng::new(seed);
    let c = small_config();
    let mut model = Model::default();
    let mut engine = Some(open(&sim, &c).unwrap());
    let mut batch = 1u32;
    let steps = 300 + rng.below(200);
    for step in 0..steps {
        let ctx = format!("seed {seed} step {step}");
        let e = match &engine {
            Some(e) => e,
            None => unreachable!(),
        };
        let poisoned = e.stats().poisoned.is_some();
        match rng.below(100) {
            0..=69 if !poisoned => {
                let op = random_op(&mut rng, step);
                let result = match op.clone() {
                    Op::Put { key, value } => e.put(key, value),
                    Op::Delete { key } => e.delete(key),
                };
                // Every accepted write got the next LSN, acknowledged or not.
                let last = e.stats().last_lsn;
                if last > model.log.len() as u64 {
                    model.accepted(last, op);
                }
                match result {
                    Ok(lsn) => {
                        assert_eq!(lsn, last, "{ctx}");
                        if batch == 1 {
                            model.durable_through(lsn);
                        } else {
                            model.acked_through(lsn);
                        }
                    }
                    Err(err) => assert!(err.is_fatal(), "{ctx}: {err}"),
                }
            }
            70..=74 if !poisoned => {
                let before = e.stats().last_lsn;
                if e.flush().is_ok() {
                    model.durable_through(before);
                }
            }
            75..=77 if !poisoned => {
                batch = [1, 1, 3, 8][rng.below(4) as usize];
                let before = e.stats().last_lsn;
                if e.set_batch(batch).is_ok() {
                    model.durable_through(before);
                }
            }
            78..=80 if !poisoned => {
                if let Ok(info) = e.snapshot() {
                    model.durable_through(info.lsn);
                }
            }
            81..=82 => sim.fail_next_sync(),
            83 => sim.fail_next_write(),
            84..=89 => {
                // Process restart: the page cache survives.
                drop(engine.take());
                sim.clear_faults();
                let e = open(&sim, &c).unwrap_or_else(|err| panic!("{ctx}: reopen: {err}"));
                model.check_restarted(&e, &format!("{ctx} (restart)"));
                e.set_batch(batch).unwrap();
                engine = Some(e);
            }
            90..=99 => {
                // Power loss: only durable bytes (plus torn sectors) survive.
                drop(engine.take());
                sim.crash();
                let e = open(&sim, &c).unwrap_or_else(|err| panic!("{ctx}: recover: {err}"));
                model.check_recovered(&e, &format!("{ctx} (power loss)"));
                e.set_batch(batch).unwrap();
                engine = Some(e);
            }
            _ => {
                // A poisoned engine takes no writes: restart it.
                drop(engine.take());
                sim.clear_faults();
                let e = open(&sim, &c).unwrap_or_else(|err| panic!("{ctx}: reopen: {err}"));
                model.check_recovered(&e, &format!("{ctx} (restart after poison)"));
                e.set_batch(batch).unwrap();
                engine = Some(e);
            }
        }
    }
    drop(engine);
    sim.crash();
    let e = open(&sim, &c).unwrap();
    model.check_recovered(&e, &format!("seed {seed} final"));
}

#[test]
fn random_operations_with_crashes() {
    let seeds: u64 = std::env::var("CRASH_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    for seed in 1..=seeds {
        let result = std::panic::catch_unwind(|| run_seed(seed));
        if let Err(panic) = result {
            eprintln!("crash model failed at seed {seed}");
            std::panic::resume_unwind(panic);
        }
    }
}

/// The fixed workload for the crash-point sweep: writes that roll segments,
/// a delete, two snapshots (so old segments and snapshots get deleted).
fn workload(e: &Engine, model: &mut Model) -> kv_node::engine::Result<()> {
    for i in 0..60u64 {
        let op = if i % 9 == 8 {
            Op::Delete {
                key: format!("k{}", i % 7).into_bytes(),
            }
        } else {
            Op::Put {
                key: format!("k{}", i % 7).into_bytes(),
                value: vec![b'a' + (i % 26) as u8; 150],
            }
        };
        let before = e.stats().last_lsn;
        let result = match op.clone() {
            Op::Put { key, value } => e.put(key, value),
            Op::Delete { key } => e.delete(key),
        };
        if e.stats().last_lsn > before {
            model.accepted(before + 1, op);
        }
        model.durable_through(result?);
        if i == 25 || i == 50 {
            let info = e.snapshot()?;
            model.durable_through(info.lsn);
        }
    }
    Ok(())
}

#[test]
fn crash_at_every_storage_operation() {
    let c = small_config();
    // Count the workload's storage operations once.
    let probe = common::sim();
    let total = {
        let e = open(&probe, &c).unwrap();
        let start = probe.ops();
        workload(&e, &mut Model::default()).unwrap();
        probe.ops() - start
    };
    assert!(total > 100, "the workload does real I/O ({total} ops)");
    for stop_after in 0..=total {
        // A process kill at this point (the page cache survives), a restart,
        // more durable writes, and only then a power loss: whatever the kill
        // left half-done must have been made durable by recovery.
        {
            let sim = common::sim();
            let mut model = Model::default();
            {
                let e = open(&sim, &c).unwrap();
                sim.fail_after_ops(stop_after);
                let _ = workload(&e, &mut model);
            }
            sim.clear_faults();
            let ctx = format!("kill after storage op {stop_after} of {total}");
            let e = open(&sim, &c).unwrap_or_else(|err| panic!("{ctx}: {err}"));
            model.check_restarted(&e, &ctx);
            for i in 0..3u64 {
                let lsn = e
                    .put(format!("after{i}").into_bytes(), vec![b'z'; 50])
                    .unwrap_or_else(|err| panic!("{ctx}: {err}"));
                model.accepted(
                    lsn,
                    Op::Put {
                        key: format!("after{i}").into_bytes(),
                        value: vec![b'z'; 50],
                    },
                );
                model.durable_through(lsn);
            }
            drop(e);
            sim.crash();
            let e = open(&sim, &c).unwrap_or_else(|err| panic!("{ctx}, then power loss: {err}"));
            model.check_recovered(&e, &format!("{ctx}, then power loss"));
        }
        for torn in [false, true] {
            let sim = SimStorage::new(SimOptions {
                seed: stop_after,
                torn_tails: torn,
                independent_names: true,
            });
            let mut model = Model::default();
            {
                let e = open(&sim, &c).unwrap();
                sim.fail_after_ops(stop_after);
                let _ = workload(&e, &mut model);
            }
            sim.crash();
            let ctx =
                format!("crash after storage op {stop_after} of {total} (torn tails: {torn})");
            let e = open(&sim, &c).unwrap_or_else(|err| panic!("{ctx}: {err}"));
            model.check_recovered(&e, &ctx);
            // And the recovered engine goes on working.
            e.put(b"after".to_vec(), b"crash".to_vec())
                .unwrap_or_else(|err| panic!("{ctx}: {err}"));
        }
    }
}

#[test]
fn snapshot_crash_points() {
    let mut c = small_config();
    c.snapshot_wal_bytes = 0;
    let prepare = |sim: &SimStorage| {
        let e = open(sim, &c).unwrap();
        for i in 0..80u64 {
            e.put(
                format!("k{}", i % 30).into_bytes(),
                vec![b'x'; 100 + i as usize],
            )
            .unwrap();
        }
        e.snapshot().unwrap();
        for i in 80..160u64 {
            e.put(
                format!("k{}", i % 30).into_bytes(),
                vec![b'y'; 100 + i as usize],
            )
            .unwrap();
        }
        (e.digest(), contents(&e))
    };
    // Count the operations of the second snapshot (it also deletes segments).
    let probe = common::sim();
    let expected = prepare(&probe);
    let total = {
        let e = open(&probe, &c).unwrap();
        let start = probe.ops();
        let info = e.snapshot().unwrap();
        assert!(info.segments_removed > 0);
        probe.ops() - start
    };
    for stop_after in 0..=total {
        let sim = common::sim();
        assert_eq!(prepare(&sim), expected);
        {
            let e = open(&sim, &c).unwrap();
            sim.fail_after_ops(stop_after);
            let _ = e.snapshot();
        }
        sim.crash();
        let e = open(&sim, &c)
            .unwrap_or_else(|err| panic!("snapshot crash after op {stop_after}: {err}"));
        assert_eq!(
            (e.digest(), contents(&e)),
            expected,
            "snapshot crash after op {stop_after} of {total}"
        );
        let names = {
            use kv_node::storage::Storage;
            sim.list_dir(std::path::Path::new(DIR)).unwrap()
        };
        assert!(
            !names.iter().any(|n| n.ends_with(".tmp")),
            "temp files are cleaned up"
        );
    }
}

/// Two snapshots in one engine lifetime (no restart in between, so nothing
/// but the snapshot protocol itself makes the first snapshot's name
/// durable), the second deleting the WAL the first covers. A power loss
/// after every storage operation, each with several draws of which unsynced
/// directory changes survive: every acknowledged write is recovered. (A
/// snapshot rename without its directory sync is caught here.)
#[test]
fn two_snapshots_in_one_run_survive_a_crash_after_every_operation() {
    let mut c = small_config();
    c.snapshot_wal_bytes = 0;
    let key = |i: u64| format!("k{}", i % 30).into_bytes();
    let value = |i: u64| format!("v{i}-{}", "x".repeat(100)).into_bytes();
    // Runs the workload until the disk stops; returns the acknowledged
    // state and the one put that failed (it may or may not have landed).
    let run = |sim: &SimStorage, stop_after: Option<u64>| {
        let mut model = std::collections::BTreeMap::new();
        let mut failed = None;
        let e = open(sim, &c).unwrap();
        if let Some(n) = stop_after {
            sim.fail_after_ops(n);
        }
        let mut step = |from: u64, to: u64| {
            for i in from..to {
                if e.put(key(i), value(i)).is_err() {
                    failed = Some((key(i), value(i)));
                    return false;
                }
                model.insert(key(i), value(i));
            }
            true
        };
        let _ = step(0, 80)
            && e.snapshot().is_ok()
            && step(80, 160)
            && e.snapshot().is_ok_and(|info| {
                assert!(stop_after.is_some() || info.segments_removed > 0);
                true
            })
            && step(160, 170);
        (model, failed)
    };
    let probe = SimStorage::new(SimOptions {
        seed: 0,
        torn_tails: false,
        independent_names: true,
    });
    let start = probe.ops();
    run(&probe, None);
    let total = probe.ops() - start;
    for stop_after in 0..=total {
        for seed in 0..6 {
            let sim = SimStorage::new(SimOptions {
                seed: seed * 1000 + stop_after,
                torn_tails: true,
                independent_names: true,
            });
            let (acked, failed) = run(&sim, Some(stop_after));
            sim.crash();
            let e = open(&sim, &c).unwrap_or_else(|err| {
                panic!("crash after op {stop_after} of {total} (seed {seed}): {err}")
            });
            let got = contents(&e);
            for (k, v) in &acked {
                // The failed put may have landed (it was written, not
                // acknowledged); nothing else may replace an acked value.
                let landed = failed
                    .as_ref()
                    .is_some_and(|(fk, fv)| fk == k && got.get(k) == Some(fv));
                assert!(
                    got.get(k) == Some(v) || landed,
                    "crash after op {stop_after} of {total} (seed {seed}): acknowledged {} lost",
                    String::from_utf8_lossy(k)
                );
            }
        }
    }
}
