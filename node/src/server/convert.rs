//! The edge between protobuf and the engine's types: every inbound message
//! is checked here (`TryFrom`), nothing from the wire is trusted further in.

use kv_proto::v1 as pb;

use crate::engine::{Op, Record};

/// CRC of a record as shipped: the CRC32 of its WAL encoding with salt 0
/// (the same function the WAL uses, so a record is checked end to end).
pub fn record_crc(lsn: u64, term: u64, op: &Op) -> u32 {
    crate::engine::record::record_crc(0, lsn, term, op)
}

/// A record for the wire.
pub fn to_proto(r: &Record) -> pb::LogRecord {
    let (key, value, delete) = match &r.op {
        Op::Put { key, value } => (key.clone(), value.clone(), false),
        Op::Delete { key } => (key.clone(), Vec::new(), true),
    };
    pb::LogRecord {
        lsn: r.lsn,
        term: r.term,
        crc: record_crc(r.lsn, r.term, &r.op),
        key,
        value,
        delete,
    }
}

/// Why a record from the wire was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("record at LSN {lsn}: CRC mismatch")]
    Crc { lsn: u64 },
    #[error("record at LSN {lsn}: a delete with a value")]
    DeleteWithValue { lsn: u64 },
    #[error("record with LSN 0")]
    ZeroLsn,
}

impl TryFrom<pb::LogRecord> for Record {
    type Error = WireError;

    fn try_from(r: pb::LogRecord) -> Result<Self, Self::Error> {
        if r.lsn == 0 {
            return Err(WireError::ZeroLsn);
        }
        let op = if r.delete {
            if !r.value.is_empty() {
                return Err(WireError::DeleteWithValue { lsn: r.lsn });
            }
            Op::Delete { key: r.key }
        } else {
            Op::Put {
                key: r.key,
                value: r.value,
            }
        };
        if record_crc(r.lsn, r.term, &op) != r.crc {
            return Err(WireError::Crc { lsn: r.lsn });
        }
        Ok(Record {
            lsn: r.lsn,
            term: r.term,
            op,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_cross_the_wire_intact_and_damage_is_caught() {
        let r = Record {
            lsn: 7,
            term: 2,
            op: Op::Put {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
            },
        };
        let wire = to_proto(&r);
        assert_eq!(Record::try_from(wire.clone()), Ok(r));
        let mut bad = wire.clone();
        bad.value = b"w".to_vec();
        assert_eq!(Record::try_from(bad), Err(WireError::Crc { lsn: 7 }));
        let mut bad = wire.clone();
        bad.term = 3;
        assert_eq!(Record::try_from(bad), Err(WireError::Crc { lsn: 7 }));
        let mut bad = wire;
        bad.delete = true;
        assert!(Record::try_from(bad).is_err());
    }
}
