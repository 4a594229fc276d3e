//! A stranger on the simulated network, and the identity check it runs
//! into.
//!
//! The simulation keeps plaintext (no TLS inside turmoil), so the node's
//! peer-identity seam gets [`SimPeerAuth`]: a connection is member `id` if
//! it comes from member `id`'s simulated address, and nobody otherwise —
//! the role a TLS certificate plays in a real cluster. The stranger host
//! ([`stranger`]) sends forged replication messages the whole chaos phase:
//! vote requests, appends (a record that would truncate and replace the
//! log) and `TimeoutNow`, each claiming to come from a member, in a term
//! no real node reaches ([`FORGED_TERM`]). Every one must be refused with
//! `PERMISSION_DENIED`; one answered otherwise is a violation
//! ([`StrangerTally::answered`]), and so is any node reaching the forged
//! term (checked by the harness after every step).
//!
//! Not here: TLS itself, certificates, or a stranger on a member's own
//! address (a member that lies is a Byzantine fault, out of scope).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use kv_node::server::auth::{Caller, PeerAuth, PeerConn};
use kv_node::server::env::Dialer;
use kv_proto::v1 as pb;
use pb::replication_client::ReplicationClient;

use crate::net::SimDialer;
use crate::rng::Rng;

/// The term of every forged message: far above any a run reaches.
pub const FORGED_TERM: u64 = 1 << 40;

/// Peer identity by simulated address: each member's host is that member.
#[derive(Debug, Clone)]
pub struct SimPeerAuth {
    members: Vec<(IpAddr, u64)>,
}

impl SimPeerAuth {
    /// Member `id` is at `addrs[id - 1]`.
    pub fn new(addrs: Vec<IpAddr>) -> SimPeerAuth {
        SimPeerAuth {
            members: addrs.into_iter().zip(1..).collect(),
        }
    }
}

impl PeerAuth for SimPeerAuth {
    fn identify(&self, conn: &PeerConn) -> Result<Caller, tonic::Status> {
        let ip = conn
            .remote
            .map(|a| a.ip())
            .ok_or_else(|| tonic::Status::permission_denied("no caller address"))?;
        self.members
            .iter()
            .find(|(addr, _)| *addr == ip)
            .map(|(_, id)| Caller::Member(*id))
            .ok_or_else(|| tonic::Status::permission_denied(format!("{ip} is no member's address")))
    }
}

/// What the stranger saw.
#[derive(Debug, Default)]
pub struct StrangerTally {
    /// Forged messages refused with `PERMISSION_DENIED`.
    pub refused: AtomicU64,
    /// The first forged message answered in any other way than a
    /// refusal of permission (a violation), if one was.
    pub answered: Mutex<Option<String>>,
}

impl StrangerTally {
    fn answered(&self, what: String) {
        self.answered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(what);
    }

    /// The violation seen, if any.
    pub fn violation(&self) -> Option<String> {
        self.answered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

fn forged(claimed: u64, to: u64) -> Option<pb::Sender> {
    Some(pb::Sender {
        cluster_id: "sim".into(),
        node_id: claimed,
        term: FORGED_TERM,
        to,
    })
}

/// One forged message to `target`, claiming to be from `claimed`; `kind`
/// picks vote request, append or `TimeoutNow`.
async fn send_one(
    (addr, target): (SocketAddr, u64),
    claimed: u64,
    kind: u64,
) -> Result<String, tonic::Status> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| tonic::Status::internal(e.to_string()))?
        .connect_timeout(Duration::from_millis(300))
        .timeout(Duration::from_millis(500));
    let channel = SimDialer::default()
        .dial(endpoint)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut client = ReplicationClient::new(channel);
    match kind {
        0 => {
            let reply = client
                .request_vote(pb::VoteRequest {
                    from: forged(claimed, target),
                    last_lsn: u64::MAX / 2,
                    last_term: FORGED_TERM,
                    transfer: true,
                })
                .await?;
            Ok(format!("vote request answered {:?}", reply.into_inner()))
        }
        1 => {
            let record = kv_node::engine::Record {
                lsn: 1,
                term: FORGED_TERM,
                op: kv_node::engine::Op::Put {
                    key: b"forged".to_vec(),
                    value: b"by a stranger".to_vec(),
                },
            };
            let request = pb::AppendRequest {
                from: forged(claimed, target),
                prev_lsn: 0,
                prev_term: 0,
                records: vec![kv_node::server::convert::to_proto(&record)],
                commit_lsn: 1,
                ..Default::default()
            };
            let mut acks = client
                .append(tokio_stream::iter(vec![request]))
                .await?
                .into_inner();
            match acks.message().await? {
                Some(ack) => Ok(format!("append acknowledged {ack:?}")),
                None => Err(tonic::Status::unavailable("the stream ended unanswered")),
            }
        }
        _ => {
            let reply = client
                .timeout_now(pb::TimeoutNowRequest {
                    from: forged(claimed, target),
                })
                .await?;
            Ok(format!("TimeoutNow answered {:?}", reply.into_inner()))
        }
    }
}

/// The stranger's workload: until `until` (simulated time since the
/// start), every 50-300 ms one forged message to a random member,
/// claiming to be another random member.
pub async fn stranger(
    seed: u64,
    nodes: usize,
    port: u16,
    until: Duration,
    tally: Arc<StrangerTally>,
) -> turmoil::Result {
    let mut rng = Rng::new(seed);
    while turmoil::sim_elapsed().unwrap_or_default() < until {
        tokio::time::sleep(Duration::from_millis(50 + rng.below(251))).await;
        let target = 1 + rng.below(nodes as u64);
        // Another member than the target (a node refuses itself anyway).
        let claimed = (target + rng.below(nodes as u64 - 1)) % nodes as u64 + 1;
        let kind = rng.below(3);
        let addr = SocketAddr::new(turmoil::lookup(format!("n{target}")), port);
        match send_one((addr, target), claimed, kind).await {
            Ok(answer) => tally.answered(format!(
                "a stranger claiming to be node {claimed} was heard by node {target}: {answer}"
            )),
            Err(status) if status.code() == tonic::Code::PermissionDenied => {
                tally.refused.fetch_add(1, Ordering::Relaxed);
            }
            // Unreachable (cut off, down) or a deadline: nothing learned.
            Err(_) => {}
        }
    }
    Ok(())
}
