//! The write-ahead log on disk: segment files, recovery, and the file-level
//! operations the group-commit flusher and replication need.
//!
//! A [`Wal`] owns the segment files of one data directory. It writes chunks
//! of already-encoded records (the in-memory log buffer and LSN assignment
//! live in `engine::log_buffer`), syncs, rolls segments, reads records back
//! from a given LSN, durably truncates after an LSN, and deletes segments
//! covered by a snapshot. It never applies records to the map and holds no
//! lock of its own: the engine serialises access to it. Reading records for
//! shipping is split in two: [`Wal::plan_read`] (under the engine's lock,
//! cheap) and [`ReadPlan::read`] (the file reads, without it).
//!
//! Recovery is the case table of `node/DESIGN.md` ("The case table"), written out in
//! [`Wal::open`]; every row has a test in `node/tests/recovery.rs`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::{EngineError, Result};
use super::record::{
    RECORD_HEADER_BYTES, RECORD_PAYLOAD_BYTES_MAX, Record, RecordError, RecordView,
    SEGMENT_HEADER_BYTES, SegmentHeader, decode_record, decode_record_view,
};
use crate::storage::{Storage, StorageFile};

/// File name of the segment whose first LSN is `first_lsn`.
pub fn segment_name(first_lsn: u64) -> String {
    format!("wal-{first_lsn:020}.wal")
}

/// Parses a segment file name back into its first LSN.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("wal-")?.strip_suffix(".wal")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Settings of the log files.
#[derive(Debug, Clone)]
pub struct WalConfig {
    /// A segment is sealed and a new one started once it holds this many bytes.
    pub segment_bytes_max: u64,
    /// The active segment is extended with zeros this many bytes at a time,
    /// so most syncs overwrite allocated blocks and need no metadata update
    /// (on ext4 that is ~1.5x more syncs per second). 0 turns it off.
    pub preallocate_bytes: u64,
}

/// A sealed or active segment.
#[derive(Debug, Clone)]
pub struct SegmentInfo {
    /// Its header.
    pub header: SegmentHeader,
    /// Its path.
    pub path: PathBuf,
    /// LSN of its last record (`first_lsn - 1` if empty).
    pub last_lsn: u64,
    /// Its length in bytes (header included).
    pub bytes: u64,
    /// Where some of its records start, so a read positions itself
    /// without decoding the segment from its start.
    index: SparseIndex,
}

/// A reader skips at most about this many bytes of a segment to reach the
/// record it wants: one index entry per stride (a 64 MiB segment: 1024
/// entries, 16 KiB).
const INDEX_STRIDE_BYTES: u64 = 64 << 10;

/// A reader reads a segment this many bytes at a time (more for a record
/// that is larger).
const READ_WINDOW_BYTES: usize = 256 << 10;

/// `(LSN, offset)` of record starts in one segment, in LSN order, at least
/// [`INDEX_STRIDE_BYTES`] apart; the first record is always there. Built as
/// records are written and while recovery scans a segment, cut by a
/// truncation; it only ever names offsets of records that were written.
#[derive(Clone, Default)]
struct SparseIndex(Vec<(u64, u64)>);

impl std::fmt::Debug for SparseIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SparseIndex({} entries)", self.0.len())
    }
}

impl SparseIndex {
    /// Record `lsn` starts at `offset` (called for every record, in order).
    fn note(&mut self, lsn: u64, offset: u64) {
        if self
            .0
            .last()
            .is_none_or(|&(_, at)| offset >= at + INDEX_STRIDE_BYTES)
        {
            self.0.push((lsn, offset));
        }
    }

    /// The indexed record start at or before `lsn`.
    fn seek(&self, lsn: u64) -> Option<(u64, u64)> {
        let i = self.0.partition_point(|&(l, _)| l <= lsn);
        i.checked_sub(1).and_then(|i| self.0.get(i).copied())
    }

    /// Forgets the records after `lsn` (they were truncated).
    fn truncate_after(&mut self, lsn: u64) {
        self.0.retain(|&(l, _)| l <= lsn);
    }
}

/// Bytes of the record `view` was decoded from.
fn view_len(view: &RecordView<'_>) -> u64 {
    let payload = match view.value {
        Some(v) => 4 + view.key.len() + v.len(),
        None => view.key.len(),
    };
    (RECORD_HEADER_BYTES + payload) as u64
}

/// What a read of records needs, taken under the engine's WAL lock by
/// [`Wal::plan_read`]: the segments' paths, open handles, salts, where to
/// start in each and how many bytes of each were written. [`ReadPlan::read`]
/// then reads without any lock: written bytes of a segment never change
/// except by a truncation, which the caller detects and retries (the engine
/// counts cuts; see `Engine::read_from`), and a handle keeps a segment that
/// a snapshot deletes meanwhile readable.
pub struct ReadPlan {
    from: u64,
    to: u64,
    parts: Vec<ReadPart>,
}

struct ReadPart {
    path: PathBuf,
    salt: u32,
    file: Box<dyn StorageFile>,
    /// LSN of the record at `offset`.
    lsn: u64,
    offset: u64,
    /// Written bytes of the segment when the plan was made.
    end: u64,
}

impl std::fmt::Debug for ReadPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadPlan")
            .field("from", &self.from)
            .field("to", &self.to)
            .field("segments", &self.parts.len())
            .finish()
    }
}

impl ReadPlan {
    /// Reads records `from..=to` of the plan, in LSN order. Reads only from
    /// the indexed position before `from`, in windows, never whole segments.
    pub fn read(self) -> Result<Vec<Record>> {
        let mut out = Vec::new();
        for part in &self.parts {
            let corrupt = |offset: u64, lsn: u64, reason: String| EngineError::Corrupt {
                file: part.path.clone(),
                offset,
                lsn: Some(lsn),
                reason,
            };
            let mut expected = part.lsn;
            // `buf` holds the file's bytes from `base`; `pos` indexes it.
            let (mut buf, mut base, mut pos) = (Vec::new(), part.offset, 0usize);
            while expected <= self.to {
                let at = base + pos as u64;
                if at >= part.end {
                    break;
                }
                let rest = buf.get(pos..).unwrap_or(&[]);
                match decode_record_view(rest, part.salt, RECORD_PAYLOAD_BYTES_MAX) {
                    Ok((view, used)) if view.lsn == expected => {
                        if expected >= self.from {
                            out.push(view.to_record());
                        }
                        expected += 1;
                        pos += used;
                    }
                    Ok((view, _)) => {
                        return Err(corrupt(
                            at,
                            expected,
                            format!("record has LSN {} where {expected} was expected", view.lsn),
                        ));
                    }
                    Err(RecordError::Incomplete) => {
                        // Read on from this record: a window, or the whole
                        // record if its header says it is larger.
                        let need = rest.get(8..12).map_or(0, |b| {
                            RECORD_HEADER_BYTES
                                + u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize
                        });
                        let len = (part.end - at).min(need.max(READ_WINDOW_BYTES) as u64);
                        if len <= rest.len() as u64 {
                            return Err(corrupt(
                                at,
                                expected,
                                "incomplete record before the written end of the segment".into(),
                            ));
                        }
                        let len = usize::try_from(len).map_err(|_| {
                            EngineError::InvalidLogOp("read window larger than memory".into())
                        })?;
                        buf = vec![0u8; len];
                        part.file
                            .read_at(&mut buf, at)
                            .map_err(EngineError::io("read wal segment", &part.path))?;
                        (base, pos) = (at, 0);
                    }
                    Err(e) => return Err(corrupt(at, expected, e.to_string())),
                }
            }
        }
        Ok(out)
    }
}

/// One chunk of encoded records for the flusher to write, in log order.
#[derive(Debug)]
pub struct Chunk {
    /// Start this new segment (after sealing the active one) before writing.
    pub roll_to: Option<SegmentHeader>,
    /// Encoded records.
    pub bytes: Vec<u8>,
    /// LSN of the first record in `bytes`.
    pub first_lsn: u64,
    /// LSN of the last record in `bytes`.
    pub last_lsn: u64,
}

/// What recovery found and did.
#[derive(Debug, Clone, Default)]
pub struct WalRecovery {
    /// Segments found (after any torn last segment was removed).
    pub segments: usize,
    /// First LSN the log can serve (first segment's first LSN).
    pub first_lsn: u64,
    /// Last valid LSN in the log.
    pub last_lsn: u64,
    /// Term of the last valid record (0 if none).
    pub last_term: u64,
    /// Records handed to the replay callback.
    pub replayed: u64,
    /// Bytes cut from a torn tail.
    pub tail_bytes_cut: u64,
    /// A half-created last segment that was removed, if any.
    pub removed_segment: Option<PathBuf>,
    /// Segments wholly covered by the snapshot, left by an interrupted
    /// deletion, that were removed.
    pub stale_segments_removed: usize,
}

/// The recovery verdict for one segment's bytes, before anything is changed.
#[derive(Debug)]
pub struct SegmentScan {
    /// Decoded header.
    pub header: SegmentHeader,
    /// Number of valid records.
    pub records: u64,
    /// Term of the last valid record, if any.
    pub last_term: Option<u64>,
    /// Byte offset just past the last valid record.
    pub valid_bytes: u64,
    /// Where the first bad record starts, why it is bad, and whether a valid
    /// record with a higher LSN follows it (which makes it mid-log damage).
    pub damage: Option<Damage>,
}

/// The first bad bytes in a segment.
#[derive(Debug, Clone)]
pub struct Damage {
    /// Offset of the bad record.
    pub offset: u64,
    /// The LSN expected there.
    pub lsn: u64,
    /// What is wrong.
    pub reason: String,
    /// Offset of a record that verifies at or after the damage (the damage
    /// itself, if it is a verified record with the wrong LSN): proof that
    /// this is not a torn tail.
    pub valid_record_after: Option<u64>,
}

/// Reads a segment's bytes into records, stopping at the first bad record and
/// looking past it for a valid one. Pure: no I/O, never panics on any input.
pub fn scan_segment(
    bytes: &[u8],
    payload_max: usize,
    on_record: &mut dyn FnMut(RecordView<'_>),
) -> std::result::Result<SegmentScan, &'static str> {
    let header = SegmentHeader::decode(bytes)?;
    let mut records = 0;
    let mut last_term = None;
    let mut offset = SEGMENT_HEADER_BYTES;
    let mut expected = header.first_lsn;
    let mut damage = None;
    while offset < bytes.len() {
        match decode_record_view(&bytes[offset..], header.salt, payload_max) {
            Ok((rec, used)) if rec.lsn == expected => {
                let Some(next) = expected.checked_add(1) else {
                    damage = Some((offset, "LSN overflow".to_owned(), true));
                    break;
                };
                records += 1;
                last_term = Some(rec.term);
                on_record(rec);
                offset += used;
                expected = next;
            }
            // A record that verifies but is out of sequence was written by
            // us: it is never a torn tail.
            Ok((rec, _)) => {
                damage = Some((
                    offset,
                    format!("record has LSN {} where {expected} was expected", rec.lsn),
                    true,
                ));
                break;
            }
            // Zeros to the end are preallocated space, not damage.
            Err(_) if bytes[offset..].iter().all(|b| *b == 0) => break,
            Err(e) => {
                damage = Some((offset, e.to_string(), false));
                break;
            }
        }
    }
    let damage = damage.map(|(at, reason, valid_itself)| Damage {
        offset: at as u64,
        lsn: expected,
        reason,
        valid_record_after: if valid_itself {
            Some(at as u64)
        } else {
            find_valid_record_after(bytes, at, header.salt, expected, payload_max)
        },
    });
    Ok(SegmentScan {
        header,
        records,
        last_term,
        valid_bytes: offset as u64,
        damage,
    })
}

/// Looks at every offset after `damaged_at` for a record that validates (CRC,
/// salt) with an LSN at or above `expected`: proof that the damage is not a
/// torn tail.
fn find_valid_record_after(
    bytes: &[u8],
    damaged_at: usize,
    salt: u32,
    expected: u64,
    payload_max: usize,
) -> Option<u64> {
    let last_start = bytes.len().checked_sub(RECORD_HEADER_BYTES)?;
    (damaged_at + 1..=last_start).find_map(|at| {
        // Cheap filter first (kind byte, padding, salt) so scanning a long
        // zeroed or garbage tail costs no CRC per offset.
        if !could_start_record(&bytes[at..], salt) {
            return None;
        }
        match decode_record(&bytes[at..], salt, payload_max) {
            Ok((rec, _)) if rec.lsn >= expected => Some(at as u64),
            _ => None,
        }
    })
}

fn could_start_record(b: &[u8], salt: u32) -> bool {
    b.len() >= RECORD_HEADER_BYTES
        && matches!(b[4], 1 | 2)
        && b[5..8] == [0, 0, 0]
        && b[12..16] == salt.to_le_bytes()
}

/// The log files of one data directory.
pub struct Wal {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    config: WalConfig,
    /// Every segment, oldest first; the last is the active one. Never empty.
    segments: Vec<SegmentInfo>,
    /// Handle of the active segment.
    active: Box<dyn StorageFile>,
    /// Length of the active segment's file: its records, then zeros.
    active_allocated: u64,
    /// Successful `sync_data` calls on segment files.
    syncs: u64,
    /// The highest salt of any segment this log has had since open: every
    /// header read by recovery (stale and superseded segments included),
    /// every roll, every reset. A segment created from now on takes a salt
    /// above it, so its salt differs from that of every segment a truncation
    /// or reset removed: stale bytes of a removed segment (a file whose
    /// removal a crash undid, old blocks showing through a reused name)
    /// fail the salt check instead of verifying as records of the new one.
    /// Kept in memory only: a removed segment's salt is forgotten by a
    /// restart, so a cut followed by a restart and a roll can still reuse
    /// one (closing that needs the high-water mark on disk; not done).
    salt_high: u32,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("dir", &self.dir)
            .field("segments", &self.segments)
            .finish_non_exhaustive()
    }
}

impl Wal {
    /// Opens (or creates) the log in `dir` and recovers it, handing every
    /// valid record above `snapshot_lsn` to `replay`, in order.
    ///
    /// `snapshot_lsn` is the LSN the loaded snapshot covers (0 without one):
    /// the log must hold every record after it, and if there are no segments
    /// it starts at `snapshot_lsn + 1`.
    ///
    /// Recovery decides first and repairs after: every segment is read and
    /// judged before anything on disk changes, so a refused open changes
    /// nothing. The case table (one row per arm, tested row by row):
    ///
    /// | where the bad bytes are | what follows | verdict |
    /// |---|---|---|
    /// | last segment, incomplete record at the end | nothing | torn tail: truncate, sync |
    /// | last segment, bad CRC/header | no valid record with a higher LSN | torn tail: truncate, sync |
    /// | any segment | a valid record with a higher LSN, or a valid record with the wrong LSN | mid-log corruption: refuse |
    /// | sealed segment, any damage | - | corruption: refuse |
    /// | last segment, unreadable header | no valid record in the file | half-created: remove, sync dir |
    /// | last segment, unreadable header | a record whose CRC verifies | damaged after records went in: refuse, never delete |
    /// | LSN gap between segments, the later one starting at or below `snapshot_lsn + 1` | - | leftovers of an interrupted deletion before the gap: skip, remove, sync dir |
    /// | any other LSN gap between segments, or a name that disagrees with its header | - | corruption: refuse |
    /// | the log starts after `snapshot_lsn + 1` or ends before `snapshot_lsn` | - | records missing: refuse |
    /// | (replicated, `superseded_ok`) the whole log ends before `snapshot_lsn` | - | an installed snapshot superseded it: start after the snapshot |
    /// | any segment, zeros to the end | - | preallocated space: keep |
    pub fn open(
        storage: Arc<dyn Storage>,
        dir: &Path,
        config: WalConfig,
        snapshot_lsn: u64,
        superseded_ok: bool,
        mut replay: impl FnMut(Record),
        mut below_snapshot: impl FnMut(u64, u64),
    ) -> Result<(Wal, WalRecovery)> {
        let replay_from = snapshot_lsn.checked_add(1).ok_or_else(|| {
            EngineError::InvalidLogOp("snapshot LSN is the largest LSN there is".into())
        })?;
        let names = storage
            .list_dir(dir)
            .map_err(EngineError::io("list data directory", dir))?;
        let mut firsts: Vec<u64> = names.iter().filter_map(|n| parse_segment_name(n)).collect();
        firsts.sort_unstable();
        // Segments wholly covered by the snapshot, cut off from the rest by
        // a gap: an interrupted deletion left them (unsynced removals
        // survive a crash each on its own). Removed in phase 2.
        let mut stale: Vec<PathBuf> = Vec::new();

        // Phase 1: read and judge; change nothing.
        let mut recovery = WalRecovery::default();
        let mut segments: Vec<SegmentInfo> = Vec::new();
        let mut half_created: Option<PathBuf> = None;
        // (path, offset to cut at) for a torn tail.
        let mut torn_tail: Option<(PathBuf, u64)> = None;
        // File length of the last segment (its records, then zeros).
        let mut allocated = 0;
        let mut salt_high = 0u32;
        let count = firsts.len();
        for (i, first) in firsts.iter().copied().enumerate() {
            let path = dir.join(segment_name(first));
            let is_last = i + 1 == count;
            let bytes = storage
                .read_file(&path)
                .map_err(EngineError::io("read wal segment", &path))?;
            let corrupt = |offset: u64, lsn: Option<u64>, reason: String| EngineError::Corrupt {
                file: path.clone(),
                offset,
                lsn,
                reason,
            };
            let header = match SegmentHeader::decode(&bytes) {
                Ok(header) => {
                    salt_high = salt_high.max(header.salt);
                    header
                }
                // A header that does not verify. Only the last segment may
                // have one, and only if nothing valid is in the file: it was
                // being created when the machine stopped (records are only
                // appended after its header is durable). A record that
                // verifies proves the header was durable once and has been
                // damaged since: deleting the file would lose those records
                // (acknowledged ones among them), so the open is refused.
                Err(reason) if !is_last => {
                    return Err(corrupt(0, Some(first), reason.to_owned()));
                }
                Err(reason) => {
                    if let Some(at) = first_valid_record(&bytes, RECORD_PAYLOAD_BYTES_MAX) {
                        return Err(corrupt(
                            0,
                            Some(first),
                            format!(
                                "{reason} in the last segment, but a valid record starts at offset {at}: the header was damaged after records were written (not a half-created segment)"
                            ),
                        ));
                    }
                    half_created = Some(path.clone());
                    continue;
                }
            };
            if header.first_lsn != first {
                return Err(corrupt(
                    0,
                    Some(first),
                    format!(
                        "segment name says first LSN {first}, header says {}",
                        header.first_lsn
                    ),
                ));
            }
            if segments.is_empty() && header.first_lsn > replay_from {
                return Err(corrupt(
                    0,
                    Some(replay_from),
                    format!(
                        "the WAL starts at LSN {} but LSN {replay_from} is the first not covered by a snapshot: records are missing",
                        header.first_lsn
                    ),
                ));
            }
            if segments
                .last()
                .is_some_and(|prev| header.first_lsn != prev.last_lsn + 1)
                && header.first_lsn <= replay_from
            {
                // The gap lies below what the snapshot covers: the segments
                // before it are leftovers, not needed by this log.
                stale.extend(segments.drain(..).map(|s| s.path));
            }
            if let Some(prev) = segments.last()
                && header.first_lsn != prev.last_lsn + 1
            {
                return Err(corrupt(
                    0,
                    Some(prev.last_lsn + 1),
                    format!(
                        "LSN gap: previous segment ends at {}, this one starts at {}",
                        prev.last_lsn, header.first_lsn
                    ),
                ));
            }
            // The header continues the log: replay its records (records
            // at or below the snapshot are only validated, never copied).
            let mut replayed = 0;
            let mut index = SparseIndex::default();
            let mut at = SEGMENT_HEADER_BYTES as u64;
            let scan = scan_segment(&bytes, RECORD_PAYLOAD_BYTES_MAX, &mut |view| {
                index.note(view.lsn, at);
                at += view_len(&view);
                if view.lsn >= replay_from {
                    replayed += 1;
                    replay(view.to_record());
                } else {
                    below_snapshot(view.lsn, view.term);
                }
            })
            .map_err(|reason| corrupt(0, Some(first), reason.to_owned()))?;
            recovery.replayed += replayed;
            let mut valid_bytes = scan.valid_bytes;
            allocated = bytes.len() as u64;
            if let Some(damage) = &scan.damage {
                if !is_last {
                    return Err(corrupt(
                        damage.offset,
                        Some(damage.lsn),
                        format!("damage in a sealed segment: {}", damage.reason),
                    ));
                }
                if let Some(after) = damage.valid_record_after {
                    return Err(corrupt(
                        damage.offset,
                        Some(damage.lsn),
                        format!(
                            "corruption in the middle of the log ({}); a valid record starts at offset {after}",
                            damage.reason
                        ),
                    ));
                }
                // Count the garbage, not the preallocated zeros behind it.
                let garbage_end = bytes.iter().rposition(|b| *b != 0).map_or(0, |p| p + 1) as u64;
                recovery.tail_bytes_cut = garbage_end.saturating_sub(damage.offset);
                torn_tail = Some((path.clone(), damage.offset));
                valid_bytes = damage.offset;
                allocated = damage.offset;
            }
            if let Some(term) = scan.last_term {
                recovery.last_term = term;
            }
            segments.push(SegmentInfo {
                header: scan.header,
                path,
                // The scan stops before an LSN could overflow.
                last_lsn: scan.header.first_lsn + scan.records - 1,
                bytes: valid_bytes,
                index,
            });
        }
        let last_lsn = segments.last().map_or(snapshot_lsn, |s| s.last_lsn);
        // A replicated node whose installed snapshot is newer than its whole
        // log (a crash during `reset_after`): the log is superseded.
        let superseded = superseded_ok && last_lsn < snapshot_lsn;
        if last_lsn < snapshot_lsn && !superseded {
            let file = segments
                .last()
                .map_or_else(|| dir.to_path_buf(), |s| s.path.clone());
            return Err(EngineError::Corrupt {
                file,
                offset: 0,
                lsn: Some(last_lsn + 1),
                reason: format!(
                    "the WAL ends at LSN {last_lsn}, before the snapshot LSN {snapshot_lsn}: records are missing"
                ),
            });
        }

        // Phase 2: the verdict is "open"; repair, then make it all durable.
        for path in &stale {
            storage
                .remove_file(path)
                .map_err(EngineError::io("remove stale wal segment", path))?;
        }
        recovery.stale_segments_removed = stale.len();
        if let Some(path) = &half_created {
            storage
                .remove_file(path)
                .map_err(EngineError::io("remove half-created wal segment", path))?;
            recovery.removed_segment = Some(path.clone());
        }
        if superseded {
            for seg in std::mem::take(&mut segments) {
                storage
                    .remove_file(&seg.path)
                    .map_err(EngineError::io("remove superseded wal segment", &seg.path))?;
            }
            torn_tail = None;
            recovery.replayed = 0;
        }
        let active = match segments.last() {
            Some(seg) => {
                let file = storage
                    .open(&seg.path)
                    .map_err(EngineError::io("open wal segment", &seg.path))?;
                if let Some((path, offset)) = &torn_tail {
                    assert_eq!(*path, seg.path, "only the last segment has a torn tail");
                    // Cut the tail before anything new is appended behind it.
                    file.set_len(*offset)
                        .map_err(EngineError::io("truncate torn wal tail", path))?;
                }
                // What survived a process kill may sit in the page cache
                // only; sync it so everything recovery exposes is durable.
                file.sync_data()
                    .map_err(EngineError::io("sync wal segment", &seg.path))?;
                file
            }
            None => {
                // 1 in a new directory; above every salt seen otherwise
                // (superseded segments were just removed).
                salt_high = salt_high.wrapping_add(1);
                let header = SegmentHeader {
                    first_lsn: replay_from,
                    prev_last_lsn: snapshot_lsn,
                    salt: salt_high,
                };
                let (info, file) = create_segment(&*storage, dir, header)?;
                allocated = info.bytes;
                segments.push(info);
                file
            }
        };
        // Names too: a segment whose creation was interrupted by a process
        // kill may have a name that was never made durable.
        storage
            .sync_dir(dir)
            .map_err(EngineError::io("sync data directory", dir))?;
        recovery.segments = segments.len();
        recovery.first_lsn = segments[0].header.first_lsn;
        recovery.last_lsn = segments[segments.len() - 1].last_lsn;
        let wal = Wal {
            storage,
            dir: dir.to_path_buf(),
            config,
            segments,
            active,
            active_allocated: allocated,
            syncs: 0,
            salt_high,
        };
        Ok((wal, recovery))
    }

    /// LSN of the last record on file (`first_lsn - 1` if none).
    pub fn last_lsn(&self) -> u64 {
        self.active_info().last_lsn
    }

    /// LSN of the first record the log still holds on file.
    pub fn first_lsn(&self) -> u64 {
        self.segments[0].header.first_lsn
    }

    /// The active segment's header (for the log buffer's roll decisions).
    pub fn active_header(&self) -> SegmentHeader {
        self.active_info().header
    }

    /// Bytes in the active segment.
    pub fn active_bytes(&self) -> u64 {
        self.active_info().bytes
    }

    /// The segments, oldest first.
    pub fn segments(&self) -> &[SegmentInfo] {
        &self.segments
    }

    /// The highest salt the log has used since open (the next segment
    /// created takes a higher one).
    pub fn salt_high(&self) -> u32 {
        self.salt_high
    }

    /// Successful data syncs of segment files so far.
    pub fn syncs(&self) -> u64 {
        self.syncs
    }

    /// The configured segment size bound.
    pub fn segment_bytes_max(&self) -> u64 {
        self.config.segment_bytes_max
    }

    fn active_info(&self) -> &SegmentInfo {
        // `segments` is never empty: open creates one if none exists.
        &self.segments[self.segments.len() - 1]
    }

    /// Writes a chunk (rolling to a new segment first if it says so). The
    /// bytes are *written*, not durable, when this returns.
    pub fn write_chunk(&mut self, chunk: &Chunk) -> Result<()> {
        if let Some(header) = chunk.roll_to {
            self.roll(header)?;
        }
        let info = self.active_info();
        assert_eq!(
            chunk.first_lsn,
            info.last_lsn + 1,
            "chunks are written in LSN order"
        );
        let (path, offset) = (info.path.clone(), info.bytes);
        let end = offset + chunk.bytes.len() as u64;
        if self.config.preallocate_bytes > 0 && end > self.active_allocated {
            // Zeros first, then the records over them; the group's one sync
            // covers both.
            let target = end + self.config.preallocate_bytes;
            let zeros = vec![0u8; (target - self.active_allocated) as usize];
            self.active
                .write_at(&zeros, self.active_allocated)
                .map_err(EngineError::io("preallocate wal segment", &path))?;
            self.active_allocated = target;
        }
        self.active
            .write_at(&chunk.bytes, offset)
            .map_err(EngineError::io("write wal segment", &path))?;
        let n = self.segments.len();
        let info = &mut self.segments[n - 1];
        // Index the chunk's records (our own encoding: each starts with a
        // 32-byte header whose bytes 8..12 are the payload length).
        let (mut at, mut lsn) = (0usize, chunk.first_lsn);
        while let Some(len) = chunk.bytes.get(at + 8..at + 12) {
            info.index.note(lsn, offset + at as u64);
            at +=
                RECORD_HEADER_BYTES + u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
            lsn += 1;
        }
        info.bytes += chunk.bytes.len() as u64;
        info.last_lsn = chunk.last_lsn;
        self.active_allocated = self.active_allocated.max(info.bytes);
        Ok(())
    }

    /// `fdatasync` of the active segment: everything written is durable after.
    pub fn sync(&mut self) -> Result<()> {
        let path = &self.active_info().path;
        self.active
            .sync_data()
            .map_err(EngineError::io("sync wal segment", path))?;
        self.syncs += 1;
        Ok(())
    }

    /// Seals the active segment (its data made durable first, so a sealed
    /// segment is always whole) and starts the segment `header` describes:
    /// header written and synced, then the directory synced.
    fn roll(&mut self, header: SegmentHeader) -> Result<()> {
        assert_eq!(
            header.prev_last_lsn,
            self.last_lsn(),
            "roll continues the log"
        );
        // A sealed segment ends exactly at its last record.
        let (bytes, path) = (self.active_bytes(), self.active_info().path.clone());
        if self.active_allocated > bytes {
            self.active
                .set_len(bytes)
                .map_err(EngineError::io("trim sealed wal segment", &path))?;
        }
        self.sync()?;
        let (info, file) = create_segment(&*self.storage, &self.dir, header)?;
        self.syncs += 1;
        self.salt_high = self.salt_high.max(header.salt);
        self.active_allocated = info.bytes;
        self.segments.push(info);
        self.active = file;
        Ok(())
    }

    /// Plans a read of up to `max_records` records starting at `from`
    /// (which must be within `first_lsn()..=last_lsn() + 1`), none above
    /// `upto`: finds the segments that hold them and where `from` starts in
    /// its segment (from the sparse index), opens them, and notes how many
    /// bytes of each are written. Cheap: no record is read here, so the
    /// caller can hold the WAL lock for it and do [`ReadPlan::read`] after
    /// releasing it. Sees written bytes, durable or not; `upto` is the
    /// caller's limit (the durable LSN, for shipping).
    pub fn plan_read(&self, from: u64, max_records: usize, upto: u64) -> Result<ReadPlan> {
        if from < self.first_lsn() || from > self.last_lsn() + 1 {
            return Err(EngineError::InvalidLogOp(format!(
                "read from LSN {from}: the log holds {}..={}",
                self.first_lsn(),
                self.last_lsn()
            )));
        }
        let to = from
            .saturating_add(max_records as u64)
            .saturating_sub(1)
            .min(upto)
            .min(self.last_lsn());
        let mut parts = Vec::new();
        if max_records > 0 && to >= from {
            for seg in self
                .segments
                .iter()
                .filter(|s| s.last_lsn >= from && s.header.first_lsn <= to)
            {
                let first = (seg.header.first_lsn, SEGMENT_HEADER_BYTES as u64);
                let (lsn, offset) = if seg.header.first_lsn < from {
                    seg.index.seek(from).unwrap_or(first)
                } else {
                    first
                };
                let file = self
                    .storage
                    .open(&seg.path)
                    .map_err(EngineError::io("open wal segment", &seg.path))?;
                parts.push(ReadPart {
                    path: seg.path.clone(),
                    salt: seg.header.salt,
                    file,
                    lsn,
                    offset,
                    end: seg.bytes,
                });
            }
        }
        Ok(ReadPlan { from, to, parts })
    }

    fn read_segment(&self, seg: &SegmentInfo) -> Result<Vec<u8>> {
        let len = usize::try_from(seg.bytes)
            .map_err(|_| EngineError::InvalidLogOp("segment larger than memory".into()))?;
        let mut bytes = vec![0u8; len];
        let file;
        let handle: &dyn StorageFile = if seg.path == self.active_info().path {
            &*self.active
        } else {
            file = self
                .storage
                .open(&seg.path)
                .map_err(EngineError::io("open wal segment", &seg.path))?;
            &*file
        };
        handle
            .read_at(&mut bytes, 0)
            .map_err(EngineError::io("read wal segment", &seg.path))?;
        Ok(bytes)
    }

    /// Durably removes every record after `lsn`: later segments are deleted
    /// (last first, directory synced) before the segment holding `lsn` is
    /// cut and synced, so a crash in between leaves a prefix of the log,
    /// never a gap. The caller guarantees no chunk is pending.
    pub fn truncate_after(&mut self, lsn: u64) -> Result<()> {
        if lsn < self.first_lsn() - 1 || lsn > self.last_lsn() {
            return Err(EngineError::InvalidLogOp(format!(
                "truncate after LSN {lsn}: the log holds {}..={}",
                self.first_lsn(),
                self.last_lsn()
            )));
        }
        let keep = self
            .segments
            .iter()
            .rposition(|s| s.header.first_lsn <= lsn.saturating_add(1))
            .unwrap_or(0);
        let mut removed = false;
        while self.segments.len() > keep + 1 {
            if let Some(seg) = self.segments.pop() {
                // Newest first, each removal durable before the next: a
                // crash between two leaves a log with its tail cut, never
                // one with a gap (unsynced removals survive a crash each on
                // its own).
                self.storage
                    .remove_file(&seg.path)
                    .map_err(EngineError::io("remove wal segment", &seg.path))?;
                self.storage
                    .sync_dir(&self.dir)
                    .map_err(EngineError::io("sync data directory", &self.dir))?;
                removed = true;
            }
        }
        let seg = self.segments[keep].clone();
        if removed {
            // The segment holding `lsn` is the active one now.
            self.active = self
                .storage
                .open(&seg.path)
                .map_err(EngineError::io("open wal segment", &seg.path))?;
        }
        let bytes = self.read_segment(&seg)?;
        let mut offset = SEGMENT_HEADER_BYTES;
        let mut next = seg.header.first_lsn;
        while next <= lsn {
            match decode_record(&bytes[offset..], seg.header.salt, RECORD_PAYLOAD_BYTES_MAX) {
                Ok((rec, used)) if rec.lsn == next => {
                    offset += used;
                    next += 1;
                }
                _ => {
                    return Err(EngineError::Corrupt {
                        file: seg.path.clone(),
                        offset: offset as u64,
                        lsn: Some(next),
                        reason: "unreadable record while truncating".into(),
                    });
                }
            }
        }
        self.active
            .set_len(offset as u64)
            .map_err(EngineError::io("truncate wal segment", &seg.path))?;
        self.sync()?;
        self.active_allocated = offset as u64;
        let info = &mut self.segments[keep];
        info.bytes = offset as u64;
        info.last_lsn = lsn;
        info.index.truncate_after(lsn);
        Ok(())
    }

    /// Replaces the whole log by an empty one starting after `lsn` (a
    /// snapshot at `lsn` was installed and made durable first): every segment
    /// is deleted (directory synced), then a new segment for `lsn + 1` is
    /// created durably. A crash in between leaves a snapshot newer than the
    /// log, which recovery in replicated mode treats as "the log was
    /// superseded" (see [`Wal::open`]).
    pub fn reset_after(&mut self, lsn: u64) -> Result<()> {
        // Above every salt used since open, not only the present segments':
        // a truncation may have removed segments with higher salts.
        let salt = self.salt_high.wrapping_add(1);
        // The list of segments changes only once the new log exists: an
        // I/O error on the way (which poisons the engine) leaves it
        // describing the old log, never an empty one.
        for seg in &self.segments {
            self.storage
                .remove_file(&seg.path)
                .map_err(EngineError::io("remove wal segment", &seg.path))?;
        }
        self.storage
            .sync_dir(&self.dir)
            .map_err(EngineError::io("sync data directory", &self.dir))?;
        let header = SegmentHeader {
            first_lsn: lsn + 1,
            prev_last_lsn: lsn,
            salt,
        };
        let (info, file) = create_segment(&*self.storage, &self.dir, header)?;
        self.salt_high = salt;
        self.active_allocated = info.bytes;
        self.segments = vec![info];
        self.active = file;
        Ok(())
    }

    /// Deletes sealed segments all of whose records are at or below `lsn`
    /// (covered by a snapshot), then syncs the directory. Returns how many.
    pub fn remove_segments_through(&mut self, lsn: u64) -> Result<usize> {
        let mut removed = 0;
        while self.segments.len() > 1 && self.segments[0].last_lsn <= lsn {
            let seg = self.segments.remove(0);
            self.storage
                .remove_file(&seg.path)
                .map_err(EngineError::io("remove wal segment", &seg.path))?;
            removed += 1;
        }
        if removed > 0 {
            self.storage
                .sync_dir(&self.dir)
                .map_err(EngineError::io("sync data directory", &self.dir))?;
        }
        Ok(removed)
    }
}

/// Offset of the first record whose CRC verifies, anywhere in `bytes`.
fn first_valid_record(bytes: &[u8], payload_max: usize) -> Option<u64> {
    // Without a header there is no salt to check against; any record whose
    // CRC verifies counts, whatever its salt.
    let last_start = bytes.len().checked_sub(RECORD_HEADER_BYTES)?;
    (0..=last_start)
        .find(|&at| {
            let salt = u32::from_le_bytes([
                bytes[at + 12],
                bytes[at + 13],
                bytes[at + 14],
                bytes[at + 15],
            ]);
            !matches!(
                decode_record(&bytes[at..], salt, payload_max),
                Err(RecordError::Incomplete | RecordError::TooLong { .. } | RecordError::BadCrc)
            )
        })
        .map(|at| at as u64)
}

/// Creates a segment file: header written and synced, then the directory
/// synced, so the segment exists durably before any record goes in.
fn create_segment(
    storage: &dyn Storage,
    dir: &Path,
    header: SegmentHeader,
) -> Result<(SegmentInfo, Box<dyn StorageFile>)> {
    let path = dir.join(segment_name(header.first_lsn));
    let file = storage
        .create(&path)
        .map_err(EngineError::io("create wal segment", &path))?;
    file.write_at(&header.encode(), 0)
        .map_err(EngineError::io("write wal segment header", &path))?;
    file.sync_data()
        .map_err(EngineError::io("sync wal segment header", &path))?;
    storage
        .sync_dir(dir)
        .map_err(EngineError::io("sync data directory", dir))?;
    let info = SegmentInfo {
        header,
        path,
        last_lsn: header.first_lsn - 1,
        bytes: SEGMENT_HEADER_BYTES as u64,
        index: SparseIndex::default(),
    };
    Ok((info, file))
}
