//! Shared helpers for the engine's integration tests: a simulated disk, an
//! engine on it, a tiny seeded PRNG, and the crash-consistency model; and,
//! in [`process`], starting real `kv` processes that cannot outlive the test.
#![allow(dead_code)]

pub mod cluster;
pub mod process;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use kv_node::engine::{Engine, EngineConfig, Op, Result};
use kv_node::storage::{SimOptions, SimStorage};

pub const DIR: &str = "/data";

/// A disk whose crashes keep exactly the durable bytes.
pub fn sim() -> SimStorage {
    SimStorage::new(SimOptions {
        seed: 1,
        torn_tails: false,
        independent_names: false,
    })
}

/// Default config on `/data`, with automatic snapshots off and no
/// preallocation (so tests can compute byte offsets from record sizes).
pub fn config() -> EngineConfig {
    let mut c = EngineConfig::new(DIR);
    c.snapshot_wal_bytes = 0;
    c.segment_preallocate_bytes = 0;
    c
}

pub fn open(sim: &SimStorage, config: &EngineConfig) -> Result<Engine> {
    Engine::open(Arc::new(sim.clone()), config.clone())
}

pub fn segment(first_lsn: u64) -> PathBuf {
    PathBuf::from(DIR).join(format!("wal-{first_lsn:020}.wal"))
}

pub fn snapshot(lsn: u64) -> PathBuf {
    PathBuf::from(DIR).join(format!("snap-{lsn:020}.snap"))
}

/// Every entry of the engine's applied state.
pub fn contents(engine: &Engine) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut m = BTreeMap::new();
    engine.for_each(|k, v| {
        m.insert(k.to_vec(), v.to_vec());
    });
    m
}

/// xorshift64*: deterministic for a seed, no dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// The model of what a crash may leave: the log of every write the engine
/// accepted (index = LSN - 1) and the highest LSN the API promised durable.
///
/// After recovery the state must equal the log's prefix through some LSN `r`
/// with `durable_floor <= r <= log.len()`: every durable write is there, and
/// every other write is wholly there or wholly absent (a WAL is a prefix).
///
/// A process restart (page cache kept) must also keep every write that was
/// acknowledged at all (`acked_floor`): in batch mode those were written to
/// the OS before the acknowledgement.
#[derive(Debug, Default, Clone)]
pub struct Model {
    pub log: Vec<Op>,
    pub durable_floor: u64,
    pub acked_floor: u64,
}

impl Model {
    /// Records a write the engine accepted at `lsn`.
    pub fn accepted(&mut self, lsn: u64, op: Op) {
        assert_eq!(
            lsn,
            self.log.len() as u64 + 1,
            "LSNs are dense and in order"
        );
        self.log.push(op);
    }

    /// The API promised everything through `lsn` durable.
    pub fn durable_through(&mut self, lsn: u64) {
        self.durable_floor = self.durable_floor.max(lsn);
        self.acked_through(lsn);
    }

    /// The API acknowledged the write at `lsn` (durable or only written).
    pub fn acked_through(&mut self, lsn: u64) {
        self.acked_floor = self.acked_floor.max(lsn);
    }

    /// Like [`Model::check_recovered`] after a process restart, where the
    /// page cache survived: every acknowledged write must be there.
    pub fn check_restarted(&mut self, engine: &Engine, context: &str) -> u64 {
        let r = engine.stats().last_lsn;
        assert!(
            r >= self.acked_floor,
            "{context}: restarted through LSN {r} but LSN {} was acknowledged",
            self.acked_floor
        );
        self.check_recovered(engine, context)
    }

    /// The state after the first `r` writes.
    pub fn state_at(&self, r: u64) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let mut m = BTreeMap::new();
        for op in &self.log[..r as usize] {
            match op {
                Op::Put { key, value } => {
                    m.insert(key.clone(), value.clone());
                }
                Op::Delete { key } => {
                    m.remove(key);
                }
            }
        }
        m
    }

    /// Checks a freshly recovered engine against the model and cuts the
    /// model's log to what survived. Returns the recovered LSN.
    pub fn check_recovered(&mut self, engine: &Engine, context: &str) -> u64 {
        let r = engine.stats().last_lsn;
        assert!(
            r >= self.durable_floor,
            "{context}: recovered through LSN {r} but LSN {} was acknowledged durable",
            self.durable_floor
        );
        assert!(
            r <= self.log.len() as u64,
            "{context}: recovered LSN {r} but only {} writes were ever accepted",
            self.log.len()
        );
        let expected = self.state_at(r);
        let got = contents(engine);
        assert!(
            got == expected,
            "{context}: state at LSN {r} differs from the model's prefix ({} vs {} keys)",
            got.len(),
            expected.len()
        );
        engine.verify_digest();
        self.log.truncate(r as usize);
        self.durable_floor = r;
        self.acked_floor = r;
        r
    }
}
