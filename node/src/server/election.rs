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

/// Steps the leader of `term` down when dropped, unless disarmed: armed
/// just before a leadership transfer sends `TimeoutNow`, so no way out of
/// the transfer (a reply, an error, the caller giving up) leaves this node
/// leading while the target may campaign.
struct StepDownOnDrop<'a> {
    node: &'a Node,
    term: u64,
    armed: bool,
}

impl StepDownOnDrop<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for StepDownOnDrop<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut e = lock(&self.node.election);
        if self.node.term() == self.term && e.role == Role::Leader {
            self.node.step_down(&mut e);
        }
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

    /// True while this node leads `term` (replicators of an older term
    /// stop). Term and role are read under one lock: both change only
    /// under it ([`Node::publish_term`]), so the pair is never torn.
    pub(super) fn leads_in(&self, term: u64) -> bool {
        let e = lock(&self.election);
        e.role == Role::Leader && self.term() == term
    }

    /// Writes `state` to `TERM` durably (the caller holds `term_lock`). It
    /// is not acted on until [`Node::publish_term`].
    pub(super) async fn persist_term(&self, state: TermState) -> Result<(), EngineError> {
        let storage = self.engine.storage();
        let dir = self.config.data_dir.clone();
        self.env
            .offload
            .run(move || super::term::persist(&*storage, &dir, state))
            .await
            .map_err(super::join_engine_error)?
    }

    /// Makes a persisted term current: the node's term and the term the
    /// engine stamps on new records. Taking the election state by `&mut`
    /// proves the caller holds its lock, so whoever reads role and term
    /// under that lock sees them change together; a caller that leaves the
    /// leader role for a new term demotes the role first.
    pub(super) fn publish_term(&self, e: &mut ElectionState, term: u64) {
        assert!(
            term >= self.term(),
            "the term goes back from {} to {term}",
            self.term()
        );
        assert!(
            e.role != Role::Leader || term == self.term(),
            "a leader of term {} would lead term {term} unelected",
            self.term()
        );
        self.term.store(term, Ordering::Release);
        self.engine.set_term(term);
    }

    /// Leaves the leader (or candidate) role, with the caller holding the
    /// election lock: forgets the leader and every follower's progress (it
    /// described this node's leadership, and must never count towards a
    /// commit again) and restarts the election timer.
    pub(super) fn step_down(&self, e: &mut ElectionState) {
        e.role = Role::Follower;
        e.leader = None;
        e.reset_timer(self.election_timeout(), self.env.clock.now());
        self.forget_followers();
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
                    self.spawn(self.clone().campaign(false));
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
                self.step_down(&mut e);
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
            if e.role == Role::Leader {
                // Won the previous campaign meanwhile (`become_leader`
                // does not take `term_lock`): keep leading that term. The
                // `TERM` file now holds a higher term than the node acts
                // in, which only makes a restart begin in it.
                return;
            }
            e.role = Role::Candidate;
            e.leader = None;
            e.voted_for = Some(me);
            self.publish_term(&mut e, term);
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
            let (node, tx, request, addr) =
                (self.clone(), tx.clone(), request.clone(), peer.peer());
            self.spawn(async move {
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
        let endpoint = self.peer_endpoint(addr)?.timeout(rpc);
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
        let lsn = {
            let mut e = lock(&self.election);
            if e.role != Role::Candidate || self.term() != term {
                return;
            }
            e.role = Role::Leader;
            self.metrics.leader_changes.increment(1);
            e.leader = Some(self.config.node_id);
            e.leading_since = self.env.clock.now();
            // Records cached while leading an earlier term may since have
            // been replaced in the log (as a follower): ship only from this
            // term's. Progress starts afresh (it was forgotten on stepping
            // down; a candidate's is empty anyway).
            lock(&self.recent).clear();
            self.forget_followers();
            // The term's first entry, appended under the same lock as the
            // role change: stamped with this term, whatever comes next.
            match self.engine.submit_term_start() {
                Ok(lsn) => lsn,
                Err(error) => {
                    tracing::error!(%error, "cannot append the term's first entry; stepping down");
                    self.step_down(&mut e);
                    return;
                }
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
            self.spawn(self.clone().replicate(peer.clone(), term));
        }
        // The entry commits like any write: once a majority has it durable.
        self.flusher.durable(lsn).await;
        if let Err(e) = self.advance_commit(term) {
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
        let Some(addr) = self.config.peer_addr_of(target) else {
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
        // From the moment `TimeoutNow` may be on its way, the target may
        // campaign with votes that skip the wait the lease relies on, so
        // this node must stop leading term `term` whatever happens next —
        // also if this future is dropped while it awaits the reply (the
        // caller's deadline, Ctrl-C, a reset stream). Declared after
        // `_clear`, so it is dropped first: the mark outlives the role.
        let step_down = StepDownOnDrop {
            node: self,
            term,
            armed: true,
        };
        let told = self.send_timeout_now(addr, term).await;
        if let Ok(reply) = &told
            && !reply.started
        {
            // The target answered that it does not campaign: it sends no
            // vote request, so this node may go on leading.
            step_down.disarm();
            return Err(Status::aborted(format!(
                "node {target} did not campaign: {}; this node still leads",
                reply.reason
            )));
        }
        // The target campaigns, or may (a lost reply): its voters need not
        // wait out the election timeout the lease relies on, so this node
        // stops leading either way.
        drop(step_down);
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

    /// Before a graceful stop (SIGTERM): a leader with elections on hands
    /// leadership to its most caught-up connected follower, so the cluster
    /// need not wait out an election timeout (a rolling restart costs a
    /// transfer, not an election). Bounded by the transfer's own limits
    /// (`write_timeout_ms` for the catch-up, one RPC for `TimeoutNow`);
    /// on failure the node stops anyway. Returns the member it handed to.
    pub(super) async fn hand_over_before_stop(&self) -> Option<u64> {
        if !self.config.elections() || !self.leads() {
            return None;
        }
        let target = lock(&self.followers)
            .iter()
            .filter(|(_, f)| f.connected)
            .max_by_key(|(id, f)| (f.progress.match_lsn, std::cmp::Reverse(**id)))
            .map(|(id, _)| *id)?;
        tracing::info!(target, "stopping: handing leadership over first");
        match self.transfer_leadership(target).await {
            Ok(term) => {
                tracing::info!(target, term, "stopping: node {target} campaigns");
                Some(target)
            }
            Err(status) => {
                tracing::warn!(
                    target,
                    error = status.message(),
                    "stopping without a hand-over"
                );
                None
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
        self.spawn(self.clone().campaign(true));
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
                peer_addr: None,
            })
            .collect();
        NodeConfig {
            cluster_id: "c".into(),
            node_id: 1,
            listen: "127.0.0.1:1001".parse().unwrap(),
            peer_listen: None,
            tls: None,
            allow_plaintext_non_loopback: false,
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
            metrics_listen: None,
            log_format: Default::default(),
        }
    }

    fn start(disk: &SimStorage) -> Arc<Node> {
        start_with(disk, config())
    }

    fn start_with(disk: &SimStorage, config: NodeConfig) -> Arc<Node> {
        let engine = Engine::open(Arc::new(disk.clone()), config.engine_config()).unwrap();
        let env = NodeEnv {
            dialer: Arc::new(TcpDialer),
            offload: Offload::Inline,
            clock: Clock::default(),
            sync_latency: Duration::ZERO,
            seed: 7,
            ..NodeEnv::default()
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
            ..NodeEnv::default()
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

    /// `config()` with member `id` at `addr`.
    fn with_member_at(id: u64, addr: std::net::SocketAddr) -> NodeConfig {
        let mut config = config();
        config.members.iter_mut().find(|m| m.id == id).unwrap().addr = addr;
        config
    }

    /// A leadership transfer whose caller gives up while `TimeoutNow` is
    /// on its way (the future is dropped mid-RPC) still leaves this node
    /// stepped down: the target may be campaigning with votes that skip
    /// the wait the lease relies on. Here node 2's address accepts TCP
    /// connections and never answers.
    #[tokio::test(flavor = "current_thread")]
    async fn a_transfer_whose_caller_gives_up_still_steps_down() {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let disk = SimStorage::new(SimOptions::default());
        let node = start_with(&disk, with_member_at(2, silent.local_addr().unwrap()));
        lock(&node.election).role = Role::Leader;
        let last = node.engine.last_lsn();
        lock(&node.followers)
            .get_mut(&2)
            .unwrap()
            .progress
            .match_lsn = last;
        // The RPC timeout is 200 ms: give up well before it.
        let gave_up =
            tokio::time::timeout(Duration::from_millis(50), node.transfer_leadership(2)).await;
        assert!(
            gave_up.is_err(),
            "the transfer ended by itself: {gave_up:?}"
        );
        assert_eq!(
            node.role(),
            Role::Follower,
            "still leading after the transfer was dropped"
        );
        assert_eq!(node.transferring_to.load(Ordering::Acquire), 0);
        acknowledged_now(&node);
        assert!(
            node.confirm_read().await.is_err(),
            "served a read after a dropped transfer"
        );
    }

    /// A transfer given up while the target is still catching up (no
    /// `TimeoutNow` sent) leaves the leader leading and serving again.
    #[tokio::test(flavor = "current_thread")]
    async fn a_transfer_given_up_before_timeout_now_keeps_leading() {
        let disk = SimStorage::new(SimOptions::default());
        let node = start(&disk);
        lock(&node.election).role = Role::Leader;
        // Node 2 holds nothing of the log: the transfer waits for it.
        node.engine.submit(put("k")).unwrap();
        let gave_up =
            tokio::time::timeout(Duration::from_millis(50), node.transfer_leadership(2)).await;
        assert!(gave_up.is_err(), "{gave_up:?}");
        assert_eq!(node.role(), Role::Leader);
        assert_eq!(node.transferring_to.load(Ordering::Acquire), 0);
        acknowledged_now(&node);
        node.confirm_read().await.unwrap();
    }

    fn put(key: &str) -> Op {
        Op::Put {
            key: key.as_bytes().to_vec(),
            value: b"v".to_vec(),
        }
    }

    /// A deposed leader never advances its commit LSN from the progress
    /// its followers reported while it led: after it adopted a higher term
    /// and took a new leader's records at the same LSNs, that progress
    /// would "commit" records no majority holds.
    #[tokio::test(flavor = "current_thread")]
    async fn a_deposed_leader_does_not_advance_commit() {
        let disk = SimStorage::new(SimOptions::default());
        let node = start(&disk);
        lock(&node.election).role = Role::Leader;
        let term = node.term();
        for key in ["a", "b", "c"] {
            node.engine.submit(put(key)).unwrap();
        }
        node.engine.flush().unwrap();
        for f in lock(&node.followers).values_mut() {
            f.progress.match_lsn = 3;
        }
        // Deposed by term + 1, whose leader replaces LSNs 2 and 3.
        node.adopt_term(term + 1).await.unwrap();
        node.engine.truncate_after(1).unwrap();
        let theirs = (2..=3)
            .map(|lsn| crate::engine::Record {
                lsn,
                term: term + 1,
                op: put("x"),
            })
            .collect();
        node.engine.append_records(theirs).unwrap();
        node.engine.flush().unwrap();
        // A writer of the old term finishing its wait runs the commit rule.
        node.advance_commit(term).unwrap();
        node.advance_commit(term + 1).unwrap();
        assert_eq!(
            node.engine.commit_lsn(),
            0,
            "a deposed leader committed from its old followers' progress"
        );
    }

    /// A follower whose `Append` handler reads the first request (the
    /// reconnect probe), notes when it heard it, and only then, after
    /// `delay`, answers the stream and acknowledges that probe alone.
    struct SlowFollower {
        heard: Arc<std::sync::Mutex<Vec<Instant>>>,
        delay: Duration,
    }

    #[tonic::async_trait]
    impl pb::replication_server::Replication for SlowFollower {
        type AppendStream = tokio_stream::wrappers::ReceiverStream<Result<pb::AppendAck, Status>>;

        async fn append(
            &self,
            req: tonic::Request<tonic::Streaming<pb::AppendRequest>>,
        ) -> Result<tonic::Response<Self::AppendStream>, Status> {
            let mut inbound = req.into_inner();
            let probe = inbound
                .message()
                .await?
                .ok_or_else(|| Status::invalid_argument("no probe"))?;
            self.heard.lock().unwrap().push(Instant::now());
            tokio::time::sleep(self.delay).await;
            let (tx, rx) = mpsc::channel(4);
            let ack = pb::AppendAck {
                term: probe.from.map_or(0, |f| f.term),
                success: true,
                durable_lsn: probe.prev_lsn,
                last_lsn: probe.prev_lsn,
                error: String::new(),
            };
            tx.send(Ok(ack)).await.unwrap();
            // Keep the stream open, acknowledging nothing more.
            tokio::spawn(async move {
                while let Ok(Some(_)) = inbound.message().await {}
                drop(tx);
            });
            Ok(tonic::Response::new(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            ))
        }

        async fn install_snapshot(
            &self,
            _: tonic::Request<tonic::Streaming<pb::SnapshotChunk>>,
        ) -> Result<tonic::Response<pb::SnapshotAck>, Status> {
            Err(Status::unimplemented("test follower"))
        }

        async fn request_vote(
            &self,
            _: tonic::Request<pb::VoteRequest>,
        ) -> Result<tonic::Response<pb::VoteReply>, Status> {
            Err(Status::unimplemented("test follower"))
        }

        async fn timeout_now(
            &self,
            _: tonic::Request<pb::TimeoutNowRequest>,
        ) -> Result<tonic::Response<pb::TimeoutNowReply>, Status> {
            Err(Status::unimplemented("test follower"))
        }
    }

    /// The lease counts from when a request was sent, never from later: the
    /// reconnect probe's send time is taken before it leaves, not when the
    /// follower's stream answers (by then the follower has heard it, and
    /// its own wait before voting started earlier than that).
    #[tokio::test(flavor = "current_thread")]
    async fn the_probe_counts_for_the_lease_from_before_it_was_sent() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heard = Arc::new(std::sync::Mutex::new(Vec::new()));
        let follower = SlowFollower {
            heard: heard.clone(),
            delay: Duration::from_millis(150),
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(pb::replication_server::ReplicationServer::new(follower))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let disk = SimStorage::new(SimOptions::default());
        let mut config = with_member_at(2, addr);
        config.rpc_timeout_ms = 1000;
        let node = start_with(&disk, config);
        lock(&node.election).role = Role::Leader;
        let term = node.term();
        let peer = node
            .config
            .members
            .iter()
            .find(|m| m.id == 2)
            .unwrap()
            .clone();
        tokio::spawn(node.clone().replicate(peer, term));
        let deadline = Instant::now() + Duration::from_secs(3);
        let acked_sent = loop {
            if let Some(sent) = lock(&node.followers)[&2].acked_sent {
                break sent;
            }
            assert!(
                Instant::now() < deadline,
                "the probe was never acknowledged"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let heard_at = heard.lock().unwrap()[0];
        assert!(
            acked_sent <= heard_at,
            "the probe counts from {:?} after the follower heard it",
            acked_sent - heard_at
        );
        lock(&node.election).role = Role::Follower;
    }

    /// Every task a node spawns ends when it stops: after `serve` returns,
    /// nothing but the caller holds the node (here a fixed leader whose
    /// replicators retry unreachable followers forever, and a running
    /// election timer on a second node).
    #[tokio::test(flavor = "current_thread")]
    async fn no_task_outlives_a_stopped_node() {
        for leader in [Some(1), None] {
            let disk = SimStorage::new(SimOptions::default());
            let mut config = config();
            config.leader = leader;
            let node = start_with(&disk, config);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let served = tokio::spawn(super::super::serve(
                node.clone(),
                listener,
                None,
                None,
                async {
                    let _ = stopped.await;
                },
            ));
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert!(Arc::strong_count(&node) > 1, "nothing ran");
            stop.send(()).unwrap();
            served.await.unwrap().unwrap();
            assert_eq!(
                Arc::strong_count(&node),
                1,
                "tasks of the node (leader {leader:?}) still run after it stopped"
            );
        }
    }

    /// `config()` with `n` members.
    fn with_members(n: u64) -> NodeConfig {
        let mut config = config();
        config.members = (1..=n)
            .map(|id| Member {
                id,
                addr: format!("127.0.0.1:{}", 1000 + id).parse().unwrap(),
                peer_addr: None,
            })
            .collect();
        config
    }

    /// The lease and check quorum count a majority of the whole membership:
    /// of 4 members the leader and one follower (2) are not a majority, so
    /// with exactly one follower of four still connected the old leader
    /// has no lease and steps down; with two it keeps both. Of 5, the
    /// leader and two followers are a majority.
    #[tokio::test(flavor = "current_thread")]
    async fn the_lease_and_check_quorum_need_a_majority_of_4_and_of_5() {
        for (members, fresh_needed) in [(3, 1), (4, 2), (5, 2)] {
            let disk = SimStorage::new(SimOptions::default());
            let node = start_with(&disk, with_members(members));
            assert_eq!(node.majority() as u64, members / 2 + 1);
            lock(&node.election).role = Role::Leader;
            lock(&node.election).leading_since = Instant::now();
            for fresh in 0..members {
                {
                    let mut followers = lock(&node.followers);
                    for (i, f) in followers.values_mut().enumerate() {
                        f.acked_sent = ((i as u64) < fresh).then(Instant::now);
                    }
                }
                assert_eq!(
                    node.lease_valid(),
                    fresh >= fresh_needed,
                    "{members} members, {fresh} fresh followers"
                );
            }
            // One follower short of a majority stays in touch (with 4
            // members: exactly one follower of three), while the others
            // went silent longer than the election timeout ago.
            let one_short = fresh_needed - 1;
            let long_ago = Instant::now() - Duration::from_millis(100);
            lock(&node.election).leading_since = long_ago;
            for (i, f) in lock(&node.followers).values_mut().enumerate() {
                f.acked_sent = Some(if (i as u64) < one_short {
                    Instant::now()
                } else {
                    long_ago
                });
            }
            node.check_quorum();
            assert_eq!(
                node.role(),
                Role::Follower,
                "{members} members: a leader with {one_short} fresh followers kept leading"
            );
        }
    }
}
