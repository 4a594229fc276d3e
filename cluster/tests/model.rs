//! Model checking of the consensus core with `stateright`: every
//! interleaving of a small cluster's steps, up to a bound, against the
//! protocol's safety properties.
//!
//! The model runs the real [`Replica`] (not a re-statement of it) as each
//! member and plays the runtime around it:
//! - **Network:** a set of messages. Delivering one does not remove it, so
//!   every message may be delivered any number of times, in any order, or
//!   never (loss).
//! - **Disks:** a replica's log is durable as soon as it is appended; its
//!   hard state only when the model takes a separate `Persist` step. Until
//!   then the messages gated on it wait in an outbox, and a crash loses
//!   both the outbox and the unpersisted hard state.
//! - **Crash-restart:** a member restarts from its durable hard state, log
//!   and commit LSN, with nothing else.
//! - **Clocks:** true time advances in steps; each member's clock runs at
//!   its own rate (3/4, 1 or 5/4 of true time, the drift bound the lease
//!   assumes), so leases and election timers race as on real machines.
//! - **Clients:** a bounded number of writes, lease reads and one
//!   leadership transfer, at any member.
//!
//! Properties (`Expectation::Always`): at most one leader per term; log
//! matching; leader completeness; a committed record is never lost or
//! replaced; commit never goes back; no client acknowledgement of a
//! replaced (LSN, term); no lease read served by a leader once a later
//! term has committed anything.
//!
//! `cargo test -p kv-cluster --release --test model` runs the bounded
//! check CI runs (and prints the states explored). `KV_MODEL_DEPTH=N`
//! sets another depth bound; `KV_MODEL_TIME=N` another time horizon.

use std::collections::{BTreeMap, BTreeSet};

use kv_cluster::replica::{
    Config, Durability, Gated, HardState, Input, Message, Ready, Replica, Role, Sent, Time,
    Verdict, WriteStatus,
};
use kv_cluster::{AckLevel, LogView, Lsn, NodeId, Term};
use stateright::{Checker, Model, Property};

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

/// A message on the wire, with what the runtime carries beside it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Envelope {
    from: NodeId,
    to: NodeId,
    /// `Message` is not `Ord`; its debug form keys the set.
    key: String,
    msg: Wire,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Wire(Message, Option<Sent>);

impl PartialOrd for Wire {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Wire {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        // Envelopes compare by `key` first, which is unique per message.
        std::cmp::Ordering::Equal
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
    /// Set when something happened that no property may allow.
    violation: Option<String>,
    crashes: u8,
    duplicates: u8,
    reads: u8,
    transfers: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct State {
    time: Time,
    members: Vec<Member>,
    net: BTreeSet<Envelope>,
    history: History,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    /// True time advances by one unit.
    Advance,
    Tick(usize),
    Persist(usize),
    /// Delivers a message; `keep`: it stays on the wire (a duplicate).
    Deliver(Envelope, bool),
    /// The leader's replicator offers `to` what it has (or a heartbeat).
    Ship(usize, NodeId),
    Write(usize),
    Read(usize),
    Transfer(usize, NodeId),
    Crash(usize),
}

struct Raft {
    members: u64,
    /// Clock rate of each member, in quarters of true time.
    rates: Vec<u64>,
    election_timeout: Time,
    max_time: Time,
    max_writes: usize,
    max_crashes: u8,
    max_duplicates: u8,
    max_reads: u8,
    max_transfers: u8,
}

impl Raft {
    fn config(&self, id: NodeId) -> Config {
        Config {
            id,
            members: (1..=self.members).collect(),
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
}

fn id(i: usize) -> NodeId {
    i as NodeId + 1
}

impl Raft {
    /// Steps member `i` with `input` and carries out the effects, as the
    /// node's runtime does (`sent` rides along with an append's answer).
    fn step(&self, s: &mut State, i: usize, input: Input, sent: Option<Sent>) {
        let now = self.local(i, s.time);
        let m = &mut s.members[i];
        let ready = m.step(now, input.clone());
        let records = match &input {
            Input::Append(req) => Some(req.meta.records.clone()),
            _ => None,
        };
        self.carry_out(s, i, ready, records, sent);
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
        if ready.persist.is_some() && self.max_crashes == 0 {
            // Without crashes a late persist is only a late send: persist at
            // once (fewer interleavings, the same behaviours).
            let m = &mut s.members[i];
            m.durable_hard = m.replica.hard_state();
            m.durable_version = m.replica.hard_state_version();
        }
        let m = &mut s.members[i];
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
                Ok(msg) => send(s, id(i), msg, sent, &s.members[i].log.clone()),
                Err(gated) => s.members[i].outbox.push((gated, sent)),
            }
        }
        let m = &s.members[i];
        if m.replica.role() == Role::Leader {
            s.history.leaders.insert((m.replica.term(), id(i)));
        }
        if ready.persist.is_some() && self.max_crashes == 0 {
            let version = s.members[i].durable_version;
            self.step(s, i, Input::Persisted { version }, None);
        }
        if log_changed {
            let lsn = s.members[i].log.len() as Lsn;
            let m = &mut s.members[i];
            let ready = m.step(now, Input::Durable { lsn });
            self.carry_out(s, i, ready, None, None);
        }
        self.check_acks(s, i);
    }

    fn publish_commit(&self, s: &mut State, i: usize, c: Lsn) {
        let m = &mut s.members[i];
        if c < m.commit {
            s.history.violation = Some(format!("node {} commit went back", id(i)));
            return;
        }
        let term = m.replica.term();
        for lsn in m.commit + 1..=c {
            let Some(&rterm) = m.log.get(lsn as usize - 1) else {
                s.history.violation = Some(format!(
                    "node {} committed LSN {lsn} it does not hold",
                    id(i)
                ));
                return;
            };
            match s.history.committed.get_mut(&lsn) {
                Some((t, _)) if *t != rterm => {
                    s.history.violation = Some(format!(
                        "LSN {lsn} committed as term {t} and as term {rterm}"
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
                s.history.violation = Some(format!(
                    "write ({lsn}, term {term}) acknowledged but LSN {lsn} committed as {:?}",
                    s.history.committed.get(&lsn)
                ));
            }
            s.history.acked.insert((lsn, term));
        }
    }
}

/// Puts a released message on the wire; an append gets its records.
fn send(s: &mut State, from: NodeId, msg: Message, answering: Option<Sent>, log: &[Term]) {
    let (msg, sent) = match msg {
        Message::Append { to, mut req, sent } => {
            req.meta.records = (req.meta.prev_lsn + 1..=sent.last)
                .map(|l| (l, log[l as usize - 1]))
                .collect();
            (Message::Append { to, req, sent }, Some(sent))
        }
        Message::AppendAck { to, ack } => (Message::AppendAck { to, ack }, answering),
        other => (other, None),
    };
    let to = msg.to();
    s.net.insert(Envelope {
        from,
        to,
        key: format!("{msg:?}{sent:?}"),
        msg: Wire(msg, sent),
    });
}

impl Model for Raft {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let members = (0..self.members as usize)
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
                }
            })
            .collect();
        vec![State {
            // Started long enough ago that every member's start-up wait
            // (no vote within the election timeout of starting) is over.
            time: self.start_time(),
            members,
            net: BTreeSet::new(),
            history: History::default(),
        }]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        if s.history.violation.is_some() {
            return;
        }
        if s.time < self.max_time {
            actions.push(Action::Advance);
        }
        for (i, m) in s.members.iter().enumerate() {
            let now = self.local(i, s.time);
            let due = match m.replica.role() {
                Role::Leader => true,
                _ => now >= m.replica.election_due(),
            };
            if due {
                actions.push(Action::Tick(i));
            }
            if self.max_crashes > 0 && m.replica.hard_state_version() > m.durable_version {
                actions.push(Action::Persist(i));
            }
            if m.replica.role() == Role::Leader {
                for peer in (1..=self.members).filter(|p| *p != id(i)) {
                    if m.replica
                        .next_for(peer)
                        .is_some_and(|n| n <= m.log.len() as Lsn)
                    {
                        actions.push(Action::Ship(i, peer));
                    }
                }
                if s.history.writes.len() < self.max_writes {
                    actions.push(Action::Write(i));
                }
                if s.history.reads < self.max_reads {
                    actions.push(Action::Read(i));
                }
                if s.history.transfers < self.max_transfers {
                    for peer in (1..=self.members).filter(|p| *p != id(i)) {
                        actions.push(Action::Transfer(i, peer));
                    }
                }
            }
            if s.history.crashes < self.max_crashes {
                actions.push(Action::Crash(i));
            }
        }
        for e in &s.net {
            actions.push(Action::Deliver(e.clone(), false));
            if s.history.duplicates < self.max_duplicates {
                actions.push(Action::Deliver(e.clone(), true));
            }
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut s = last.clone();
        match action {
            Action::Advance => s.time += 1,
            Action::Tick(i) => {
                self.step(&mut s, i, Input::Tick, None);
                // The heartbeat timer: an empty append to every follower.
                if s.members[i].replica.role() == Role::Leader {
                    for to in (1..=self.members).filter(|p| *p != id(i)) {
                        let next = s.members[i].replica.next_for(to)?;
                        let input = Input::Ship {
                            to,
                            prev_lsn: next - 1,
                            last: next - 1,
                            bytes: 0,
                        };
                        self.step(&mut s, i, input, None);
                    }
                }
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
                            let log = s.members[i].log.clone();
                            send(&mut s, id(i), msg, sent, &log)
                        }
                        Err(gated) => s.members[i].outbox.push((gated, sent)),
                    }
                }
                self.step(&mut s, i, Input::Persisted { version }, None);
            }
            Action::Deliver(e, keep) => {
                if keep {
                    s.history.duplicates += 1;
                } else {
                    s.net.remove(&e);
                }
                let to = e.to as usize - 1;
                let Wire(msg, sent) = e.msg;
                let input = match msg {
                    Message::Vote { req, .. } => Input::Vote(req),
                    Message::VoteReply { reply, .. } => Input::VoteReply(reply),
                    Message::Append { req, .. } => Input::Append(req),
                    Message::AppendAck { ack, .. } => Input::AppendAck {
                        ack,
                        sent: sent.expect("an ack rides with its request"),
                    },
                    Message::TimeoutNow { req, .. } => Input::TimeoutNow(req),
                    Message::TimeoutNowReply { reply, .. } => Input::TimeoutNowAnswered {
                        target: reply.from,
                        reply: Some(reply),
                    },
                };
                self.step(&mut s, to, input, sent);
            }
            Action::Ship(i, to) => {
                let m = &s.members[i];
                let next = m.replica.next_for(to)?;
                let last = m.log.len() as Lsn;
                let (prev, through) = (next - 1, last.min(next + 1));
                let bytes = through - prev;
                let input = Input::Ship {
                    to,
                    prev_lsn: prev,
                    last: through,
                    bytes,
                };
                self.step(&mut s, i, input, None);
            }
            Action::Write(i) => {
                let m = &mut s.members[i];
                let ready = m.step(self.local(i, s.time), Input::Propose);
                if let Some(term) = ready.propose {
                    let lsn = s.members[i].log.len() as Lsn + 1;
                    s.history.writes.insert((lsn, term));
                }
                self.carry_out(&mut s, i, ready, None, None);
            }
            Action::Read(i) => {
                let now = self.local(i, s.time);
                let m = &mut s.members[i];
                let ready = m.step(now, Input::Read);
                if ready.verdict != Some(Verdict::Ok) {
                    return None;
                }
                {
                    s.history.reads += 1;
                    let term = s.members[i].replica.term();
                    if let Some((lsn, (rterm, at))) = s
                        .history
                        .committed
                        .iter()
                        .find(|(_, (rterm, at))| *rterm > term || *at > term)
                    {
                        s.history.violation = Some(format!(
                            "node {} served a lease read in term {term} after LSN {lsn} \
                             (term {rterm}) was committed in term {at}",
                            id(i)
                        ));
                    }
                }
                self.carry_out(&mut s, i, ready, None, None);
            }
            Action::Transfer(i, target) => {
                s.history.transfers += 1;
                self.step(&mut s, i, Input::Transfer { target }, None);
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
            }
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always("no violation seen by the runtime", |_: &Raft, s: &State| {
                s.history.violation.is_none()
            }),
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
            Property::always(
                "a committed record is never lost or replaced",
                |_: &Raft, s: &State| {
                    s.members.iter().all(|m| {
                        (1..=m.commit).all(|lsn| {
                            s.history.committed.get(&lsn).map(|c| c.0)
                                == m.log.get(lsn as usize - 1).copied()
                        })
                    })
                },
            ),
            Property::always(
                "acknowledged writes stay committed",
                |_: &Raft, s: &State| {
                    s.history
                        .acked
                        .iter()
                        .all(|(lsn, term)| s.history.committed.get(lsn).map(|c| c.0) == Some(*term))
                },
            ),
        ]
    }

    fn within_boundary(&self, s: &State) -> bool {
        s.net.len() <= 24
    }
}

fn env(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Runs the check; panics with the counterexample if a property fails.
fn check(model: Raft, depth: usize) {
    let started = std::time::Instant::now();
    let checker = model
        .checker()
        .threads(std::thread::available_parallelism().map_or(1, |n| n.get()))
        .target_max_depth(depth)
        .spawn_dfs()
        .join();
    println!(
        "model: {} states explored ({} unique), depth {} (bound {depth}), in {:.1?}",
        checker.state_count(),
        checker.unique_state_count(),
        checker.max_depth(),
        started.elapsed()
    );
    for p in checker.model().properties() {
        if let Some(path) = checker.discovery(p.name) {
            let last = path.last_state().clone();
            let actions = path.into_actions();
            let mut trace = String::new();
            for (k, a) in actions.iter().enumerate() {
                trace.push_str(&format!("  {k:>2}. {a:?}\n"));
            }
            panic!(
                "property \"{}\" fails after {} steps:\n{trace}final: time {}, violation {:?}, \
                 leaders {:?}, committed {:?}, logs {:?}",
                p.name,
                actions.len(),
                last.time,
                last.history.violation,
                last.history.leaders,
                last.history.committed,
                last.members.iter().map(|m| &m.log).collect::<Vec<_>>()
            );
        }
    }
}

/// Three members with client writes, lease reads and a transfer, over a
/// network that loses, reorders and duplicates.
fn clients() -> Raft {
    Raft {
        members: 3,
        rates: vec![4, 3, 5],
        election_timeout: 2,
        max_time: env("KV_MODEL_TIME").unwrap_or(8) as Time,
        max_writes: 1,
        max_crashes: 0,
        max_duplicates: 1,
        max_reads: 1,
        max_transfers: 1,
    }
}

/// Three members, one of which crashes (losing what it had not persisted)
/// and restarts, with a client write.
fn crashes() -> Raft {
    Raft {
        members: 3,
        rates: vec![4, 3, 5],
        election_timeout: 2,
        max_time: env("KV_MODEL_TIME").unwrap_or(8) as Time,
        max_writes: 1,
        max_crashes: 1,
        max_duplicates: 0,
        max_reads: 0,
        max_transfers: 0,
    }
}

#[test]
fn three_members_with_clients_and_a_transfer_keep_every_safety_property() {
    check(clients(), env("KV_MODEL_DEPTH").unwrap_or(10));
}

#[test]
fn three_members_with_a_crash_keep_every_safety_property() {
    check(crashes(), env("KV_MODEL_DEPTH").unwrap_or(10));
}
