//! A node's configuration file (`configs/node*.toml`): parsing, defaults,
//! and validation. Pure: no I/O beyond reading the one file given.

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
    /// Where its gRPC server listens.
    pub addr: SocketAddr,
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
    /// Address to listen on (loopback in the shipped configs).
    pub listen: SocketAddr,
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
        Ok(())
    }

    /// The address of member `id`.
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
    }

    #[test]
    fn the_shipped_configs_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        for i in 1..=3 {
            let c = NodeConfig::load(&dir.join(format!("node{i}.toml"))).unwrap();
            assert_eq!(c.node_id, i);
            assert_eq!(c.members.len(), 3);
            assert!(c.members.iter().all(|m| m.addr.ip().is_loopback()));
        }
    }
}
