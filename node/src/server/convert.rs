//! The edge between protobuf and the engine's types: every inbound message
//! is checked here (`TryFrom`), nothing from the wire is trusted further in.
//! Also a gRPC status as a `Kv.Batch` outcome carries it (`pb::Failure`),
//! both ways: the node sends it (`failure`), the client turns it back into
//! the status its unary call would have returned (`status_of`).

use kv_proto::v1 as pb;
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use super::LEADER_METADATA;
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

/// A command's error as it travels in an outcome.
pub(crate) fn failure(status: &Status) -> pb::Failure {
    pb::Failure {
        code: status.code() as i32,
        message: status.message().to_owned(),
        leader_addr: status
            .metadata()
            .get(LEADER_METADATA)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
    }
}

/// The error a unary call would have returned, back from an outcome.
pub(crate) fn status_of(failure: pb::Failure) -> Status {
    let mut status = Status::new(Code::from_i32(failure.code), failure.message);
    if !failure.leader_addr.is_empty()
        && let Ok(addr) = MetadataValue::try_from(failure.leader_addr.as_str())
    {
        status.metadata_mut().insert(LEADER_METADATA, addr);
    }
    status
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

    #[test]
    fn a_failure_carries_code_message_and_leader_back_and_forth() {
        let mut status = Status::failed_precondition("not leader; the leader is node 2");
        status.metadata_mut().insert(
            LEADER_METADATA,
            MetadataValue::from_static("127.0.0.1:7002"),
        );
        let back = status_of(failure(&status));
        assert_eq!(back.code(), Code::FailedPrecondition);
        assert_eq!(back.message(), status.message());
        assert_eq!(
            back.metadata().get(LEADER_METADATA).unwrap(),
            "127.0.0.1:7002"
        );
        let plain = status_of(failure(&Status::invalid_argument("key is too large")));
        assert_eq!(plain.code(), Code::InvalidArgument);
        assert!(plain.metadata().get(LEADER_METADATA).is_none());
    }

    #[test]
    fn an_unknown_code_from_the_wire_is_not_a_panic() {
        let s = status_of(pb::Failure {
            code: 9999,
            message: "?".into(),
            leader_addr: "\n not an address".into(),
        });
        assert_eq!(s.code(), Code::Unknown);
        assert!(s.metadata().get(LEADER_METADATA).is_none());
    }
}
