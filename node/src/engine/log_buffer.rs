//! The in-memory tail of the log: LSN assignment and encoded records waiting
//! for the flusher.
//!
//! Appending here is cheap (encode into a buffer under the engine's state
//! lock); the flusher later takes whole chunks and writes them with one
//! `write` and one `fdatasync`. Chunks are bounded in bytes and records so one
//! group's latency stays bounded, and a chunk that starts a new segment says
//! so (the flusher does the roll; see `Wal::write_chunk`). No I/O here.

use std::collections::VecDeque;

use super::record::{Op, SEGMENT_HEADER_BYTES, SegmentHeader, encode_record};
use super::wal::Chunk;

/// Limits of the buffer.
#[derive(Debug, Clone, Copy)]
pub struct BufferLimits {
    /// Start a new segment once the active one would grow past this.
    pub segment_bytes_max: u64,
    /// Close a chunk once it holds this many bytes.
    pub group_commit_bytes_max: usize,
    /// Close a chunk once it holds this many records.
    pub group_commit_records_max: usize,
}

/// Encoded records not yet handed to the flusher.
#[derive(Debug)]
pub struct LogBuffer {
    limits: BufferLimits,
    /// LSN of the last record appended (to the buffer or earlier to a file).
    last_lsn: u64,
    /// Term of the last record appended.
    last_term: u64,
    /// Header of the segment the next record goes into.
    segment: SegmentHeader,
    /// Bytes that segment will hold once everything buffered is written.
    segment_bytes: u64,
    /// The highest salt any segment of this log has carried, removed ones
    /// included (see [`crate::engine::wal::Wal::salt_high`]): a roll takes
    /// the next one, so a new segment never shares a salt with a segment a
    /// truncation removed.
    salt_high: u32,
    chunks: VecDeque<Chunk>,
    /// Records in the last chunk.
    tail_records: usize,
}

impl LogBuffer {
    /// A buffer continuing a log whose active segment is `segment`, holding
    /// `segment_bytes`, with `last_lsn`/`last_term` its last record and
    /// `salt_high` the highest salt the log has used.
    pub fn new(
        limits: BufferLimits,
        segment: SegmentHeader,
        segment_bytes: u64,
        last_lsn: u64,
        last_term: u64,
        salt_high: u32,
    ) -> Self {
        LogBuffer {
            limits,
            last_lsn,
            last_term,
            segment,
            segment_bytes,
            salt_high: salt_high.max(segment.salt),
            chunks: VecDeque::new(),
            tail_records: 0,
        }
    }

    /// LSN of the last record appended.
    pub fn last_lsn(&self) -> u64 {
        self.last_lsn
    }

    /// Term of the last record appended.
    pub fn last_term(&self) -> u64 {
        self.last_term
    }

    /// True if nothing waits for the flusher.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Encodes `op` as the record `last_lsn + 1` with `term`; returns its LSN.
    pub fn append(&mut self, term: u64, op: &Op) -> u64 {
        let lsn = self.last_lsn + 1;
        let len = op.record_len() as u64;
        let roll = self.segment_bytes > SEGMENT_HEADER_BYTES as u64
            && self.segment_bytes + len > self.limits.segment_bytes_max;
        let mut roll_to = None;
        if roll {
            // Not the active segment's salt + 1: after a truncation the
            // active segment is an older one, and its salt + 1 is the salt
            // of a segment just removed, whose stale bytes would then verify.
            self.salt_high = self.salt_high.wrapping_add(1);
            self.segment = SegmentHeader {
                first_lsn: lsn,
                prev_last_lsn: self.last_lsn,
                salt: self.salt_high,
            };
            self.segment_bytes = SEGMENT_HEADER_BYTES as u64;
            roll_to = Some(self.segment);
        }
        let start_chunk = match self.chunks.back() {
            None => true,
            Some(c) => {
                roll_to.is_some()
                    || c.bytes.len() >= self.limits.group_commit_bytes_max
                    || self.tail_records >= self.limits.group_commit_records_max
            }
        };
        if start_chunk {
            self.chunks.push_back(Chunk {
                roll_to,
                bytes: Vec::with_capacity(4096),
                first_lsn: lsn,
                last_lsn: lsn,
            });
            self.tail_records = 0;
        }
        let salt = self.segment.salt;
        if let Some(chunk) = self.chunks.back_mut() {
            encode_record(&mut chunk.bytes, salt, lsn, term, op);
            chunk.last_lsn = lsn;
        }
        self.tail_records += 1;
        self.segment_bytes += len;
        self.last_lsn = lsn;
        self.last_term = term;
        lsn
    }

    /// Takes the oldest chunks, up to the group-commit bounds (at least one).
    pub fn take_group(&mut self) -> Vec<Chunk> {
        let mut out: Vec<Chunk> = Vec::new();
        let (mut bytes, mut records) = (0, 0);
        while let Some(front) = self.chunks.front() {
            let front_records = (front.last_lsn - front.first_lsn + 1) as usize;
            if !out.is_empty()
                && (bytes + front.bytes.len() > self.limits.group_commit_bytes_max
                    || records + front_records > self.limits.group_commit_records_max)
            {
                break;
            }
            bytes += front.bytes.len();
            records += front_records;
            if let Some(c) = self.chunks.pop_front() {
                out.push(c);
            }
        }
        if self.chunks.is_empty() {
            self.tail_records = 0;
        }
        out
    }

    /// Resets the buffer to continue a log that was truncated to `last_lsn`.
    /// The caller guarantees the buffer is empty. The salt high-water mark
    /// only grows: the segments the cut removed keep counting as used.
    pub fn reset(
        &mut self,
        segment: SegmentHeader,
        segment_bytes: u64,
        last_lsn: u64,
        last_term: u64,
    ) {
        assert!(self.chunks.is_empty(), "reset with records still buffered");
        self.salt_high = self.salt_high.max(segment.salt);
        self.segment = segment;
        self.segment_bytes = segment_bytes;
        self.last_lsn = last_lsn;
        self.last_term = last_term;
    }
}
