//! Model checking of the consensus core with `stateright`: every
//! interleaving of a small cluster's steps, up to a bound on their
//! number, against the protocol's safety properties.
//!
//! The model runs the real [`Replica`] (not a re-statement of it) as each
//! of three members and plays the runtime around it:
//! - **Network:** a set of messages in flight, delivered in any order.
//!   Any message may never arrive (loss); a bounded number may arrive
//!   twice (duplication). A message whose delivery can no longer change
//!   anything (an answer to a term its receiver has left for good) is
//!   dropped, which the lossy network allows anyway.
//! - **Replicators:** the leader ships each follower what it lacks at
//!   once after every step, as far as flow control lets it. A bounded
//!   number of times, a replication stream may break and open again: the
//!   replicator forgets what it had in flight and, as the node's does,
//!   probes with a heartbeat at the follower's `next` before it ships.
//!   The answers in flight on the broken stream are lost with it; its
//!   requests stay deliverable (the follower may still be reading them).
//! - **Disks:** a replica's log is durable as soon as it is appended. Its
//!   hard state is persisted at once, except on the one member that may
//!   still crash: there persisting is a separate `Persist` step, the
//!   messages gated on it wait in an outbox meanwhile, and a crash loses
//!   both the outbox and the unpersisted hard state. (On a member that
//!   never crashes a late persist is only a late send, which reordering
//!   already covers.)
//! - **Crash-restart:** the member restarts from its durable hard state,
//!   log and commit LSN, with nothing else; only a crash that loses
//!   something is explored (one that loses nothing is a pause).
//! - **Clocks:** true time advances in steps; each member's clock runs at
//!   its own rate (3/4, 1 or 5/4 of true time, the drift bound the lease
//!   assumes), so leases and election timers race as on real machines.
//!   The timer's jitter is drawn from a seed that follows from the state
//!   (member and term), so two paths to one state are one state.
//! - **Clients:** a bounded number of writes, lease reads and a
//!   leadership transfer, at whichever member leads.
//!
//! Properties (`Expectation::Always`): at most one leader per term; log
//! matching; leader completeness; a committed record is never lost or
//! replaced; commit never goes back; no client acknowledgement of a
//! replaced (LSN, term); no lease read served by a leader once a later
//! term has committed anything.
//!
//! Searches: `clients` and `crashes` start from the fresh cluster;
//! `failover`, `handover`, `diverged` and `older_terms` start after a few
//! opening moves (see [`Move`]: a leader with a committed write and a
//! follower behind; two leaders whose logs diverge; a third term's leader
//! whose records of the first term are on their way to a majority, while
//! the second term's leader may still win), which spares the search the
//! steps of reaching those states.
//!
//! `cargo test -p kv-cluster --release --test model -- --nocapture` runs
//! the bounded check CI runs and prints each search's states explored
//! and its bound: the most steps from the search's first state.
//! `KV_MODEL_STEPS=N` sets another bound (each step more multiplies the
//! states by 2 to 4), `KV_MODEL_TIME`, `KV_MODEL_TERM` and `KV_MODEL_NET`
//! the time horizon, the highest term a timer may campaign for and the
//! most messages in flight. The default search is depth first, and a
//! depth-first search with a bound is not exhaustive to it: a state
//! first reached late on a long path is not explored again from a
//! shorter one. `KV_MODEL_BFS=1` searches breadth first instead:
//! exhaustive to the bound and its counterexamples are shortest, but it
//! holds a whole level of states in memory. `scripts/plant-model-bugs.py`
//! plants bug classes in the core and reports what catches each.

// A model that finds its own assumptions broken should stop loudly.
#![allow(clippy::expect_used)]

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};

use kv_cluster::replica::{
    AppendAck, AppendRequest, Config, Durability, Gated, HardState, Input, Message, Ready, Replica,
    Role, Sent, Time, TimeoutNow, TimeoutNowReply, Verdict, VoteReply, VoteRequest, WriteStatus,
};
use kv_cluster::{AckLevel, AppendMeta, LogView, Lsn, NodeId, Term};
use stateright::{Checker, HasDiscoveries, Model, Property};

/// One member's disk and its in-memory runtime state.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Member {
    replica: Replica,
    /// The term of each record, LSN 1 first (durable once appended).
    log: Vec<Term>,
    /// The published commit LSN (durable).
    commit: Lsn,
    /// The hard state on disk, and the in-memory version it matches.
    durable_hard: HardState,
    durable_version: u64,
    /// Messages waiting for the hard state they depend on (an ack with
    /// the request it answers).
    outbox: Vec<(Gated, Option<Sent>)>,
    /// Leader: (term, clock, commit LSN) of its last heartbeat round. A
    /// second round with the same would send the same messages again
    /// (the network's duplicates stand for that), only advancing the
    /// followers' timer draws: one round per clock reading and commit.
    beat: Option<(Term, Time, Lsn)>,
}

struct Log<'a> {
    terms: &'a [Term],
    commit: Lsn,
}

impl LogView for Log<'_> {
    fn last_lsn(&self) -> Lsn {
        self.terms.len() as Lsn
    }
    fn term_at(&self, lsn: Lsn) -> Option<Term> {
        if lsn == 0 {
            Some(0)
        } else {
            self.terms.get(lsn as usize - 1).copied()
        }
    }
    fn commit_lsn(&self) -> Lsn {
        self.commit
    }
    fn durable_lsn(&self) -> Lsn {
        self.terms.len() as Lsn
    }
}

impl Member {
    fn view(&self) -> Log<'_> {
        Log {
            terms: &self.log,
            commit: self.commit,
        }
    }

    fn step(&mut self, now: Time, input: Input) -> Ready {
        let view = Log {
            terms: &self.log,
            commit: self.commit,
        };
        self.replica.step(now, input, &view)
    }
}

/// A [`Sent`] with a total order (its `epoch` is private: the order falls
/// back on its hash, then on its debug form, only to tell apart two that
/// agree on every public field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SentKey {
    term: Term,
    at: Time,
    last: Lsn,
    bytes: u64,
    hash: u64,
    sent: Sent,
}

impl SentKey {
    fn new(sent: Sent) -> SentKey {
        let mut h = std::hash::DefaultHasher::new();
        sent.hash(&mut h);
        SentKey {
            term: sent.term,
            at: sent.at,
            last: sent.last,
            bytes: sent.bytes,
            hash: h.finish(),
            sent,
        }
    }
}

impl PartialOrd for SentKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for SentKey {
    fn cmp(&self, o: &Self) -> Ordering {
        (self.term, self.at, self.last, self.bytes, self.hash)
            .cmp(&(o.term, o.at, o.last, o.bytes, o.hash))
            .then_with(|| {
                if self.sent == o.sent {
                    Ordering::Equal
                } else {
                    format!("{:?}", self.sent).cmp(&format!("{:?}", o.sent))
                }
            })
    }
}

/// The records of an append: at most two (see `Action::Ship`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Batch {
    len: u8,
    terms: [Term; 2],
}

/// A message on the wire: every field of a [`Message`] a receiver reads
/// (the free-text reasons are dropped: no step reads them), with the
/// [`Sent`] the runtime carries beside an append and its answer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Wire {
    Vote {
        term: Term,
        last_lsn: Lsn,
        last_term: Term,
        transfer: bool,
    },
    VoteReply {
        term: Term,
        granted: bool,
    },
    Append {
        term: Term,
        prev_lsn: Lsn,
        prev_term: Term,
        records: Batch,
        commit: Lsn,
        sent: SentKey,
    },
    AppendAck {
        term: Term,
        success: bool,
        durable_lsn: Lsn,
        last_lsn: Lsn,
        sent: SentKey,
    },
    TimeoutNow {
        term: Term,
    },
    TimeoutNowReply {
        term: Term,
        started: bool,
    },
}

/// What a [`Wire`] message is, without its fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Vote,
    VoteReply,
    Append,
    AppendAck,
    TimeoutNow,
    TimeoutNowReply,
}

impl Wire {
    fn kind(&self) -> Kind {
        match self {
            Wire::Vote { .. } => Kind::Vote,
            Wire::VoteReply { .. } => Kind::VoteReply,
            Wire::Append { .. } => Kind::Append,
            Wire::AppendAck { .. } => Kind::AppendAck,
            Wire::TimeoutNow { .. } => Kind::TimeoutNow,
            Wire::TimeoutNowReply { .. } => Kind::TimeoutNowReply,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Envelope {
    from: NodeId,
    to: NodeId,
    wire: Wire,
}

impl Envelope {
    /// The wire form of a released message; an append gets its records
    /// from `log`, an ack the request it answers.
    fn new(from: NodeId, msg: Message, answering: Option<Sent>, log: &[Term]) -> Envelope {
        let to = msg.to();
        let wire = match msg {
            Message::Vote { req, .. } => Wire::Vote {
                term: req.term,
                last_lsn: req.last_lsn,
                last_term: req.last_term,
                transfer: req.transfer,
            },
            Message::VoteReply { reply, .. } => Wire::VoteReply {
                term: reply.term,
                granted: reply.granted,
            },
            Message::Append { req, sent, .. } => {
                let n = (sent.last - req.meta.prev_lsn) as usize;
                assert!(n <= 2, "a batch of {n} records");
                let mut terms = [0; 2];
                for (k, t) in terms.iter_mut().enumerate().take(n) {
                    *t = log[req.meta.prev_lsn as usize + k];
                }
                Wire::Append {
                    term: req.term,
                    prev_lsn: req.meta.prev_lsn,
                    prev_term: req.meta.prev_term,
                    records: Batch {
                        len: n as u8,
                        terms,
                    },
                    commit: req.commit,
                    sent: SentKey::new(sent),
                }
            }
            Message::AppendAck { ack, .. } => Wire::AppendAck {
                term: ack.term,
                success: ack.success,
                durable_lsn: ack.durable_lsn,
                last_lsn: ack.last_lsn,
                sent: SentKey::new(answering.expect("an ack rides with its request")),
            },
            Message::TimeoutNow { req, .. } => Wire::TimeoutNow { term: req.term },
            Message::TimeoutNowReply { reply, .. } => Wire::TimeoutNowReply {
                term: reply.term,
                started: reply.started,
            },
        };
        Envelope { from, to, wire }
    }

    /// The input it is to its receiver, and the request an answer rides with.
    fn input(&self) -> (Input, Option<Sent>) {
        let from = self.from;
        match self.wire {
            Wire::Vote {
                term,
                last_lsn,
                last_term,
                transfer,
            } => (
                Input::Vote(VoteRequest {
                    from,
                    term,
                    last_lsn,
                    last_term,
                    transfer,
                }),
                None,
            ),
            Wire::VoteReply { term, granted } => (
                Input::VoteReply(VoteReply {
                    from,
                    term,
                    granted,
                    reason: String::new(),
                }),
                None,
            ),
            Wire::Append {
                term,
                prev_lsn,
                prev_term,
                records,
                commit,
                sent,
            } => (
                Input::Append(AppendRequest {
                    from,
                    term,
                    meta: AppendMeta {
                        prev_lsn,
                        prev_term,
                        records: (0..records.len as usize)
                            .map(|k| (prev_lsn + 1 + k as Lsn, records.terms[k]))
                            .collect(),
                    },
                    commit,
                }),
                Some(sent.sent),
            ),
            Wire::AppendAck {
                term,
                success,
                durable_lsn,
                last_lsn,
                sent,
            } => (
                Input::AppendAck {
                    ack: AppendAck {
                        from,
                        term,
                        success,
                        durable_lsn,
                        last_lsn,
                        error: String::new(),
                    },
                    sent: sent.sent,
                },
                None,
            ),
            Wire::TimeoutNow { term } => (Input::TimeoutNow(TimeoutNow { from, term }), None),
            Wire::TimeoutNowReply { term, started } => (
                Input::TimeoutNowAnswered {
                    target: from,
                    reply: Some(TimeoutNowReply {
                        from,
                        term,
                        started,
                        reason: String::new(),
                    }),
                },
                None,
            ),
        }
    }
}

impl std::fmt::Display for Envelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}->{} ", self.from, self.to)?;
        match &self.wire {
            Wire::Vote {
                term,
                last_lsn,
                last_term,
                transfer,
            } => write!(
                f,
                "Vote(t{term}, last {last_lsn}@t{last_term}{})",
                if *transfer { ", transfer" } else { "" }
            ),
            Wire::VoteReply { term, granted } => write!(f, "VoteReply(t{term}, {granted})"),
            Wire::Append {
                term,
                prev_lsn,
                prev_term,
                records,
                commit,
                sent,
            } => write!(
                f,
                "Append(t{term}, prev {prev_lsn}@t{prev_term}, records {:?}, commit {commit}, sent at {})",
                &records.terms[..records.len as usize],
                sent.at
            ),
            Wire::AppendAck {
                term,
                success,
                durable_lsn,
                last_lsn,
                sent,
            } => write!(
                f,
                "AppendAck(t{term}, {}, durable {durable_lsn}, last {last_lsn}; request t{} sent at {})",
                if *success { "ok" } else { "refused" },
                sent.term,
                sent.at
            ),
            Wire::TimeoutNow { term } => write!(f, "TimeoutNow(t{term})"),
            Wire::TimeoutNowReply { term, started } => {
                write!(f, "TimeoutNowReply(t{term}, started {started})")
            }
        }
    }
}

/// What happened so far that the properties look at (ghost state).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
struct History {
    /// Every (term, member) that led.
    leaders: BTreeSet<(Term, NodeId)>,
    /// Every committed LSN: its record's term, and the lowest term in which
    /// any member saw it committed.
    committed: BTreeMap<Lsn, (Term, Term)>,
    /// Client writes appended, as (LSN, term), and those acknowledged.
    writes: BTreeSet<(Lsn, Term)>,
    acked: BTreeSet<(Lsn, Term)>,
    /// Set when something happened that no property may allow: which
    /// property, and what.
    violation: Option<(&'static str, String)>,
    crashes: u8,
    duplicates: u8,
    reads: u8,
    transfers: u8,
    reconnects: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct State {
    /// Steps since the search's first state (not part of the state).
    steps: Steps,
    time: Time,
    members: Vec<Member>,
    /// The messages in flight, sorted, without repeats.
    net: Vec<Envelope>,
    history: History,
    /// The member that may still crash (and so persists lazily).
    crasher: Option<usize>,
}

/// How many steps the search took to reach a state. It bounds the
/// search, but two paths to one state reach one state, so it takes no part
/// in equality or the state's fingerprint. The checker's own depth bound
/// would not do: it generates (and fingerprints) the states one step past
/// the bound, then drops them unchecked; a state at the bound here has no
/// actions, so every state generated is checked.
#[derive(Debug, Clone, Copy, Default)]
struct Steps(usize);

impl PartialEq for Steps {
    fn eq(&self, _: &Steps) -> bool {
        true
    }
}

impl Eq for Steps {}

impl Hash for Steps {
    fn hash<H: Hasher>(&self, _: &mut H) {}
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    /// True time advances by one unit.
    Advance,
    /// The member's timer: a follower's election timeout, a leader's
    /// heartbeat (check quorum, a transfer's deadline, then an empty
    /// append to each follower).
    Tick(usize),
    /// The member's pending hard state reaches its disk.
    Persist(usize),
    /// Delivers `net[k]`; `keep`: it stays on the wire (a duplicate).
    Deliver(usize, bool),
    Write(usize),
    Read(usize),
    Transfer(usize, NodeId),
    /// The leader's replication stream to a follower breaks and opens
    /// again: the follower's answers in flight are lost, the replicator
    /// forgets what it had in flight, probes with a heartbeat at the
    /// follower's `next`, then ships.
    Reconnect(usize, NodeId),
    Crash(usize),
}

/// One of a scenario's opening moves, played from the initial state
/// before the search begins. Each is a step the model takes itself (or a
/// loss the network may cause), so the search starts from a reachable
/// state: the opening only spares the search the steps of reaching it.
#[derive(Debug, Clone, Copy)]
enum Move {
    /// True time advances until the member's election timer is due; the
    /// timer fires.
    Timeout(usize),
    /// The message in flight from one member to another of this kind
    /// arrives.
    Deliver(NodeId, NodeId, Kind),
    /// Every message in flight from one member to another is lost.
    Lose(NodeId, NodeId),
    /// A client write at the member.
    Write(usize),
    /// True time advances, the leader's timer firing at each step, until
    /// check quorum steps it down (nothing it sent was acknowledged).
    StepDown(usize),
}

const COMMIT_BACK: &str = "commit never goes back";
const COMMIT_AGREES: &str = "a committed record is never lost or replaced";
const ACK_REPLACED: &str = "no acknowledgement of a replaced write";
const STALE_READ: &str = "no stale lease read";

struct Raft {
    name: &'static str,
    /// The bound CI runs: at most this many steps from the search's first
    /// state (see [`Steps`]).
    steps: usize,
    /// Clock rate of each member, in quarters of true time.
    rates: Vec<u64>,
    election_timeout: Time,
    /// Played before the search (see [`Move`]).
    opening: Vec<Move>,
    /// How far true time may advance in the search, past its first state.
    horizon: Time,
    /// True time at the search's first state (set by [`check`]).
    start: Time,
    /// No campaign (on the election timer) beyond this term.
    max_term: Term,
    max_writes: usize,
    max_crashes: u8,
    max_duplicates: u8,
    max_reads: u8,
    max_transfers: u8,
    max_reconnects: u8,
    /// States with more messages in flight are checked, not explored.
    max_net: usize,
}

fn id(i: usize) -> NodeId {
    i as NodeId + 1
}

impl Raft {
    fn members(&self) -> usize {
        self.rates.len()
    }

    fn config(&self, id: NodeId) -> Config {
        Config {
            id,
            members: (1..=self.members() as NodeId).collect(),
            fixed_leader: None,
            election_timeout: self.election_timeout,
            // (1 - d) / (1 + d) of the timeout, d = 1/4: 3/5.
            lease: self.election_timeout * 3 / 5,
            transfer_timeout: self.election_timeout,
            inflight_bytes_max: 4,
        }
    }

    /// Member `i`'s clock at true time `t`.
    fn local(&self, i: usize, t: Time) -> Time {
        t * self.rates[i] / 4
    }

    /// When the model begins: the slowest clock has run an election
    /// timeout since the members started (at 0).
    fn start_time(&self) -> Time {
        let slowest = *self.rates.iter().min().expect("members");
        (self.election_timeout * 4).div_ceil(slowest)
    }

    fn seed(i: usize) -> u64 {
        0x5EED + i as u64
    }

    /// Member `i` persists lazily (a separate `Persist` step) only if it
    /// is the one that may still crash: otherwise a late persist is only a
    /// late send.
    fn lazy(&self, s: &State, i: usize) -> bool {
        s.crasher == Some(i)
    }

    /// Steps member `i` with `input` and carries out the effects, as the
    /// node's runtime does (`sent` rides along with an append's answer).
    fn step(&self, s: &mut State, i: usize, input: Input, sent: Option<Sent>) {
        let now = self.local(i, s.time);
        let records = match &input {
            Input::Append(req) => Some(req.meta.records.clone()),
            _ => None,
        };
        let ready = s.members[i].step(now, input);
        self.carry_out(s, i, ready, records, sent);
    }

    /// The leader's replicators: each ships a follower the records it
    /// lacks, two at a time, as far as flow control lets it, at once.
    fn replicate(&self, s: &mut State, i: usize) {
        for to in (1..=self.members() as NodeId).filter(|p| *p != id(i)) {
            loop {
                let m = &s.members[i];
                if m.replica.role() != Role::Leader {
                    return;
                }
                let Some(peer) = m.replica.peers().get(&to) else {
                    break;
                };
                let next = peer.progress.next_lsn;
                let last = m.log.len() as Lsn;
                if next > last {
                    break;
                }
                let (prev, through) = (next - 1, last.min(next + 1));
                let bytes = through - prev;
                if !peer
                    .progress
                    .can_send(bytes, self.config(id(i)).inflight_bytes_max)
                {
                    break;
                }
                let input = Input::Ship {
                    to,
                    term: m.replica.term(),
                    prev_lsn: prev,
                    last: through,
                    bytes,
                };
                self.step(s, i, input, None);
                if s.members[i].replica.next_for(to) == Some(next) {
                    break;
                }
            }
        }
    }

    fn carry_out(
        &self,
        s: &mut State,
        i: usize,
        ready: Ready,
        records: Option<Vec<(Lsn, Term)>>,
        sent: Option<Sent>,
    ) {
        let now = self.local(i, s.time);
        let eager = ready.persist.is_some() && !self.lazy(s, i);
        let m = &mut s.members[i];
        if eager {
            m.durable_hard = m.replica.hard_state();
            m.durable_version = m.replica.hard_state_version();
        }
        let mut log_changed = false;
        if let Some(after) = ready.truncate_after {
            assert!(after >= m.commit, "truncated at or below the commit LSN");
            m.log.truncate(after as usize);
            log_changed = true;
        }
        if let (Some(from), Some(records)) = (ready.append_from, &records) {
            m.log.extend(records[from..].iter().map(|(_, t)| *t));
            log_changed = true;
        }
        if let Some(term) = ready.propose {
            m.log.push(term);
            log_changed = true;
        }
        if let Some(c) = ready.commit {
            self.publish_commit(s, i, c);
        }
        let m = &mut s.members[i];
        let durable = Durability {
            hard_state: m.durable_version,
            log: Lsn::MAX,
        };
        for gated in ready.messages {
            match gated.release(durable) {
                Ok(msg) => {
                    let e = Envelope::new(id(i), msg, sent, &s.members[i].log);
                    insert(&mut s.net, e);
                }
                Err(gated) => s.members[i].outbox.push((gated, sent)),
            }
        }
        let m = &s.members[i];
        if m.replica.role() == Role::Leader {
            s.history.leaders.insert((m.replica.term(), id(i)));
        }
        if eager {
            let version = s.members[i].durable_version;
            self.step(s, i, Input::Persisted { version }, None);
        }
        if log_changed {
            let lsn = s.members[i].log.len() as Lsn;
            let ready = s.members[i].step(now, Input::Durable { lsn });
            self.carry_out(s, i, ready, None, None);
        }
        self.check_acks(s, i);
    }

    fn publish_commit(&self, s: &mut State, i: usize, c: Lsn) {
        let m = &mut s.members[i];
        if c < m.commit {
            s.history.violation = Some((COMMIT_BACK, format!("node {} commit went back", id(i))));
            return;
        }
        let term = m.replica.term();
        for lsn in m.commit + 1..=c {
            let Some(&rterm) = m.log.get(lsn as usize - 1) else {
                s.history.violation = Some((
                    COMMIT_AGREES,
                    format!("node {} committed LSN {lsn} it does not hold", id(i)),
                ));
                return;
            };
            match s.history.committed.get_mut(&lsn) {
                Some((t, _)) if *t != rterm => {
                    s.history.violation = Some((
                        COMMIT_AGREES,
                        format!("LSN {lsn} committed as term {t} and as term {rterm}"),
                    ));
                    return;
                }
                Some((_, at)) => *at = (*at).min(term),
                None => {
                    s.history.committed.insert(lsn, (rterm, term));
                }
            }
        }
        s.members[i].commit = c;
    }

    /// The leader's writers: a client write is acknowledged the moment
    /// `write_status` says so.
    fn check_acks(&self, s: &mut State, i: usize) {
        let m = &s.members[i];
        if m.replica.role() != Role::Leader {
            return;
        }
        let view = m.view();
        let newly: Vec<(Lsn, Term)> = s
            .history
            .writes
            .iter()
            .filter(|w| !s.history.acked.contains(w))
            .filter(|(lsn, term)| {
                m.replica.write_status(&view, *lsn, *term, AckLevel::Quorum)
                    == WriteStatus::Acknowledged
            })
            .copied()
            .collect();
        for (lsn, term) in newly {
            if s.history.committed.get(&lsn).map(|c| c.0) != Some(term) {
                s.history.violation = Some((
                    ACK_REPLACED,
                    format!(
                        "node {} acknowledged write ({lsn}, term {term}) but LSN {lsn} is \
                         committed as {:?}",
                        id(i),
                        s.history.committed.get(&lsn)
                    ),
                ));
            }
            s.history.acked.insert((lsn, term));
        }
    }

    /// The term below which member `i` can never go again (a crash may
    /// take it back to its durable term).
    fn floor_term(&self, s: &State, i: usize) -> Term {
        let m = &s.members[i];
        if self.lazy(s, i) {
            m.durable_hard.term
        } else {
            m.replica.term()
        }
    }

    /// A message whose delivery is a no-op now and forever: dropping it
    /// (which the lossy network may do anyway) loses no behaviour.
    fn dead(&self, s: &State, e: &Envelope) -> bool {
        let to = e.to as usize - 1;
        let floor = self.floor_term(s, to);
        match e.wire {
            // The leader of `sent.term` is gone for good (terms only grow),
            // and the ack's term is no news.
            Wire::AppendAck { term, sent, .. } => term <= floor && sent.term < floor,
            // The candidate left that term: no news, no vote to count.
            Wire::VoteReply { term, .. } => term < floor,
            _ => false,
        }
    }

    fn gc(&self, s: &mut State) {
        let dead: Vec<bool> = s.net.iter().map(|e| self.dead(s, e)).collect();
        let mut k = 0;
        s.net.retain(|_| {
            k += 1;
            !dead[k - 1]
        });
    }

    /// The cluster as it starts: empty logs, no term, nothing in flight.
    fn fresh(&self) -> State {
        let members = (0..self.members())
            .map(|i| {
                let log = Log {
                    terms: &[],
                    commit: 0,
                };
                Member {
                    replica: Replica::new(
                        self.config(id(i)),
                        HardState::default(),
                        &log,
                        0,
                        Raft::seed(i),
                    ),
                    log: Vec::new(),
                    commit: 0,
                    durable_hard: HardState::default(),
                    durable_version: 0,
                    outbox: Vec::new(),
                    beat: None,
                }
            })
            .collect();
        State {
            steps: Steps::default(),
            // Started long enough ago that every member's start-up wait
            // (no vote within the election timeout of starting) is over.
            time: self.start_time(),
            members,
            net: Vec::new(),
            history: History::default(),
            crasher: None,
        }
    }

    /// The state the search starts from: the fresh cluster after the
    /// opening moves, and what each move did.
    fn open(&self) -> (State, Vec<String>) {
        let mut s = self.fresh();
        let mut trace = Vec::new();
        // Takes one step of the opening, and notes it in the trace.
        let play = |s: &State, action: Action, trace: &mut Vec<String>| {
            trace.push(self.describe(s, &action));
            self.next_state(s, action).unwrap_or_else(|| {
                panic!(
                    "opening of {}: {} did nothing",
                    self.name,
                    trace[trace.len() - 1]
                )
            })
        };
        for m in &self.opening {
            match *m {
                Move::Timeout(i) => {
                    while self.local(i, s.time) < s.members[i].replica.election_due() {
                        s = play(&s, Action::Advance, &mut trace);
                    }
                    s = play(&s, Action::Tick(i), &mut trace);
                }
                Move::Deliver(from, to, kind) => {
                    let k = s
                        .net
                        .iter()
                        .position(|e| e.from == from && e.to == to && e.wire.kind() == kind)
                        .unwrap_or_else(|| {
                            let net: Vec<String> = s.net.iter().map(|e| e.to_string()).collect();
                            panic!(
                                "opening of {}: no {kind:?} from {from} to {to} in flight \
                                 after\n  {}\nin flight: {net:?}; logs {:?}",
                                self.name,
                                trace.join("\n  "),
                                s.members.iter().map(|m| &m.log).collect::<Vec<_>>()
                            )
                        });
                    s = play(&s, Action::Deliver(k, false), &mut trace);
                }
                Move::Lose(from, to) => {
                    trace.push(format!("Lose every message from {from} to {to}"));
                    s.net.retain(|e| (e.from, e.to) != (from, to));
                }
                Move::Write(i) => s = play(&s, Action::Write(i), &mut trace),
                Move::StepDown(i) => {
                    while s.members[i].replica.role() == Role::Leader {
                        assert!(
                            s.time < self.start_time() + 100,
                            "opening of {}: node {} never steps down",
                            self.name,
                            id(i)
                        );
                        s = play(&s, Action::Advance, &mut trace);
                        s = play(&s, Action::Tick(i), &mut trace);
                    }
                }
            }
        }
        // The search counts its steps from here.
        s.steps = Steps::default();
        (s, trace)
    }

    fn describe(&self, s: &State, a: &Action) -> String {
        match a {
            Action::Deliver(k, keep) => format!(
                "Deliver{} {}",
                if *keep { " (keeping a duplicate)" } else { "" },
                s.net[*k]
            ),
            Action::Advance => format!(
                "Advance to {} (clocks {:?})",
                s.time + 1,
                (0..self.members())
                    .map(|i| self.local(i, s.time + 1))
                    .collect::<Vec<_>>()
            ),
            Action::Tick(i) => {
                let m = &s.members[*i];
                format!(
                    "Tick {} ({} t{})",
                    id(*i),
                    m.replica.role().name(),
                    m.replica.term()
                )
            }
            Action::Persist(i) => format!("Persist {}", id(*i)),
            Action::Write(i) => format!("Write at {}", id(*i)),
            Action::Read(i) => format!("Read at {}", id(*i)),
            Action::Transfer(i, to) => format!("Transfer {} -> {to}", id(*i)),
            Action::Reconnect(i, to) => format!("Reconnect {} -> {to}", id(*i)),
            Action::Crash(i) => format!("Crash {}", id(*i)),
        }
    }
}

/// Puts `e` on the wire (the set of messages in flight).
fn insert(net: &mut Vec<Envelope>, e: Envelope) {
    if let Err(k) = net.binary_search(&e) {
        net.insert(k, e);
    }
}

impl Model for Raft {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let (state, _) = self.open();
        if self.max_crashes == 0 {
            return vec![state];
        }
        (0..self.members())
            .map(|c| State {
                crasher: Some(c),
                ..state.clone()
            })
            .collect()
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        if s.history.violation.is_some() {
            return;
        }
        // Past the bound on messages in flight a state is still checked
        // (a step that floods the network may be the one that breaks a
        // property), but not explored further.
        if s.net.len() > self.max_net || s.steps.0 >= self.steps {
            return;
        }
        if s.time < self.start + self.horizon {
            actions.push(Action::Advance);
        }
        let n = self.members();
        for (i, m) in s.members.iter().enumerate() {
            let now = self.local(i, s.time);
            let leader = m.replica.role() == Role::Leader;
            let beat = Some((m.replica.term(), now, m.replica.commit()));
            if (leader && m.beat != beat)
                || (!leader && now >= m.replica.election_due() && m.replica.term() < self.max_term)
            {
                actions.push(Action::Tick(i));
            }
            if self.lazy(s, i) && m.replica.hard_state_version() > m.durable_version {
                actions.push(Action::Persist(i));
            }
            if leader {
                if s.history.writes.len() < self.max_writes {
                    actions.push(Action::Write(i));
                }
                if s.history.reads < self.max_reads {
                    actions.push(Action::Read(i));
                }
                for peer in (1..=n as NodeId).filter(|p| *p != id(i)) {
                    if s.history.transfers < self.max_transfers {
                        actions.push(Action::Transfer(i, peer));
                    }
                    if s.history.reconnects < self.max_reconnects {
                        actions.push(Action::Reconnect(i, peer));
                    }
                }
            }
            // A restart that loses nothing unpersisted is (for safety) a
            // pause: only a crash with something pending is explored.
            if s.crasher == Some(i)
                && (m.replica.hard_state_version() > m.durable_version || !m.outbox.is_empty())
            {
                actions.push(Action::Crash(i));
            }
        }
        for k in 0..s.net.len() {
            actions.push(Action::Deliver(k, false));
            if s.history.duplicates < self.max_duplicates {
                actions.push(Action::Deliver(k, true));
            }
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut s = last.clone();
        s.steps.0 += 1;
        match action {
            Action::Advance => s.time += 1,
            Action::Tick(i) => {
                self.step(&mut s, i, Input::Tick, None);
                // The heartbeat timer: an empty append to every follower.
                let m = &mut s.members[i];
                if m.replica.role() == Role::Leader {
                    m.beat = Some((m.replica.term(), self.local(i, s.time), m.replica.commit()));
                    for to in (1..=self.members() as NodeId).filter(|p| *p != id(i)) {
                        let next = s.members[i].replica.next_for(to)?;
                        let input = Input::Ship {
                            to,
                            term: s.members[i].replica.term(),
                            prev_lsn: next - 1,
                            last: next - 1,
                            bytes: 0,
                        };
                        self.step(&mut s, i, input, None);
                    }
                }
                self.replicate(&mut s, i);
            }
            Action::Persist(i) => {
                let m = &mut s.members[i];
                m.durable_hard = m.replica.hard_state();
                m.durable_version = m.replica.hard_state_version();
                let version = m.durable_version;
                let outbox = std::mem::take(&mut m.outbox);
                let durable = Durability {
                    hard_state: version,
                    log: Lsn::MAX,
                };
                for (gated, sent) in outbox {
                    match gated.release(durable) {
                        Ok(msg) => {
                            let e = Envelope::new(id(i), msg, sent, &s.members[i].log);
                            insert(&mut s.net, e);
                        }
                        Err(gated) => s.members[i].outbox.push((gated, sent)),
                    }
                }
                self.step(&mut s, i, Input::Persisted { version }, None);
                self.replicate(&mut s, i);
            }
            Action::Deliver(k, keep) => {
                let e = if keep {
                    s.history.duplicates += 1;
                    s.net[k].clone()
                } else {
                    s.net.remove(k)
                };
                let (input, sent) = e.input();
                let to = e.to as usize - 1;
                self.step(&mut s, to, input, sent);
                self.replicate(&mut s, to);
            }
            Action::Write(i) => {
                let now = self.local(i, s.time);
                let ready = s.members[i].step(now, Input::Propose);
                if let Some(term) = ready.propose {
                    let lsn = s.members[i].log.len() as Lsn + 1;
                    s.history.writes.insert((lsn, term));
                }
                self.carry_out(&mut s, i, ready, None, None);
                self.replicate(&mut s, i);
            }
            Action::Read(i) => {
                let now = self.local(i, s.time);
                let ready = s.members[i].step(now, Input::Read);
                if ready.verdict != Some(Verdict::Ok) {
                    return None;
                }
                s.history.reads += 1;
                let term = s.members[i].replica.term();
                if let Some((lsn, (rterm, at))) = s
                    .history
                    .committed
                    .iter()
                    .find(|(_, (rterm, at))| *rterm > term || *at > term)
                {
                    s.history.violation = Some((
                        STALE_READ,
                        format!(
                            "node {} served a lease read in term {term} after LSN {lsn} \
                             (term {rterm}) was committed in term {at}",
                            id(i)
                        ),
                    ));
                }
                self.carry_out(&mut s, i, ready, None, None);
            }
            Action::Transfer(i, target) => {
                s.history.transfers += 1;
                self.step(&mut s, i, Input::Transfer { target }, None);
                self.replicate(&mut s, i);
            }
            Action::Reconnect(i, peer) => {
                s.history.reconnects += 1;
                // The answers to what the broken stream carried went down
                // with it (the core is told nothing is in flight).
                let leader = id(i);
                s.net.retain(|e| {
                    !(e.from == peer && e.to == leader && matches!(e.wire, Wire::AppendAck { .. }))
                });
                let term = s.members[i].replica.term();
                self.step(&mut s, i, Input::Disconnected { peer, term }, None);
                let next = s.members[i].replica.next_for(peer)?;
                let probe = Input::Ship {
                    to: peer,
                    term,
                    prev_lsn: next - 1,
                    last: next - 1,
                    bytes: 0,
                };
                self.step(&mut s, i, probe, None);
                self.step(&mut s, i, Input::Connected { peer, term }, None);
                self.replicate(&mut s, i);
            }
            Action::Crash(i) => {
                s.history.crashes += 1;
                let now = self.local(i, s.time);
                let m = &mut s.members[i];
                let restarted = Replica::new(
                    self.config(id(i)),
                    m.durable_hard,
                    &m.view(),
                    now,
                    Raft::seed(i) ^ u64::from(s.history.crashes),
                );
                m.replica = restarted;
                m.durable_version = 0;
                m.outbox.clear();
                if s.history.crashes >= self.max_crashes {
                    s.crasher = None;
                }
            }
        }
        self.gc(&mut s);
        // The next timer draws follow from the state (member and term),
        // not from the path that reached it.
        for (i, m) in s.members.iter_mut().enumerate() {
            m.replica.reseed(Raft::seed(i) ^ m.replica.term());
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        fn violated(s: &State, name: &str) -> bool {
            s.history
                .violation
                .as_ref()
                .is_some_and(|(p, _)| *p == name)
        }
        vec![
            Property::always("at most one leader per term", |_: &Raft, s: &State| {
                let mut terms = BTreeSet::new();
                s.history.leaders.iter().all(|(t, _)| terms.insert(*t))
            }),
            Property::always("log matching", |_: &Raft, s: &State| {
                s.members.iter().all(|a| {
                    s.members.iter().all(|b| {
                        let n = a.log.len().min(b.log.len());
                        (0..n).all(|k| a.log[k] != b.log[k] || a.log[..k] == b.log[..k])
                    })
                })
            }),
            Property::always("leader completeness", |_: &Raft, s: &State| {
                s.members.iter().all(|m| {
                    m.replica.role() != Role::Leader
                        || s.history.committed.iter().all(|(lsn, (rterm, at))| {
                            *at >= m.replica.term() || m.log.get(*lsn as usize - 1) == Some(rterm)
                        })
                })
            }),
            Property::always(COMMIT_AGREES, |_: &Raft, s: &State| {
                !violated(s, COMMIT_AGREES)
                    && s.members.iter().all(|m| {
                        (1..=m.commit).all(|lsn| {
                            s.history.committed.get(&lsn).map(|c| c.0)
                                == m.log.get(lsn as usize - 1).copied()
                        })
                    })
            }),
            Property::always(COMMIT_BACK, |_: &Raft, s: &State| !violated(s, COMMIT_BACK)),
            Property::always(ACK_REPLACED, |_: &Raft, s: &State| {
                !violated(s, ACK_REPLACED)
                    && s.history
                        .acked
                        .iter()
                        .all(|(lsn, term)| s.history.committed.get(lsn).map(|c| c.0) == Some(*term))
            }),
            Property::always(STALE_READ, |_: &Raft, s: &State| !violated(s, STALE_READ)),
        ]
    }
}

fn env(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Runs the check; panics with the counterexample if a property fails.
fn check(mut model: Raft) {
    let started = std::time::Instant::now();
    let (first, opening) = model.open();
    model.start = first.time;
    model.horizon = env("KV_MODEL_TIME").map_or(model.horizon, |t| t as Time);
    model.max_term = env("KV_MODEL_TERM").map_or(model.max_term, |t| t as Term);
    model.max_net = env("KV_MODEL_NET").unwrap_or(model.max_net);
    model.steps = env("KV_MODEL_STEPS").unwrap_or(model.steps);
    let builder = model
        .checker()
        .threads(std::thread::available_parallelism().map_or(1, |n| n.get()))
        .finish_when(HasDiscoveries::Any);
    // Depth first by default (memory stays small); breadth first finds a
    // shortest counterexample, holding a whole level of states at a time.
    if std::env::var_os("KV_MODEL_BFS").is_some() {
        report(builder.spawn_bfs().join(), &opening, started);
    } else {
        report(builder.spawn_dfs().join(), &opening, started);
    }
}

/// Prints what the check explored; panics with the counterexample if a
/// property fails (`opening`: the moves played before the search).
fn report(checker: impl Checker<Raft>, opening: &[String], started: std::time::Instant) {
    let name = checker.model().name;
    println!(
        "model {name}: {} states explored ({} unique), up to {} steps, in {:.1?}",
        checker.state_count(),
        checker.unique_state_count(),
        checker.model().steps,
        started.elapsed()
    );
    let model = checker.model();
    for p in model.properties() {
        if let Some(path) = checker.discovery(p.name) {
            let steps = path.into_vec();
            let mut trace = String::new();
            if !opening.is_empty() {
                trace.push_str("  opening:\n");
                for m in opening {
                    trace.push_str(&format!("      {m}\n"));
                }
            }
            for (k, (state, action)) in steps.iter().enumerate() {
                if let Some(a) = action {
                    trace.push_str(&format!("  {:>2}. {}\n", k + 1, model.describe(state, a)));
                }
            }
            let (last, _) = steps.last().expect("a path has a state");
            panic!(
                "model {name}: property \"{}\" fails after {} steps:\n{trace}final: time {}, \
                 violation {:?}, leaders {:?}, committed {:?}, logs {:?}, commits {:?}",
                p.name,
                steps.len() - 1,
                last.time,
                last.history.violation,
                last.history.leaders,
                last.history.committed,
                last.members.iter().map(|m| &m.log).collect::<Vec<_>>(),
                last.members.iter().map(|m| m.commit).collect::<Vec<_>>()
            );
        }
    }
}

fn base(name: &'static str) -> Raft {
    Raft {
        name,
        steps: 9,
        rates: vec![4, 3, 5],
        election_timeout: 2,
        opening: Vec::new(),
        horizon: 5,
        start: 0,
        max_term: 2,
        max_writes: 0,
        max_crashes: 0,
        max_duplicates: 0,
        max_reads: 0,
        max_transfers: 0,
        max_reconnects: 0,
        max_net: 6,
    }
}

#[test]
fn clients() {
    check(Raft {
        max_writes: 1,
        max_duplicates: 1,
        max_reads: 1,
        max_transfers: 1,
        ..base("clients")
    });
}

#[test]
fn crashes() {
    check(Raft {
        max_writes: 1,
        max_crashes: 1,
        steps: 10,
        ..base("crashes")
    });
}

/// The opening of the scenarios below: node 1 is elected in term 1 with
/// node 2's vote (node 3's vote arrives after); node 1 commits its first
/// record and a client write with node 2. Node 3 holds the first record
/// only: its copy of the write, and its answer for the first record, are
/// in flight.
fn elected() -> Vec<Move> {
    use Kind::*;
    vec![
        Move::Timeout(0),
        Move::Deliver(1, 2, Vote),
        Move::Deliver(2, 1, VoteReply),
        Move::Deliver(1, 2, Append),
        Move::Deliver(1, 3, Vote),
        Move::Deliver(1, 3, Append),
        Move::Deliver(2, 1, AppendAck),
        Move::Deliver(3, 1, VoteReply),
        Move::Write(0),
        Move::Deliver(1, 2, Append),
        Move::Deliver(2, 1, AppendAck),
    ]
}

/// Elections after the opening: the leader's lease against its successor.
#[test]
fn failover() {
    check(Raft {
        opening: elected(),
        max_reads: 1,
        max_term: 3,
        steps: 12,
        ..base("failover")
    });
}

/// A leadership transfer after the opening, and reads around it.
#[test]
fn handover() {
    check(Raft {
        opening: elected(),
        max_reads: 1,
        max_transfers: 1,
        max_term: 3,
        steps: 10,
        ..base("handover")
    });
}

/// Two leaders' logs diverge at LSN 1: node 1 led term 1 and appended its
/// first record and a client write alone (its messages were lost); node 2
/// leads term 2 and committed its own first record with node 3. Node 2's
/// vote request and append to node 1 are in flight.
#[test]
fn diverged() {
    use Kind::*;
    check(Raft {
        opening: vec![
            Move::Timeout(0),
            Move::Deliver(1, 2, Vote),
            Move::Deliver(2, 1, VoteReply),
            Move::Write(0),
            Move::Lose(1, 2),
            Move::Lose(1, 3),
            Move::Timeout(1),
            Move::Deliver(2, 3, Vote),
            Move::Deliver(3, 2, VoteReply),
            Move::Deliver(2, 3, Append),
            Move::Deliver(3, 2, AppendAck),
        ],
        max_writes: 2,
        max_term: 4,
        steps: 10,
        ..base("diverged")
    });
}

/// An older term's records on a majority (Raft's figure 8, on three
/// members): node 1 led term 1 and appended two records alone; node 3 led
/// term 2 and appended one alone; node 1 leads term 3 with node 2's vote,
/// and after node 2's refusal its records of term 1 and its own first
/// record are on their way to node 2 in two appends. Node 3, whose last
/// record (term 2) is newer than term 1, may still be elected with node
/// 2's vote unless node 2 holds term 3's record. One replication stream
/// may break and reopen: its probe carries node 1's commit LSN to node 3,
/// whose log still holds node 3's own record of term 2.
#[test]
fn older_terms() {
    use Kind::*;
    check(Raft {
        opening: vec![
            Move::Timeout(0),
            Move::Deliver(1, 2, Vote),
            Move::Deliver(1, 3, Vote),
            Move::Deliver(2, 1, VoteReply),
            Move::Write(0),
            Move::StepDown(0),
            Move::Lose(1, 2),
            Move::Lose(1, 3),
            Move::Lose(3, 1),
            Move::Timeout(2),
            Move::Deliver(3, 1, Vote),
            Move::Deliver(3, 2, Vote),
            Move::Deliver(2, 3, VoteReply),
            Move::StepDown(2),
            Move::Lose(3, 1),
            Move::Lose(3, 2),
            Move::Lose(1, 3),
            Move::Timeout(0),
            Move::Deliver(1, 3, Vote),
            Move::Deliver(1, 2, Vote),
            Move::Deliver(2, 1, VoteReply),
            Move::Deliver(1, 2, Append),
            Move::Deliver(2, 1, AppendAck),
            Move::Lose(3, 1),
        ],
        max_term: 4,
        max_reconnects: 1,
        steps: 10,
        ..base("older_terms")
    });
}
