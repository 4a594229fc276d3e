//! What the client commands (`kv put/get/del/status/transfer-leader`) print
//! and exit with, so scripts can rely on it: the `--write-out` formats, the
//! JSON objects with their stable field names, key and value bytes as hex
//! or base64 (never lossy UTF-8), and the exit codes.
//!
//! It does not talk to a cluster (that is [`crate::client::cluster_client`]) or
//! parse arguments (that is `main.rs`); everything here is a pure function
//! of a reply, so it is unit-tested without a node.

use base64::Engine as _;
use kv_proto::v1 as pb;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::client::cluster_client::CallError;

/// Exit codes of the client commands (README: "Exit codes").
pub mod exit {
    /// The command did what it was asked.
    pub const OK: u8 = 0;
    /// A local failure: a config or certificate file that cannot be read,
    /// an I/O error, anything not below.
    pub const FAILURE: u8 = 1;
    /// A usage error: unknown flag, missing argument, bad value (clap's
    /// own code), malformed `--hex` input.
    pub const USAGE: u8 = 2;
    /// The cluster answered and refused: the request took no effect
    /// (invalid argument such as an oversized key, a transfer refused).
    pub const REFUSED: u8 = 3;
    /// No node answered, or none led, within twice `--timeout-ms`; for
    /// `kv status`: some endpoint did not answer.
    pub const UNREACHABLE: u8 = 4;
    /// The request was sent and may or may not take effect: a write
    /// "outcome unknown", or a transfer whose target was not seen leading.
    pub const UNKNOWN: u8 = 5;
    /// `kv verify` found a violation (a history that is not linearizable,
    /// or an acknowledged write missing from a node's log), or could not
    /// decide (the checker ran out of time).
    pub const VIOLATION: u8 = 6;
}

/// A command line clap accepted but the command cannot use (malformed
/// `--hex` input): exit code [`exit::USAGE`], as clap's own errors.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The exit code a failed client command ends with: [`exit::USAGE`] for a
/// [`UsageError`], the class of the [`CallError`] behind `e`, else
/// [`exit::FAILURE`].
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if e.chain().any(|cause| cause.is::<UsageError>()) {
        return exit::USAGE;
    }
    e.chain()
        .find_map(|cause| cause.downcast_ref::<CallError>())
        .map_or(exit::FAILURE, CallError::exit_code)
}

impl CallError {
    /// This failure's exit code ([`exit`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            CallError::Status(_) => exit::REFUSED,
            CallError::Unreachable(_) => exit::UNREACHABLE,
            CallError::OutcomeUnknown(_) => exit::UNKNOWN,
        }
    }
}

/// `--write-out`: how a client command prints its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum WriteOut {
    /// Text for people: the value itself, `OK lsn=N`, the status table.
    #[default]
    Table,
    /// One JSON object on one line (field names in README).
    Json,
}

/// How key and value bytes are written out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bytes {
    /// As they are (table) or base64 in `*_base64` fields (JSON).
    Raw,
    /// Lowercase hex, in `*_hex` fields in JSON (`--hex`).
    Hex,
}

impl Bytes {
    fn field(self, name: &str, bytes: &[u8]) -> (String, Value) {
        match self {
            Bytes::Raw => (
                format!("{name}_base64"),
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
            ),
            Bytes::Hex => (format!("{name}_hex"), Value::String(hex::encode(bytes))),
        }
    }
}

/// Decodes a command-line key or value: its bytes as given, or with
/// `hex`, the bytes its hex digits spell.
pub fn decode_arg(arg: std::ffi::OsString, hex: bool) -> Result<Vec<u8>, UsageError> {
    use std::os::unix::ffi::OsStringExt;
    let raw = arg.into_vec();
    if !hex {
        return Ok(raw);
    }
    hex::decode(&raw).map_err(|e| {
        UsageError(format!(
            "--hex: {:?} is not hex ({e})",
            String::from_utf8_lossy(&raw)
        ))
    })
}

/// `kv put`/`kv del` in JSON: `{"lsn":N,"term":T}`.
#[derive(Debug, Serialize)]
pub struct WriteJson {
    pub lsn: u64,
    pub term: u64,
}

impl From<&pb::WriteReply> for WriteJson {
    fn from(r: &pb::WriteReply) -> Self {
        WriteJson {
            lsn: r.lsn,
            term: r.term,
        }
    }
}

/// `kv get` in JSON: `found`, the key and the value (`null` if not found)
/// as `key_base64`/`value_base64` (or `key_hex`/`value_hex` with `--hex`),
/// `applied_lsn`, and the `node_id` and `term` of the node that answered.
pub fn get_json(key: &[u8], reply: &pb::GetReply, bytes: Bytes) -> Value {
    let mut m = Map::new();
    m.insert("found".into(), Value::Bool(reply.found));
    let (k, v) = bytes.field("key", key);
    m.insert(k, v);
    let (k, v) = bytes.field("value", &reply.value);
    m.insert(k, if reply.found { v } else { Value::Null });
    m.insert("applied_lsn".into(), reply.applied_lsn.into());
    m.insert("node_id".into(), reply.node_id.into());
    m.insert("term".into(), reply.term.into());
    Value::Object(m)
}

/// `kv get` as text: the value's bytes as they are (or hex), or `(nil)`;
/// a stale read adds a tab and `(applied LSN N)`. Ends with a newline.
pub fn get_text(reply: &pb::GetReply, bytes: Bytes, stale: bool) -> Vec<u8> {
    let mut out = if !reply.found {
        b"(nil)".to_vec()
    } else {
        match bytes {
            Bytes::Raw => reply.value.clone(),
            Bytes::Hex => hex::encode(&reply.value).into_bytes(),
        }
    };
    if stale {
        out.extend_from_slice(format!("\t(applied LSN {})", reply.applied_lsn).as_bytes());
    }
    out.push(b'\n');
    out
}

/// One follower as the leader sees it, in `kv status -w json`.
#[derive(Debug, Serialize)]
pub struct FollowerJson {
    pub node_id: u64,
    pub match_lsn: u64,
    pub next_lsn: u64,
    pub lag: u64,
    pub connected: bool,
}

/// One endpoint of `kv status -w json`. An endpoint that did not answer
/// has `reachable: false`, an `error`, and no other field.
#[derive(Debug, Serialize)]
pub struct NodeJson {
    pub endpoint: String,
    pub reachable: bool,
    #[serde(flatten)]
    pub status: Option<NodeStatusJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What an endpoint that answered `kv status` reported.
#[derive(Debug, Serialize)]
pub struct NodeStatusJson {
    pub node_id: u64,
    pub cluster_id: String,
    pub role: String,
    pub term: u64,
    /// `null`: no vote in this term.
    pub voted_for: Option<u64>,
    /// `null`: no leader known.
    pub leader_id: Option<u64>,
    /// `null`: no leader known.
    pub leader_addr: Option<String>,
    pub elections: bool,
    pub last_lsn: u64,
    pub durable_lsn: u64,
    pub commit_lsn: u64,
    pub applied_lsn: u64,
    pub snapshot_lsn: u64,
    /// Records behind the leader's log, as the leader sees it (0 for the
    /// leader; `null` if no leader answered).
    pub lag: Option<u64>,
    /// The state digest at `applied_lsn`: 16 hex digits (a string, as
    /// JSON numbers above 2^53 lose digits).
    pub digest: String,
    pub keys: u64,
    /// The leader's view of its followers (empty on a follower).
    pub followers: Vec<FollowerJson>,
    /// `null`, or why this replica's state is known to differ from the
    /// leader's (it serves no reads).
    pub alarm: Option<String>,
}

fn nonzero(v: u64) -> Option<u64> {
    (v != 0).then_some(v)
}

impl NodeStatusJson {
    /// `s` as JSON, `lag` as [`crate::client::cluster_client::status_row`] takes it.
    pub fn new(s: &pb::StatusReply, lag: Option<u64>) -> Self {
        NodeStatusJson {
            node_id: s.node_id,
            cluster_id: s.cluster_id.clone(),
            role: s.role.clone(),
            term: s.term,
            voted_for: nonzero(s.voted_for),
            leader_id: nonzero(s.leader_id),
            leader_addr: (!s.leader_addr.is_empty()).then(|| s.leader_addr.clone()),
            elections: s.elections,
            last_lsn: s.last_lsn,
            durable_lsn: s.durable_lsn,
            commit_lsn: s.commit_lsn,
            applied_lsn: s.applied_lsn,
            snapshot_lsn: s.snapshot_lsn,
            lag,
            digest: format!("{:016x}", s.digest),
            keys: s.keys,
            followers: s
                .followers
                .iter()
                .map(|f| FollowerJson {
                    node_id: f.node_id,
                    match_lsn: f.match_lsn,
                    next_lsn: f.next_lsn,
                    lag: f.lag,
                    connected: f.connected,
                })
                .collect(),
            alarm: (!s.alarm.is_empty()).then(|| s.alarm.clone()),
        }
    }
}

/// `kv status -w json`: `{"nodes":[...]}`, one [`NodeJson`] per endpoint in
/// the order asked.
#[derive(Debug, Serialize)]
pub struct StatusJson {
    pub nodes: Vec<NodeJson>,
}

/// `kv transfer-leader -w json`: `transferred` (true if `target` was seen
/// leading), `target`, `from_term` (the term the old leader led), and the
/// `leader_id` and `term` seen leading after it (`null` if none was seen).
#[derive(Debug, Serialize)]
pub struct TransferJson {
    pub transferred: bool,
    pub target: u64,
    pub from_term: u64,
    pub leader_id: Option<u64>,
    pub term: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_json_encodes_bytes_losslessly() {
        let reply = pb::GetReply {
            found: true,
            value: vec![0xff, 0x00, b'a'],
            applied_lsn: 7,
            node_id: 2,
            term: 3,
        };
        let j = get_json(b"k\xfe", &reply, Bytes::Raw);
        let want: Value = serde_json::from_str(
            r#"{"found":true,"key_base64":"a/4=","value_base64":"/wBh","applied_lsn":7,"node_id":2,"term":3}"#,
        )
        .unwrap();
        assert_eq!(j, want);
        let j = get_json(b"k\xfe", &reply, Bytes::Hex);
        assert_eq!(j["key_hex"], "6bfe");
        assert_eq!(j["value_hex"], "ff0061");
        let missing = pb::GetReply::default();
        assert_eq!(
            get_json(b"k", &missing, Bytes::Raw)["value_base64"],
            Value::Null
        );
    }

    #[test]
    fn get_text_writes_the_bytes_as_they_are() {
        let reply = pb::GetReply {
            found: true,
            value: vec![0xff, 0xfe],
            ..Default::default()
        };
        assert_eq!(get_text(&reply, Bytes::Raw, false), b"\xff\xfe\n");
        assert_eq!(get_text(&reply, Bytes::Hex, false), b"fffe\n");
        assert_eq!(
            get_text(&pb::GetReply::default(), Bytes::Raw, true),
            b"(nil)\t(applied LSN 0)\n"
        );
    }

    #[test]
    fn hex_args_decode_or_explain() {
        assert_eq!(decode_arg("00ff".into(), true).unwrap(), vec![0, 0xff]);
        assert_eq!(decode_arg("00ff".into(), false).unwrap(), b"00ff".to_vec());
        let err = decode_arg("0g".into(), true).expect_err("not hex");
        assert!(err.0.contains("not hex"), "{err}");
        assert_eq!(exit_code(&err.into()), exit::USAGE);
    }

    #[test]
    fn call_errors_map_to_distinct_exit_codes() {
        let refused = CallError::Status(tonic::Status::invalid_argument("key too long"));
        let unknown = CallError::OutcomeUnknown(tonic::Status::unavailable("outcome unknown"));
        let unreachable = CallError::Unreachable("no endpoint".into());
        let codes: Vec<u8> = [refused, unknown, unreachable]
            .into_iter()
            .map(|e| exit_code(&anyhow::Error::from(e).context("put")))
            .collect();
        assert_eq!(codes, [exit::REFUSED, exit::UNKNOWN, exit::UNREACHABLE]);
        assert_eq!(exit_code(&anyhow::anyhow!("read configs")), exit::FAILURE);
    }
}
