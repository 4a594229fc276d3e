//! A node's configuration file (`configs/node*.toml`): parsing, defaults,
//! and validation. Pure: no I/O beyond reading the one file given (the
//! certificate files it names are read when the node starts, by
//! `crate::tls`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The acknowledgement level a write waits for (see `REPLICATION.md`, "Acknowledgement levels").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ack {
    /// The leader's own fsync.
    Local,
    /// A majority, leader included.
    Quorum,
    /// Every member.
    All,
}

impl From<Ack> for kv_cluster::AckLevel {
    fn from(a: Ack) -> Self {
        match a {
            Ack::Local => kv_cluster::AckLevel::Local,
            Ack::Quorum => kv_cluster::AckLevel::Quorum,
            Ack::All => kv_cluster::AckLevel::All,
        }
    }
}

/// One member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// Its node id (unique, non-zero).
    pub id: u64,
    /// Its client listener (the `Kv` service): where clients and
    /// redirects go.
    pub addr: SocketAddr,
    /// Its peer listener (the `Replication` service), where the other
    /// members dial it. Default: `addr` (a node without `peer_listen`
    /// serves both on one port).
    #[serde(default)]
    pub peer_addr: Option<SocketAddr>,
}

impl Member {
    /// Where the other members reach its replication service.
    pub fn peer(&self) -> SocketAddr {
        self.peer_addr.unwrap_or(self.addr)
    }
}

/// TLS on both listeners (`[tls]` in a node's config). Relative paths are
/// relative to the directory `kv serve` runs in.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// The cluster CA (PEM): every peer's certificate must chain to it.
    pub ca: PathBuf,
    /// This node's certificate (PEM), naming `urn:kv:node:<node_id>`.
    pub cert: PathBuf,
    /// Its private key (PEM; refused if group or others may read it).
    pub key: PathBuf,
    /// Demand a client certificate on the client listener. Default false.
    #[serde(default)]
    pub client_cert_auth: bool,
    /// The CA client certificates must chain to. Default: `ca`.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

/// How `kv serve` writes its log lines (stderr).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// tracing's human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, target, fields), for log
    /// shippers.
    Json,
}

fn default_ack() -> Ack {
    Ack::Quorum
}
fn default_write_timeout_ms() -> u64 {
    5000
}
fn default_rpc_timeout_ms() -> u64 {
    2000
}
fn default_heartbeat_ms() -> u64 {
    100
}
fn default_election_timeout_ms() -> u64 {
    300
}
fn default_batch_records_max() -> usize {
    1024
}
fn default_inflight_bytes_max() -> u64 {
    8 << 20
}
fn default_key_bytes_max() -> usize {
    1024
}
fn default_value_bytes_max() -> usize {
    1 << 20
}
fn default_snapshot_wal_bytes() -> u64 {
    64 << 20
}
fn default_segment_bytes_max() -> u64 {
    64 << 20
}

/// A node's settings. Every field but `cluster_id`, `node_id`, `listen`,
/// `data_dir` and `members` has a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Name of the cluster; messages from another cluster are refused.
    pub cluster_id: String,
    /// This node's id (one of `members`).
    pub node_id: u64,
    /// The client listener: the `Kv` service, gRPC health and reflection
    /// (loopback in the shipped configs).
    pub listen: SocketAddr,
    /// The peer listener: the `Replication` service only, where the other
    /// members dial this node. Default: none, and replication shares
    /// `listen` (plaintext development setups only; TLS needs it).
    #[serde(default)]
    pub peer_listen: Option<SocketAddr>,
    /// TLS on both listeners, mutual on the peer one. Default: plaintext.
    #[serde(default)]
    pub tls: Option<TlsSettings>,
    /// Allow plaintext on an address other than loopback (anyone who
    /// reaches it can then act as a member). Default false: such a node
    /// refuses to start.
    #[serde(default)]
    pub allow_plaintext_non_loopback: bool,
    /// Data directory (created on demand). A relative path is relative to
    /// the directory `kv serve` runs in.
    pub data_dir: PathBuf,
    /// A fixed leader, with elections off. Default: none, and the members
    /// elect one (Raft's rules). A fixed leader never fails over; it exists
    /// for tests and for comparison.
    #[serde(default)]
    pub leader: Option<u64>,
    /// Every member, this node included.
    pub members: Vec<Member>,
    /// Default acknowledgement level for writes. Default `quorum`.
    #[serde(default = "default_ack")]
    pub ack: Ack,
    /// A write not acknowledged by then gets "outcome unknown". Default 5000.
    #[serde(default = "default_write_timeout_ms")]
    pub write_timeout_ms: u64,
    /// Deadline of one RPC between nodes (and of a silent stream). Default 2000.
    #[serde(default = "default_rpc_timeout_ms")]
    pub rpc_timeout_ms: u64,
    /// The leader sends an empty append at least this often. Default 100.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// A follower that hears no leader for a random time between this and
    /// twice this starts an election; a leader that hears from no majority
    /// for this long steps down. Default 300 (three heartbeats; on a LAN or
    /// loopback a round trip is well under a millisecond; raise it for
    /// slower networks).
    #[serde(default = "default_election_timeout_ms")]
    pub election_timeout_ms: u64,
    /// Records in one append batch at most. Default 1024.
    #[serde(default = "default_batch_records_max")]
    pub batch_records_max: usize,
    /// Bytes sent to one follower and not yet acknowledged, at most. Default 8 MiB.
    #[serde(default = "default_inflight_bytes_max")]
    pub inflight_bytes_max: u64,
    /// Longest key accepted. Default 1024.
    #[serde(default = "default_key_bytes_max")]
    pub key_bytes_max: usize,
    /// Longest value accepted. Default 1 MiB.
    #[serde(default = "default_value_bytes_max")]
    pub value_bytes_max: usize,
    /// Snapshot after this many WAL bytes (0: never). Default 64 MiB.
    #[serde(default = "default_snapshot_wal_bytes")]
    pub snapshot_wal_bytes: u64,
    /// WAL segment size bound. Default 64 MiB.
    #[serde(default = "default_segment_bytes_max")]
    pub segment_bytes_max: u64,
    /// Where Prometheus scrapes this node (plain HTTP, `GET /metrics`;
    /// read-only). Default: none, and no metrics endpoint.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// `text` (default) or `json`: one JSON object per log line.
    #[serde(default)]
    pub log_format: LogFormat,
}

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("parse {}: {error}", path.display())]
    Parse {
        path: PathBuf,
        error: toml::de::Error,
    },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
}

impl NodeConfig {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let config: NodeConfig = toml::from_str(&text).map_err(|error| ConfigError::Parse {
            path: path.to_path_buf(),
            error,
        })?;
        config.validate().map_err(|reason| ConfigError::Invalid {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(config)
    }

    /// Checks what the types cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.cluster_id.is_empty() {
            return Err("cluster_id is empty".into());
        }
        if self.members.is_empty() {
            return Err("members is empty".into());
        }
        let mut ids: Vec<u64> = self.members.iter().map(|m| m.id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != self.members.len() || ids.contains(&0) {
            return Err("member ids must be unique and non-zero".into());
        }
        if !ids.contains(&self.node_id) {
            return Err(format!("node_id {} is not a member", self.node_id));
        }
        if let Some(leader) = self.leader.filter(|l| !ids.contains(l)) {
            return Err(format!("leader {leader} is not a member"));
        }
        if self.heartbeat_ms == 0 || self.rpc_timeout_ms <= self.heartbeat_ms {
            return Err("rpc_timeout_ms must be longer than heartbeat_ms (> 0)".into());
        }
        if self.election_timeout_ms < 2 * self.heartbeat_ms {
            return Err("election_timeout_ms must be at least twice heartbeat_ms".into());
        }
        if self.batch_records_max == 0 {
            return Err("batch_records_max must be at least 1".into());
        }
        if self.peer_listen == Some(self.listen) {
            return Err("peer_listen must differ from listen".into());
        }
        if let Some(m) = self.metrics_listen
            && (m == self.listen || Some(m) == self.peer_listen)
        {
            return Err("metrics_listen must differ from listen and peer_listen".into());
        }
        if self.tls.is_some() && self.peer_listen.is_none() {
            return Err("tls needs peer_listen: replication gets a listener of its own".into());
        }
        if self.tls.is_none() && !self.allow_plaintext_non_loopback {
            for addr in std::iter::once(self.listen).chain(self.peer_listen) {
                if !addr.ip().is_loopback() {
                    return Err(format!(
                        "plaintext on {addr}, which is not loopback, lets anyone who reaches it \
                         act as a member: configure [tls], or set \
                         allow_plaintext_non_loopback = true"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Where member `id`'s replication service listens.
    pub fn peer_addr_of(&self, id: u64) -> Option<SocketAddr> {
        self.members.iter().find(|m| m.id == id).map(Member::peer)
    }

    /// The client address of member `id`.
    pub fn addr_of(&self, id: u64) -> Option<SocketAddr> {
        self.members.iter().find(|m| m.id == id).map(|m| m.addr)
    }

    /// True if this node is the fixed leader (elections off).
    pub fn is_fixed_leader(&self) -> bool {
        self.leader == Some(self.node_id)
    }

    /// True if the members elect their leader.
    pub fn elections(&self) -> bool {
        self.leader.is_none()
    }

    /// The engine settings this node runs with.
    pub fn engine_config(&self) -> crate::engine::EngineConfig {
        let mut c = crate::engine::EngineConfig::new(&self.data_dir);
        c.key_bytes_max = self.key_bytes_max;
        c.value_bytes_max = self.value_bytes_max;
        c.snapshot_wal_bytes = self.snapshot_wal_bytes;
        c.segment_bytes_max = self.segment_bytes_max;
        c.replicated = true;
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
        cluster_id = "c"
        node_id = 2
        listen = "127.0.0.1:7002"
        data_dir = "d"
        leader = 1
        [[members]]
        id = 1
        addr = "127.0.0.1:7001"
        [[members]]
        id = 2
        addr = "127.0.0.1:7002"
    "#;

    fn parse(text: &str) -> Result<NodeConfig, String> {
        let c: NodeConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn defaults_fill_what_is_not_set() {
        let c = parse(BASE).unwrap();
        assert_eq!(c.ack, Ack::Quorum);
        assert_eq!(c.write_timeout_ms, 5000);
        assert_eq!((c.metrics_listen, c.log_format), (None, LogFormat::Text));
        assert!(!c.is_fixed_leader() && !c.elections());
        assert_eq!(c.addr_of(1), Some("127.0.0.1:7001".parse().unwrap()));
    }

    #[test]
    fn bad_configurations_are_refused() {
        let check = |text: String, fragment: &str| {
            let err = parse(&text).unwrap_err();
            assert!(err.contains(fragment), "{err:?} lacks {fragment:?}");
        };
        check(BASE.replace("node_id = 2", "node_id = 9"), "not a member");
        check(BASE.replace("leader = 1", "leader = 5"), "leader 5");
        check(BASE.replace("id = 2\n", "id = 1\n"), "unique");
        check(format!("{BASE}\nunknown = 1"), "unknown");
        check(BASE.replace("127.0.0.1:7001", "nonsense"), "invalid");
        check(
            BASE.replace("listen = \"127.0.0.1:7002\"", "listen = \"0.0.0.0:7002\""),
            "not loopback",
        );
        check(
            format!("peer_listen = \"127.0.0.1:7002\"\n{BASE}"),
            "must differ",
        );
        check(
            format!("metrics_listen = \"127.0.0.1:7002\"\n{BASE}"),
            "metrics_listen must differ",
        );
        check(format!("log_format = \"xml\"\n{BASE}"), "unknown variant");
        let tls = "[tls]\nca = \"ca.pem\"\ncert = \"n.pem\"\nkey = \"n-key.pem\"\n";
        check(format!("{BASE}\n{tls}"), "needs peer_listen");
    }

    #[test]
    fn plaintext_beyond_loopback_needs_the_opt_in_and_tls_does_not() {
        let open = BASE.replace("listen = \"127.0.0.1:7002\"", "listen = \"0.0.0.0:7002\"");
        parse(&format!("allow_plaintext_non_loopback = true\n{open}")).unwrap();
        let tls = format!(
            "peer_listen = \"0.0.0.0:7102\"\n{open}\n[tls]\nca = \"ca.pem\"\ncert = \"n.pem\"\nkey = \"n-key.pem\"\n"
        );
        let c = parse(&tls).unwrap();
        let t = c.tls.clone().unwrap();
        assert!(!t.client_cert_auth && t.client_ca.is_none());
        assert_eq!(
            c.peer_addr_of(1),
            c.addr_of(1),
            "peer_addr defaults to addr"
        );
    }

    #[test]
    fn the_shipped_configs_are_valid() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        for (dir, tls) in [(root.clone(), false), (root.join("tls"), true)] {
            for i in 1..=3 {
                let c = NodeConfig::load(&dir.join(format!("node{i}.toml"))).unwrap();
                assert_eq!(c.node_id, i);
                assert_eq!(c.members.len(), 3);
                assert!(c.members.iter().all(|m| m.addr.ip().is_loopback()));
                assert!(c.members.iter().all(|m| m.peer_addr.is_some()));
                assert_eq!(c.peer_listen, c.peer_addr_of(i));
                assert_eq!(c.tls.is_some(), tls, "{}", dir.display());
                let metrics = format!("127.0.0.1:910{i}").parse().ok();
                assert_eq!(c.metrics_listen, metrics, "{}", dir.display());
            }
        }
    }
}
