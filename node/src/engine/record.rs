//! WAL records and segment headers: byte layouts, encoding and validation.
//!
//! Pure functions over byte slices; no I/O. The layouts are documented in
//! `node/DESIGN.md` and pinned by compile-time asserts and round-trip tests.
//! Decoding never trusts a length from the bytes: it is bounded by the
//! configured maximum and by the bytes actually present before anything is
//! read or allocated.

/// Bytes in a record header (everything before the payload).
pub const RECORD_HEADER_BYTES: usize = 32;
/// Bytes in a segment header.
pub const SEGMENT_HEADER_BYTES: usize = 40;
/// Magic at the start of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"KVWALSEG";
/// Version of the segment and record format.
pub const FORMAT_VERSION: u32 = 1;
/// The longest record payload the format allows. Reading is bounded by this
/// constant (and by the bytes left in the file), never by the configured key
/// and value limits, so restarting with smaller limits cannot turn old,
/// valid records into "damage". The configured limits must fit under it.
pub const RECORD_PAYLOAD_BYTES_MAX: usize = 64 << 20;

const _: () = assert!(RECORD_HEADER_BYTES == 4 + 1 + 3 + 4 + 4 + 8 + 8);
const _: () = assert!(SEGMENT_HEADER_BYTES == 8 + 4 + 4 + 8 + 8 + 4 + 4);

/// What a record does to the map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Set `key` to `value`.
    Put { key: Vec<u8>, value: Vec<u8> },
    /// Remove `key` (a no-op if absent).
    Delete { key: Vec<u8> },
}

impl Op {
    fn kind(&self) -> u8 {
        match self {
            Op::Put { .. } => KIND_PUT,
            Op::Delete { .. } => KIND_DELETE,
        }
    }

    /// The entry a new leader appends to start its term: a delete of the
    /// empty key, which no client can write (keys are never empty), so it
    /// changes no state.
    pub fn term_start() -> Op {
        Op::Delete { key: Vec::new() }
    }

    /// True for [`Op::term_start`].
    pub fn is_term_start(&self) -> bool {
        matches!(self, Op::Delete { key } if key.is_empty())
    }

    /// The key this operation touches.
    pub fn key(&self) -> &[u8] {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => key,
        }
    }

    /// Payload bytes this operation encodes to.
    pub fn payload_len(&self) -> usize {
        match self {
            Op::Put { key, value } => 4 + key.len() + value.len(),
            Op::Delete { key } => key.len(),
        }
    }

    /// Bytes of the whole record (header + payload).
    pub fn record_len(&self) -> usize {
        RECORD_HEADER_BYTES + self.payload_len()
    }
}

const KIND_PUT: u8 = 0x01;
const KIND_DELETE: u8 = 0x02;

/// A decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Log sequence number: strictly increasing by one through the whole log.
    pub lsn: u64,
    /// Term (epoch) of the leader that created it; 0 on a single node.
    pub term: u64,
    /// The operation.
    pub op: Op,
}

/// Appends the encoding of one record to `out`.
///
/// Layout (little endian): `crc u32 | kind u8 | zero [3] | payload_len u32 |
/// salt u32 | lsn u64 | term u64 | payload`. The CRC covers every byte after
/// itself, header and payload.
pub fn encode_record(out: &mut Vec<u8>, salt: u32, lsn: u64, term: u64, op: &Op) {
    let start = out.len();
    let payload_len = u32::try_from(op.payload_len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&[0u8; 4]);
    out.push(op.kind());
    out.extend_from_slice(&[0u8; 3]);
    out.extend_from_slice(&payload_len.to_le_bytes());
    out.extend_from_slice(&salt.to_le_bytes());
    out.extend_from_slice(&lsn.to_le_bytes());
    out.extend_from_slice(&term.to_le_bytes());
    match op {
        Op::Put { key, value } => {
            let key_len = u32::try_from(key.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&key_len.to_le_bytes());
            out.extend_from_slice(key);
            out.extend_from_slice(value);
        }
        Op::Delete { key } => out.extend_from_slice(key),
    }
    let crc = crc32fast::hash(&out[start + 4..]);
    out[start..start + 4].copy_from_slice(&crc.to_le_bytes());
}

/// The CRC [`encode_record`] would write for this record, computed without
/// building the record (no allocation): the CRC of every byte after the
/// CRC field, header and payload.
pub fn record_crc(salt: u32, lsn: u64, term: u64, op: &Op) -> u32 {
    let payload_len = u32::try_from(op.payload_len()).unwrap_or(u32::MAX);
    let mut header = [0u8; RECORD_HEADER_BYTES - 4];
    header[0] = op.kind();
    header[4..8].copy_from_slice(&payload_len.to_le_bytes());
    header[8..12].copy_from_slice(&salt.to_le_bytes());
    header[12..20].copy_from_slice(&lsn.to_le_bytes());
    header[20..28].copy_from_slice(&term.to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&header);
    match op {
        Op::Put { key, value } => {
            let key_len = u32::try_from(key.len()).unwrap_or(u32::MAX);
            h.update(&key_len.to_le_bytes());
            h.update(key);
            h.update(value);
        }
        Op::Delete { key } => h.update(key),
    }
    h.finalize()
}

/// Why bytes did not decode as a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordError {
    /// Fewer bytes than the header or than the payload length it states.
    Incomplete,
    /// The stated payload length is over the configured maximum.
    TooLong { payload_len: u64 },
    /// The CRC does not match the bytes.
    BadCrc,
    /// The CRC matches but the record is from another segment (stale bytes).
    WrongSalt { found: u32 },
    /// The CRC matches but the kind byte, padding or payload is malformed.
    Malformed(&'static str),
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordError::Incomplete => write!(f, "incomplete record"),
            RecordError::TooLong { payload_len } => {
                write!(f, "payload length {payload_len} over the maximum")
            }
            RecordError::BadCrc => write!(f, "CRC mismatch"),
            RecordError::WrongSalt { found } => {
                write!(f, "record from another segment (salt {found})")
            }
            RecordError::Malformed(what) => write!(f, "malformed record: {what}"),
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// A decoded record that borrows its key and value from the bytes it was
/// read from: validating a log costs no allocation per record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordView<'a> {
    /// Log sequence number.
    pub lsn: u64,
    /// Term of the leader that created it.
    pub term: u64,
    /// The key.
    pub key: &'a [u8],
    /// The value of a put; `None` for a delete.
    pub value: Option<&'a [u8]>,
}

impl RecordView<'_> {
    /// An owned copy.
    pub fn to_record(&self) -> Record {
        let key = self.key.to_vec();
        let op = match self.value {
            Some(v) => Op::Put {
                key,
                value: v.to_vec(),
            },
            None => Op::Delete { key },
        };
        Record {
            lsn: self.lsn,
            term: self.term,
            op,
        }
    }
}

/// Decodes the record at the start of `bytes`, returning it and its length.
///
/// `payload_max` bounds the payload length read from the header; `salt` is the
/// segment's salt that every record in it must carry.
pub fn decode_record(
    bytes: &[u8],
    salt: u32,
    payload_max: usize,
) -> Result<(Record, usize), RecordError> {
    decode_record_view(bytes, salt, payload_max).map(|(view, used)| (view.to_record(), used))
}

/// [`decode_record`] without copying the key and value.
pub fn decode_record_view(
    bytes: &[u8],
    salt: u32,
    payload_max: usize,
) -> Result<(RecordView<'_>, usize), RecordError> {
    if bytes.len() < RECORD_HEADER_BYTES {
        return Err(RecordError::Incomplete);
    }
    let payload_len = u32_at(bytes, 8) as usize;
    if payload_len > payload_max {
        return Err(RecordError::TooLong {
            payload_len: payload_len as u64,
        });
    }
    let total = RECORD_HEADER_BYTES + payload_len;
    if bytes.len() < total {
        return Err(RecordError::Incomplete);
    }
    let crc = u32_at(bytes, 0);
    if crc32fast::hash(&bytes[4..total]) != crc {
        return Err(RecordError::BadCrc);
    }
    let found_salt = u32_at(bytes, 12);
    if found_salt != salt {
        return Err(RecordError::WrongSalt { found: found_salt });
    }
    if bytes[5..8] != [0, 0, 0] {
        return Err(RecordError::Malformed("nonzero padding"));
    }
    let lsn = u64_at(bytes, 16);
    let term = u64_at(bytes, 24);
    let payload = &bytes[RECORD_HEADER_BYTES..total];
    let (key, value) = match bytes[4] {
        KIND_PUT => {
            if payload.len() < 4 {
                return Err(RecordError::Malformed(
                    "put payload shorter than its key length",
                ));
            }
            let key_len = u32_at(payload, 0) as usize;
            let rest = &payload[4..];
            if key_len > rest.len() {
                return Err(RecordError::Malformed("key length past the payload"));
            }
            (&rest[..key_len], Some(&rest[key_len..]))
        }
        KIND_DELETE => (payload, None),
        _ => return Err(RecordError::Malformed("unknown record kind")),
    };
    Ok((
        RecordView {
            lsn,
            term,
            key,
            value,
        },
        total,
    ))
}

/// The header every segment file starts with, written and synced before any
/// record goes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// LSN of the first record this segment holds (or will hold).
    pub first_lsn: u64,
    /// LSN of the last record of the previous segment (`first_lsn - 1`),
    /// so the header alone states where the log before it must end.
    pub prev_last_lsn: u64,
    /// Salt every record in this segment carries.
    pub salt: u32,
}

impl SegmentHeader {
    /// Layout: `magic [8] | version u32 | salt u32 | first_lsn u64 |
    /// prev_last_lsn u64 | zero u32 | crc u32` (CRC over the 36 bytes before it).
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_BYTES] {
        let mut b = [0u8; SEGMENT_HEADER_BYTES];
        b[0..8].copy_from_slice(&SEGMENT_MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.salt.to_le_bytes());
        b[16..24].copy_from_slice(&self.first_lsn.to_le_bytes());
        b[24..32].copy_from_slice(&self.prev_last_lsn.to_le_bytes());
        let crc = crc32fast::hash(&b[..36]);
        b[36..40].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and validates a segment header.
    pub fn decode(bytes: &[u8]) -> Result<SegmentHeader, &'static str> {
        if bytes.len() < SEGMENT_HEADER_BYTES {
            return Err("segment header incomplete");
        }
        if bytes[0..8] != SEGMENT_MAGIC {
            return Err("segment header: bad magic");
        }
        if crc32fast::hash(&bytes[..36]) != u32_at(bytes, 36) {
            return Err("segment header: CRC mismatch");
        }
        if u32_at(bytes, 8) != FORMAT_VERSION {
            return Err("segment header: unsupported version");
        }
        if u32_at(bytes, 32) != 0 {
            return Err("segment header: nonzero padding");
        }
        let header = SegmentHeader {
            salt: u32_at(bytes, 12),
            first_lsn: u64_at(bytes, 16),
            prev_last_lsn: u64_at(bytes, 24),
        };
        if header.first_lsn == 0 || header.prev_last_lsn.checked_add(1) != Some(header.first_lsn) {
            return Err("segment header: first LSN does not follow the previous last LSN");
        }
        Ok(header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_round_trip(op: Op, lsn: u64, term: u64) {
        let mut buf = Vec::new();
        encode_record(&mut buf, 7, lsn, term, &op);
        assert_eq!(buf.len(), op.record_len());
        let (rec, used) = decode_record(&buf, 7, 1 << 20).expect("decodes");
        assert_eq!(used, buf.len());
        assert_eq!(rec, Record { lsn, term, op });
    }

    #[test]
    fn records_round_trip() {
        check_round_trip(
            Op::Put {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
            },
            1,
            0,
        );
        check_round_trip(
            Op::Put {
                key: vec![],
                value: vec![],
            },
            u64::MAX,
            u64::MAX,
        );
        check_round_trip(
            Op::Put {
                key: vec![0xff; 300],
                value: vec![0; 5000],
            },
            42,
            3,
        );
        check_round_trip(
            Op::Delete {
                key: b"gone".to_vec(),
            },
            9,
            1,
        );
        check_round_trip(Op::Delete { key: vec![] }, 10, 0);
    }

    #[test]
    fn record_crc_matches_the_encoded_crc() {
        for op in [
            Op::Put {
                key: b"key".to_vec(),
                value: b"value".to_vec(),
            },
            Op::Put {
                key: vec![],
                value: vec![7; 300],
            },
            Op::Delete {
                key: b"gone".to_vec(),
            },
        ] {
            let mut buf = Vec::new();
            encode_record(&mut buf, 9, 42, 3, &op);
            assert_eq!(record_crc(9, 42, 3, &op), u32_at(&buf, 0), "{op:?}");
        }
    }

    #[test]
    fn decode_rejects_damage() {
        let mut buf = Vec::new();
        let op = Op::Put {
            key: b"key".to_vec(),
            value: b"value".to_vec(),
        };
        encode_record(&mut buf, 7, 5, 0, &op);
        assert_eq!(
            decode_record(&buf[..10], 7, 1024),
            Err(RecordError::Incomplete)
        );
        assert_eq!(
            decode_record(&buf[..buf.len() - 1], 7, 1024),
            Err(RecordError::Incomplete)
        );
        assert_eq!(
            decode_record(&buf, 8, 1024),
            Err(RecordError::WrongSalt { found: 7 })
        );
        assert!(matches!(
            decode_record(&buf, 7, 3),
            Err(RecordError::TooLong { .. })
        ));
        let mut bad = buf.clone();
        bad[40] ^= 1;
        assert_eq!(decode_record(&bad, 7, 1024), Err(RecordError::BadCrc));
        // A huge length in a torn header never allocates or reads past the end.
        let mut huge = buf.clone();
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_record(&huge, 7, 1 << 20),
            Err(RecordError::TooLong { .. })
        ));
        // All zeros (preallocated or zeroed space) is never a record.
        assert!(decode_record(&[0u8; 64], 0, 1024).is_err());
    }

    #[test]
    fn malformed_payload_with_valid_crc_is_rejected() {
        // Hand-build a put whose key length points past the payload.
        let mut buf = vec![0u8; RECORD_HEADER_BYTES];
        buf[4] = KIND_PUT;
        buf[8..12].copy_from_slice(&6u32.to_le_bytes());
        buf[12..16].copy_from_slice(&7u32.to_le_bytes());
        buf.extend_from_slice(&100u32.to_le_bytes());
        buf.extend_from_slice(b"ab");
        let crc = crc32fast::hash(&buf[4..]);
        buf[0..4].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            decode_record(&buf, 7, 1024),
            Err(RecordError::Malformed(_))
        ));
    }

    #[test]
    fn segment_header_round_trip_and_damage() {
        let h = SegmentHeader {
            first_lsn: 101,
            prev_last_lsn: 100,
            salt: 3,
        };
        let b = h.encode();
        assert_eq!(SegmentHeader::decode(&b), Ok(h));
        for i in 0..SEGMENT_HEADER_BYTES {
            let mut bad = b;
            bad[i] ^= 0x10;
            assert!(
                SegmentHeader::decode(&bad).is_err(),
                "flip at byte {i} accepted"
            );
        }
        assert!(SegmentHeader::decode(&b[..20]).is_err());
    }
}
