//! A cluster of real `kv serve` processes on 127.0.0.1 for the
//! integration tests: 3 members unless a test asks for 4 or 5, test-chosen
//! ports, temporary data directories, every node on the stdin lifeline
//! ([`super::process`]); driven with the real `kv` client.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use kv_proto::v1 as pb;

use super::process::{self, KV};

/// A cluster of `kv serve` processes, members 1..=n (`addrs[id - 1]`).
pub struct Cluster {
    pub dir: tempfile::TempDir,
    /// This cluster's id, unique to it: clusters of tests that run at the
    /// same time never take each other's nodes for their own, even where
    /// one reuses a port another's stopped node held.
    pub cluster_id: String,
    /// Client listeners, `addrs[id - 1]`.
    pub addrs: Vec<SocketAddr>,
    /// Peer listeners (TLS clusters only; otherwise replication shares
    /// the client listener).
    pub peer_addrs: Vec<SocketAddr>,
    pub nodes: Vec<Option<Child>>,
    /// The cluster's CA and certificates, for a TLS cluster.
    pub tls: Option<ClusterTls>,
    /// Free ports, one per member, that a test's `extra` configuration
    /// names as `{metrics_listen}` (replaced by `"127.0.0.1:<port>"`).
    pub metrics_addrs: Vec<SocketAddr>,
}

/// A TLS cluster's certificates: a CA, `node<N>.pem` per member and a
/// client certificate `admin.pem`, under `<dir>/certs`.
pub struct ClusterTls {
    pub ca: kv_node::certs::Authority,
    pub dir: PathBuf,
}

impl ClusterTls {
    fn make(dir: PathBuf, members: usize) -> ClusterTls {
        use kv_node::certs::{Authority, Validity};
        std::fs::create_dir_all(&dir).unwrap();
        let ca = Authority::new("test", Validity::days(1)).unwrap();
        std::fs::write(dir.join("ca.pem"), &ca.issued.cert_pem).unwrap();
        for id in 1..=members as u64 {
            let node = ca
                .node(id, &["127.0.0.1".into()], Validity::days(1))
                .unwrap();
            write_pair(&dir, &format!("node{id}"), &node);
        }
        write_pair(
            &dir,
            "admin",
            &ca.client("admin", Validity::days(1)).unwrap(),
        );
        ClusterTls { ca, dir }
    }

    /// `<dir>/<name>.pem`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }

    /// The client's transport: the CA, and `admin`'s certificate.
    pub fn transport(&self) -> kv_node::tls::Transport {
        self.transport_as("ca", "admin")
    }

    /// A transport trusting `<ca>.pem` and presenting `<name>.pem`.
    pub fn transport_as(&self, ca: &str, name: &str) -> kv_node::tls::Transport {
        let identity =
            kv_node::tls::IdentityFiles::load(&self.path(name), &self.path(&format!("{name}-key")))
                .unwrap();
        kv_node::tls::Transport::tls(&std::fs::read(self.path(ca)).unwrap(), Some(&identity))
    }
}

/// Writes `<name>.pem` and `<name>-key.pem` (mode 600) into `dir`.
pub fn write_pair(dir: &std::path::Path, name: &str, issued: &kv_node::certs::Issued) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(dir.join(format!("{name}.pem")), &issued.cert_pem).unwrap();
    let key = dir.join(format!("{name}-key.pem"));
    std::fs::write(&key, &issued.key_pem).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
}

pub fn free_ports(n: usize) -> Vec<SocketAddr> {
    // Bind them all at once so they are distinct, then release them.
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners.iter().map(|l| l.local_addr().unwrap()).collect()
}

impl Cluster {
    pub fn start() -> Cluster {
        Cluster::start_with("")
    }

    /// Starts a 3-member cluster whose node configs also hold `extra` (TOML
    /// lines), with node 1 as the fixed leader.
    pub fn start_with(extra: &str) -> Cluster {
        Cluster::build(3, extra, "leader = 1\n")
    }

    /// Starts a 3-member cluster whose members elect their leader.
    pub fn start_elected(extra: &str) -> Cluster {
        Cluster::start_elected_n(3, extra)
    }

    /// Starts a cluster of `members` nodes that elect their leader.
    pub fn start_elected_n(members: usize, extra: &str) -> Cluster {
        Cluster::build(members, extra, "")
    }

    pub fn build(members: usize, extra: &str, leader: &str) -> Cluster {
        Cluster::build_with(members, extra, leader, None)
    }

    /// Starts a 3-member TLS cluster (mutual TLS between peers, a peer
    /// listener each) whose members elect their leader; `tls_extra` goes
    /// into each node's `[tls]` table.
    pub fn start_tls(extra: &str, tls_extra: &str) -> Cluster {
        Cluster::build_with(3, extra, "", Some(tls_extra))
    }

    fn build_with(members: usize, extra: &str, leader: &str, tls: Option<&str>) -> Cluster {
        static CLUSTERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = tempfile::tempdir().unwrap();
        let cluster_id = format!(
            "test-{}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let ports = free_ports(3 * members);
        let (addrs, rest) = ports.split_at(members);
        let (peers, metrics_addrs) = rest.split_at(members);
        let certs = tls.map(|_| ClusterTls::make(dir.path().join("certs"), members));
        for id in 1..=members as u64 {
            let members: String = addrs
                .iter()
                .zip(peers)
                .enumerate()
                .map(|(i, (a, p))| {
                    let peer = if certs.is_some() {
                        format!("peer_addr = \"{p}\"\n")
                    } else {
                        String::new()
                    };
                    format!("[[members]]\nid = {}\naddr = \"{a}\"\n{peer}", i + 1)
                })
                .collect();
            let (peer_listen, tls_table) = match (&certs, tls) {
                (Some(c), Some(tls_extra)) => (
                    format!("peer_listen = \"{}\"\n", peers[id as usize - 1]),
                    format!(
                        "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n{tls_extra}\n",
                        c.path("ca").display(),
                        c.path(&format!("node{id}")).display(),
                        c.path(&format!("node{id}-key")).display()
                    ),
                ),
                _ => (String::new(), String::new()),
            };
            let extra = extra.replace(
                "{metrics_listen}",
                &format!("\"{}\"", metrics_addrs[id as usize - 1]),
            );
            let config = format!(
                "cluster_id = \"{cluster_id}\"\nnode_id = {id}\nlisten = \"{}\"\n{peer_listen}data_dir = \"{}\"\n{leader}write_timeout_ms = 3000\nrpc_timeout_ms = 1000\nheartbeat_ms = 50\n{extra}\n{members}{tls_table}",
                addrs[id as usize - 1],
                dir.path().join(format!("node{id}")).display()
            );
            std::fs::write(dir.path().join(format!("node{id}.toml")), config).unwrap();
        }
        let mut cluster = Cluster {
            dir,
            cluster_id,
            addrs: addrs.to_vec(),
            peer_addrs: if certs.is_some() {
                peers.to_vec()
            } else {
                addrs.to_vec()
            },
            nodes: (0..members).map(|_| None).collect(),
            tls: certs,
            metrics_addrs: metrics_addrs.to_vec(),
        };
        for id in cluster.ids() {
            cluster.start_node(id);
        }
        cluster
    }

    /// Every member's id.
    pub fn ids(&self) -> std::ops::RangeInclusive<usize> {
        1..=self.addrs.len()
    }

    pub fn config(&self, id: usize) -> PathBuf {
        self.dir.path().join(format!("node{id}.toml"))
    }

    pub fn start_node(&mut self, id: usize) {
        let log = std::fs::File::create(self.dir.path().join(format!("node{id}.log"))).unwrap();
        self.nodes[id - 1] = Some(process::serve(&self.config(id), log));
        self.wait_until(
            Duration::from_secs(20),
            &format!("node {id} answers"),
            |c| c.status_of(id).is_some(),
        );
    }

    pub fn kill(&mut self, id: usize) {
        if let Some(mut child) = self.nodes[id - 1].take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    pub fn endpoint(&self, id: usize) -> String {
        self.addrs[id - 1].to_string()
    }

    pub fn all_endpoints(&self) -> String {
        self.addrs
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Runs the `kv` client with `args` against `endpoints`.
    pub fn kv(&self, args: &[&str], endpoints: &str) -> Output {
        let mut command = Command::new(KV);
        command
            .args(args)
            .args(["--endpoints", endpoints, "--timeout-ms", "5000"]);
        if let Some(tls) = &self.tls {
            command
                .arg("--cacert")
                .arg(tls.path("ca"))
                .arg("--cert")
                .arg(tls.path("admin"))
                .arg("--key")
                .arg(tls.path("admin-key"));
        }
        command.output().unwrap()
    }

    /// `kv bench cluster` with 8 clients, `ops` writes of `value_size`
    /// bytes in all: a quick way to fill the leader's WAL (asserted to
    /// succeed).
    pub fn bench_writes(&self, ops: u64, value_size: usize) {
        let (ops, value_size) = (ops.to_string(), value_size.to_string());
        let out = self.kv(
            &[
                "bench",
                "cluster",
                "--clients",
                "8",
                "--ops",
                &ops,
                "--value-size",
                &value_size,
                "--json",
            ],
            &self.all_endpoints(),
        );
        assert!(
            out.status.success(),
            "kv bench cluster: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// How a client reaches this cluster's client listeners.
    pub fn transport(&self) -> kv_node::tls::Transport {
        self.tls
            .as_ref()
            .map_or_else(kv_node::tls::Transport::plaintext, ClusterTls::transport)
    }

    pub fn put(&self, key: &str, value: &str) -> Result<(), String> {
        let out = self.kv(&["put", key, value], &self.all_endpoints());
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    pub fn get(&self, key: &str) -> String {
        let out = self.kv(&["get", key], &self.all_endpoints());
        assert!(
            out.status.success(),
            "get {key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim_end().to_owned()
    }

    /// The first LSN node `id`'s WAL holds on disk (from its segment names).
    pub fn first_wal_lsn(&self, id: usize) -> u64 {
        std::fs::read_dir(self.dir.path().join(format!("node{id}")))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_prefix("wal-")?
                    .strip_suffix(".wal")?
                    .parse::<u64>()
                    .ok()
            })
            .min()
            .unwrap()
    }

    pub fn status_of(&self, id: usize) -> Option<pb::StatusReply> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let addr = self.addrs[id - 1];
            let replies = kv_node::client::cluster_client::status_all(
                &self.transport(),
                &[addr],
                Duration::from_millis(500),
            )
            .await;
            // Only member `id` of this cluster counts: another test's node
            // may listen on a port one of ours held before it stopped.
            replies
                .into_iter()
                .next()
                .and_then(|(_, r)| r.ok())
                .filter(|s| s.cluster_id == self.cluster_id && s.node_id == id as u64)
        })
    }

    pub fn wait_until(&self, limit: Duration, what: &str, mut done: impl FnMut(&Cluster) -> bool) {
        let start = Instant::now();
        while !done(self) {
            assert!(
                start.elapsed() < limit,
                "timed out waiting until {what}; logs in {}",
                self.dir.path().display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every node applied the same LSN with the same digest.
    /// The node that leads the highest term, once one does.
    pub fn wait_leader(&self) -> usize {
        let mut leader = 0;
        self.wait_until(Duration::from_secs(20), "a leader is elected", |c| {
            let best = c
                .ids()
                .filter_map(|id| c.status_of(id))
                .filter(|s| s.role == "leader")
                .max_by_key(|s| s.term);
            leader = best.map_or(0, |s| s.node_id as usize);
            leader != 0
        });
        leader
    }

    pub fn wait_converged(&self) -> (u64, u64) {
        self.wait_converged_among(&self.ids().collect::<Vec<_>>())
    }

    /// Waits until the nodes `ids` applied the same LSN with the same
    /// digest (the others may be down).
    pub fn wait_converged_among(&self, ids: &[usize]) -> (u64, u64) {
        let mut result = (0, 0);
        self.wait_until(
            Duration::from_secs(20),
            &format!("nodes {ids:?} converge"),
            |c| {
                let s: Vec<_> = ids.iter().filter_map(|id| c.status_of(*id)).collect();
                let converged = s.len() == ids.len()
                    && s.iter()
                        .all(|x| x.applied_lsn == s[0].applied_lsn && x.digest == s[0].digest)
                    && s[0].applied_lsn == s[0].last_lsn;
                if converged {
                    result = (s[0].applied_lsn, s[0].digest);
                }
                converged
            },
        );
        result
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for id in self.ids() {
            self.kill(id);
        }
    }
}
