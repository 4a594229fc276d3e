//! Recovery: the case table of `node/DESIGN.md`, row by row; torn
//! tails at every byte offset and every flipped bit of the last records;
//! snapshots and their fallback; determinism; poisoning; batch mode;
//! preallocation; the replication hooks, with truncation and snapshot
//! install at every crash point.

// Tests unwrap: a failed unwrap is a test failure with its reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::{DIR, config, contents, open, segment, sim, snapshot};
use kv_node::engine::record::{RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES};
use kv_node::engine::{EngineError, Op, Record};
use kv_node::storage::{SimStorage, Storage};

fn key(i: u64) -> Vec<u8> {
    format!("key-{i:04}").into_bytes()
}

fn value(i: u64) -> Vec<u8> {
    // Varying lengths, so record boundaries fall everywhere.
    format!("value-{i}-{}", "x".repeat((i * 7 % 23) as usize)).into_bytes()
}

/// Segments small enough that a few hundred records roll several.
const SMALL_SEGMENT_BYTES: u64 = 4096;

fn small_segments() -> kv_node::engine::EngineConfig {
    let mut c = config();
    c.segment_bytes_max = SMALL_SEGMENT_BYTES;
    c
}

/// A disk holding keys 1..=n written with small segments (several sealed).
fn filled_small_segments(n: u64) -> (SimStorage, kv_node::engine::EngineConfig) {
    let (s, c) = (sim(), small_segments());
    put_range(&open(&s, &c).unwrap(), 1..=n);
    (s, c)
}

/// Puts `key(i) = value(i)` for every `i` in `range`, in sync mode.
fn put_range(engine: &kv_node::engine::Engine, range: std::ops::RangeInclusive<u64>) {
    for i in range {
        engine.put(key(i), value(i)).unwrap();
    }
}

/// Names of the WAL segments on the disk, oldest first.
fn segment_names(s: &SimStorage) -> Vec<String> {
    let mut names = s.list_dir(Path::new(DIR)).unwrap();
    names.retain(|n| n.starts_with("wal-"));
    names
}

/// The records a leader in `term` would ship for `range`.
fn leader_records(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Record> {
    range
        .map(|i| Record {
            lsn: i,
            term,
            op: Op::Put {
                key: key(i),
                value: value(i),
            },
        })
        .collect()
}

/// Writes keys 1..=n in sync mode.
fn fill(sim: &SimStorage, n: u64) {
    let engine = open(sim, &config()).unwrap();
    for i in 1..=n {
        assert_eq!(engine.put(key(i), value(i)).unwrap(), i);
    }
}

/// Byte offset where record `lsn` starts in the first segment (every record
/// of `fill` is a put).
fn record_start(lsn: u64) -> usize {
    SEGMENT_HEADER_BYTES
        + (1..lsn)
            .map(|i| RECORD_HEADER_BYTES + 4 + key(i).len() + value(i).len())
            .sum::<usize>()
}

fn assert_holds_exactly(sim: &SimStorage, n: u64) {
    let engine = open(sim, &config()).unwrap();
    assert_eq!(engine.stats().last_lsn, n);
    assert_eq!(engine.len() as u64, n);
    for i in 1..=n {
        assert_eq!(engine.get(&key(i)), Some(value(i)), "key {i}");
    }
}

fn expect_corrupt(sim: &SimStorage, file: &Path, lsn: u64) -> String {
    match open(sim, &config()) {
        Err(EngineError::Corrupt {
            file: f, lsn: l, ..
        }) if f == file && l == Some(lsn) => open(sim, &config()).unwrap_err().to_string(),
        other => panic!(
            "expected corruption in {} at LSN {lsn}, got {other:?}",
            file.display()
        ),
    }
}

#[test]
fn row_torn_tail_incomplete_record_is_cut_and_synced() {
    let s = sim();
    fill(&s, 10);
    let seg = segment(1);
    let bytes = s.file_bytes(&seg).unwrap();
    let cut_at = bytes.len() - 5;
    s.set_file_bytes(&seg, bytes[..cut_at].to_vec()).unwrap();

    let engine = open(&s, &config()).unwrap();
    let rec = engine.recovery();
    assert_eq!(rec.last_lsn, 9);
    assert_eq!(rec.tail_bytes_cut, (cut_at - record_start(10)) as u64);
    assert_eq!(
        s.file_bytes(&seg).unwrap().len(),
        record_start(10),
        "the cut is on disk"
    );
    // A new write lands right after the last valid record, not behind garbage,
    // and survives a crash.
    assert_eq!(
        engine.put(b"new".to_vec(), b"after cut".to_vec()).unwrap(),
        10
    );
    drop(engine);
    s.crash();
    let engine = open(&s, &config()).unwrap();
    assert_eq!(engine.get(b"new"), Some(b"after cut".to_vec()));
    assert_eq!(engine.recovery().tail_bytes_cut, 0);
}

#[test]
fn row_torn_tail_bad_crc_in_last_record_is_cut() {
    let s = sim();
    fill(&s, 10);
    let seg = segment(1);
    let mut bytes = s.file_bytes(&seg).unwrap();
    let at = record_start(10) + RECORD_HEADER_BYTES + 2;
    bytes[at] ^= 0x40;
    s.set_file_bytes(&seg, bytes).unwrap();
    assert_holds_exactly(&s, 9);
}

#[test]
fn row_mid_log_damage_is_refused_and_nothing_changes() {
    let s = sim();
    fill(&s, 10);
    let seg = segment(1);
    let mut bytes = s.file_bytes(&seg).unwrap();
    bytes[record_start(5) + RECORD_HEADER_BYTES + 1] ^= 0x01;
    s.set_file_bytes(&seg, bytes.clone()).unwrap();
    let msg = expect_corrupt(&s, &seg, 5);
    assert!(
        msg.contains(&format!("offset {}", record_start(5))),
        "{msg}"
    );
    assert!(msg.contains("middle of the log"), "{msg}");
    assert_eq!(
        s.file_bytes(&seg).unwrap(),
        bytes,
        "a refused open changes nothing"
    );
}

#[test]
fn row_damage_in_a_sealed_segment_is_refused() {
    let (s, c) = filled_small_segments(200);
    let segs = segment_names(&s);
    assert!(segs.len() >= 3, "small segments roll: {segs:?}");
    // Cut the last record of the first (sealed) segment: in the last segment
    // this would be a torn tail; here it loses acknowledged writes.
    let first = segment(1);
    let bytes = s.file_bytes(&first).unwrap();
    s.set_file_bytes(&first, bytes[..bytes.len() - 3].to_vec())
        .unwrap();
    let engine_err = open(&s, &c).unwrap_err();
    assert!(
        matches!(&engine_err, EngineError::Corrupt { file, reason, .. } if *file == first && reason.contains("sealed")),
        "{engine_err}"
    );
}

#[test]
fn row_lsn_gap_between_segments_is_refused() {
    let (s, c) = filled_small_segments(200);
    let segs = segment_names(&s);
    let middle = Path::new(DIR).join(&segs[1]);
    s.remove_file(&middle).unwrap();
    s.sync_dir(Path::new(DIR)).unwrap();
    let err = open(&s, &c).unwrap_err();
    assert!(
        matches!(&err, EngineError::Corrupt { reason, .. } if reason.contains("LSN gap")),
        "{err}"
    );

    // A missing first segment with no snapshot to cover it is a hole too.
    let s = sim();
    let engine = open(&s, &c).unwrap();
    put_range(&engine, 1..=200);
    drop(engine);
    s.remove_file(&segment(1)).unwrap();
    s.sync_dir(Path::new(DIR)).unwrap();
    let err = open(&s, &c).unwrap_err();
    assert!(
        matches!(&err, EngineError::Corrupt { reason, .. } if reason.contains("records are missing")),
        "{err}"
    );
}

#[test]
fn row_half_created_last_segment_is_removed() {
    let s = sim();
    fill(&s, 5);
    // A crash while creating segment 6: the name is durable, the header is not.
    let half = segment(6);
    let f = s.create(&half).unwrap();
    f.write_at(b"KVWALSEG\x01\x00", 0).unwrap();
    f.sync_data().unwrap();
    s.sync_dir(Path::new(DIR)).unwrap();
    let engine = open(&s, &config()).unwrap();
    assert_eq!(
        engine.recovery().removed_segment.as_deref(),
        Some(half.as_path())
    );
    assert_eq!(engine.put(key(6), value(6)).unwrap(), 6);
    drop(engine);
    s.crash();
    assert_holds_exactly(&s, 6);
}

#[test]
fn a_segment_whose_name_disagrees_with_its_header_is_refused() {
    let s = sim();
    fill(&s, 5);
    let bytes = s.file_bytes(&segment(1)).unwrap();
    let wrong = segment(7);
    let f = s.create(&wrong).unwrap();
    f.write_at(&bytes, 0).unwrap();
    f.sync_data().unwrap();
    s.sync_dir(Path::new(DIR)).unwrap();
    let err = open(&s, &config()).unwrap_err();
    assert!(err.to_string().contains("name says first LSN 7"), "{err}");
}

/// Truncates the log at every byte offset from the start of record 7 of 10
/// to the end: recovery never panics, keeps every whole record before the cut
/// and nothing after it.
#[test]
fn torn_tail_at_every_offset_of_the_last_records() {
    let base = sim();
    fill(&base, 10);
    let seg = segment(1);
    let bytes = base.file_bytes(&seg).unwrap();
    for cut in record_start(7)..=bytes.len() {
        let s = sim();
        s.create_dir_all(Path::new(DIR)).unwrap();
        let f = s.create(&seg).unwrap();
        f.write_at(&bytes[..cut], 0).unwrap();
        f.sync_data().unwrap();
        s.sync_dir(Path::new(DIR)).unwrap();
        let whole = (1..=10).filter(|&i| record_start(i + 1) <= cut).count() as u64;
        let engine = open(&s, &config()).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        assert_eq!(engine.stats().last_lsn, whole, "cut at {cut}");
        // The report counts the garbage, not zeros at its end.
        let garbage = &bytes[record_start(whole + 1)..cut];
        let counted = garbage.iter().rposition(|b| *b != 0).map_or(0, |p| p + 1);
        assert_eq!(engine.recovery().tail_bytes_cut, counted as u64);
        assert_eq!(
            s.file_bytes(&seg).unwrap().len(),
            record_start(whole + 1),
            "cut at {cut}: the file ends at the last whole record"
        );
        for i in 1..=whole {
            assert_eq!(engine.get(&key(i)), Some(value(i)), "cut at {cut}, key {i}");
        }
        assert_eq!(engine.get(&key(whole + 1)), None);
    }
}

/// Flips every bit of the last three records: damage in the last record is a
/// torn tail (cut, earlier records kept); damage in an earlier one has a
/// valid record after it, so recovery refuses and names the LSN.
#[test]
fn every_bit_flip_in_the_last_records() {
    let base = sim();
    fill(&base, 10);
    let seg = segment(1);
    let bytes = base.file_bytes(&seg).unwrap();
    for at in record_start(8)..bytes.len() {
        let lsn = (1..=10).rev().find(|&i| record_start(i) <= at).unwrap();
        for bit in 0..8 {
            let mut damaged = bytes.clone();
            damaged[at] ^= 1 << bit;
            let s = sim();
            s.create_dir_all(Path::new(DIR)).unwrap();
            let f = s.create(&seg).unwrap();
            f.write_at(&damaged, 0).unwrap();
            f.sync_data().unwrap();
            s.sync_dir(Path::new(DIR)).unwrap();
            let result = open(&s, &config());
            if lsn == 10 {
                let engine = result.unwrap_or_else(|e| panic!("byte {at} bit {bit}: {e}"));
                assert_eq!(engine.stats().last_lsn, 9, "byte {at} bit {bit}");
                assert_eq!(engine.get(&key(9)), Some(value(9)));
            } else {
                match result {
                    Err(EngineError::Corrupt {
                        lsn: Some(l),
                        offset,
                        ..
                    }) => {
                        assert_eq!(l, lsn, "byte {at} bit {bit}");
                        assert_eq!(offset, record_start(lsn) as u64);
                    }
                    other => panic!("byte {at} bit {bit}: expected refusal, got {other:?}"),
                }
            }
        }
    }
}

#[test]
fn recovery_is_deterministic() {
    let s = sim();
    let c = small_segments();
    let engine = open(&s, &c).unwrap();
    for i in 1..=300 {
        engine.put(key(i % 37), value(i)).unwrap();
        if i % 5 == 0 {
            engine.delete(key(i % 11)).unwrap();
        }
        if i == 150 {
            engine.snapshot().unwrap();
        }
    }
    let live = (engine.digest(), contents(&engine));
    drop(engine);
    let first = open(&s, &c).unwrap();
    let once = (first.digest(), contents(&first), first.verify_digest());
    drop(first);
    let second = open(&s, &c).unwrap();
    let twice = (second.digest(), contents(&second), second.verify_digest());
    assert_eq!(once, twice);
    assert_eq!((once.0, once.1), live);
}

#[test]
fn snapshot_truncates_the_wal_and_recovers_with_a_tail() {
    let s = sim();
    let c = small_segments();
    let engine = open(&s, &c).unwrap();
    put_range(&engine, 1..=200);
    let first = engine.snapshot().unwrap();
    assert_eq!(first.lsn, 200);
    assert_eq!(
        first.segments_removed, 0,
        "one snapshot: the WAL stays as its fallback"
    );
    put_range(&engine, 201..=400);
    let second = engine.snapshot().unwrap();
    assert!(
        second.segments_removed > 0,
        "segments below the older snapshot go"
    );
    put_range(&engine, 401..=420);
    let digest = engine.digest();
    drop(engine);
    s.crash();
    let engine = open(&s, &c).unwrap();
    assert_eq!(engine.recovery().snapshot_lsn, Some(400));
    assert_eq!(engine.recovery().records_replayed, 20);
    assert_eq!(engine.digest(), digest);
    let names = s.list_dir(Path::new(DIR)).unwrap();
    assert!(!names.contains(&"wal-00000000000000000001.wal".to_owned()));
    assert!(names.contains(&"snap-00000000000000000200.snap".to_owned()));
}

#[test]
fn a_bad_snapshot_falls_back_to_the_previous_one() {
    let s = sim();
    let c = small_segments();
    let engine = open(&s, &c).unwrap();
    put_range(&engine, 1..=200);
    engine.snapshot().unwrap();
    put_range(&engine, 201..=400);
    engine.snapshot().unwrap();
    put_range(&engine, 401..=410);
    let digest = engine.digest();
    drop(engine);
    let newest = snapshot(400);
    let mut bytes = s.file_bytes(&newest).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    s.set_file_bytes(&newest, bytes).unwrap();

    let engine = open(&s, &c).unwrap();
    let rec = engine.recovery();
    assert_eq!(rec.snapshot_lsn, Some(200));
    assert_eq!(rec.records_replayed, 210);
    assert_eq!(rec.snapshots_rejected.len(), 1);
    assert_eq!(engine.digest(), digest);
    let names = s.list_dir(Path::new(DIR)).unwrap();
    assert!(
        names.contains(&"snap-00000000000000000400.snap.broken".to_owned()),
        "{names:?}"
    );
}

#[test]
fn leftover_snapshot_temp_file_is_removed() {
    let s = sim();
    fill(&s, 3);
    let tmp = Path::new(DIR).join("snap-00000000000000000003.snap.tmp");
    let f = s.create(&tmp).unwrap();
    f.write_at(b"half a snapshot", 0).unwrap();
    f.sync_data().unwrap();
    s.sync_dir(Path::new(DIR)).unwrap();
    assert_holds_exactly(&s, 3);
    assert!(
        !s.list_dir(Path::new(DIR))
            .unwrap()
            .iter()
            .any(|n| n.ends_with(".tmp"))
    );
}

#[test]
fn a_failed_sync_poisons_the_engine() {
    let s = sim();
    let engine = open(&s, &config()).unwrap();
    engine.put(b"a".to_vec(), b"1".to_vec()).unwrap();
    s.fail_next_sync();
    let err = engine.put(b"b".to_vec(), b"2".to_vec()).unwrap_err();
    assert!(err.is_fatal(), "{err}");
    assert_eq!(
        engine.get(b"b"),
        None,
        "an unacknowledged sync-mode write is not visible"
    );
    let later = engine.put(b"c".to_vec(), b"3".to_vec()).unwrap_err();
    assert!(matches!(later, EngineError::Poisoned { .. }), "{later}");
    assert!(engine.flush().is_err());
    assert!(engine.stats().poisoned.is_some());
    assert_eq!(engine.get(b"a"), Some(b"1".to_vec()), "reads still work");
    drop(engine);
    s.crash();
    let engine = open(&s, &config()).unwrap();
    assert_eq!(engine.get(b"a"), Some(b"1".to_vec()));
    assert_eq!(engine.get(b"c"), None);
}

#[test]
fn after_a_failed_write_every_writer_is_refused() {
    let s = sim();
    let engine = std::sync::Arc::new(open(&s, &config()).unwrap());
    s.fail_next_write();
    let err = engine.put(b"a".to_vec(), b"1".to_vec()).unwrap_err();
    assert!(err.is_fatal());
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let e = engine.clone();
            std::thread::spawn(move || e.put(vec![b'k', i], b"v".to_vec()))
        })
        .collect();
    for t in threads {
        assert!(matches!(
            t.join().unwrap(),
            Err(EngineError::Poisoned { .. })
        ));
    }
}

#[test]
fn batch_mode_syncs_every_n_writes_and_on_flush() {
    let s = sim();
    let mut c = config();
    c.batch = 4;
    let engine = open(&s, &c).unwrap();
    let syncs_before = s.syncs();
    for i in 1..=8 {
        engine.put(key(i), value(i)).unwrap();
        assert_eq!(
            engine.get(&key(i)),
            Some(value(i)),
            "acknowledged writes are visible"
        );
    }
    assert_eq!(engine.stats().durable_lsn, 8);
    assert_eq!(
        s.syncs() - syncs_before,
        2,
        "8 writes at batch 4: two syncs"
    );
    engine.put(key(9), value(9)).unwrap();
    let st = engine.stats();
    assert_eq!(
        (st.written_lsn, st.durable_lsn),
        (9, 8),
        "written, not durable"
    );
    engine.flush().unwrap();
    assert_eq!(engine.stats().durable_lsn, 9);
    engine.put(key(10), value(10)).unwrap();
    drop(engine);
    // Power loss: the unsynced write is gone, everything flushed is there.
    s.crash();
    let engine = open(&s, &c).unwrap();
    assert_eq!(engine.stats().last_lsn, 9);
}

#[test]
fn the_flusher_can_be_driven_step_by_step_on_one_thread() {
    let s = sim();
    let engine = open(&s, &config()).unwrap();
    let a = engine
        .submit(Op::Put {
            key: b"a".to_vec(),
            value: b"1".to_vec(),
        })
        .unwrap();
    let b = engine
        .submit(Op::Put {
            key: b"b".to_vec(),
            value: b"2".to_vec(),
        })
        .unwrap();
    assert_eq!((a, b), (1, 2));
    assert_eq!(engine.get(b"a"), None, "not visible before it is durable");
    assert_eq!(engine.stats().durable_lsn, 0);
    let syncs = s.syncs();
    assert!(engine.flush_step().unwrap());
    assert_eq!(s.syncs() - syncs, 1, "one sync covers both: group commit");
    let st = engine.stats();
    assert_eq!((st.durable_lsn, st.applied_lsn), (2, 2));
    assert_eq!(engine.get(b"b"), Some(b"2".to_vec()));
    assert!(!engine.flush_step().unwrap(), "nothing left to do");
}

#[test]
fn concurrent_writers_share_syncs() {
    let s = sim();
    let engine = std::sync::Arc::new(open(&s, &config()).unwrap());
    let threads: Vec<_> = (0..8u8)
        .map(|t| {
            let e = engine.clone();
            std::thread::spawn(move || {
                for i in 0..50u8 {
                    e.put(vec![t, i], vec![i; 10]).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let st = engine.stats();
    assert_eq!(st.durable_lsn, 400);
    assert_eq!(st.keys, 400);
    drop(engine);
    s.crash();
    assert_eq!(open(&s, &config()).unwrap().len(), 400);
}

#[test]
fn replication_hooks_read_append_and_truncate() {
    let s = sim();
    let c = small_segments();
    let engine = open(&s, &c).unwrap();
    engine.set_term(3);
    put_range(&engine, 1..=100);
    let shipped = engine.read_from(41, 30).unwrap();
    assert_eq!(shipped.len(), 30);
    assert_eq!(shipped[0].lsn, 41);
    assert_eq!(shipped[0].term, 3);
    assert_eq!(
        shipped[0].op,
        Op::Put {
            key: key(41),
            value: value(41)
        }
    );
    assert_eq!(engine.read_from(95, 100).unwrap().len(), 6);

    // A follower: records at the leader's LSNs and terms, applied on commit.
    let f = sim();
    let follower = open(&f, &c).unwrap();
    follower.set_commit_lsn(0).unwrap();
    let all = engine.read_from(1, 1000).unwrap();
    assert_eq!(follower.append_records(all[..60].to_vec()).unwrap(), 60);
    let wrong = Record {
        lsn: 99,
        term: 3,
        op: Op::Delete { key: key(1) },
    };
    assert!(matches!(
        follower.append_records(vec![wrong]),
        Err(EngineError::InvalidLogOp(_))
    ));
    follower.wait_durable(60).unwrap();
    assert_eq!(follower.len(), 0, "durable but not committed: not applied");
    follower.set_commit_lsn(50).unwrap();
    assert_eq!(follower.stats().applied_lsn, 50);
    assert!(
        matches!(
            follower.truncate_after(45),
            Err(EngineError::InvalidLogOp(_))
        ),
        "never below the commit point"
    );
    follower.truncate_after(55).unwrap();
    assert_eq!(follower.stats().last_lsn, 55);
    // A conflicting record from a newer term replaces the truncated ones.
    let newer = Record {
        lsn: 56,
        term: 4,
        op: Op::Put {
            key: b"t4".to_vec(),
            value: b"x".to_vec(),
        },
    };
    follower.append_records(vec![newer]).unwrap();
    follower.wait_durable(56).unwrap();
    follower.set_commit_lsn(56).unwrap();
    drop(follower);
    f.crash();
    let follower = open(&f, &c).unwrap();
    assert_eq!(follower.stats().last_lsn, 56);
    assert_eq!(follower.get(b"t4"), Some(b"x".to_vec()));
    assert_eq!(follower.get(&key(56)), None);
    assert_eq!(follower.read_from(56, 1).unwrap()[0].term, 4);
}

fn prealloc_config() -> kv_node::engine::EngineConfig {
    let mut c = config();
    c.segment_preallocate_bytes = 4096;
    c
}

#[test]
fn preallocated_zeros_are_not_damage_and_get_reused() {
    let s = sim();
    let c = prealloc_config();
    let engine = open(&s, &c).unwrap();
    put_range(&engine, 1..=10);
    drop(engine);
    s.crash();
    let seg = segment(1);
    let len_before = s.file_bytes(&seg).unwrap().len();
    assert!(len_before > record_start(11), "the segment is preallocated");
    let engine = open(&s, &c).unwrap();
    assert_eq!(
        engine.recovery().tail_bytes_cut,
        0,
        "zeros are free space, not a torn tail"
    );
    assert_eq!(engine.stats().last_lsn, 10);
    engine.put(key(11), value(11)).unwrap();
    drop(engine);
    s.crash();
    assert_eq!(
        s.file_bytes(&seg).unwrap().len(),
        len_before,
        "the new record went into the zeros"
    );
    let engine = open(&s, &c).unwrap();
    assert_eq!(engine.get(&key(11)), Some(value(11)));
}

#[test]
fn a_torn_record_over_preallocated_zeros_is_cut() {
    let s = sim();
    let c = prealloc_config();
    let engine = open(&s, &c).unwrap();
    put_range(&engine, 1..=10);
    drop(engine);
    let seg = segment(1);
    let mut bytes = s.file_bytes(&seg).unwrap();
    // Half of record 10 reached the disk, the rest is still zeros.
    for b in &mut bytes[record_start(10) + 20..record_start(11)] {
        *b = 0;
    }
    s.set_file_bytes(&seg, bytes.clone()).unwrap();
    let engine = open(&s, &c).unwrap();
    assert_eq!(engine.stats().last_lsn, 9);
    // The first 20 bytes of a record were garbage (up to their last
    // nonzero byte); the preallocated zeros behind them are not counted.
    let start = record_start(10);
    let garbage = bytes[start..start + 20]
        .iter()
        .rposition(|b| *b != 0)
        .unwrap()
        + 1;
    assert_eq!(engine.recovery().tail_bytes_cut, garbage as u64);
    assert_eq!(s.file_bytes(&seg).unwrap().len(), record_start(10));
    drop(engine);

    // But a valid record beyond a zeroed hole is mid-log damage.
    let s = sim();
    let engine = open(&s, &c).unwrap();
    put_range(&engine, 1..=10);
    drop(engine);
    let mut bytes = s.file_bytes(&seg).unwrap();
    for b in &mut bytes[record_start(9)..record_start(10)] {
        *b = 0;
    }
    s.set_file_bytes(&seg, bytes).unwrap();
    expect_corrupt(&s, &seg, 9);
}

#[test]
fn sealed_segments_end_exactly_at_their_last_record() {
    let s = sim();
    let mut c = prealloc_config();
    c.segment_bytes_max = SMALL_SEGMENT_BYTES;
    let engine = open(&s, &c).unwrap();
    put_range(&engine, 1..=200);
    drop(engine);
    let segs = segment_names(&s);
    assert!(segs.len() >= 3);
    for name in &segs[..segs.len() - 1] {
        let bytes = s.file_bytes(&Path::new(DIR).join(name)).unwrap();
        assert_ne!(bytes.last(), Some(&0), "{name} ends in zeros");
        assert!(bytes.len() <= 4096 + 200, "{name} is {} bytes", bytes.len());
    }
    s.crash();
    assert_eq!(open(&s, &c).unwrap().stats().last_lsn, 200);
}

/// Many writers in sync and batch mode at once, with flushes and batch
/// changes racing them: every call returns (no lost wakeup), every write is
/// there, and after a power loss every write acknowledged durable is too.
#[test]
fn racing_writers_flushes_and_batch_changes_never_hang() {
    use std::sync::Arc;
    use std::sync::mpsc;
    use std::time::Duration;

    let s = sim();
    let engine = Arc::new(open(&s, &config()).unwrap());
    let (done_tx, done_rx) = mpsc::channel();
    let threads: Vec<_> = (0..16u8)
        .map(|t| {
            let e = engine.clone();
            let done = done_tx.clone();
            std::thread::spawn(move || {
                for i in 0..150u8 {
                    match (t, i % 25) {
                        (0, 0) => e.set_batch(1 + u32::from(i % 4)).unwrap(),
                        (1, 0) => e.flush().unwrap(),
                        _ => {
                            e.put(vec![t, i], vec![i; 20]).unwrap();
                        }
                    }
                }
                done.send(t).unwrap();
            })
        })
        .collect();
    for _ in 0..16 {
        done_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("a writer hung: lost wakeup in group commit");
    }
    for t in threads {
        t.join().unwrap();
    }
    let writes = 16 * 150 - 2 * 6;
    assert_eq!(engine.len(), writes);
    engine.flush().unwrap();
    drop(engine);
    s.crash();
    assert_eq!(open(&s, &config()).unwrap().len(), writes);
}

/// Review finding: the read bound is the format's, not the configured key and
/// value limits, so restarting with smaller limits keeps every record.
#[test]
fn restarting_with_smaller_limits_keeps_every_record() {
    let s = sim();
    let engine = open(&s, &config()).unwrap();
    engine.put(b"big".to_vec(), vec![b'v'; 3000]).unwrap();
    engine.put(b"small".to_vec(), b"x".to_vec()).unwrap();
    drop(engine);
    let mut small = config();
    small.value_bytes_max = 1000;
    let engine = open(&s, &small).unwrap();
    assert_eq!(engine.recovery().tail_bytes_cut, 0);
    assert_eq!(engine.get(b"big"), Some(vec![b'v'; 3000]));
    assert!(matches!(
        engine.put(b"big2".to_vec(), vec![b'v'; 3000]),
        Err(EngineError::ValueTooLarge { .. })
    ));
}

#[test]
fn limits_that_do_not_fit_the_record_format_are_refused() {
    let mut c = config();
    c.value_bytes_max = 1 << 40;
    assert!(matches!(open(&sim(), &c), Err(EngineError::Config(_))));
}

/// Review finding: a record that verifies but carries the wrong LSN was
/// written by us; at the tail it is corruption, not a torn write.
#[test]
fn a_verified_record_with_the_wrong_lsn_at_the_tail_is_refused() {
    let s = sim();
    fill(&s, 10);
    let seg = segment(1);
    let mut bytes = s.file_bytes(&seg).unwrap();
    let at = record_start(10);
    bytes[at + 16..at + 24].copy_from_slice(&12u64.to_le_bytes());
    let end = record_start(11);
    let crc = crc32fast::hash(&bytes[at + 4..end]);
    bytes[at..at + 4].copy_from_slice(&crc.to_le_bytes());
    s.set_file_bytes(&seg, bytes).unwrap();
    expect_corrupt(&s, &seg, 10);
}

#[test]
fn a_refused_open_changes_nothing_even_with_a_torn_tail() {
    // A torn tail in the last segment, but a missing first segment: the open
    // is refused, and the torn tail is not cut either.
    let s = sim();
    let c = small_segments();
    let engine = open(&s, &c).unwrap();
    put_range(&engine, 1..=100);
    drop(engine);
    let names: Vec<String> = s.list_dir(Path::new(DIR)).unwrap();
    let last = Path::new(DIR).join(names.iter().rfind(|n| n.starts_with("wal-")).unwrap());
    let mut bytes = s.file_bytes(&last).unwrap();
    bytes.extend_from_slice(b"torn garbage");
    s.set_file_bytes(&last, bytes.clone()).unwrap();
    s.remove_file(&segment(1)).unwrap();
    s.sync_dir(Path::new(DIR)).unwrap();
    assert!(open(&s, &c).is_err());
    assert_eq!(s.file_bytes(&last).unwrap(), bytes);
}

#[test]
fn waiting_for_an_lsn_past_the_log_is_an_error_not_a_hang() {
    let s = sim();
    let engine = open(&s, &config()).unwrap();
    engine.put(b"a".to_vec(), b"1".to_vec()).unwrap();
    let syncs = s.syncs();
    assert!(matches!(
        engine.wait_durable(5),
        Err(EngineError::InvalidLogOp(_))
    ));
    assert_eq!(s.syncs(), syncs, "no sync was spent on it");
}

#[test]
fn truncation_across_segments_and_at_every_crash_point() {
    let c = small_segments();
    let build = |s: &SimStorage| {
        let e = open(s, &c).unwrap();
        e.set_commit_lsn(0).unwrap();
        e.append_records(leader_records(1..=200, 1)).unwrap();
        e.wait_durable(200).unwrap();
        e
    };
    let s = sim();
    let e = build(&s);
    let ops_before = s.ops();
    e.truncate_after(30).unwrap();
    let total = s.ops() - ops_before;
    assert_eq!(e.stats().last_lsn, 30);
    assert_eq!(e.read_from(30, 10).unwrap().len(), 1);
    drop(e);
    s.crash();
    assert_eq!(open(&s, &c).unwrap().stats().last_lsn, 30);

    for (stop_after, seed) in crash_points(total) {
        let s = crashing_sim(seed);
        let e = build(&s);
        s.fail_after_ops(stop_after);
        let _ = e.truncate_after(30);
        // What the engine still calls durable after a failure midway...
        let claimed = e.stats().durable_lsn;
        drop(e);
        s.crash();
        let e = open(&s, &c).unwrap_or_else(|err| panic!("crash after op {stop_after}: {err}"));
        let last = e.stats().last_lsn;
        assert!((30..=200).contains(&last), "op {stop_after}: {last}");
        // ...the disk still holds.
        assert!(
            last >= claimed,
            "op {stop_after}: durable through {claimed} claimed, {last} recovered"
        );
        // Whatever survived is a prefix of what was appended.
        for r in e.read_from(1, 300).unwrap() {
            assert_eq!(
                r.op,
                Op::Put {
                    key: key(r.lsn),
                    value: value(r.lsn)
                }
            );
        }
    }
}

#[test]
fn a_follower_applies_only_what_is_committed_and_durable() {
    let s = sim();
    let e = open(&s, &config()).unwrap();
    e.set_commit_lsn(0).unwrap();
    e.append_records(leader_records(1..=10, 1)).unwrap();
    e.set_commit_lsn(10).unwrap();
    assert_eq!(e.stats().applied_lsn, 0, "committed but not durable here");
    e.wait_durable(10).unwrap();
    assert_eq!(e.stats().applied_lsn, 10);
}

#[test]
fn append_records_is_all_or_nothing() {
    let s = sim();
    let e = open(&s, &config()).unwrap();
    let rec = |lsn| Record {
        lsn,
        term: 1,
        op: Op::Delete { key: key(lsn) },
    };
    assert!(e.append_records(vec![rec(1), rec(2), rec(7)]).is_err());
    assert_eq!(e.stats().last_lsn, 0, "nothing of a bad batch is appended");
    assert_eq!(e.append_records(vec![rec(1), rec(2)]).unwrap(), 2);
}

#[test]
fn a_failed_batch_mode_write_is_never_visible() {
    let s = sim();
    let mut c = config();
    c.batch = 8;
    let e = open(&s, &c).unwrap();
    e.put(b"a".to_vec(), b"1".to_vec()).unwrap();
    s.fail_next_write();
    assert!(e.put(b"b".to_vec(), b"2".to_vec()).is_err());
    assert_eq!(e.get(b"b"), None);
    assert_eq!(e.get(b"a"), Some(b"1".to_vec()));
}

#[test]
fn a_failed_sync_while_snapshotting_poisons_the_engine() {
    let s = sim();
    let e = open(&s, &config()).unwrap();
    e.put(b"a".to_vec(), b"1".to_vec()).unwrap();
    s.fail_next_sync();
    let err = e.snapshot().unwrap_err();
    assert!(err.is_fatal(), "{err}");
    assert!(matches!(
        e.put(b"b".to_vec(), b"2".to_vec()),
        Err(EngineError::Poisoned { .. })
    ));
}

/// A replicated node recovers only what it knew was committed: records
/// above the saved commit LSN wait for the leader instead of being applied.
#[test]
fn a_replicated_node_recovers_only_committed_records() {
    let s = sim();
    let mut c = config();
    c.replicated = true;
    let e = open(&s, &c).unwrap();
    e.append_records(leader_records(1..=10, 1)).unwrap();
    e.wait_durable(10).unwrap();
    e.set_commit_lsn(6).unwrap();
    assert_eq!(e.stats().applied_lsn, 6);
    assert_eq!(e.term_at(6), Some(1));
    drop(e);
    // A power loss may lose the unsynced commit file: a lower floor, never
    // a record applied that was not committed.
    let lost = s.clone();
    lost.crash();
    let after_power_loss = open(&lost, &c).unwrap().stats();
    assert_eq!(after_power_loss.last_lsn, 10);
    assert!(after_power_loss.applied_lsn <= 6);
    drop(lost);

    // A process restart (page cache kept) recovers the saved commit LSN.
    let s = sim();
    let e = open(&s, &c).unwrap();
    e.append_records(leader_records(1..=10, 1)).unwrap();
    e.wait_durable(10).unwrap();
    e.set_commit_lsn(6).unwrap();
    drop(e);
    let e = open(&s, &c).unwrap();
    let st = e.stats();
    assert_eq!((st.last_lsn, st.applied_lsn), (10, 6));
    assert_eq!(e.get(&key(7)), None, "uncommitted: not applied");
    assert_eq!(e.commit_lsn(), 6);
    // The leader's term-2 records replace the uncommitted tail.
    e.truncate_after(8).unwrap();
    e.append_records(vec![Record {
        lsn: 9,
        term: 2,
        op: Op::Delete { key: key(1) },
    }])
    .unwrap();
    e.wait_durable(9).unwrap();
    e.set_commit_lsn(9).unwrap();
    assert_eq!(e.get(&key(8)), Some(value(8)));
    assert_eq!(e.get(&key(1)), None);
    assert_eq!(
        (e.term_at(8), e.term_at(9), e.term_at(10)),
        (Some(1), Some(2), None)
    );
}

/// A follower installs a leader's snapshot: its state and log restart at the
/// snapshot, and a power loss at any step recovers the old or the new state.
#[test]
fn installing_a_snapshot_replaces_state_and_log_at_every_crash_point() {
    let mut c = small_segments();
    c.replicated = true;
    // The leader's snapshot at LSN 300.
    let leader = sim();
    let l = open(&leader, &config()).unwrap();
    put_range(&l, 1..=300);
    l.snapshot().unwrap();
    let newest = l.newest_snapshot().unwrap().unwrap();
    let (lsn, bytes) = (newest.lsn(), newest.read_all().unwrap());
    assert_eq!(lsn, 300);
    let leader_digest = l.digest().0;

    let build = |s: &SimStorage| {
        let f = open(s, &c).unwrap();
        // A short log of its own, partly uncommitted.
        f.append_records(leader_records(1..=20, 1)).unwrap();
        f.wait_durable(20).unwrap();
        f.set_commit_lsn(15).unwrap();
        f
    };
    let s = sim();
    let f = build(&s);
    let old_digest = f.digest().0;
    let before = s.ops();
    assert_eq!(f.install_snapshot(&bytes).unwrap(), 300);
    let total = s.ops() - before;
    assert_eq!(
        (f.digest().0, f.stats().last_lsn, f.commit_lsn()),
        (leader_digest, 300, 300)
    );
    assert_eq!(f.term_at(300), Some(0));
    // The log goes on right after the snapshot.
    f.append_records(vec![Record {
        lsn: 301,
        term: 1,
        op: Op::Delete { key: key(1) },
    }])
    .unwrap();
    f.wait_durable(301).unwrap();
    drop(f);
    s.crash();
    let f = open(&s, &c).unwrap();
    assert_eq!(f.stats().last_lsn, 301);

    // A bad snapshot changes nothing.
    let s = sim();
    let f = build(&s);
    let mut bad = bytes.clone();
    bad[100] ^= 1;
    assert!(f.install_snapshot(&bad).is_err());
    assert_eq!(f.stats().last_lsn, 20);

    for (stop_after, seed) in crash_points(total) {
        let s = crashing_sim(seed);
        let f = build(&s);
        s.fail_after_ops(stop_after);
        let installed = f.install_snapshot(&bytes);
        // Stopped part way, the engine refuses more work but can still be
        // inspected (the simulation found a WAL left with no segment here,
        // which panicked the next reader). Stopped while the snapshot was
        // still being received into its temp file, before the old log was
        // touched, it is not poisoned: nothing it keeps changed.
        let st = f.stats();
        let untouched = st.last_lsn == 20 && f.digest().0 == old_digest;
        assert!(
            installed.is_ok() || st.poisoned.is_some() || untouched,
            "crash after op {stop_after}: failed install did not poison: {installed:?}"
        );
        assert!(f.wal_first_lsn() <= st.last_lsn + 1);
        drop(f);
        s.crash();
        let f = open(&s, &c).unwrap_or_else(|e| panic!("crash after op {stop_after}: {e}"));
        let st = f.stats();
        let old = (f.digest().0 == old_digest || st.applied_lsn < 20) && st.last_lsn == 20;
        let new = f.digest().0 == leader_digest && st.last_lsn == 300;
        assert!(
            old || new,
            "crash after op {stop_after}: last {} applied {}",
            st.last_lsn,
            st.applied_lsn
        );
    }
}

/// A snapshot whose last record the follower's durable log already holds
/// changes nothing: those records may already count towards a commit, so
/// dropping them would un-replicate committed writes (found by the
/// simulation, seed 112). The answer says the log matches through it.
#[test]
fn a_snapshot_behind_a_matching_log_is_not_installed() {
    let mut c = small_segments();
    c.replicated = true;
    let leader = sim();
    let l = open(&leader, &c).unwrap();
    l.append_records(leader_records(1..=40, 1)).unwrap();
    l.wait_durable(40).unwrap();
    l.set_commit_lsn(30).unwrap();
    l.snapshot().unwrap();
    let newest = l.newest_snapshot().unwrap().unwrap();
    let (lsn, bytes) = (newest.lsn(), newest.read_all().unwrap());
    assert_eq!(lsn, 30);

    let s = sim();
    let f = open(&s, &c).unwrap();
    f.append_records(leader_records(1..=40, 1)).unwrap();
    f.wait_durable(40).unwrap();
    f.set_commit_lsn(10).unwrap();
    let digest = f.digest();
    assert_eq!(f.install_snapshot(&bytes).unwrap(), 30);
    assert_eq!((f.stats().last_lsn, f.stats().durable_lsn), (40, 40));
    assert_eq!((f.digest(), f.commit_lsn()), (digest, 10));
    assert_eq!(f.term_at(40), Some(1));

    // A log whose record at the snapshot's LSN has another term gets it.
    let s = sim();
    let f = open(&s, &c).unwrap();
    f.append_records(leader_records(1..=35, 2)).unwrap();
    f.wait_durable(35).unwrap();
    assert_eq!(f.install_snapshot(&bytes).unwrap(), 30);
    assert_eq!(f.stats().last_lsn, 30);
    assert_eq!(f.term_at(30), Some(1));
}

/// After a restart, a log that still holds records the snapshot covers
/// knows their terms (a leader needs them to ship those records).
#[test]
fn records_below_the_snapshot_keep_their_terms_across_a_restart() {
    let mut c = small_segments();
    c.replicated = true;
    let s = sim();
    let e = open(&s, &c).unwrap();
    e.append_records(leader_records(1..=10, 1)).unwrap();
    e.append_records(leader_records(11..=20, 2)).unwrap();
    e.wait_durable(20).unwrap();
    e.set_commit_lsn(20).unwrap();
    e.snapshot().unwrap();
    drop(e);
    let e = open(&s, &c).unwrap();
    assert_eq!(e.stats().snapshot_lsn, 20);
    assert!(e.wal_first_lsn() <= 5, "the WAL still holds old records");
    assert_eq!(
        (e.term_at(5), e.term_at(15), e.term_at(20)),
        (Some(1), Some(2), Some(2))
    );
}

/// Every crash point of an operation `total` storage operations long, each
/// with several seeds (which unsynced directory changes survive).
fn crash_points(total: u64) -> impl Iterator<Item = (u64, u64)> {
    (0..=total).flat_map(|stop_after| (0..4).map(move |seed| (stop_after, seed)))
}

/// A disk whose crash keeps each unsynced directory change or not on its
/// own (and no torn tails, so the verdicts stay exact).
fn crashing_sim(seed: u64) -> SimStorage {
    SimStorage::new(kv_node::storage::SimOptions {
        seed,
        torn_tails: false,
        independent_names: true,
    })
}

/// Case table row: a gap between segments that all lie below the snapshot
/// is what an interrupted deletion leaves (each unsynced removal survives a
/// crash on its own): the segments before it are skipped and removed. A gap
/// in the part of the log the snapshot does not cover is still corruption.
#[test]
fn a_gap_below_the_snapshot_is_a_leftover_and_one_above_it_is_corruption() {
    let c = small_segments();
    let s = sim();
    let e = open(&s, &c).unwrap();
    put_range(&e, 1..=200);
    e.snapshot().unwrap();
    put_range(&e, 201..=260);
    let expected = contents(&e);
    drop(e);
    let names = segment_names(&s);
    assert!(names.len() >= 4, "several segments: {names:?}");
    // The second segment's removal survived, the first one's did not.
    s.remove_file(&Path::new(DIR).join(&names[1])).unwrap();
    let e = open(&s, &c).unwrap();
    assert_eq!(contents(&e), expected);
    assert!(
        !segment_names(&s).contains(&names[0]),
        "the leftover before the gap is removed"
    );
    drop(e);
    // A hole after the snapshot: records are missing, the open is refused.
    let names = segment_names(&s);
    let last_but_one = &names[names.len() - 2];
    s.remove_file(&Path::new(DIR).join(last_but_one)).unwrap();
    assert!(matches!(open(&s, &c), Err(EngineError::Corrupt { .. })));
}

/// The salt of a segment file's header.
fn segment_salt(s: &SimStorage, path: &Path) -> u32 {
    kv_node::engine::record::SegmentHeader::decode(&s.file_bytes(path).unwrap())
        .unwrap()
        .salt
}

/// A truncation removes segments; the records that replace the cut ones have
/// the same sizes, so the log rolls at the same LSN and re-creates a removed
/// segment's name. Its salt must differ from the removed one's: otherwise
/// old bytes of the removed file showing through (a crash mid-removal, old
/// blocks behind a reused name) verify as records of the new segment and a
/// truncated term-1 suffix comes back.
#[test]
fn a_segment_created_after_a_truncation_never_reuses_a_removed_salt() {
    let c = small_segments();
    let s = sim();
    let e = open(&s, &c).unwrap();
    e.set_commit_lsn(0).unwrap();
    e.append_records(leader_records(1..=200, 1)).unwrap();
    e.wait_durable(200).unwrap();
    let names = segment_names(&s);
    assert!(names.len() >= 3, "small segments roll: {names:?}");
    let second = Path::new(DIR).join(&names[1]);
    let second_first: u64 = names[1][4..24].parse().unwrap();
    let old_second = s.file_bytes(&second).unwrap();
    let salts_before: Vec<u32> = names
        .iter()
        .map(|n| segment_salt(&s, &Path::new(DIR).join(n)))
        .collect();

    // Cut inside the first segment: every later segment is removed.
    e.truncate_after(10).unwrap();
    assert_eq!(segment_names(&s).len(), 1);
    // The new leader's records up to the roll, same sizes, term 2.
    e.append_records(leader_records(11..=second_first, 2))
        .unwrap();
    e.wait_durable(second_first).unwrap();
    assert_eq!(
        segment_names(&s),
        names[..2].to_vec(),
        "the roll re-creates the removed name"
    );
    let new_salt = segment_salt(&s, &second);
    assert!(
        !salts_before.contains(&new_salt),
        "salt {new_salt} of the re-created segment was used before: {salts_before:?}"
    );
    drop(e);

    // The re-created file holds its header and record `second_first`; the
    // removed file's term-1 records show through after them.
    let mut bytes = s.file_bytes(&second).unwrap();
    let new_len = bytes.len();
    bytes.extend_from_slice(&old_second[new_len..]);
    s.set_file_bytes(&second, bytes).unwrap();
    s.crash();
    let e = open(&s, &c).unwrap();
    assert_eq!(
        e.stats().last_lsn,
        second_first,
        "stale records of the removed segment were accepted as live"
    );
    assert_eq!(e.term_at(second_first), Some(2));
    assert_eq!(e.term_at(second_first + 1), None);
}

/// Flips one bit of the stored first LSN in a segment's header: the header
/// CRC no longer matches.
fn damage_header(s: &SimStorage, path: &Path) -> Vec<u8> {
    let mut bytes = s.file_bytes(path).unwrap();
    bytes[17] ^= 0x01;
    s.set_file_bytes(path, bytes.clone()).unwrap();
    bytes
}

/// A last segment whose header does not verify but whose records do was
/// durable once and got damaged: removing it as half-created would lose
/// acknowledged writes. Open refuses, naming the file and offset 0, and
/// changes nothing.
#[test]
fn row_damaged_header_on_a_last_segment_with_records_is_refused() {
    // The only segment, and the last of several.
    let single = {
        let s = sim();
        fill(&s, 10);
        (s, config(), segment(1))
    };
    let several = {
        let (s, c) = filled_small_segments(200);
        let names = segment_names(&s);
        assert!(names.len() >= 3, "small segments roll: {names:?}");
        let last = Path::new(DIR).join(names.last().unwrap());
        (s, c, last)
    };
    for (s, c, last) in [single, several] {
        let damaged = damage_header(&s, &last);
        let first: u64 = last.file_name().unwrap().to_str().unwrap()[4..24]
            .parse()
            .unwrap();
        match open(&s, &c) {
            Err(EngineError::Corrupt {
                file,
                offset,
                lsn,
                reason,
            }) => {
                assert_eq!(file, last);
                assert_eq!((offset, lsn), (0, Some(first)));
                assert!(
                    reason.contains(&format!(
                        "valid record starts at offset {SEGMENT_HEADER_BYTES}"
                    )),
                    "{reason}"
                );
            }
            other => panic!(
                "expected a refusal naming {}, got {other:?}",
                last.display()
            ),
        }
        assert_eq!(s.file_bytes(&last).unwrap(), damaged, "nothing changed");
    }
}

/// A torn create: the whole header was written but not durable (here: one
/// bit off) and no record follows. That segment never held a record, so it
/// is removed as half-created and the log continues before it.
#[test]
fn row_damaged_header_on_an_empty_last_segment_is_removed() {
    let s = sim();
    fill(&s, 5);
    let half = segment(6);
    let header = kv_node::engine::record::SegmentHeader {
        first_lsn: 6,
        prev_last_lsn: 5,
        salt: 2,
    };
    let f = s.create(&half).unwrap();
    f.write_at(&header.encode(), 0).unwrap();
    f.sync_data().unwrap();
    s.sync_dir(Path::new(DIR)).unwrap();
    damage_header(&s, &half);
    let engine = open(&s, &config()).unwrap();
    assert_eq!(
        engine.recovery().removed_segment.as_deref(),
        Some(half.as_path())
    );
    assert_eq!(segment_names(&s), vec![format!("wal-{:020}.wal", 1)]);
    assert_eq!(engine.put(key(6), value(6)).unwrap(), 6);
    drop(engine);
    s.crash();
    assert_holds_exactly(&s, 6);
}

/// `kv check` runs the same recovery: on real files it reports the refusal,
/// naming the segment and the offset.
#[test]
fn kv_check_reports_a_damaged_header_on_a_last_segment_with_records() {
    use kv_node::storage::FsStorage;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut c = config();
    c.data_dir = dir.clone();
    let e = kv_node::engine::Engine::open(std::sync::Arc::new(FsStorage), c.clone()).unwrap();
    for i in 1..=10 {
        e.put(key(i), value(i)).unwrap();
    }
    drop(e);
    let seg = dir.join(format!("wal-{:020}.wal", 1));
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[17] ^= 0x01;
    std::fs::write(&seg, &bytes).unwrap();
    let report = kv_node::check::check(&c).unwrap();
    assert!(!report.would_open, "{}", report.text);
    assert!(
        report.text.contains(&format!(
            "verdict: REFUSES to open: {}",
            EngineError::Corrupt {
                file: seg.clone(),
                offset: 0,
                lsn: Some(1),
                reason: format!(
                    "segment header: CRC mismatch in the last segment, but a valid record starts at offset {SEGMENT_HEADER_BYTES}: the header was damaged after records were written (not a half-created segment)"
                ),
            }
        )),
        "{}",
        report.text
    );
    assert_eq!(std::fs::read(&seg).unwrap(), bytes, "check changes nothing");
}

/// A disk that can hold file operations: `hold` makes every write to
/// `COMMIT` block until it is cleared; `pause` makes every one take that
/// long (so racing writers queue on the file); `hold_next_wal_read` makes
/// the next read of a WAL segment block until `read_held` is cleared.
#[derive(Clone)]
struct CommitGate {
    sim: SimStorage,
    gate: std::sync::Arc<(std::sync::Mutex<GateState>, std::sync::Condvar)>,
}

#[derive(Default)]
struct GateState {
    hold: bool,
    blocked: bool,
    pause: Option<std::time::Duration>,
    hold_next_wal_read: bool,
    read_held: bool,
    /// Bytes read from WAL segments so far.
    wal_bytes_read: u64,
}

impl CommitGate {
    fn new(sim: SimStorage) -> Self {
        CommitGate {
            sim,
            gate: Default::default(),
        }
    }

    fn set(&self, f: impl FnOnce(&mut GateState)) {
        f(&mut self.gate.0.lock().unwrap());
        self.gate.1.notify_all();
    }

    /// Waits until a held write has reached the file.
    fn wait_blocked(&self) {
        let (m, cv) = &*self.gate;
        let (st, timeout) = cv
            .wait_timeout_while(m.lock().unwrap(), std::time::Duration::from_secs(10), |g| {
                !g.blocked
            })
            .unwrap();
        assert!(
            !timeout.timed_out() && st.blocked,
            "no COMMIT write arrived"
        );
    }

    /// The LSN in `COMMIT` (its CRC checked).
    fn commit_value(&self) -> u64 {
        let b = self.sim.file_bytes(&Path::new(DIR).join("COMMIT")).unwrap();
        assert_eq!(
            crc32fast::hash(&b[..8]).to_le_bytes(),
            b[8..12],
            "COMMIT verifies"
        );
        u64::from_le_bytes(b[..8].try_into().unwrap())
    }
}

struct GatedFile {
    inner: Box<dyn kv_node::storage::StorageFile>,
    gate: Option<CommitGate>,
    wal_gate: Option<CommitGate>,
}

impl kv_node::storage::StorageFile for GatedFile {
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if let Some(g) = &self.wal_gate {
            let (m, cv) = &*g.gate;
            let mut st = m.lock().unwrap();
            st.wal_bytes_read += buf.len() as u64;
            if std::mem::take(&mut st.hold_next_wal_read) {
                st.read_held = true;
                st.blocked = true;
                cv.notify_all();
                st = cv.wait_while(st, |g| g.read_held).unwrap();
                st.blocked = false;
            }
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if let Some(g) = &self.gate {
            let (m, cv) = &*g.gate;
            let mut st = m.lock().unwrap();
            if st.hold {
                st.blocked = true;
                cv.notify_all();
                st = cv.wait_while(st, |g| g.hold).unwrap();
                st.blocked = false;
            }
            let pause = st.pause;
            drop(st);
            if let Some(p) = pause {
                std::thread::sleep(p);
            }
        }
        self.inner.write_at(buf, offset)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.inner.sync_data()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
}

impl CommitGate {
    fn wrap(
        &self,
        path: &Path,
        f: Box<dyn kv_node::storage::StorageFile>,
    ) -> Box<dyn kv_node::storage::StorageFile> {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let gate = (name == "COMMIT").then(|| self.clone());
        let wal_gate = name.starts_with("wal-").then(|| self.clone());
        Box::new(GatedFile {
            inner: f,
            gate,
            wal_gate,
        })
    }
}

impl Storage for CommitGate {
    fn create_dir_all(&self, dir: &Path) -> std::io::Result<()> {
        self.sim.create_dir_all(dir)
    }
    fn list_dir(&self, dir: &Path) -> std::io::Result<Vec<String>> {
        self.sim.list_dir(dir)
    }
    fn create(&self, path: &Path) -> std::io::Result<Box<dyn kv_node::storage::StorageFile>> {
        Ok(self.wrap(path, self.sim.create(path)?))
    }
    fn open(&self, path: &Path) -> std::io::Result<Box<dyn kv_node::storage::StorageFile>> {
        Ok(self.wrap(path, self.sim.open(path)?))
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.sim.rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> std::io::Result<()> {
        self.sim.remove_file(path)
    }
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        self.sim.sync_dir(dir)
    }
    fn lock_dir(&self, dir: &Path) -> std::io::Result<Box<dyn std::any::Any + Send + Sync>> {
        self.sim.lock_dir(dir)
    }
}

fn replicated_on(gate: &CommitGate) -> kv_node::engine::Engine {
    let mut c = config();
    c.replicated = true;
    kv_node::engine::Engine::open(std::sync::Arc::new(gate.clone()), c).unwrap()
}

/// A `COMMIT` write in progress (held here) must not hold the engine's
/// state lock: every writer, the flusher and `stats` need it.
#[test]
fn the_commit_file_is_written_outside_the_state_lock() {
    let gate = CommitGate::new(sim());
    let e = std::sync::Arc::new(replicated_on(&gate));
    e.append_records(leader_records(1..=10, 1)).unwrap();
    e.wait_durable(10).unwrap();
    e.set_commit_lsn(2).unwrap();
    gate.set(|g| g.hold = true);
    let committer = {
        let e = e.clone();
        std::thread::spawn(move || e.set_commit_lsn(5))
    };
    gate.wait_blocked();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = {
        let e = e.clone();
        std::thread::spawn(move || {
            let _ = tx.send(e.stats().applied_lsn);
        })
    };
    let seen = rx.recv_timeout(std::time::Duration::from_secs(5));
    gate.set(|g| g.hold = false);
    committer.join().unwrap().unwrap();
    reader.join().unwrap();
    assert_eq!(
        seen.expect("stats() waited for the COMMIT write: it runs under the state lock"),
        5,
        "applied before the file is written"
    );
    assert_eq!(gate.commit_value(), 5);
}

/// Many committers race (each `COMMIT` write is slow, so they queue on the
/// file): the file never goes backwards, never exceeds the applied LSN, and
/// ends at the last applied LSN.
#[test]
fn racing_commit_advances_never_leave_an_older_value_in_the_commit_file() {
    const N: u64 = 400;
    let gate = CommitGate::new(sim());
    gate.set(|g| g.pause = Some(std::time::Duration::from_micros(200)));
    let e = std::sync::Arc::new(replicated_on(&gate));
    e.append_records(leader_records(1..=N, 1)).unwrap();
    e.wait_durable(N).unwrap();
    e.set_commit_lsn(1).unwrap();
    assert_eq!(gate.commit_value(), 1);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(2));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let committers: Vec<_> = (0..8)
        .map(|_| {
            let (e, next) = (e.clone(), next.clone());
            std::thread::spawn(move || {
                loop {
                    let lsn = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if lsn > N {
                        break;
                    }
                    e.set_commit_lsn(lsn).unwrap();
                }
            })
        })
        .collect();
    let observer = {
        let (e, gate, done) = (e.clone(), gate.clone(), done.clone());
        std::thread::spawn(move || {
            let mut last = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let v = gate.commit_value();
                // Read after the file: the applied LSN only grows.
                let applied = e.stats().applied_lsn;
                assert!(v <= applied, "COMMIT {v} above the applied LSN {applied}");
                assert!(v >= last, "COMMIT went back from {last} to {v}");
                last = v;
                std::thread::yield_now();
            }
        })
    };
    for c in committers {
        c.join().unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    observer.join().unwrap();
    assert_eq!(e.stats().applied_lsn, N);
    assert_eq!(
        gate.commit_value(),
        N,
        "an older value overwrote the last one"
    );
}

/// Reading records for a follower does not hold the WAL lock while it
/// reads: a write (whose group commit needs that lock) completes while a
/// read is stuck in the middle of a segment.
#[test]
fn a_slow_read_for_shipping_does_not_stall_group_commit() {
    let gate = CommitGate::new(sim());
    let e = std::sync::Arc::new(
        kv_node::engine::Engine::open(std::sync::Arc::new(gate.clone()), small_segments()).unwrap(),
    );
    put_range(&e, 1..=100);
    gate.set(|g| g.hold_next_wal_read = true);
    let reader = {
        let e = e.clone();
        std::thread::spawn(move || e.read_from(1, 1000))
    };
    gate.wait_blocked();
    let (tx, rx) = std::sync::mpsc::channel();
    let writer = {
        let e = e.clone();
        std::thread::spawn(move || {
            let _ = tx.send(e.put(key(101), value(101)));
        })
    };
    let wrote = rx.recv_timeout(std::time::Duration::from_secs(5));
    gate.set(|g| g.read_held = false);
    writer.join().unwrap();
    let read = reader.join().unwrap().unwrap();
    assert_eq!(
        wrote
            .expect("the write waited for the read: the WAL lock is held while reading")
            .unwrap(),
        101
    );
    assert_eq!(
        read.len(),
        100,
        "the read sees what was durable when it began"
    );
    for (r, lsn) in read.iter().zip(1..) {
        assert_eq!(r.lsn, lsn);
    }
}

/// A truncation that runs while a read is in progress: the read never
/// returns a record the truncation removed (the removed segment stays
/// readable through the reader's handle, so without a check it would).
#[test]
fn a_read_racing_a_truncation_never_returns_cut_records() {
    let gate = CommitGate::new(sim());
    let e = std::sync::Arc::new(
        kv_node::engine::Engine::open(std::sync::Arc::new(gate.clone()), small_segments()).unwrap(),
    );
    e.set_commit_lsn(0).unwrap();
    e.append_records(leader_records(1..=200, 1)).unwrap();
    e.wait_durable(200).unwrap();
    let names = segment_names(&gate.sim);
    assert!(names.len() >= 3, "small segments roll: {names:?}");
    // Read from the middle of the third segment; cut inside the first.
    let third: u64 = names[2][4..24].parse().unwrap();
    gate.set(|g| g.hold_next_wal_read = true);
    let reader = {
        let e = e.clone();
        std::thread::spawn(move || e.read_from(third + 1, 1000))
    };
    gate.wait_blocked();
    let (tx, rx) = std::sync::mpsc::channel();
    let cutter = {
        let e = e.clone();
        std::thread::spawn(move || {
            e.truncate_after(10).unwrap();
            e.append_records(leader_records(11..=third + 5, 2)).unwrap();
            e.wait_durable(third + 5).unwrap();
            let _ = tx.send(());
        })
    };
    let cut = rx.recv_timeout(std::time::Duration::from_secs(5));
    gate.set(|g| g.read_held = false);
    cutter.join().unwrap();
    cut.expect("the truncation waited for the read: the WAL lock is held while reading");
    let read = reader.join().unwrap().unwrap();
    assert!(!read.is_empty());
    for r in &read {
        assert_eq!(
            Some(r.term),
            e.term_at(r.lsn),
            "LSN {} of term {} was cut and came back",
            r.lsn,
            r.term
        );
    }
    assert_eq!(read.last().unwrap().lsn, third + 5);
}

/// Reads from every position of large segments (several index strides)
/// return exactly the records there, before and after a restart (which
/// rebuilds the index from the files) and after a truncation.
#[test]
fn reads_for_shipping_start_at_every_lsn_of_large_segments() {
    let s = sim();
    let mut c = config();
    c.segment_bytes_max = 256 << 10;
    c.group_commit_records_max = 7;
    c.replicated = true;
    let n = 12_000u64;
    let e = open(&s, &c).unwrap();
    e.set_commit_lsn(0).unwrap();
    for chunk in (1..=n).collect::<Vec<_>>().chunks(500) {
        e.append_records(leader_records(chunk[0]..=*chunk.last().unwrap(), 1))
            .unwrap();
    }
    e.wait_durable(n).unwrap();
    assert!(segment_names(&s).len() >= 3, "{:?}", segment_names(&s));
    let check = |e: &kv_node::engine::Engine, last: u64| {
        for from in (1..=last).step_by(37).chain([last, last + 1]) {
            let got = e.read_from(from, 50).unwrap();
            let want = (from..=last.min(from + 49)).collect::<Vec<_>>();
            assert_eq!(
                got.iter().map(|r| r.lsn).collect::<Vec<_>>(),
                want,
                "from {from}"
            );
            for r in &got {
                assert_eq!(
                    r.op,
                    Op::Put {
                        key: key(r.lsn),
                        value: value(r.lsn)
                    }
                );
            }
        }
    };
    check(&e, n);
    drop(e);
    let e = open(&s, &c).unwrap();
    check(&e, n);
    e.truncate_after(n / 2 + 3).unwrap();
    check(&e, n / 2 + 3);
    assert!(e.read_from(n / 2 + 5, 1).is_err(), "past the end");
}

/// A read near the end of a large segment reads about one index stride and
/// one window of it, not the whole segment (as it did on every call).
#[test]
fn a_read_in_a_large_segment_reads_a_window_not_the_segment() {
    let gate = CommitGate::new(sim());
    let mut c = config();
    c.segment_bytes_max = 8 << 20;
    let e = kv_node::engine::Engine::open(std::sync::Arc::new(gate.clone()), c).unwrap();
    e.set_commit_lsn(0).unwrap();
    let n = 60_000u64;
    for chunk in (1..=n).collect::<Vec<_>>().chunks(1000) {
        e.append_records(leader_records(chunk[0]..=*chunk.last().unwrap(), 1))
            .unwrap();
    }
    e.wait_durable(n).unwrap();
    let names = segment_names(&gate.sim);
    assert_eq!(names.len(), 1, "one large segment: {names:?}");
    let segment_len = gate.sim.file_bytes(&segment(1)).unwrap().len() as u64;
    assert!(segment_len > 2 << 20, "{segment_len}");
    let before = gate.gate.0.lock().unwrap().wal_bytes_read;
    let got = e.read_from(n - 100, 20).unwrap();
    let read = gate.gate.0.lock().unwrap().wal_bytes_read - before;
    assert_eq!(got.len(), 20);
    assert_eq!(got[0].lsn, n - 100);
    assert!(
        read <= (64 << 10) + (256 << 10),
        "read {read} bytes of a {segment_len}-byte segment for 20 records"
    );
}

// ----- snapshot transfer through temp files: streamed send and receive -----

/// Chunk size for the streamed tests: small, so a snapshot of a few hundred
/// keys is dozens of chunks.
const CHUNK_BYTES: usize = 512;

/// Names of unfinished snapshot receives on the disk.
fn recv_files(s: &SimStorage) -> Vec<String> {
    s.list_dir(Path::new(DIR))
        .unwrap()
        .into_iter()
        .filter(|n| n.ends_with(".snap.recv"))
        .collect()
}

/// A leader's disk holding a snapshot of keys 1..=n at LSN n.
fn leader_with_snapshot(n: u64) -> (SimStorage, kv_node::engine::Engine) {
    let leader = sim();
    let l = open(&leader, &config()).unwrap();
    put_range(&l, 1..=n);
    l.snapshot().unwrap();
    (leader, l)
}

/// A replicated follower with a short log of its own (1..=20, 15 committed).
fn follower(s: &SimStorage) -> kv_node::engine::Engine {
    let mut c = small_segments();
    c.replicated = true;
    let f = open(s, &c).unwrap();
    f.append_records(leader_records(1..=20, 1)).unwrap();
    f.wait_durable(20).unwrap();
    f.set_commit_lsn(15).unwrap();
    f
}

/// Streams `file` into `f` chunk by chunk, with `damage` applied to each
/// chunk (offset, bytes) first; stops after `chunks_max` chunks.
fn stream_into(
    f: &kv_node::engine::Engine,
    file: &kv_node::engine::snapshot::SnapshotFile,
    chunks_max: usize,
    mut damage: impl FnMut(u64, &mut Vec<u8>),
) -> kv_node::engine::snapshot::Receive {
    let mut recv = f.begin_snapshot_receive(file.lsn(), file.len()).unwrap();
    let mut offset = 0;
    for _ in 0..chunks_max {
        if offset >= file.len() {
            break;
        }
        let mut data = file.read_chunk(offset, CHUNK_BYTES).unwrap();
        damage(offset, &mut data);
        recv.write(offset, &data).unwrap();
        offset += data.len() as u64;
    }
    recv
}

/// A snapshot of many chunks, read from the leader's file chunk by chunk
/// and written to the follower's temp file chunk by chunk, installs: state
/// and log restart at it, the temp file is gone, and a second transfer of
/// the same snapshot (nothing new) is ignored and also leaves no file.
#[test]
fn a_snapshot_streamed_in_many_chunks_installs_from_its_temp_file() {
    let (_leader, l) = leader_with_snapshot(300);
    let file = l.newest_snapshot().unwrap().unwrap();
    assert_eq!((file.lsn(), file.term()), (300, 0));
    let chunks = file.len().div_ceil(CHUNK_BYTES as u64);
    assert!(chunks > 10, "many chunks: {chunks}");
    let s = sim();
    let f = follower(&s);
    let recv = stream_into(&f, &file, usize::MAX, |_, _| {});
    assert!(recv.is_complete());
    assert_eq!(recv_files(&s).len(), 1, "chunks go to a temp file");
    assert_eq!(f.install_received_snapshot(recv).unwrap(), 300);
    assert_eq!(f.digest(), l.digest());
    assert_eq!((f.stats().last_lsn, f.stats().snapshot_lsn), (300, 300));
    assert_eq!(recv_files(&s), Vec::<String>::new());
    assert!(
        s.list_dir(Path::new(DIR))
            .unwrap()
            .contains(&"snap-00000000000000000300.snap".to_owned())
    );
    // Nothing new: ignored, and its temp file removed too.
    let again = stream_into(&f, &file, usize::MAX, |_, _| {});
    assert_eq!(f.install_received_snapshot(again).unwrap(), 300);
    assert_eq!(recv_files(&s), Vec::<String>::new());
    // It survives a restart.
    let digest = f.digest();
    drop(f);
    s.crash();
    let mut c = small_segments();
    c.replicated = true;
    let f = open(&s, &c).unwrap();
    assert_eq!(f.digest(), digest);
}

/// A stream cut short, a flipped bit, a chunk at the wrong offset or past
/// the announced size, and a stream dropped midway: each is refused, the
/// old state and log stay as they were, and no temp file is left.
#[test]
fn a_truncated_or_corrupted_stream_is_refused_and_leaves_no_temp_file() {
    let (_leader, l) = leader_with_snapshot(300);
    let file = l.newest_snapshot().unwrap().unwrap();
    let chunks = file.len().div_ceil(CHUNK_BYTES as u64) as usize;
    let s = sim();
    let f = follower(&s);
    let old = (f.digest(), f.stats());
    let unchanged = |f: &kv_node::engine::Engine, what: &str| {
        assert_eq!((f.digest(), f.stats()), old, "{what}: state changed");
        assert_eq!(
            recv_files(&s),
            Vec::<String>::new(),
            "{what}: temp file left"
        );
    };

    // Every chunk but the last.
    let recv = stream_into(&f, &file, chunks - 1, |_, _| {});
    assert!(!recv.is_complete());
    let err = f.install_received_snapshot(recv).unwrap_err();
    assert!(err.to_string().contains("stream ended after"), "{err}");
    unchanged(&f, "truncated");

    // One flipped bit in a middle chunk.
    let middle = (chunks / 2 * CHUNK_BYTES) as u64;
    let recv = stream_into(&f, &file, usize::MAX, |offset, data| {
        if offset == middle {
            data[7] ^= 0x10;
        }
    });
    let err = f.install_received_snapshot(recv).unwrap_err();
    assert!(err.to_string().contains("does not verify"), "{err}");
    unchanged(&f, "bit flip");

    // A chunk that skips ahead, and one past the announced size.
    let mut recv = f.begin_snapshot_receive(file.lsn(), file.len()).unwrap();
    let data = file.read_chunk(0, CHUNK_BYTES).unwrap();
    recv.write(0, &data).unwrap();
    let err = recv.write(data.len() as u64 + 1, &data).unwrap_err();
    assert!(err.to_string().contains("expected"), "{err}");
    let err = recv
        .write(data.len() as u64, &vec![0; file.len() as usize])
        .unwrap_err();
    assert!(err.to_string().contains("past the announced"), "{err}");
    drop(recv);
    unchanged(&f, "bad offsets");

    // A header whose LSN disagrees with the announced one.
    let mut recv = f
        .begin_snapshot_receive(file.lsn() + 1, file.len())
        .unwrap();
    recv.write(0, &file.read_all().unwrap()).unwrap();
    let err = f.install_received_snapshot(recv).unwrap_err();
    assert!(err.to_string().contains("announced LSN 301"), "{err}");
    unchanged(&f, "wrong LSN");

    // Dropped midway (the stream broke).
    drop(stream_into(&f, &file, 3, |_, _| {}));
    unchanged(&f, "dropped");
}

/// Power loss in the middle of a receive (the process dies too, so nothing
/// cleans up): the next open recovers the old state and removes the temp
/// file, even one whose name and bytes were durable.
#[test]
fn a_crash_mid_receive_recovers_the_old_state_and_removes_the_temp_file() {
    let (_leader, l) = leader_with_snapshot(300);
    let file = l.newest_snapshot().unwrap().unwrap();
    let chunks = file.len().div_ceil(CHUNK_BYTES as u64) as usize;
    let mut c = small_segments();
    c.replicated = true;
    // What the follower recovers after a crash with no receive at all.
    let reference = sim();
    drop(follower(&reference));
    reference.crash();
    let old = open(&reference, &c).unwrap();
    let (digest, last) = (old.digest(), old.stats().last_lsn);
    assert_eq!(last, 20);
    for durable_name in [false, true] {
        let s = sim();
        let f = follower(&s);
        let recv = stream_into(&f, &file, chunks / 2, |_, _| {});
        if durable_name {
            s.sync_dir(Path::new(DIR)).unwrap();
        }
        assert_eq!(recv_files(&s).len(), 1);
        // The process dies with the receive in flight: no drop runs.
        std::mem::forget(recv);
        drop(f);
        s.crash();
        assert_eq!(recv_files(&s).len(), usize::from(durable_name));
        let f = open(&s, &c).unwrap();
        assert_eq!((f.digest(), f.stats().last_lsn), (digest, last));
        assert_eq!(recv_files(&s), Vec::<String>::new(), "open removes it");
    }
}

/// The snapshot a leader is sending stays readable when two newer
/// snapshots are taken meanwhile and the cleanup (which keeps the two
/// newest) removes its file: the transfer reads through the handle it
/// opened, on the simulated disk and on real files.
#[test]
fn a_snapshot_being_sent_survives_the_cleanup_of_two_newer_snapshots() {
    let real = tempfile::tempdir().unwrap();
    let disks: Vec<(std::sync::Arc<dyn Storage>, std::path::PathBuf)> = vec![
        (std::sync::Arc::new(sim()), Path::new(DIR).to_path_buf()),
        (
            std::sync::Arc::new(kv_node::storage::FsStorage),
            real.path().join("data"),
        ),
    ];
    for (storage, dir) in disks {
        let mut c = config();
        c.data_dir = dir.clone();
        let l = kv_node::engine::Engine::open(storage.clone(), c).unwrap();
        put_range(&l, 1..=200);
        l.snapshot().unwrap();
        let digest_at_200 = l.digest();
        let file = l.newest_snapshot().unwrap().unwrap();
        assert_eq!(file.lsn(), 200);
        // Half of it is sent...
        let half = file.len() / 2;
        let first = file.read_chunk(0, half as usize).unwrap();
        // ...then two newer snapshots remove its file.
        put_range(&l, 201..=210);
        l.snapshot().unwrap();
        put_range(&l, 211..=220);
        l.snapshot().unwrap();
        let names = storage.list_dir(&dir).unwrap();
        assert!(
            !names.contains(&"snap-00000000000000000200.snap".to_owned()),
            "the cleanup removed it: {names:?}"
        );
        // The rest still reads, and the whole verifies and installs.
        let rest = file.read_chunk(half, usize::MAX).unwrap();
        assert_eq!(first.len() + rest.len(), file.len() as usize);
        let s = sim();
        let f = follower(&s);
        let mut recv = f.begin_snapshot_receive(200, file.len()).unwrap();
        recv.write(0, &first).unwrap();
        recv.write(half, &rest).unwrap();
        assert_eq!(f.install_received_snapshot(recv).unwrap(), 200);
        assert_eq!(f.digest(), digest_at_200);
    }
}

#[test]
fn a_digest_checkpoint_is_compared_at_its_lsn_and_a_mismatch_is_kept() {
    let sim = common::sim();
    let engine = common::open(&sim, &common::config()).unwrap();
    put_range(&engine, 1..=3);
    let (digest, applied) = engine.digest();
    assert_eq!(applied, 3);
    // At the applied LSN: compared at once.
    engine.expect_digest(3, digest);
    assert_eq!(engine.divergence(), None);
    // Past it: nothing to compare with, ignored.
    engine.expect_digest(2, digest ^ 1);
    assert_eq!(engine.divergence(), None);
    // Ahead: compared when LSN 5 is applied, not at 4.
    engine.expect_digest(5, 0xdead);
    put_range(&engine, 4..=4);
    assert_eq!(engine.divergence(), None);
    put_range(&engine, 5..=6);
    let divergence = engine.divergence().expect("LSN 5's digest differs");
    assert_eq!((divergence.lsn, divergence.theirs), (5, 0xdead));
    assert_ne!(divergence.ours, 0xdead);
    // The first mismatch is kept.
    engine.expect_digest(6, 0xbeef);
    assert_eq!(engine.divergence(), Some(divergence));
}
