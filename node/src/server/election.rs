//! Leader election (Raft's rules; see `REPLICATION.md`): who leads, campaigns,
//! votes, the leader's lease and its step-down when it loses its majority.
//!
//! - A follower that hears from no leader for its election timeout (random,
//!   between `election_timeout_ms` and twice that) becomes a candidate: it
//!   raises its term and votes for itself, both durable first, and asks
//!   every member for its vote.
//! - A node grants one vote per term, durably before replying, and only to a
//!   candidate whose log is at least as up to date as its own (last term,
//!   then last LSN). It grants none while it has heard from a leader within
//!   the minimum election timeout, or leads itself (so a partitioned node
//!   rejoining with a high term cannot depose a working leader, and the
//!   leader's lease below holds).
//! - A candidate with a majority leads: it appends an entry of its own term
//!   ([`crate::engine::Op::term_start`]) and serves no read until that entry
//!   is committed.
//! - Reads at the leader use a lease: a follower that acknowledged a request
//!   the leader sent at `s` votes for nobody until `s + election_timeout` on
//!   its own clock, so while a majority's acknowledgements are that fresh no
//!   other leader can exist. The lease is [`LEASE_FRACTION`] of that window,
//!   measured on the node's monotonic [`super::env::Clock`]: short enough to
//!   hold while clock rates differ from true time by up to
//!   [`super::env::MAX_CLOCK_DRIFT`].
//! - A leader that has heard from no majority for an election timeout steps
//!   down (check quorum), so a partitioned minority stops acknowledging.
//! - Leadership transfer (`kv transfer-leader`, Raft's section 3.10): the
//!   leader stops taking writes and serving reads, waits until the target's
//!   log matches its own, sends it `TimeoutNow` and steps down. The target
//!   campaigns at once, and its vote requests say so (`transfer`), so
//!   voters need not wait out the election timeout since they last heard
//!   the leader. That breaks the promise the lease rests on, which is why
//!   the leader gives up its lease before it sends `TimeoutNow`. Votes stay
//!   one per term, durable, and for logs at least as up to date.
//!
//! With a fixed leader (`leader = N` in the configuration) none of this
//! runs: the configured node leads in term 1 until a higher term deposes it.
//!
//! It does not decide log matching or the commit rule (`kv_cluster`), nor
//! ship records (`super::Node::replicate`).

use std::sync::Arc;
use std::time::Duration;

use kv_proto::v1 as pb;
use pb::replication_client::ReplicationClient;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::Status;

use std::sync::atomic::{AtomicU64, Ordering};

use super::env::MAX_CLOCK_DRIFT;
use super::term::TermState;
use super::{Node, lock};
use crate::engine::{EngineError, Op};

/// The lease, as a fraction of the election timeout: with every clock's
/// rate within `1 ± d` of true time (`d` = [`MAX_CLOCK_DRIFT`]), a lease of
/// `(1 - d) / (1 + d)` of the timeout on the leader's clock ends, in true
/// time, no later than the timeout on any follower's clock, after which a
/// follower may vote for someone else.
pub const LEASE_FRACTION: f64 = (1.0 - MAX_CLOCK_DRIFT) / (1.0 + MAX_CLOCK_DRIFT);

/// A node's role in its current term.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Follows `leader` (if known).
    Follower,
    /// Campaigns for votes in its term.
    Candidate,
    /// Leads its term.
    Leader,
}

impl Role {
    /// As `kv status` shows it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Follower => "follower",
            Role::Candidate => "candidate",
            Role::Leader => "leader",
        }
    }
}

/// Election state, under one lock. The term itself is `Node::term`.
#[derive(Debug)]
pub(super) struct ElectionState {
    pub role: Role,
    /// The leader of the current term, if known.
    pub leader: Option<u64>,
    /// Whom this node voted for in the current term (mirrors `TERM`).
    pub voted_for: Option<u64>,
    /// When this node last heard from a leader of its term (or started).
    /// No vote is granted within the minimum election timeout of it.
    pub heard: Instant,
    /// When the election timer was last reset.
    pub timer_start: Instant,
    /// This round's election timeout (randomized).
    pub timeout: Duration,
    /// Leader only: when it took office (check quorum before any ack).
    pub leading_since: Instant,
    /// Deterministic per seed: draws the randomized timeouts.
    pub rng: u64,
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl ElectionState {
    pub fn new(
        role: Role,
        leader: Option<u64>,
        voted_for: Option<u64>,
        seed: u64,
        now: Instant,
    ) -> Self {
        ElectionState {
            role,
            leader,
            voted_for,
            heard: now,
            timer_start: now,
            timeout: Duration::ZERO,
            leading_since: now,
            rng: seed,
        }
    }

    /// Restarts the election timer with a fresh random timeout in
    /// `[base, 2 * base)`, from `now`.
    pub fn reset_timer(&mut self, base: Duration, now: Instant) {
        let base_ms = base.as_millis().max(1) as u64;
        let jitter = splitmix64(&mut self.rng) % base_ms;
        self.timeout = Duration::from_millis(base_ms + jitter);
        self.timer_start = now;
    }
}

/// Clears a leadership transfer mark when the transfer ends, however.
struct ClearOnDrop<'a>(&'a AtomicU64);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(0, Ordering::Release);
    }
}

impl Node {
    fn election_timeout(&self) -> Duration {
        Duration::from_millis(self.config.election_timeout_ms)
    }

    fn majority(&self) -> usize {
        self.config.members.len() / 2 + 1
    }

    /// This node's role now.
    pub fn role(&self) -> Role {
        lock(&self.election).role
    }

    /// True while this node leads `term` (replicators of an older term stop).
    pub(super) fn leads_in(&self, term: u64) -> bool {
        self.term() == term && self.role() == Role::Leader
    }

    /// Persists `state` durably (the caller holds `term_lock`), then
    /// publishes its term.
    pub(super) async fn persist_term(&self, state: TermState) -> Result<(), EngineError> {
        let storage = self.engine.storage();
        let dir = self.config.data_dir.clone();
        self.env
            .offload
            .run(move || super::term::persist(&*storage, &dir, state))
            .await
            .map_err(super::join_engine_error)??;
        self.term
            .store(state.term, std::sync::atomic::Ordering::Release);
        self.engine.set_term(state.term);
        Ok(())
    }

    /// The election timer (elections on): campaigns when no leader was heard
    /// for the timeout, and steps a leader down that lost its majority.
    pub(super) async fn run_elections(self: Arc<Self>) {
        let tick = Duration::from_millis((self.config.election_timeout_ms / 10).max(1));
        lock(&self.election).reset_timer(self.election_timeout(), self.env.clock.now());
        let mut stopping = self.stopping.subscribe();
        loop {
            tokio::select! {
                biased;
                _ = stopping.wait_for(|s| *s) => return,
                () = tokio::time::sleep(tick) => {}
            }
            let (role, due) = {
                let e = lock(&self.election);
                (e.role, self.env.clock.since(e.timer_start) >= e.timeout)
            };
            match role {
                Role::Leader => self.check_quorum(),
                Role::Follower | Role::Candidate if due => {
                    // Reset first, so a slow campaign is not started twice;
                    // a campaign that fails leaves the next one to the timer.
                    lock(&self.election).reset_timer(self.election_timeout(), self.env.clock.now());
                    tokio::spawn(self.clone().campaign(false));
                }
                _ => {}
            }
        }
    }

    /// Leader: steps down if no majority acknowledged anything it sent
    /// within an election timeout.
    fn check_quorum(&self) {
        let now = self.env.clock.now();
        let timeout = self.election_timeout();
        let fresh = self
            .majority_acked_sent()
            .unwrap_or_else(|| lock(&self.election).leading_since);
        if now.duration_since(fresh) > timeout {
            let mut e = lock(&self.election);
            if e.role == Role::Leader {
                tracing::warn!(
                    term = self.term(),
                    "no majority heard within the election timeout: stepping down"
                );
                e.role = Role::Follower;
                e.leader = None;
                e.reset_timer(timeout, now);
            }
        }
    }

    /// The send time of the newest request a majority (this leader
    /// included) has acknowledged in this term; `None` if none yet.
    fn majority_acked_sent(&self) -> Option<Instant> {
        let need = self.majority() - 1;
        if need == 0 {
            return Some(self.env.clock.now());
        }
        let mut sent: Vec<Instant> = lock(&self.followers)
            .values()
            .filter_map(|f| f.acked_sent)
            .collect();
        sent.sort_unstable_by(|a, b| b.cmp(a));
        sent.get(need - 1).copied()
    }

    /// Leader: true while its lease says no other leader can exist.
    pub(super) fn lease_valid(&self) -> bool {
        let lease = self.election_timeout().mul_f64(LEASE_FRACTION);
        self.majority_acked_sent()
            .is_some_and(|sent| self.env.clock.now() < sent + lease)
    }

    /// Becomes a candidate in the next term and asks every member for its
    /// vote; leads if a majority grants it. `transfer`: the leader handed
    /// over to this node (`TimeoutNow`).
    async fn campaign(self: Arc<Self>, transfer: bool) {
        let me = self.config.node_id;
        let term = {
            let _one = self.term_lock.lock().await;
            if self.role() == Role::Leader {
                return;
            }
            let term = self.term() + 1;
            let state = TermState {
                term,
                voted_for: Some(me),
            };
            if let Err(e) = self.persist_term(state).await {
                tracing::error!(error = %e, "cannot persist a new term; not campaigning");
                return;
            }
            let mut e = lock(&self.election);
            e.role = Role::Candidate;
            e.leader = None;
            e.voted_for = Some(me);
            term
        };
        if transfer {
            tracing::info!(term, "the leader handed over: campaigning");
        } else {
            tracing::info!(term, "election timeout: campaigning");
        }
        let last_lsn = self.engine.last_lsn();
        let request = pb::VoteRequest {
            from: Some(self.sender()),
            last_lsn,
            last_term: self.engine.term_at(last_lsn).unwrap_or(0),
            transfer,
        };
        let mut votes = 1;
        if votes >= self.majority() {
            self.become_leader(term).await;
            return;
        }
        let (tx, mut rx) = mpsc::channel(self.config.members.len());
        for peer in self.config.members.iter().filter(|m| m.id != me) {
            let (node, tx, request, addr) = (self.clone(), tx.clone(), request.clone(), peer.addr);
            tokio::spawn(async move {
                let _ = tx.send(node.ask_for_vote(addr, request).await).await;
            });
        }
        drop(tx);
        while let Some(reply) = rx.recv().await {
            let Ok(reply) = reply else { continue };
            if reply.term > term {
                let _one = self.term_lock.lock().await;
                if reply.term > self.term() {
                    let _ = self.adopt_term_locked(reply.term).await;
                }
                return;
            }
            if reply.granted && reply.term == term {
                votes += 1;
                if votes >= self.majority() {
                    self.become_leader(term).await;
                    return;
                }
            }
        }
    }

    /// A replication client to the member at `addr`, for one short call
    /// (every call on it has the RPC timeout as its deadline).
    async fn peer(
        &self,
        addr: std::net::SocketAddr,
    ) -> anyhow::Result<ReplicationClient<tonic::transport::Channel>> {
        let rpc = Duration::from_millis(self.config.rpc_timeout_ms);
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(rpc)
            .timeout(rpc);
        let channel = tokio::time::timeout(rpc, self.env.dialer.dial(endpoint)).await??;
        Ok(ReplicationClient::new(channel))
    }

    async fn ask_for_vote(
        &self,
        addr: std::net::SocketAddr,
        request: pb::VoteRequest,
    ) -> anyhow::Result<pb::VoteReply> {
        let rpc = Duration::from_millis(self.config.rpc_timeout_ms);
        let mut peer = self.peer(addr).await?;
        let reply = tokio::time::timeout(rpc, peer.request_vote(request)).await??;
        Ok(reply.into_inner())
    }

    /// Takes office in `term` if still its candidate: resets every
    /// follower's progress, appends the term's first entry, starts the
    /// replicators.
    async fn become_leader(self: Arc<Self>, term: u64) {
        {
            let mut e = lock(&self.election);
            if e.role != Role::Candidate || self.term() != term {
                return;
            }
            e.role = Role::Leader;
            e.leader = Some(self.config.node_id);
            e.leading_since = self.env.clock.now();
        }
        // Records cached while leading an earlier term may since have been
        // replaced in the log (as a follower): ship only from this term's.
        lock(&self.recent).clear();
        let last = self.engine.last_lsn();
        for f in lock(&self.followers).values_mut() {
            f.progress = kv_cluster::Progress::new(last);
            f.connected = false;
            f.acked_sent = None;
        }
        let lsn = match self.engine.submit_term_start() {
            Ok(lsn) => lsn,
            Err(e) => {
                tracing::error!(error = %e, "cannot append the term's first entry; stepping down");
                lock(&self.election).role = Role::Follower;
                return;
            }
        };
        self.remember(lsn, term, Op::term_start());
        self.read_barrier
            .store(lsn, std::sync::atomic::Ordering::Release);
        tracing::info!(term, lsn, "won the election: leading");
        for peer in self
            .config
            .members
            .iter()
            .filter(|m| m.id != self.config.node_id)
        {
            tokio::spawn(self.clone().replicate(peer.clone(), term));
        }
        // The entry commits like any write: once a majority has it durable.
        self.flusher.durable(lsn).await;
        if let Err(e) = self.advance_commit() {
            tracing::error!(error = %e, "commit failed");
        }
    }

    /// Refuses a write or a read while this leader hands leadership over:
    /// "not leader", naming the target, so clients go there and retry.
    pub(super) fn refuse_while_transferring(&self) -> Result<(), Status> {
        let target = self.transferring_to.load(Ordering::Acquire);
        if target == 0 {
            return Ok(());
        }
        Err(self.redirect(target, |addr| {
            format!("not leader: handing leadership over to node {target} at {addr}; retry")
        }))
    }

    /// Leader: hands leadership over to `target` (see the module docs).
    /// Returns the term this node led once the target has started its
    /// campaign and this node has stepped down. If the target does not
    /// catch up within the write timeout, or refuses to campaign, this node
    /// keeps leading. If `TimeoutNow` gets no answer, the target may be
    /// campaigning: this node steps down all the same (an error says so).
    pub(super) async fn transfer_leadership(&self, target: u64) -> Result<u64, Status> {
        if !self.config.elections() {
            return Err(Status::failed_precondition(
                "elections are off (a fixed leader is configured): leadership cannot move",
            ));
        }
        if !self.leads() {
            return Err(self.not_leader());
        }
        let term = self.term();
        if target == self.config.node_id {
            return Ok(term);
        }
        let Some(addr) = self.config.addr_of(target) else {
            return Err(Status::invalid_argument(format!(
                "node {target} is not a member of this cluster"
            )));
        };
        if let Err(other) =
            self.transferring_to
                .compare_exchange(0, target, Ordering::AcqRel, Ordering::Acquire)
        {
            return Err(Status::aborted(format!(
                "a transfer to node {other} is already under way"
            )));
        }
        // From here on no write is appended and no read served here; the
        // mark is cleared however this ends (the caller may also give up).
        let _clear = ClearOnDrop(&self.transferring_to);
        tracing::info!(term, target, "handing leadership over");
        let timeout = Duration::from_millis(self.config.write_timeout_ms);
        let deadline = tokio::time::Instant::now() + timeout;
        let poll = Duration::from_millis((self.config.heartbeat_ms / 4).clamp(1, 5));
        loop {
            if !self.leads_in(term) {
                return Err(Status::aborted(format!(
                    "this node stopped leading term {term} during the transfer"
                )));
            }
            let last = self.engine.last_lsn();
            let matched = self.progress_of(target).map_or(0, |p| p.match_lsn);
            if matched >= last {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::deadline_exceeded(format!(
                    "node {target} did not catch up within {} ms (it holds LSN {matched} of {last}); \
                     this node still leads",
                    self.config.write_timeout_ms
                )));
            }
            tokio::time::sleep(poll).await;
        }
        let told = self.send_timeout_now(addr, term).await;
        if let Ok(reply) = &told
            && !reply.started
        {
            return Err(Status::aborted(format!(
                "node {target} did not campaign: {}; this node still leads",
                reply.reason
            )));
        }
        // The target campaigns, or may (a lost reply): its voters need not
        // wait out the election timeout the lease relies on, so this node
        // stops leading either way.
        {
            let mut e = lock(&self.election);
            if self.term() == term && e.role == Role::Leader {
                e.role = Role::Follower;
                e.leader = None;
                e.reset_timer(self.election_timeout(), self.env.clock.now());
            }
        }
        match told {
            Ok(_) => {
                tracing::info!(term, target, "handed leadership over: stepped down");
                Ok(term)
            }
            Err(e) => {
                tracing::warn!(term, target, error = %e, "TimeoutNow unconfirmed: stepped down");
                Err(Status::unavailable(format!(
                    "could not confirm that node {target} campaigns ({e:#}); this node \
                     stepped down anyway (the target may be campaigning), so an election follows"
                )))
            }
        }
    }

    async fn send_timeout_now(
        &self,
        addr: std::net::SocketAddr,
        term: u64,
    ) -> anyhow::Result<pb::TimeoutNowReply> {
        let rpc = Duration::from_millis(self.config.rpc_timeout_ms);
        let mut peer = self.peer(addr).await?;
        let request = pb::TimeoutNowRequest {
            from: Some(self.sender_in(term)),
        };
        let reply = tokio::time::timeout(rpc, peer.timeout_now(request)).await??;
        Ok(reply.into_inner())
    }

    /// The `TimeoutNow` handler: campaigns at once if the sender leads our
    /// term (a leadership transfer).
    pub(super) async fn handle_timeout_now(
        self: Arc<Self>,
        req: pb::TimeoutNowRequest,
    ) -> Result<pb::TimeoutNowReply, Status> {
        let from = self.check_peer(req.from, "TimeoutNow")?;
        let reply = |term: u64, started: bool, reason: String| pb::TimeoutNowReply {
            term,
            started,
            reason,
        };
        if !self.config.elections() {
            return Ok(reply(self.term(), false, "elections are off".into()));
        }
        {
            let mut e = lock(&self.election);
            let term = self.term();
            if from.term != term || e.leader != Some(from.node_id) || e.role != Role::Follower {
                return Ok(reply(
                    term,
                    false,
                    format!(
                        "node {} does not lead term {term} here (this node is a {} in term {term})",
                        from.node_id,
                        e.role.name()
                    ),
                ));
            }
            // The timer must not start a second campaign on top of this one.
            e.reset_timer(self.election_timeout(), self.env.clock.now());
        }
        let term = self.term();
        tokio::spawn(self.campaign(true));
        Ok(reply(term, true, String::new()))
    }

    /// The vote handler (`RequestVote`).
    pub(super) async fn handle_vote(&self, req: pb::VoteRequest) -> Result<pb::VoteReply, Status> {
        let from = self.check_peer(req.from, "vote request")?;
        let candidate = from.node_id;
        let _one = self.term_lock.lock().await;
        let ours = self.term();
        let refuse = |term: u64, reason: &str| pb::VoteReply {
            term,
            granted: false,
            reason: reason.to_owned(),
        };
        if !self.config.elections() {
            return Ok(refuse(ours, "elections are off (fixed leader)"));
        }
        if from.term < ours {
            return Ok(refuse(ours, "stale term"));
        }
        if !req.transfer {
            let e = lock(&self.election);
            if e.role == Role::Leader || self.env.clock.since(e.heard) < self.election_timeout() {
                // Neither adopt its term nor vote: a leader is (or was just)
                // active, and its lease relies on this. (A transfer's
                // candidate was sent by that leader, which gave up its
                // lease first.)
                return Ok(refuse(ours, "a leader is active"));
            }
        }
        if from.term > ours {
            self.adopt_term_locked(from.term)
                .await
                .map_err(super::engine_status)?;
        }
        let term = self.term();
        let last_lsn = self.engine.last_lsn();
        let last_term = self.engine.term_at(last_lsn).unwrap_or(0);
        if (req.last_term, req.last_lsn) < (last_term, last_lsn) {
            return Ok(refuse(term, "the candidate's log is behind ours"));
        }
        if let Some(v) = lock(&self.election).voted_for.filter(|v| *v != candidate) {
            return Ok(refuse(term, &format!("already voted for node {v}")));
        }
        // Durable before it is granted: a crash must not let us vote twice.
        self.persist_term(TermState {
            term,
            voted_for: Some(candidate),
        })
        .await
        .map_err(super::engine_status)?;
        let mut e = lock(&self.election);
        e.voted_for = Some(candidate);
        e.reset_timer(self.election_timeout(), self.env.clock.now());
        tracing::info!(
            term,
            candidate,
            candidate_last = ?(req.last_term, req.last_lsn),
            ours = ?(last_term, last_lsn),
            "vote granted"
        );
        Ok(pb::VoteReply {
            term,
            granted: true,
            reason: String::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Engine;
    use crate::server::config::{Ack, Member, NodeConfig};
    use crate::server::env::{Clock, NodeEnv, Offload, TcpDialer};
    use crate::storage::{SimOptions, SimStorage};

    fn config() -> NodeConfig {
        let members = (1..=3)
            .map(|id| Member {
                id,
                addr: format!("127.0.0.1:{}", 1000 + id).parse().unwrap(),
            })
            .collect();
        NodeConfig {
            cluster_id: "c".into(),
            node_id: 1,
            listen: "127.0.0.1:1001".parse().unwrap(),
            data_dir: "/kv".into(),
            leader: None,
            members,
            ack: Ack::Quorum,
            write_timeout_ms: 1000,
            rpc_timeout_ms: 200,
            heartbeat_ms: 20,
            election_timeout_ms: 60,
            batch_records_max: 16,
            inflight_bytes_max: 1 << 20,
            key_bytes_max: 64,
            value_bytes_max: 64,
            snapshot_wal_bytes: 0,
            segment_bytes_max: 1 << 20,
        }
    }

    fn start(disk: &SimStorage) -> Arc<Node> {
        let config = config();
        let engine = Engine::open(Arc::new(disk.clone()), config.engine_config()).unwrap();
        let env = NodeEnv {
            dialer: Arc::new(TcpDialer),
            offload: Offload::Inline,
            clock: Clock::default(),
            sync_latency: Duration::ZERO,
            seed: 7,
        };
        Node::with_env(config, Arc::new(engine), env).unwrap()
    }

    /// One follower (with the node itself, a majority of 3) acknowledged a
    /// request sent just now: a fresh lease.
    fn acknowledged_now(node: &Node) {
        lock(&node.followers)
            .values_mut()
            .next()
            .unwrap()
            .acked_sent = Some(Instant::now());
    }

    fn ask(candidate: u64, term: u64) -> pb::VoteRequest {
        pb::VoteRequest {
            from: Some(pb::Sender {
                cluster_id: "c".into(),
                node_id: candidate,
                term,
            }),
            last_lsn: 0,
            last_term: 0,
            transfer: false,
        }
    }

    /// A vote is durable before it is granted: after a power loss right
    /// after voting, the node refuses a second candidate in the same term.
    #[tokio::test(flavor = "current_thread")]
    async fn a_vote_survives_a_power_loss_right_after_it_was_granted() {
        let disk = SimStorage::new(SimOptions::default());
        let node = start(&disk);
        // Wait out the start-up window in which no vote is granted.
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert!(node.handle_vote(ask(2, 5)).await.unwrap().granted);
        drop(node);
        disk.crash();
        let node = start(&disk);
        tokio::time::sleep(Duration::from_millis(80)).await;
        let again = node.handle_vote(ask(3, 5)).await.unwrap();
        assert!(!again.granted, "voted twice in term 5: {again:?}");
        assert_eq!(node.status().voted_for, 2);
        // The same candidate asking again is fine; a later term is open.
        assert!(node.handle_vote(ask(2, 5)).await.unwrap().granted);
        assert!(node.handle_vote(ask(3, 6)).await.unwrap().granted);
    }

    /// A leader serves a read only while a majority's acknowledgements are
    /// fresh (its lease); without them it refuses, however sure it is that
    /// it leads.
    #[tokio::test(flavor = "current_thread")]
    async fn a_leader_without_a_fresh_majority_serves_no_read() {
        let disk = SimStorage::new(SimOptions::default());
        let mut config = config();
        config.write_timeout_ms = 100;
        let engine = Engine::open(Arc::new(disk.clone()), config.engine_config()).unwrap();
        let env = NodeEnv {
            dialer: Arc::new(TcpDialer),
            offload: Offload::Inline,
            clock: Clock::default(),
            sync_latency: Duration::ZERO,
            seed: 7,
        };
        let node = Node::with_env(config, Arc::new(engine), env).unwrap();
        // It believes it leads (as a partitioned old leader would), and its
        // term's first entry is committed: only the lease is missing.
        lock(&node.election).role = Role::Leader;
        let refused = node.confirm_read().await;
        assert!(refused.is_err(), "served a read with no lease");
        acknowledged_now(&node);
        node.confirm_read().await.unwrap();
        // The lease runs out within the election timeout.
        tokio::time::sleep(Duration::from_millis(70)).await;
        assert!(
            node.confirm_read().await.is_err(),
            "the lease outlived its window"
        );
    }

    /// No vote for a candidate whose log is behind ours.
    #[tokio::test(flavor = "current_thread")]
    async fn no_vote_for_a_shorter_log() {
        let disk = SimStorage::new(SimOptions::default());
        let node = start(&disk);
        node.engine
            .append_records(vec![crate::engine::Record {
                lsn: 1,
                term: 1,
                op: Op::Put {
                    key: b"k".to_vec(),
                    value: b"v".to_vec(),
                },
            }])
            .unwrap();
        tokio::time::sleep(Duration::from_millis(80)).await;
        let reply = node.handle_vote(ask(2, 5)).await.unwrap();
        assert!(!reply.granted, "granted to an empty log: {reply:?}");
        let mut longer = ask(3, 5);
        longer.last_lsn = 1;
        longer.last_term = 1;
        assert!(node.handle_vote(longer).await.unwrap().granted);
    }

    /// A candidate the leader handed over to gets a vote although the
    /// voter heard from a leader just now; any other candidate does not.
    /// Votes stay one per term.
    #[tokio::test(flavor = "current_thread")]
    async fn a_transfer_vote_is_not_held_back_by_a_recent_leader() {
        let disk = SimStorage::new(SimOptions::default());
        let node = start(&disk);
        // Just started, which counts as having heard a leader just now.
        let refused = node.handle_vote(ask(2, 5)).await.unwrap();
        assert!(!refused.granted, "{refused:?}");
        let mut transfer = ask(2, 5);
        transfer.transfer = true;
        assert!(node.handle_vote(transfer).await.unwrap().granted);
        let mut other = ask(3, 5);
        other.transfer = true;
        let again = node.handle_vote(other).await.unwrap();
        assert!(!again.granted, "voted twice in term 5: {again:?}");
    }

    /// While it hands leadership over, a leader takes no write and serves
    /// no read, even with a fresh lease, and names the target to clients.
    #[tokio::test(flavor = "current_thread")]
    async fn a_leader_handing_over_refuses_reads_and_writes() {
        let disk = SimStorage::new(SimOptions::default());
        let node = start(&disk);
        lock(&node.election).role = Role::Leader;
        acknowledged_now(&node);
        node.confirm_read().await.unwrap();
        node.transferring_to.store(2, Ordering::Release);
        let read = node.confirm_read().await.unwrap_err();
        assert_eq!(read.code(), tonic::Code::FailedPrecondition, "{read:?}");
        assert_eq!(
            read.metadata().get(super::super::LEADER_METADATA).unwrap(),
            "127.0.0.1:1002"
        );
        let last = node.engine.last_lsn();
        let put = Op::Put {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
        };
        let write = node
            .write(put, kv_cluster::AckLevel::Quorum)
            .await
            .unwrap_err();
        assert_eq!(write.code(), tonic::Code::FailedPrecondition, "{write:?}");
        assert_eq!(node.engine.last_lsn(), last, "a refused write was appended");
        node.transferring_to.store(0, Ordering::Release);
        node.confirm_read().await.unwrap();
    }

    /// `TimeoutNow` from a node that does not lead our term starts no
    /// campaign.
    #[tokio::test(flavor = "current_thread")]
    async fn timeout_now_from_a_non_leader_starts_no_campaign() {
        let disk = SimStorage::new(SimOptions::default());
        let node = start(&disk);
        let term = node.term();
        let request = pb::TimeoutNowRequest {
            from: Some(pb::Sender {
                cluster_id: "c".into(),
                node_id: 2,
                term,
            }),
        };
        let reply = node.clone().handle_timeout_now(request).await.unwrap();
        assert!(!reply.started, "{reply:?}");
        tokio::task::yield_now().await;
        assert_eq!(node.term(), term);
        assert_eq!(node.role(), Role::Follower);
    }

    /// A leader whose `TimeoutNow` goes unanswered steps down anyway: the
    /// target may be campaigning with votes that skip the wait its lease
    /// relies on. (Here nothing listens at node 2's address.)
    #[tokio::test(flavor = "current_thread")]
    async fn an_unconfirmed_handover_still_steps_down() {
        let disk = SimStorage::new(SimOptions::default());
        let node = start(&disk);
        lock(&node.election).role = Role::Leader;
        let last = node.engine.last_lsn();
        lock(&node.followers)
            .get_mut(&2)
            .unwrap()
            .progress
            .match_lsn = last;
        let err = node.transfer_leadership(2).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
        assert_eq!(node.role(), Role::Follower);
        acknowledged_now(&node);
        assert!(
            node.confirm_read().await.is_err(),
            "served a read after handing over"
        );
    }
}
