//! The consensus protocol as one pure state machine: [`Replica`].
//!
//! A `Replica` owns every piece of protocol state a node has: the hard state
//! (term and vote), its role and the leader it follows, the election timer
//! and its seeded jitter, the leader's view of every follower (progress,
//! connection, lease evidence, which requests are stale), the commit LSN and
//! read barrier, and a leadership transfer under way. Everything changes
//! through one entry point, [`Replica::step`]: the time on this replica's
//! monotonic clock and one [`Input`] go in, a [`Ready`] comes out, listing
//! the effects in the order they must happen.
//!
//! "Send only after this is durable" is in the types: every outgoing
//! [`Message`] is wrapped in a [`Gated`], which hands the message over only
//! once the runtime shows that the hard state version and the log position
//! it depends on are durable ([`Gated::release`]). A vote reply cannot leave
//! before the vote is on disk, nor an acknowledgement before the records it
//! acknowledges.
//!
//! Time is an input (`u64`, in whatever unit the [`Config`] durations use:
//! the node passes microseconds) and randomness is a seeded field, so a
//! `Replica` is `Clone + Eq + Hash` and a model checker can store it,
//! compare it and explore every interleaving of its inputs.
//!
//! What is not here: the log itself (the replica reads it through
//! [`LogView`] and asks for appends and truncations in [`Ready`]), record
//! payloads, the network, the clock, files. The node crate is the runtime
//! that feeds inputs in and carries the effects out.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::{
    AckLevel, AppendMeta, AppendVerdict, LogView, Lsn, NodeId, Progress, Refusal, Term,
    follower_append, quorum_commit,
};

/// A time on one replica's monotonic clock. Only differences matter; the
/// unit is the one [`Config`]'s durations are given in.
pub type Time = u64;

/// The fixed parameters of one replica.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Config {
    /// This replica.
    pub id: NodeId,
    /// Every member, this one included.
    pub members: Vec<NodeId>,
    /// Elections off: this member leads term 1 (until a higher term deposes it).
    pub fixed_leader: Option<NodeId>,
    /// The minimum election timeout `T`: a follower that heard no leader
    /// for a random time in `[T, 2T)` campaigns, and a voter that heard one
    /// within `T` votes for no one (but a transfer's candidate).
    pub election_timeout: Time,
    /// How long after sending a request a majority acknowledged the leader
    /// may serve reads on its own: short enough that, with clock rates
    /// within the drift bound, it ends before any follower's `T` does.
    pub lease: Time,
    /// How long a leadership transfer may wait for its target to catch up.
    pub transfer_timeout: Time,
    /// Bytes in flight to one follower (one batch is always allowed).
    pub inflight_bytes_max: u64,
}

impl Config {
    /// True unless a fixed leader is configured.
    pub fn elections(&self) -> bool {
        self.fixed_leader.is_none()
    }

    /// Members needed for a decision: more than half of all of them.
    pub fn majority(&self) -> usize {
        self.members.len() / 2 + 1
    }

    fn is_member(&self, id: NodeId) -> bool {
        self.members.contains(&id)
    }
}

/// What must survive a crash: the term and the vote in it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct HardState {
    /// The current term.
    pub term: Term,
    /// Whom this node voted for in `term`.
    pub voted_for: Option<NodeId>,
}

/// A node's role in its current term.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

/// The leader's view of one follower.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Peer {
    /// What it holds and what to send it next.
    pub progress: Progress,
    /// A replication stream to it is open.
    pub connected: bool,
    /// The send time of the newest request it acknowledged in this term:
    /// the lease and check quorum count these.
    pub acked_sent: Option<Time>,
    /// Bumped whenever `next` moves back (a refusal, a broken stream):
    /// requests sent before are stale, and their refusals say nothing new.
    epoch: u64,
}

impl Peer {
    fn new(last_lsn: Lsn) -> Self {
        Peer {
            progress: Progress::new(last_lsn),
            connected: false,
            acked_sent: None,
            epoch: 0,
        }
    }
}

/// What the leader keeps of one append request it sent, to pair with the
/// follower's answer (the runtime keeps it beside the request; answers on
/// one stream come in order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sent {
    /// The term it was sent in.
    pub term: Term,
    /// When it was sent: the lease counts from here, never from later.
    pub at: Time,
    /// The last LSN it carried (`prev_lsn` for a heartbeat).
    pub last: Lsn,
    /// Its bytes, as flow control counts them.
    pub bytes: u64,
    epoch: u64,
}

/// A candidate asking for a vote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VoteRequest {
    /// The candidate.
    pub from: NodeId,
    /// The term it campaigns in.
    pub term: Term,
    /// Its last LSN and that record's term.
    pub last_lsn: Lsn,
    /// See `last_lsn`.
    pub last_term: Term,
    /// The leader handed over to it (`TimeoutNow`): voters need not wait.
    pub transfer: bool,
}

/// A voter's answer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VoteReply {
    /// The voter.
    pub from: NodeId,
    /// The voter's term.
    pub term: Term,
    /// The vote is the candidate's.
    pub granted: bool,
    /// Why not, if not.
    pub reason: String,
}

/// The protocol parts of an append request (the runtime carries the
/// records' payloads).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AppendRequest {
    /// The leader.
    pub from: NodeId,
    /// Its term.
    pub term: Term,
    /// Position of the batch, and `(lsn, term)` of each record.
    pub meta: AppendMeta,
    /// The leader's commit LSN.
    pub commit: Lsn,
}

/// A follower's answer to one append.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AppendAck {
    /// The follower.
    pub from: NodeId,
    /// The follower's term.
    pub term: Term,
    /// The batch was appended (and is durable: the ack waits for it).
    pub success: bool,
    /// The follower's durable LSN, at most the batch's last.
    pub durable_lsn: Lsn,
    /// Its last LSN (where a refusal says to back up to).
    pub last_lsn: Lsn,
    /// Why it refused.
    pub error: String,
}

/// A leader asking its chosen successor to campaign now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TimeoutNow {
    /// The leader.
    pub from: NodeId,
    /// Its term.
    pub term: Term,
}

/// The answer to [`TimeoutNow`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TimeoutNowReply {
    /// The would-be successor.
    pub from: NodeId,
    /// Its term when it answered.
    pub term: Term,
    /// It campaigns.
    pub started: bool,
    /// Why not, if not.
    pub reason: String,
}

/// A message between members.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Message {
    /// To every other member, from a candidate.
    Vote { to: NodeId, req: VoteRequest },
    /// To the candidate.
    VoteReply { to: NodeId, reply: VoteReply },
    /// To a follower. `req.meta.records` is empty: the runtime attaches
    /// the records `req.meta.prev_lsn + 1 ..= sent.last` (durable on the
    /// leader when the step ran), with their `(lsn, term)`s.
    Append {
        to: NodeId,
        req: AppendRequest,
        sent: Sent,
    },
    /// To the leader.
    AppendAck { to: NodeId, ack: AppendAck },
    /// To a transfer's target.
    TimeoutNow { to: NodeId, req: TimeoutNow },
    /// To the leader that asked.
    TimeoutNowReply { to: NodeId, reply: TimeoutNowReply },
}

impl Message {
    /// The member it goes to.
    pub fn to(&self) -> NodeId {
        match self {
            Message::Vote { to, .. }
            | Message::VoteReply { to, .. }
            | Message::Append { to, .. }
            | Message::AppendAck { to, .. }
            | Message::TimeoutNow { to, .. }
            | Message::TimeoutNowReply { to, .. } => *to,
        }
    }
}

/// What the runtime has made durable so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Durability {
    /// The newest hard state version written to disk.
    pub hard_state: u64,
    /// The log's durable LSN.
    pub log: Lsn,
}

/// A message that may leave only once what it depends on is durable: a
/// vote reply after the vote, an acknowledgement after the records it
/// acknowledges. The message is reachable only through
/// [`Gated::release`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Gated {
    msg: Message,
    hard_state: u64,
    log: Lsn,
}

impl Gated {
    /// What must be durable first.
    pub fn needs(&self) -> Durability {
        Durability {
            hard_state: self.hard_state,
            log: self.log,
        }
    }

    /// The message, if `durable` covers what it needs; the gate back if not
    /// (to hold on to: it is no larger than the message it wraps).
    #[allow(clippy::result_large_err)]
    pub fn release(self, durable: Durability) -> Result<Message, Gated> {
        if durable.hard_state >= self.hard_state && durable.log >= self.log {
            Ok(self.msg)
        } else {
            Err(self)
        }
    }

    /// Where it goes (readable before release: routing is not sending).
    pub fn to(&self) -> NodeId {
        self.msg.to()
    }

    /// What it will be, for routing; sending it takes [`Gated::release`].
    pub fn message(&self) -> &Message {
        &self.msg
    }
}

/// One input to [`Replica::step`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Input {
    /// Time passed: the election timer, check quorum, a transfer's deadline.
    Tick,
    /// The hard state of this version (or a newer one) is durable.
    Persisted { version: u64 },
    /// This node's log is durable through `lsn` (leader: the commit rule;
    /// follower: the commit the leader vouched for).
    Durable { lsn: Lsn },
    /// A candidate asks for our vote.
    Vote(VoteRequest),
    /// A voter answered our vote request.
    VoteReply(VoteReply),
    /// A leader's append (or heartbeat).
    Append(AppendRequest),
    /// A follower answered the request the leader sent as `sent`.
    AppendAck { ack: AppendAck, sent: Sent },
    /// Leader: the runtime has records `prev_lsn + 1 ..= last` (none: a
    /// heartbeat) of `bytes` ready for `to`, and asks to send them in
    /// `term` (the replicator's; nothing goes if this node no longer leads
    /// it).
    Ship {
        to: NodeId,
        term: Term,
        prev_lsn: Lsn,
        last: Lsn,
        bytes: u64,
    },
    /// Leader of `term`: a replication stream to `peer` opened.
    Connected { peer: NodeId, term: Term },
    /// Leader of `term`: the stream to `peer` broke; nothing is in flight.
    Disconnected { peer: NodeId, term: Term },
    /// Leader of `sent_in`: `peer` installed our snapshot at `lsn`,
    /// answering in `term` (`lsn` is `None` if it refused).
    SnapshotSent {
        peer: NodeId,
        sent_in: Term,
        term: Term,
        lsn: Option<Lsn>,
    },
    /// Follower: a leader starts sending a snapshot of its term.
    SnapshotOffer { from: NodeId, term: Term },
    /// Follower: a snapshot through `lsn` (committed) was installed.
    SnapshotInstalled { lsn: Lsn },
    /// A client's write.
    Propose,
    /// A client's default (linearizable) read.
    Read,
    /// A client asks this leader to hand over to `target`.
    Transfer { target: NodeId },
    /// A leader hands over to us.
    TimeoutNow(TimeoutNow),
    /// Leader: the target's answer to `TimeoutNow` (`None`: no answer).
    TimeoutNowAnswered {
        target: NodeId,
        reply: Option<TimeoutNowReply>,
    },
}

/// Why a client request is refused here.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Refused {
    /// This node does not lead; `leader` does, if known.
    NotLeader { leader: Option<NodeId> },
    /// This leader hands over to `target`: go there.
    Transferring { target: NodeId },
    /// Reads wait until the commit LSN covers the read barrier.
    Barrier { barrier: Lsn },
    /// No majority acknowledged a request within the lease.
    NoLease,
    /// Elections are off: leadership cannot move.
    ElectionsOff,
    /// Not a member of this cluster.
    NotAMember { id: NodeId },
    /// A transfer to another member is under way.
    TransferUnderWay { target: NodeId },
}

/// The verdict on a client request ([`Input::Propose`], [`Input::Read`],
/// [`Input::Transfer`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Go on: append the write (see [`Ready::propose`]), serve the read,
    /// or the transfer has started (or there is nothing to transfer).
    Ok,
    /// Refused.
    Refused(Refused),
}

/// A rule a leader's message broke (see [`Ready::error`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Broken {
    /// The sender is not a member, is this node, or is not the configured
    /// fixed leader.
    Stranger(String),
    /// Another member leads the sender's term (or this node does).
    SecondLeader(String),
    /// The batch is not a run of consecutive LSNs after `prev_lsn`.
    Malformed(String),
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Broken::Stranger(m) | Broken::SecondLeader(m) | Broken::Malformed(m) => f.write_str(m),
        }
    }
}

/// How a leadership transfer ended.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TransferOutcome {
    /// The target campaigns; this node stepped down.
    HandedOver,
    /// `TimeoutNow` went unanswered: this node stepped down anyway.
    Unconfirmed,
    /// The target did not catch up in time: this node still leads.
    TargetBehind { matched: Lsn, last: Lsn },
    /// The target refused to campaign: this node still leads.
    TargetRefused { reason: String },
    /// This node stopped leading first.
    LostLeadership,
}

/// Something the runtime may want to log or count.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Event {
    /// The election timer (or a transfer) started a campaign.
    Campaigning { term: Term, transfer: bool },
    /// Won: leads `term`; its first entry goes at `lsn`.
    BecameLeader { term: Term, lsn: Lsn },
    /// Stopped leading (or campaigning) `term`.
    SteppedDown { term: Term, why: StepDown },
    /// A vote was granted (durably, before the reply leaves).
    VoteGranted { term: Term, candidate: NodeId },
    /// A different leader is followed now.
    LeaderChanged { term: Term, leader: NodeId },
    /// A transfer ended.
    TransferEnded {
        target: NodeId,
        outcome: TransferOutcome,
    },
    /// A refused append backed `next` up for `peer`.
    BackedUp { peer: NodeId, next: Lsn },
}

/// Why a leader stepped down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StepDown {
    /// A higher term was seen.
    HigherTerm,
    /// No majority acknowledged anything within the election timeout.
    NoQuorum,
    /// It handed over (or may have).
    Transfer,
}

/// The effects of one step, in the order they must happen.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Ready {
    /// 1. Write this hard state durably (its version in `.0`), then feed
    ///    [`Input::Persisted`]. Messages that depend on it wait (gated).
    pub persist: Option<(u64, HardState)>,
    /// 2. Follower: durably truncate every record after this LSN.
    pub truncate_after: Option<Lsn>,
    /// 3. Follower: append the request's records from this index on.
    pub append_from: Option<usize>,
    /// 3. Leader: append one record stamped with this term now, before
    ///    anything else can step (the client's write; or, on winning, the
    ///    term's first entry).
    pub propose: Option<Term>,
    /// 4. Publish this commit LSN (apply, wake writers).
    pub commit: Option<Lsn>,
    /// 5. Leader of this term: start a replicator per follower.
    pub start_replicators: Option<Term>,
    /// 6. Messages, each once its gate opens.
    pub messages: Vec<Gated>,
    /// The verdict on a client request (see [`Verdict`]).
    pub verdict: Option<Verdict>,
    /// Follower: whether an append or snapshot offer came from the leader
    /// of our term (false: stale, refuse). Errors are in `error`.
    pub accepted: Option<bool>,
    /// Follower: the sender broke a rule; the runtime ends the stream
    /// with this.
    pub error: Option<Broken>,
    /// For logs and metrics.
    pub events: Vec<Event>,
}

impl Ready {
    /// True if the step asks for nothing at all.
    pub fn is_empty(&self) -> bool {
        *self == Ready::default()
    }
}

/// A leadership transfer under way.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Transfer {
    target: NodeId,
    deadline: Time,
    /// `TimeoutNow` is (or may be) on its way: from here on this node
    /// steps down unless the target says it did not campaign.
    told: bool,
}

/// The protocol state of one member (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Replica {
    config: Arc<Config>,
    hard: HardState,
    /// Bumped with every change of `hard`.
    hard_version: u64,
    role: Role,
    leader: Option<NodeId>,
    /// When a leader of this term was last heard (or the replica started).
    heard: Time,
    timer_start: Time,
    timeout: Time,
    /// Draws the election timeouts: deterministic per seed.
    rng: u64,
    /// Leader: when it took office (check quorum before any ack).
    leading_since: Time,
    /// Candidate: who granted their vote in this term (this node first).
    votes: Vec<NodeId>,
    /// Leader: every other member.
    peers: BTreeMap<NodeId, Peer>,
    /// The commit LSN as this replica knows it.
    commit: Lsn,
    /// Leader: reads wait until `commit` covers this LSN.
    read_barrier: Lsn,
    /// Follower: our log matches the leader's through this LSN (in this
    /// term), and the highest commit LSN it told us.
    vouched: Lsn,
    leader_commit: Lsn,
    transfer: Option<Transfer>,
}

/// The splitmix64 step: a small, seedable generator for election jitter.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The shipping cache's validity rule: a record the leader cached at `lsn`
/// in `cached_term` may be shipped from memory only while the log still
/// holds that record there (as a follower, the node may have replaced it).
pub fn cached_record_valid(log: &impl LogView, lsn: Lsn, cached_term: Term) -> bool {
    log.term_at(lsn) == Some(cached_term)
}

/// Whether a write appended at `(lsn, term)` is acknowledged (see
/// [`Replica::write_status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WriteStatus {
    /// Not yet at its level.
    Pending,
    /// At its level, and its record is still the one at its LSN.
    Acknowledged,
    /// A later leader's record of term `by` took its LSN: it did not happen.
    Replaced { by: Term },
    /// The log no longer tells (compacted): the outcome is unknown.
    Unknown,
}

impl Replica {
    /// A replica starting (or restarting) with the durable `hard` state
    /// over `log`, at `now`. `seed` draws its election timeouts.
    pub fn new(
        config: Config,
        hard: HardState,
        log: &impl LogView,
        now: Time,
        seed: u64,
    ) -> Replica {
        assert!(
            config.members.contains(&config.id),
            "node {} is not among the members {:?}",
            config.id,
            config.members
        );
        let (role, leader) = match config.fixed_leader {
            Some(l) if l == config.id => (Role::Leader, Some(l)),
            Some(l) => (Role::Follower, Some(l)),
            None => (Role::Follower, None),
        };
        let last = log.last_lsn();
        let peers = config
            .members
            .iter()
            .filter(|m| **m != config.id)
            .map(|m| (*m, Peer::new(last)))
            .collect();
        let mut replica = Replica {
            config: Arc::new(config),
            hard,
            hard_version: 0,
            role,
            leader,
            heard: now,
            timer_start: now,
            timeout: 0,
            rng: seed,
            leading_since: now,
            votes: Vec::new(),
            peers,
            commit: log.commit_lsn(),
            // After a restart the commit LSN may be behind what was already
            // committed and acknowledged: no read until the log we start
            // with is committed.
            read_barrier: last,
            vouched: 0,
            leader_commit: 0,
            transfer: None,
        };
        replica.reset_timer(now);
        replica
    }

    // ----- what the runtime reads -----

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }
    /// The current term.
    pub fn term(&self) -> Term {
        self.hard.term
    }
    /// The hard state (in memory; maybe not yet durable).
    pub fn hard_state(&self) -> HardState {
        self.hard
    }
    /// The version of [`Replica::hard_state`].
    pub fn hard_state_version(&self) -> u64 {
        self.hard_version
    }
    /// The role in the current term.
    pub fn role(&self) -> Role {
        self.role
    }
    /// The leader of the current term, if known.
    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }
    /// True while this node leads `term`.
    pub fn leads_in(&self, term: Term) -> bool {
        self.role == Role::Leader && self.hard.term == term
    }
    /// The commit LSN.
    pub fn commit(&self) -> Lsn {
        self.commit
    }
    /// Leader: the read barrier.
    pub fn read_barrier(&self) -> Lsn {
        self.read_barrier
    }
    /// Leader: the member leadership is being handed to.
    pub fn transferring_to(&self) -> Option<NodeId> {
        self.transfer.as_ref().map(|t| t.target)
    }
    /// Leader: every follower's state.
    pub fn peers(&self) -> &BTreeMap<NodeId, Peer> {
        &self.peers
    }
    /// Restarts the election-jitter sequence from `seed`. A runtime has no
    /// reason to; a model checker does, so that the next draws are a
    /// function of the state it explores rather than of the path to it.
    pub fn reseed(&mut self, seed: u64) {
        self.rng = seed;
    }
    /// When the election timer fires next.
    pub fn election_due(&self) -> Time {
        self.timer_start.saturating_add(self.timeout)
    }

    /// True if this node knows a live leader at `now`: it leads, or follows
    /// one it heard from within the election timeout.
    pub fn leader_known(&self, now: Time) -> bool {
        self.role == Role::Leader
            || (self.leader.is_some()
                && now.saturating_sub(self.heard) <= self.config.election_timeout)
    }

    /// The send time of the newest request a majority (this leader
    /// included) acknowledged in this term; `None` if none yet.
    pub fn majority_acked_sent(&self, now: Time) -> Option<Time> {
        let need = self.config.majority() - 1;
        if need == 0 {
            return Some(now);
        }
        let mut sent: Vec<Time> = self.peers.values().filter_map(|p| p.acked_sent).collect();
        sent.sort_unstable_by(|a, b| b.cmp(a));
        sent.get(need - 1).copied()
    }

    /// Leader: its lease says no other leader can exist at `now`.
    pub fn lease_valid(&self, now: Time) -> bool {
        self.role == Role::Leader
            && self
                .majority_acked_sent(now)
                .is_some_and(|sent| now < sent.saturating_add(self.config.lease))
    }

    /// Leader: where to send `peer` from next, if it is a follower here.
    pub fn next_for(&self, peer: NodeId) -> Option<Lsn> {
        self.peers.get(&peer).map(|p| p.progress.next_lsn)
    }

    /// The connected follower with the most of the log (ties: lowest id),
    /// the natural target of a hand-over.
    pub fn most_caught_up(&self) -> Option<NodeId> {
        self.peers
            .iter()
            .filter(|(_, p)| p.connected)
            .max_by_key(|(id, p)| (p.progress.match_lsn, std::cmp::Reverse(**id)))
            .map(|(id, _)| *id)
    }

    /// Leader: is the write appended at `(lsn, term)` acknowledged at
    /// `level`? Only if its record is still the one at `lsn`: a new
    /// leader may fill the LSN with another record, and commit it.
    pub fn write_status(
        &self,
        log: &impl LogView,
        lsn: Lsn,
        term: Term,
        level: AckLevel,
    ) -> WriteStatus {
        // Only `all` looks at every member (no list built for the others).
        let durable = match level {
            AckLevel::All => self.durable_lsns(log),
            AckLevel::Local | AckLevel::Quorum => Vec::new(),
        };
        if !level.satisfied(lsn, log.durable_lsn(), self.commit, &durable) {
            return WriteStatus::Pending;
        }
        match log.term_at(lsn) {
            Some(now) if now == term => WriteStatus::Acknowledged,
            Some(by) => WriteStatus::Replaced { by },
            None => WriteStatus::Unknown,
        }
    }

    // ----- the entry point -----

    /// Takes one input at `now` (this replica's clock) over `log` (which
    /// reflects every effect of earlier steps the runtime has carried out:
    /// appends and truncations at once, durability as it comes).
    pub fn step(&mut self, now: Time, input: Input, log: &impl LogView) -> Ready {
        let mut ready = Ready::default();
        let term_before = self.hard.term;
        match input {
            Input::Tick => self.tick(now, log, &mut ready),
            Input::Persisted { .. } => self.maybe_win(now, log, &mut ready),
            Input::Durable { lsn } => self.durable(lsn, log, &mut ready),
            Input::Vote(req) => self.vote(now, req, log, &mut ready),
            Input::VoteReply(reply) => self.vote_reply(now, reply, log, &mut ready),
            Input::Append(req) => self.append(now, req, log, &mut ready),
            Input::AppendAck { ack, sent } => self.append_ack(now, ack, sent, log, &mut ready),
            Input::Ship {
                to,
                term,
                prev_lsn,
                last,
                bytes,
            } => {
                if self.leads_in(term) {
                    self.ship(now, to, prev_lsn, last, bytes, log, &mut ready)
                }
            }
            Input::Connected { peer, term } => {
                if let (true, Some(p)) = (self.leads_in(term), self.peers.get_mut(&peer)) {
                    p.connected = true;
                }
            }
            Input::Disconnected { peer, term } => {
                // A replicator of an older term must not reset this term's
                // view of the follower.
                if let (true, Some(p)) = (self.leads_in(term), self.peers.get_mut(&peer)) {
                    p.connected = false;
                    p.progress.reset();
                    p.epoch += 1;
                }
            }
            Input::SnapshotSent {
                peer,
                sent_in,
                term,
                lsn,
            } => self.snapshot_sent(now, peer, (sent_in, term), lsn, log, &mut ready),
            Input::SnapshotOffer { from, term } => {
                self.accept_leader(now, from, term, log, &mut ready);
            }
            Input::SnapshotInstalled { lsn } => {
                self.vouched = self.vouched.max(lsn);
                self.raise_commit(lsn, &mut ready);
            }
            Input::Propose => {
                let verdict = self.serving(false, now);
                if verdict == Verdict::Ok {
                    ready.propose = Some(self.hard.term);
                }
                ready.verdict = Some(verdict);
            }
            Input::Read => ready.verdict = Some(self.serving(true, now)),
            Input::Transfer { target } => self.start_transfer(now, target, log, &mut ready),
            Input::TimeoutNow(req) => self.timeout_now(now, req, log, &mut ready),
            Input::TimeoutNowAnswered { target, reply } => {
                self.timeout_now_answered(now, target, reply, log, &mut ready)
            }
        }
        debug_assert!(self.hard.term >= term_before, "the term went back");
        debug_assert!(
            self.role != Role::Leader || self.leader == Some(self.config.id),
            "a leader that does not know it leads"
        );
        ready
    }

    // ----- hard state -----

    fn set_hard(&mut self, hard: HardState, ready: &mut Ready) {
        debug_assert!(hard.term >= self.hard.term, "the term goes back");
        if hard.term != self.hard.term {
            // What a leader vouched for held in its term only (however the
            // term moves on: adopted, or a campaign of our own).
            self.vouched = 0;
            self.leader_commit = 0;
        }
        if hard != self.hard {
            self.hard = hard;
            self.hard_version += 1;
            ready.persist = Some((self.hard_version, hard));
        }
    }

    /// A message that depends on the hard state as it is now.
    fn send(&self, msg: Message, ready: &mut Ready) {
        ready.messages.push(Gated {
            msg,
            hard_state: self.hard_version,
            log: 0,
        });
    }

    /// Adopts a higher term (no vote in it), stepping down from any role.
    fn adopt_term(&mut self, now: Time, term: Term, log: &impl LogView, ready: &mut Ready) {
        debug_assert!(term > self.hard.term);
        if self.role != Role::Follower {
            self.step_down(now, StepDown::HigherTerm, log, ready);
        }
        self.set_hard(
            HardState {
                term,
                voted_for: None,
            },
            ready,
        );
        // With a fixed leader, followers keep following it; the fixed
        // leader itself is deposed for good.
        self.leader = self.config.fixed_leader.filter(|l| *l != self.config.id);
        self.reset_timer(now);
    }

    /// Leaves the leader (or candidate) role: forgets the leader and every
    /// follower's progress (it described this leadership and must never
    /// count towards a commit again), ends a transfer, restarts the timer.
    fn step_down(&mut self, now: Time, why: StepDown, log: &impl LogView, ready: &mut Ready) {
        let term = self.hard.term;
        if self.role != Role::Follower {
            ready.events.push(Event::SteppedDown { term, why });
        }
        self.role = Role::Follower;
        self.leader = None;
        self.votes.clear();
        self.forget_peers(log);
        if let Some(t) = self.transfer.take() {
            // Once `TimeoutNow` is out, any step-down ends the hand-over as
            // meant (the target's own vote request may well be what
            // deposes this node, before `TimeoutNow`'s answer arrives).
            let outcome = if why == StepDown::Transfer || t.told {
                TransferOutcome::HandedOver
            } else {
                TransferOutcome::LostLeadership
            };
            ready.events.push(Event::TransferEnded {
                target: t.target,
                outcome,
            });
        }
        self.reset_timer(now);
    }

    fn forget_peers(&mut self, log: &impl LogView) {
        let last = log.last_lsn();
        for p in self.peers.values_mut() {
            let epoch = p.epoch + 1;
            *p = Peer::new(last);
            p.epoch = epoch;
        }
    }

    fn reset_timer(&mut self, now: Time) {
        let base = self.config.election_timeout.max(1);
        let jitter = splitmix64(&mut self.rng) % base;
        self.timeout = base + jitter;
        self.timer_start = now;
    }

    // ----- elections -----

    fn tick(&mut self, now: Time, log: &impl LogView, ready: &mut Ready) {
        if !self.config.elections() {
            return;
        }
        match self.role {
            Role::Leader => {
                self.check_quorum(now, log, ready);
                self.check_transfer(now, log, ready);
            }
            Role::Follower | Role::Candidate => {
                if now.saturating_sub(self.timer_start) >= self.timeout {
                    self.campaign(now, false, log, ready);
                }
            }
        }
    }

    /// Leader: steps down if no majority acknowledged anything it sent
    /// within an election timeout.
    fn check_quorum(&mut self, now: Time, log: &impl LogView, ready: &mut Ready) {
        let fresh = self
            .majority_acked_sent(now)
            .unwrap_or(self.leading_since)
            .max(self.leading_since);
        if now.saturating_sub(fresh) > self.config.election_timeout {
            self.step_down(now, StepDown::NoQuorum, log, ready);
        }
    }

    /// Becomes a candidate in the next term, voting for itself (durably,
    /// before any vote request leaves).
    fn campaign(&mut self, now: Time, transfer: bool, log: &impl LogView, ready: &mut Ready) {
        let me = self.config.id;
        let term = self.hard.term + 1;
        self.role = Role::Candidate;
        self.leader = None;
        self.votes = vec![me];
        self.set_hard(
            HardState {
                term,
                voted_for: Some(me),
            },
            ready,
        );
        self.reset_timer(now);
        ready.events.push(Event::Campaigning { term, transfer });
        let last_lsn = log.last_lsn();
        let req = VoteRequest {
            from: me,
            term,
            last_lsn,
            last_term: log.term_at(last_lsn).unwrap_or(0),
            transfer,
        };
        for to in self.config.members.iter().filter(|m| **m != me) {
            self.send(Message::Vote { to: *to, req }, ready);
        }
        self.maybe_win(now, log, ready);
    }

    fn vote(&mut self, now: Time, req: VoteRequest, log: &impl LogView, ready: &mut Ready) {
        let refuse = |this: &Replica, ready: &mut Ready, reason: String| {
            let reply = VoteReply {
                from: this.config.id,
                term: this.hard.term,
                granted: false,
                reason,
            };
            this.send(
                Message::VoteReply {
                    to: req.from,
                    reply,
                },
                ready,
            );
        };
        if !self.config.elections() {
            return refuse(self, ready, "elections are off (fixed leader)".into());
        }
        if !self.config.is_member(req.from) || req.from == self.config.id {
            return refuse(self, ready, format!("node {} is not a member", req.from));
        }
        if req.term < self.hard.term {
            return refuse(self, ready, "stale term".into());
        }
        if !req.transfer
            && (self.role == Role::Leader
                || now.saturating_sub(self.heard) < self.config.election_timeout)
        {
            // Neither adopt its term nor vote: a leader is (or was just)
            // active, and its lease relies on this. (A transfer's candidate
            // was sent by that leader, which gave up its lease first.)
            return refuse(self, ready, "a leader is active".into());
        }
        if req.term > self.hard.term {
            self.adopt_term(now, req.term, log, ready);
        }
        let last_lsn = log.last_lsn();
        let last_term = log.term_at(last_lsn).unwrap_or(0);
        if (req.last_term, req.last_lsn) < (last_term, last_lsn) {
            return refuse(self, ready, "the candidate's log is behind ours".into());
        }
        if let Some(v) = self.hard.voted_for.filter(|v| *v != req.from) {
            return refuse(self, ready, format!("already voted for node {v}"));
        }
        // Durable before it is granted: the reply is gated on this version.
        self.set_hard(
            HardState {
                term: self.hard.term,
                voted_for: Some(req.from),
            },
            ready,
        );
        self.reset_timer(now);
        ready.events.push(Event::VoteGranted {
            term: self.hard.term,
            candidate: req.from,
        });
        let reply = VoteReply {
            from: self.config.id,
            term: self.hard.term,
            granted: true,
            reason: String::new(),
        };
        self.send(
            Message::VoteReply {
                to: req.from,
                reply,
            },
            ready,
        );
    }

    fn vote_reply(&mut self, now: Time, reply: VoteReply, log: &impl LogView, ready: &mut Ready) {
        if reply.term > self.hard.term {
            self.adopt_term(now, reply.term, log, ready);
            return;
        }
        if self.role != Role::Candidate || reply.term != self.hard.term || !reply.granted {
            return;
        }
        if self.config.is_member(reply.from) && !self.votes.contains(&reply.from) {
            self.votes.push(reply.from);
        }
        self.maybe_win(now, log, ready);
    }

    /// Takes office once a majority voted for this candidate. (Its own vote
    /// must be durable first; the others' replies could only come after its
    /// requests left, which waited for it. With one member there are no
    /// requests: the runtime feeds `Persisted` after the persist.)
    fn maybe_win(&mut self, now: Time, log: &impl LogView, ready: &mut Ready) {
        if self.role != Role::Candidate || self.votes.len() < self.config.majority() {
            return;
        }
        if self.votes.len() == 1 && ready.persist.is_some() {
            // Alone: wait for our own vote to be durable.
            return;
        }
        let term = self.hard.term;
        self.role = Role::Leader;
        self.leader = Some(self.config.id);
        self.leading_since = now;
        self.votes.clear();
        self.forget_peers(log);
        // The term's first entry: appended now, stamped with this term.
        // No read is served until it is committed.
        let lsn = log.last_lsn() + 1;
        self.read_barrier = lsn;
        ready.propose = Some(term);
        ready.start_replicators = Some(term);
        ready.events.push(Event::BecameLeader { term, lsn });
    }

    // ----- the follower side -----

    /// Checks the sender of an append or snapshot: a member, and (fixed
    /// leader) the configured one; a higher term is adopted first. On
    /// success the sender is this term's leader: we follow it and restart
    /// the election timer. Sets `ready.accepted` (false: stale term) or
    /// `ready.error`.
    fn accept_leader(
        &mut self,
        now: Time,
        from: NodeId,
        term: Term,
        log: &impl LogView,
        ready: &mut Ready,
    ) -> bool {
        let fixed_other = self.config.fixed_leader.is_some_and(|l| l != from);
        if from == self.config.id || !self.config.is_member(from) || fixed_other {
            ready.error = Some(Broken::Stranger(format!(
                "node {from} is not the leader of this cluster"
            )));
            return false;
        }
        if term < self.hard.term {
            ready.accepted = Some(false);
            return false;
        }
        if term > self.hard.term {
            self.adopt_term(now, term, log, ready);
        }
        if let Some(l) = self.leader.filter(|l| *l != from) {
            ready.error = Some(Broken::SecondLeader(format!(
                "node {l} leads term {term}, not node {from}"
            )));
            return false;
        }
        if self.role == Role::Leader {
            ready.error = Some(Broken::SecondLeader(format!(
                "this node leads term {term} itself"
            )));
            return false;
        }
        if self.role == Role::Candidate {
            self.votes.clear();
        }
        self.role = Role::Follower;
        if self.leader != Some(from) {
            ready
                .events
                .push(Event::LeaderChanged { term, leader: from });
        }
        self.leader = Some(from);
        self.heard = now;
        self.reset_timer(now);
        ready.accepted = Some(true);
        true
    }

    fn append(&mut self, now: Time, req: AppendRequest, log: &impl LogView, ready: &mut Ready) {
        if !self.accept_leader(now, req.from, req.term, log, ready) {
            if ready.accepted == Some(false) {
                // A stale leader: refuse, answering with our term (fencing).
                self.refuse_append(
                    req.from,
                    format!("stale term {}", req.term),
                    None,
                    log,
                    ready,
                );
            }
            return;
        }
        match follower_append(log, &req.meta) {
            AppendVerdict::Refuse(Refusal::Malformed(why)) => {
                ready.accepted = None;
                ready.error = Some(Broken::Malformed(why));
            }
            AppendVerdict::Refuse(r) => {
                let back_to = match &r {
                    Refusal::Mismatch { prev_lsn, .. } => Some(prev_lsn.saturating_sub(1)),
                    _ => None,
                };
                self.refuse_append(req.from, format!("{r:?}"), back_to, log, ready);
            }
            AppendVerdict::Accept {
                truncate_after,
                append_from,
            } => {
                ready.truncate_after = truncate_after;
                if append_from < req.meta.records.len() {
                    ready.append_from = Some(append_from);
                }
                let batch_last = req.meta.prev_lsn + req.meta.records.len() as Lsn;
                // Our log matches the leader's through the batch: the
                // leader's commit LSN holds here that far.
                self.vouched = self.vouched.max(batch_last);
                self.leader_commit = self.leader_commit.max(req.commit);
                let last = log.last_lsn().max(batch_last);
                let ack = AppendAck {
                    from: self.config.id,
                    term: self.hard.term,
                    success: true,
                    durable_lsn: batch_last,
                    last_lsn: if truncate_after.is_some() {
                        batch_last
                    } else {
                        last
                    },
                    error: String::new(),
                };
                ready.messages.push(Gated {
                    msg: Message::AppendAck { to: req.from, ack },
                    hard_state: self.hard_version,
                    log: batch_last,
                });
                // What is durable already may be applied at once.
                let durable = log.durable_lsn();
                if truncate_after.is_none() && durable >= batch_last {
                    self.follower_commit(durable, ready);
                }
            }
        }
    }

    fn refuse_append(
        &self,
        to: NodeId,
        error: String,
        back_to: Option<Lsn>,
        log: &impl LogView,
        ready: &mut Ready,
    ) {
        let last = log.last_lsn();
        let ack = AppendAck {
            from: self.config.id,
            term: self.hard.term,
            success: false,
            durable_lsn: log.durable_lsn(),
            last_lsn: back_to.map_or(last, |b| b.min(last)),
            error,
        };
        self.send(Message::AppendAck { to, ack }, ready);
    }

    /// Follower: the commit the leader vouched for, as far as it is durable.
    fn follower_commit(&mut self, durable: Lsn, ready: &mut Ready) {
        let commit = self.leader_commit.min(self.vouched).min(durable);
        self.raise_commit(commit, ready);
    }

    fn raise_commit(&mut self, commit: Lsn, ready: &mut Ready) {
        if commit > self.commit {
            self.commit = commit;
            ready.commit = Some(commit);
        }
    }

    fn durable(&mut self, lsn: Lsn, log: &impl LogView, ready: &mut Ready) {
        match self.role {
            Role::Leader => self.advance_commit(log, ready),
            Role::Follower => self.follower_commit(lsn, ready),
            Role::Candidate => {}
        }
    }

    // ----- the leader side -----

    /// Every member's durable LSN (this leader's first).
    fn durable_lsns(&self, log: &impl LogView) -> Vec<Lsn> {
        let mut durable = Vec::with_capacity(self.peers.len() + 1);
        durable.push(log.durable_lsn());
        durable.extend(self.peers.values().map(|p| p.progress.match_lsn));
        durable
    }

    /// Leader: moves the commit LSN as far as the commit rule allows. Only
    /// a leader runs it: a deposed node's follower progress described an
    /// old leadership (and is forgotten on stepping down).
    fn advance_commit(&mut self, log: &impl LogView, ready: &mut Ready) {
        if self.role != Role::Leader {
            return;
        }
        let durable = self.durable_lsns(log);
        let new = quorum_commit(&durable, self.hard.term, |l| log.term_at(l), self.commit);
        self.raise_commit(new, ready);
    }

    #[allow(clippy::too_many_arguments)]
    fn ship(
        &mut self,
        now: Time,
        to: NodeId,
        prev_lsn: Lsn,
        last: Lsn,
        bytes: u64,
        log: &impl LogView,
        ready: &mut Ready,
    ) {
        if self.role != Role::Leader {
            return;
        }
        let heartbeat = last == prev_lsn;
        // Only records durable here are shipped; a batch needs its
        // predecessor's term (a heartbeat goes out regardless: a follower
        // whose commit covers `prev_lsn` matches it anyway).
        let prev_term = match log.term_at(prev_lsn) {
            Some(t) => t,
            None if heartbeat => 0,
            None => return,
        };
        if last > log.durable_lsn() {
            return;
        }
        let term = self.hard.term;
        let commit = self.commit;
        let max = self.config.inflight_bytes_max;
        let Some(peer) = self.peers.get_mut(&to) else {
            return;
        };
        if !heartbeat
            && (peer.progress.next_lsn != prev_lsn + 1 || !peer.progress.can_send(bytes, max))
        {
            return;
        }
        if !heartbeat {
            peer.progress.sent(last, bytes);
        }
        let sent = Sent {
            term,
            at: now,
            last,
            bytes: if heartbeat { 0 } else { bytes },
            epoch: peer.epoch,
        };
        let req = AppendRequest {
            from: self.config.id,
            term,
            // The runtime attaches the records (see `Message::Append`).
            meta: AppendMeta {
                prev_lsn,
                prev_term,
                records: Vec::new(),
            },
            commit,
        };
        self.send(Message::Append { to, req, sent }, ready);
    }

    fn append_ack(
        &mut self,
        now: Time,
        ack: AppendAck,
        sent: Sent,
        log: &impl LogView,
        ready: &mut Ready,
    ) {
        if ack.term > self.hard.term {
            // A newer term exists: this leader is stale.
            self.adopt_term(now, ack.term, log, ready);
            return;
        }
        if !self.leads_in(sent.term) {
            return;
        }
        let term = self.hard.term;
        let Some(peer) = self.peers.get_mut(&ack.from) else {
            return;
        };
        let stale = sent.epoch != peer.epoch;
        if ack.term == term {
            // It follows us in this term: counts for the lease, from when
            // the request was sent.
            peer.acked_sent = Some(peer.acked_sent.map_or(sent.at, |t| t.max(sent.at)));
        }
        if ack.success {
            // A stale request's bytes were written off by the back-up.
            let bytes = if stale { 0 } else { sent.bytes };
            peer.progress.acked(ack.durable_lsn.min(sent.last), bytes);
            self.advance_commit(log, ready);
            self.check_transfer(now, log, ready);
        } else if !stale {
            peer.progress.refused(ack.last_lsn + 1);
            peer.epoch += 1;
            ready.events.push(Event::BackedUp {
                peer: ack.from,
                next: peer.progress.next_lsn,
            });
        }
    }

    fn snapshot_sent(
        &mut self,
        now: Time,
        peer: NodeId,
        (sent_in, term): (Term, Term),
        lsn: Option<Lsn>,
        log: &impl LogView,
        ready: &mut Ready,
    ) {
        if term > self.hard.term {
            self.adopt_term(now, term, log, ready);
            return;
        }
        if !self.leads_in(sent_in) {
            return;
        }
        if let (Some(lsn), Some(p)) = (lsn, self.peers.get_mut(&peer)) {
            p.progress.match_lsn = p.progress.match_lsn.max(lsn);
            p.progress.next_lsn = p.progress.match_lsn + 1;
            p.progress.inflight_bytes = 0;
            p.epoch += 1;
            self.advance_commit(log, ready);
        }
    }

    /// Whether a client's write (or, `read`, a default read) may be served.
    fn serving(&self, read: bool, now: Time) -> Verdict {
        if self.role != Role::Leader {
            return Verdict::Refused(Refused::NotLeader {
                leader: self.leader.filter(|l| *l != self.config.id),
            });
        }
        if let Some(t) = &self.transfer {
            return Verdict::Refused(Refused::Transferring { target: t.target });
        }
        if read {
            if self.commit < self.read_barrier {
                return Verdict::Refused(Refused::Barrier {
                    barrier: self.read_barrier,
                });
            }
            if self.config.elections() && !self.lease_valid(now) {
                return Verdict::Refused(Refused::NoLease);
            }
        }
        Verdict::Ok
    }

    // ----- leadership transfer -----

    fn start_transfer(&mut self, now: Time, target: NodeId, log: &impl LogView, ready: &mut Ready) {
        let refused = |r| Some(Verdict::Refused(r));
        if !self.config.elections() {
            ready.verdict = refused(Refused::ElectionsOff);
            return;
        }
        if self.role != Role::Leader {
            ready.verdict = refused(Refused::NotLeader {
                leader: self.leader,
            });
            return;
        }
        if target == self.config.id {
            ready.verdict = Some(Verdict::Ok);
            return;
        }
        if !self.config.is_member(target) {
            ready.verdict = refused(Refused::NotAMember { id: target });
            return;
        }
        if let Some(t) = &self.transfer {
            ready.verdict = refused(Refused::TransferUnderWay { target: t.target });
            return;
        }
        // From here on no write is appended and no read served here.
        self.transfer = Some(Transfer {
            target,
            deadline: now.saturating_add(self.config.transfer_timeout),
            told: false,
        });
        ready.verdict = Some(Verdict::Ok);
        self.check_transfer(now, log, ready);
    }

    /// Leader handing over: once the target holds our whole log, tell it
    /// to campaign; past the deadline, give up (still leading) if it was
    /// never told, or step down if it may have been.
    fn check_transfer(&mut self, now: Time, log: &impl LogView, ready: &mut Ready) {
        let Some(t) = self.transfer.clone() else {
            return;
        };
        let matched = self
            .peers
            .get(&t.target)
            .map_or(0, |p| p.progress.match_lsn);
        let last = log.last_lsn();
        if !t.told && matched >= last {
            // From the moment `TimeoutNow` may be on its way, the target
            // may campaign with votes that skip the wait the lease relies
            // on: this node steps down unless the target says it did not
            // campaign, or at the deadline.
            if let Some(t) = &mut self.transfer {
                t.told = true;
                t.deadline = now.saturating_add(self.config.transfer_timeout);
            }
            let req = TimeoutNow {
                from: self.config.id,
                term: self.hard.term,
            };
            self.send(Message::TimeoutNow { to: t.target, req }, ready);
        } else if now >= t.deadline {
            if t.told {
                self.transfer = None;
                ready.events.push(Event::TransferEnded {
                    target: t.target,
                    outcome: TransferOutcome::Unconfirmed,
                });
                self.step_down(now, StepDown::Transfer, log, ready);
            } else {
                self.transfer = None;
                ready.events.push(Event::TransferEnded {
                    target: t.target,
                    outcome: TransferOutcome::TargetBehind { matched, last },
                });
            }
        }
    }

    fn timeout_now_answered(
        &mut self,
        now: Time,
        target: NodeId,
        reply: Option<TimeoutNowReply>,
        log: &impl LogView,
        ready: &mut Ready,
    ) {
        let ours = self
            .transfer
            .as_ref()
            .is_some_and(|t| t.target == target && t.told);
        if !ours || self.role != Role::Leader {
            return;
        }
        match reply {
            Some(r) if !r.started => {
                // It sends no vote request: this node may go on leading.
                self.transfer = None;
                ready.events.push(Event::TransferEnded {
                    target,
                    outcome: TransferOutcome::TargetRefused { reason: r.reason },
                });
                if r.term > self.hard.term {
                    self.adopt_term(now, r.term, log, ready);
                }
            }
            Some(_) => self.step_down(now, StepDown::Transfer, log, ready),
            None => {
                self.transfer = None;
                ready.events.push(Event::TransferEnded {
                    target,
                    outcome: TransferOutcome::Unconfirmed,
                });
                self.step_down(now, StepDown::Transfer, log, ready);
            }
        }
    }

    /// Campaigns at once if the sender leads our term (a transfer).
    fn timeout_now(&mut self, now: Time, req: TimeoutNow, log: &impl LogView, ready: &mut Ready) {
        let me = self.config.id;
        let term = self.hard.term;
        let answer = |started: bool, reason: String| TimeoutNowReply {
            from: me,
            term,
            started,
            reason,
        };
        let reply = if !self.config.elections() {
            answer(false, "elections are off".into())
        } else if req.term != term || self.leader != Some(req.from) || self.role != Role::Follower {
            answer(
                false,
                format!(
                    "node {} does not lead term {term} here (this node is a {} in term {term})",
                    req.from,
                    self.role.name()
                ),
            )
        } else {
            answer(true, String::new())
        };
        let started = reply.started;
        self.send(
            Message::TimeoutNowReply {
                to: req.from,
                reply,
            },
            ready,
        );
        if started {
            self.campaign(now, true, log, ready);
        }
    }
}

#[cfg(test)]
mod tests;
