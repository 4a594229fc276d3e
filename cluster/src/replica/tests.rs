//! Unit tests of the core: each protocol rule, and each bug the simulation
//! or a review found in the node's old glue, as a plain test of `step`.

use super::*;

/// A log for the tests: the term of LSN 1..=n, how much of it is durable,
/// and the commit LSN.
#[derive(Debug, Clone, Default)]
struct MemLog {
    terms: Vec<Term>,
    durable: Lsn,
    commit: Lsn,
}

impl LogView for MemLog {
    fn last_lsn(&self) -> Lsn {
        self.terms.len() as Lsn
    }
    fn term_at(&self, lsn: Lsn) -> Option<Term> {
        if lsn == 0 {
            return Some(0);
        }
        self.terms.get(lsn as usize - 1).copied()
    }
    fn commit_lsn(&self) -> Lsn {
        self.commit
    }
    fn durable_lsn(&self) -> Lsn {
        self.durable
    }
}

impl MemLog {
    fn of(terms: &[Term]) -> MemLog {
        MemLog {
            terms: terms.to_vec(),
            durable: terms.len() as Lsn,
            commit: 0,
        }
    }

    /// Carries out a step's log effects (records of `req` for a follower),
    /// everything durable at once.
    fn apply(&mut self, ready: &Ready, req: Option<&AppendRequest>) {
        if let Some(after) = ready.truncate_after {
            self.terms.truncate(after as usize);
        }
        if let (Some(from), Some(req)) = (ready.append_from, req) {
            self.terms
                .extend(req.meta.records[from..].iter().map(|(_, t)| *t));
        }
        if let Some(term) = ready.propose {
            self.terms.push(term);
        }
        self.durable = self.last_lsn();
        if let Some(c) = ready.commit {
            self.commit = c;
        }
    }
}

const T: Time = 100;

fn config(id: NodeId, members: u64) -> Config {
    Config {
        id,
        members: (1..=members).collect(),
        fixed_leader: None,
        election_timeout: T,
        lease: T * 6 / 10,
        transfer_timeout: T / 2,
        inflight_bytes_max: 1000,
    }
}

fn replica(id: NodeId, members: u64, log: &MemLog) -> Replica {
    Replica::new(config(id, members), HardState::default(), log, 0, 7)
}

/// Every message of `ready`, released as if everything were durable.
fn sent(ready: &Ready) -> Vec<Message> {
    let all = Durability {
        hard_state: u64::MAX,
        log: Lsn::MAX,
    };
    ready
        .messages
        .iter()
        .map(|g| g.clone().release(all).expect("released"))
        .collect()
}

fn vote_req(from: NodeId, term: Term, last: (Lsn, Term)) -> VoteRequest {
    VoteRequest {
        from,
        term,
        last_lsn: last.0,
        last_term: last.1,
        transfer: false,
    }
}

fn granted(ready: &Ready) -> Option<bool> {
    sent(ready).iter().find_map(|m| match m {
        Message::VoteReply { reply, .. } => Some(reply.granted),
        _ => None,
    })
}

fn grant(from: NodeId, term: Term) -> Input {
    Input::VoteReply(VoteReply {
        from,
        term,
        granted: true,
        reason: String::new(),
    })
}

/// A leader of term 1 among `members`, elected at time `T * 2`, with its
/// term-start entry at LSN `log.len() + 1` in `log`.
fn leader(members: u64, log: &mut MemLog) -> (Replica, Time) {
    let mut r = replica(1, members, log);
    let now = 2 * T;
    let ready = r.step(now, Input::Tick, log);
    assert_eq!(r.role(), Role::Candidate);
    log.apply(&ready, None);
    let ready = r.step(now, Input::Persisted { version: 1 }, log);
    log.apply(&ready, None);
    let mut voter = 2;
    while r.role() != Role::Leader {
        let ready = r.step(now, grant(voter, r.term()), log);
        log.apply(&ready, None);
        voter += 1;
    }
    (r, now)
}

/// The Append message `ready` holds for `to`.
fn append_to(ready: &Ready, to: NodeId) -> (AppendRequest, Sent) {
    sent(ready)
        .into_iter()
        .find_map(|m| match m {
            Message::Append { to: t, req, sent } if t == to => Some((req, sent)),
            _ => None,
        })
        .expect("an append")
}

fn ack(from: NodeId, term: Term, success: bool, durable: Lsn, last: Lsn) -> AppendAck {
    AppendAck {
        from,
        term,
        success,
        durable_lsn: durable,
        last_lsn: last,
        error: String::new(),
    }
}

/// The leader ships everything from `next` to `peer`, and the peer acks it
/// at `at`, the request sent at `sent_at`.
fn replicate_all(r: &mut Replica, log: &MemLog, peer: NodeId, sent_at: Time, at: Time) -> Ready {
    let next = r.next_for(peer).unwrap();
    let last = log.last_lsn();
    let ready = r.step(
        sent_at,
        Input::Ship {
            to: peer,
            term: r.term(),
            prev_lsn: next - 1,
            last,
            bytes: 10,
        },
        log,
    );
    let (_, s) = append_to(&ready, peer);
    r.step(
        at,
        Input::AppendAck {
            ack: ack(peer, r.term(), true, last, last),
            sent: s,
        },
        log,
    )
}

// ----- elections and votes -----

#[test]
fn the_election_timer_fires_between_t_and_2t_and_is_seeded() {
    let log = MemLog::default();
    let mut a = replica(1, 3, &log);
    let mut b = replica(1, 3, &log);
    let due = a.election_due();
    assert!((T..2 * T).contains(&due), "{due}");
    assert_eq!(
        due,
        b.election_due(),
        "the same seed draws the same timeout"
    );
    assert!(a.step(due - 1, Input::Tick, &log).persist.is_none());
    let ready = a.step(due, Input::Tick, &log);
    assert_eq!(
        ready.persist,
        Some((
            1,
            HardState {
                term: 1,
                voted_for: Some(1)
            }
        ))
    );
    assert_eq!(a.role(), Role::Candidate);
    let c = Replica::new(config(1, 3), HardState::default(), &log, 0, 8);
    assert_ne!(c.election_due(), due, "another seed, another timeout");
    let _ = b.step(due, Input::Tick, &log);
    assert_eq!(a, b, "the same inputs give the same state");
}

#[test]
fn vote_requests_leave_only_after_the_candidates_own_vote_is_durable() {
    let log = MemLog::default();
    let mut r = replica(1, 3, &log);
    let ready = r.step(2 * T, Input::Tick, &log);
    let (version, _) = ready.persist.unwrap();
    assert_eq!(ready.messages.len(), 2);
    for gated in ready.messages {
        let gated = gated
            .release(Durability::default())
            .expect_err("a vote request left before the vote was durable");
        let msg = gated
            .release(Durability {
                hard_state: version,
                log: 0,
            })
            .unwrap();
        assert!(matches!(msg, Message::Vote { req, .. } if req.term == 1));
    }
}

#[test]
fn a_vote_is_granted_once_per_term_and_only_after_it_is_durable() {
    let log = MemLog::default();
    let mut r = replica(1, 3, &log);
    let now = 2 * T;
    let ready = r.step(now, Input::Vote(vote_req(2, 5, (0, 0))), &log);
    let (version, hard) = ready.persist.unwrap();
    assert_eq!(
        hard,
        HardState {
            term: 5,
            voted_for: Some(2)
        }
    );
    let reply = ready.messages[0].clone();
    assert!(
        reply
            .clone()
            .release(Durability {
                hard_state: version - 1,
                log: 0
            })
            .is_err(),
        "the grant left before the vote was durable"
    );
    assert!(
        reply
            .release(Durability {
                hard_state: version,
                log: 0
            })
            .is_ok()
    );
    let again = r.step(now, Input::Vote(vote_req(3, 5, (0, 0))), &log);
    assert_eq!(granted(&again), Some(false), "voted twice in term 5");
    assert!(again.persist.is_none());
    // The same candidate asking again is fine; a later term is open.
    assert_eq!(
        granted(&r.step(now, Input::Vote(vote_req(2, 5, (0, 0))), &log)),
        Some(true)
    );
    assert_eq!(
        granted(&r.step(now, Input::Vote(vote_req(3, 6, (0, 0))), &log)),
        Some(true)
    );
}

#[test]
fn a_restarted_voter_keeps_its_vote() {
    let log = MemLog::default();
    let hard = HardState {
        term: 5,
        voted_for: Some(2),
    };
    let mut r = Replica::new(config(1, 3), hard, &log, 0, 7);
    let ready = r.step(2 * T, Input::Vote(vote_req(3, 5, (0, 0))), &log);
    assert_eq!(granted(&ready), Some(false));
}

#[test]
fn no_vote_for_a_log_behind_ours() {
    let log = MemLog::of(&[1, 1, 2]);
    let mut r = replica(1, 3, &log);
    let now = 2 * T;
    // A higher last LSN does not make up for a lower last term.
    for behind in [(2, 2), (9, 1), (0, 0)] {
        let ready = r.step(now, Input::Vote(vote_req(2, 5, behind)), &log);
        assert_eq!(granted(&ready), Some(false), "{behind:?}");
    }
    let ready = r.step(now, Input::Vote(vote_req(3, 5, (3, 2))), &log);
    assert_eq!(granted(&ready), Some(true));
}

#[test]
fn no_vote_while_a_leader_was_heard_within_t_unless_a_transfer() {
    let log = MemLog::default();
    let mut r = replica(1, 3, &log);
    // Just started: counts as having heard a leader.
    let ready = r.step(T - 1, Input::Vote(vote_req(2, 5, (0, 0))), &log);
    assert_eq!(granted(&ready), Some(false));
    assert_eq!(r.term(), 0, "adopted the term of a vote it refused");
    let mut transfer = vote_req(2, 5, (0, 0));
    transfer.transfer = true;
    assert_eq!(
        granted(&r.step(T - 1, Input::Vote(transfer), &log)),
        Some(true)
    );
    let mut other = vote_req(3, 5, (0, 0));
    other.transfer = true;
    assert_eq!(
        granted(&r.step(T - 1, Input::Vote(other), &log)),
        Some(false),
        "voted twice in term 5"
    );
}

#[test]
fn a_leader_grants_no_vote_to_a_rejoining_node_with_a_higher_term() {
    let mut log = MemLog::default();
    let (mut r, now) = leader(3, &mut log);
    let ready = r.step(now + 10 * T, Input::Vote(vote_req(3, 50, (9, 9))), &log);
    assert_eq!(granted(&ready), Some(false));
    assert_eq!(r.role(), Role::Leader);
}

#[test]
fn a_majority_elects_and_the_term_starts_with_its_own_entry() {
    let mut log = MemLog::of(&[1, 1]);
    let (r, _) = leader(3, &mut log);
    assert_eq!(r.role(), Role::Leader);
    assert_eq!(log.terms, vec![1, 1, r.term()], "the term-start entry");
    assert_eq!(r.read_barrier(), 3);
}

#[test]
fn majorities_of_three_four_and_five() {
    for (members, votes_needed) in [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3)] {
        let log = MemLog::default();
        let mut r = replica(1, members, &log);
        let ready = r.step(2 * T, Input::Tick, &log);
        let _ = r.step(2 * T, Input::Persisted { version: 1 }, &log);
        let _ = ready;
        for voter in 2..=votes_needed {
            assert_ne!(r.role(), Role::Leader, "{members} members won early");
            let _ = r.step(2 * T, grant(voter, 1), &log);
        }
        assert_eq!(
            r.role(),
            Role::Leader,
            "{members} members, {votes_needed} votes"
        );
        // A duplicated vote counts once.
        let log = MemLog::default();
        let mut r = replica(1, members, &log);
        let _ = r.step(2 * T, Input::Tick, &log);
        for _ in 0..5 {
            let _ = r.step(2 * T, grant(2, 1), &log);
        }
        assert_eq!(r.role() == Role::Leader, votes_needed <= 2, "{members}");
    }
}

#[test]
fn a_lone_member_leads_only_once_its_vote_is_durable() {
    let mut log = MemLog::default();
    let mut r = replica(1, 1, &log);
    let ready = r.step(2 * T, Input::Tick, &log);
    assert!(ready.persist.is_some());
    assert_eq!(r.role(), Role::Candidate, "led before its vote was durable");
    let ready = r.step(2 * T, Input::Persisted { version: 1 }, &log);
    assert_eq!(r.role(), Role::Leader);
    log.apply(&ready, None);
    let ready = r.step(2 * T, Input::Durable { lsn: 1 }, &log);
    assert_eq!(ready.commit, Some(1), "one member is its own majority");
}

#[test]
fn a_higher_term_in_any_answer_steps_a_leader_down_durably() {
    let mut log = MemLog::default();
    let (mut r, now) = leader(3, &mut log);
    let ready = r.step(
        now,
        Input::Ship {
            to: 2,
            term: r.term(),
            prev_lsn: 0,
            last: 0,
            bytes: 0,
        },
        &log,
    );
    let (_, s) = append_to(&ready, 2);
    let ready = r.step(
        now,
        Input::AppendAck {
            ack: ack(2, 9, false, 0, 0),
            sent: s,
        },
        &log,
    );
    assert_eq!(r.role(), Role::Follower);
    assert_eq!(
        ready.persist.map(|(_, h)| h),
        Some(HardState {
            term: 9,
            voted_for: None
        })
    );
    assert!(ready.events.contains(&Event::SteppedDown {
        term: 1,
        why: StepDown::HigherTerm
    }));
}

// ----- the follower side -----

fn append_req(
    from: NodeId,
    term: Term,
    prev: (Lsn, Term),
    terms: &[Term],
    commit: Lsn,
) -> AppendRequest {
    AppendRequest {
        from,
        term,
        meta: AppendMeta {
            prev_lsn: prev.0,
            prev_term: prev.1,
            records: terms
                .iter()
                .enumerate()
                .map(|(i, t)| (prev.0 + 1 + i as Lsn, *t))
                .collect(),
        },
        commit,
    }
}

#[test]
fn a_follower_acknowledges_only_once_the_batch_is_durable_and_commits_what_it_vouches_for() {
    let mut log = MemLog::default();
    let mut r = replica(2, 3, &log);
    let req = append_req(1, 1, (0, 0), &[1, 1, 1], 5);
    let ready = r.step(10, Input::Append(req.clone()), &log);
    assert_eq!(ready.accepted, Some(true));
    assert_eq!(ready.append_from, Some(0));
    assert_eq!(r.leader(), Some(1));
    let gate = ready.messages[0].clone();
    assert!(
        gate.clone()
            .release(Durability {
                hard_state: u64::MAX,
                log: 2
            })
            .is_err(),
        "acknowledged records that are not durable"
    );
    let Ok(Message::AppendAck { ack, .. }) = gate.release(Durability {
        hard_state: u64::MAX,
        log: 3,
    }) else {
        panic!("no ack")
    };
    assert!(ack.success);
    assert_eq!(ack.durable_lsn, 3);
    // Applied (appended, not durable yet): nothing committed until durable.
    log.terms.extend([1, 1, 1]);
    assert_eq!(ready.commit, None);
    log.durable = 3;
    let ready = r.step(11, Input::Durable { lsn: 3 }, &log);
    // The leader said 5, but the batch vouches for our log through 3 only.
    assert_eq!(ready.commit, Some(3));
}

#[test]
fn a_stale_leader_is_refused_with_our_term_and_nothing_changes() {
    let log = MemLog::of(&[2]);
    let hard = HardState {
        term: 3,
        voted_for: None,
    };
    let mut r = Replica::new(config(2, 3), hard, &log, 0, 7);
    let before = r.clone();
    let ready = r.step(10, Input::Append(append_req(1, 2, (1, 2), &[2], 1)), &log);
    assert_eq!(ready.accepted, Some(false));
    assert!(ready.append_from.is_none() && ready.truncate_after.is_none());
    let Message::AppendAck { ack, .. } = &sent(&ready)[0] else {
        panic!()
    };
    assert_eq!((ack.term, ack.success), (3, false));
    assert_eq!(r, before);
}

#[test]
fn an_append_from_a_non_member_or_a_second_leader_is_an_error() {
    let log = MemLog::default();
    let mut r = replica(2, 3, &log);
    let ready = r.step(10, Input::Append(append_req(9, 1, (0, 0), &[], 0)), &log);
    assert!(ready.error.is_some());
    let _ = r.step(10, Input::Append(append_req(1, 1, (0, 0), &[], 0)), &log);
    let ready = r.step(10, Input::Append(append_req(3, 1, (0, 0), &[], 0)), &log);
    assert!(
        ready
            .error
            .clone()
            .unwrap()
            .to_string()
            .contains("node 1 leads term 1"),
        "{ready:?}"
    );
    assert_eq!(r.leader(), Some(1));
}

#[test]
fn a_mismatch_refusal_points_before_the_mismatch() {
    let log = MemLog::of(&[1, 1, 2, 2]);
    let mut r = replica(2, 3, &log);
    let ready = r.step(10, Input::Append(append_req(1, 3, (4, 3), &[3], 0)), &log);
    let Message::AppendAck { ack, .. } = &sent(&ready)[0] else {
        panic!()
    };
    assert!(!ack.success);
    assert_eq!(ack.last_lsn, 3, "{ack:?}");
}

// ----- the leader side -----

#[test]
fn commit_needs_a_majority_of_this_terms_records() {
    let mut log = MemLog::of(&[1]);
    let (mut r, now) = leader(3, &mut log);
    assert_eq!(r.term(), 1);
    // The term-start entry at LSN 2 commits with one follower.
    let ready = replicate_all(&mut r, &log, 2, now, now + 1);
    assert_eq!(ready.commit, Some(2));
    let read = r.step(now + 2, Input::Read, &log);
    assert_eq!(read.verdict, Some(Verdict::Ok));
}

#[test]
fn only_durable_records_are_shipped() {
    let mut log = MemLog::default();
    let (mut r, now) = leader(3, &mut log);
    log.terms.push(1);
    log.durable = 1;
    let ready = r.step(
        now,
        Input::Ship {
            to: 2,
            term: r.term(),
            prev_lsn: 0,
            last: 2,
            bytes: 10,
        },
        &log,
    );
    assert!(
        ready.messages.is_empty(),
        "shipped a record not durable here"
    );
    log.durable = 2;
    let ready = r.step(
        now,
        Input::Ship {
            to: 2,
            term: r.term(),
            prev_lsn: 0,
            last: 2,
            bytes: 10,
        },
        &log,
    );
    assert_eq!(ready.messages.len(), 1);
}

/// Seed 1096: with several requests in flight, the first refusal backs
/// `next` up; the refusals of requests sent before it are stale, and acting
/// on them would undo the back-up (forever, with a steady pipeline).
#[test]
fn a_stale_refusal_does_not_move_next_again() {
    let mut log = MemLog::of(&[1, 1, 1, 1, 1]);
    let (mut r, now) = leader(3, &mut log);
    let term = r.term();
    log.terms.extend([term, term]);
    log.durable = log.last_lsn();
    // Progress starts at last + 1 = 7 (the term start is LSN 6): send 7..=8
    // and a heartbeat, all from a `next` the follower will refuse.
    let next = r.next_for(2).unwrap();
    let first = r.step(
        now,
        Input::Ship {
            to: 2,
            term: r.term(),
            prev_lsn: next - 1,
            last: 8,
            bytes: 10,
        },
        &log,
    );
    let (_, s1) = append_to(&first, 2);
    let second = r.step(
        now,
        Input::Ship {
            to: 2,
            term: r.term(),
            prev_lsn: 8,
            last: 8,
            bytes: 0,
        },
        &log,
    );
    let (_, s2) = append_to(&second, 2);
    // The follower holds only LSN 1..=2: both are refused with last 2.
    let _ = r.step(
        now + 1,
        Input::AppendAck {
            ack: ack(2, term, false, 2, 2),
            sent: s1,
        },
        &log,
    );
    assert_eq!(r.next_for(2), Some(3));
    // The follower's log moved on meanwhile (say it holds 4 now); the stale
    // refusal must not move `next` anywhere.
    let _ = r.step(
        now + 2,
        Input::AppendAck {
            ack: ack(2, term, false, 2, 4),
            sent: s2,
        },
        &log,
    );
    assert_eq!(r.next_for(2), Some(3), "a stale refusal moved next");
    assert_eq!(r.peers()[&2].progress.inflight_bytes, 0);
}

/// Seed 1106: a replicator of an old term ships nothing once the node no
/// longer leads that term, and an answer to its requests changes nothing.
#[test]
fn answers_to_an_old_terms_requests_change_nothing() {
    let mut log = MemLog::default();
    let (mut r, now) = leader(3, &mut log);
    let ready = r.step(
        now,
        Input::Ship {
            to: 2,
            term: r.term(),
            prev_lsn: 0,
            last: 1,
            bytes: 10,
        },
        &log,
    );
    let (_, old) = append_to(&ready, 2);
    // Deposed (term 2), then leads again in term 3.
    let _ = r.step(
        now,
        Input::Vote(VoteRequest {
            transfer: true,
            ..vote_req(3, 2, (9, 9))
        }),
        &log,
    );
    assert_eq!(r.role(), Role::Follower);
    let ready = r.step(
        now,
        Input::Ship {
            to: 2,
            term: r.term(),
            prev_lsn: 0,
            last: 1,
            bytes: 10,
        },
        &log,
    );
    assert!(ready.messages.is_empty(), "a deposed leader shipped");
    let ready = r.step(10 * T, Input::Tick, &log);
    log.apply(&ready, None);
    let _ = r.step(
        10 * T,
        Input::Persisted {
            version: r.hard_state_version(),
        },
        &log,
    );
    let ready = r.step(10 * T, grant(2, 3), &log);
    log.apply(&ready, None);
    assert!(r.leads_in(3));
    let before = r.peers()[&2].clone();
    let ready = r.step(
        10 * T,
        Input::AppendAck {
            ack: ack(2, 3, true, 1, 1),
            sent: old,
        },
        &log,
    );
    assert_eq!(r.peers()[&2], before, "an old term's ack moved progress");
    assert!(ready.commit.is_none());
}

/// Seed 1106 too: a record cached while leading an earlier term may since
/// have been replaced in the log (as a follower).
#[test]
fn the_shipping_cache_is_valid_only_while_the_log_holds_its_record() {
    let log = MemLog::of(&[1, 1, 3]);
    assert!(cached_record_valid(&log, 2, 1));
    assert!(
        !cached_record_valid(&log, 3, 2),
        "a replaced record was shipped"
    );
    assert!(!cached_record_valid(&log, 4, 3), "a record past the log");
}

/// Seed 1112: a write whose LSN a new leader's record took is not
/// acknowledged, even once that LSN is committed.
#[test]
fn a_write_replaced_at_its_lsn_is_never_acknowledged() {
    let mut log = MemLog::of(&[1]);
    let (mut r, now) = leader(3, &mut log);
    let term = r.term();
    let _ = replicate_all(&mut r, &log, 2, now, now + 1);
    log.terms.push(term);
    log.durable = 3;
    let _ = replicate_all(&mut r, &log, 2, now + 2, now + 3);
    assert_eq!(
        r.write_status(&log, 3, term, AckLevel::Quorum),
        WriteStatus::Acknowledged
    );
    // The same LSN now holds another term's record.
    assert_eq!(
        r.write_status(&log, 3, term - 1, AckLevel::Quorum),
        WriteStatus::Replaced { by: term }
    );
    assert_eq!(
        r.write_status(&log, 4, term, AckLevel::Quorum),
        WriteStatus::Pending
    );
    assert_eq!(
        r.write_status(&log, 3, term, AckLevel::All),
        WriteStatus::Pending
    );
}

/// Review bug 3: a deposed leader never advances its commit LSN from the
/// progress its followers reported while it led.
#[test]
fn a_deposed_leader_does_not_advance_commit() {
    let mut log = MemLog::default();
    let (mut r, now) = leader(3, &mut log);
    let term = r.term();
    log.terms.extend([term, term]);
    log.durable = 3;
    // Follower 2 holds all three, unacknowledged yet.
    let ready = r.step(
        now,
        Input::Ship {
            to: 2,
            term: r.term(),
            prev_lsn: 0,
            last: 3,
            bytes: 10,
        },
        &log,
    );
    let (_, s) = append_to(&ready, 2);
    // Deposed by term + 1, whose leader replaces LSNs 2 and 3.
    let ready = r.step(
        now,
        Input::Vote(VoteRequest {
            transfer: true,
            ..vote_req(3, term + 1, (9, 9))
        }),
        &log,
    );
    assert!(ready.persist.is_some());
    log.terms.truncate(1);
    log.terms.extend([term + 1, term + 1]);
    // The old request's ack, and our own durability, arrive now.
    let a = r.step(
        now,
        Input::AppendAck {
            ack: ack(2, term, true, 3, 3),
            sent: s,
        },
        &log,
    );
    let b = r.step(now, Input::Durable { lsn: 3 }, &log);
    assert_eq!(
        (a.commit, b.commit, r.commit()),
        (None, None, 0),
        "a deposed leader committed from its old followers' progress"
    );
}

// ----- the lease, check quorum, the read barrier -----

/// Review bug 2: the lease counts from when a request was sent, never from
/// when its answer came (the follower's wait began when it heard it).
#[test]
fn the_lease_counts_from_the_send_not_from_the_answer() {
    let mut log = MemLog::default();
    let (mut r, now) = leader(3, &mut log);
    let _ = replicate_all(&mut r, &log, 2, now, now + 50);
    let lease = r.config().lease;
    assert!(r.lease_valid(now + lease - 1));
    assert!(
        !r.lease_valid(now + lease),
        "the lease ran from the answer, not the send"
    );
}

/// The lease and check quorum need a majority of the whole membership:
/// with one follower short of it in touch, no lease and a step-down.
#[test]
fn the_lease_and_check_quorum_need_a_majority_of_3_4_and_5() {
    for (members, fresh_needed) in [(3u64, 1u64), (4, 2), (5, 2)] {
        for fresh in 0..members {
            let mut log = MemLog::default();
            let (mut r, now) = leader(members, &mut log);
            let later = now + T / 2;
            for peer in 2..2 + fresh {
                let _ = replicate_all(&mut r, &log, peer, later, later + 1);
            }
            assert_eq!(
                r.lease_valid(later + 2),
                fresh >= fresh_needed,
                "{members} members, {fresh} fresh followers"
            );
            let ready = r.step(now + T + 1, Input::Tick, &log);
            assert_eq!(
                r.role() == Role::Leader,
                fresh >= fresh_needed,
                "{members} members, {fresh} fresh followers: check quorum"
            );
            if fresh < fresh_needed {
                assert!(ready.events.contains(&Event::SteppedDown {
                    term: 1,
                    why: StepDown::NoQuorum
                }));
            }
        }
    }
}

/// The term-identity check on acknowledgements: an answer in a lower term
/// (from a follower that has not adopted ours) is no lease evidence.
#[test]
fn only_an_answer_in_our_term_counts_for_the_lease() {
    let mut log = MemLog::default();
    let (mut r, now) = leader(3, &mut log);
    let ready = r.step(
        now,
        Input::Ship {
            to: 2,
            term: r.term(),
            prev_lsn: 1,
            last: 1,
            bytes: 0,
        },
        &log,
    );
    let (_, s) = append_to(&ready, 2);
    let _ = r.step(
        now,
        Input::AppendAck {
            ack: ack(2, 0, false, 0, 0),
            sent: s,
        },
        &log,
    );
    assert!(
        !r.lease_valid(now + 1),
        "an answer of term 0 counted for the lease"
    );
}

/// Seed 1001: a leader serves no read until its commit LSN covers its
/// term-start entry (fixed leader: the log it started with).
#[test]
fn no_read_before_the_barrier_is_committed() {
    let mut log = MemLog::of(&[1, 1]);
    let (mut r, now) = leader(3, &mut log);
    // A fresh lease, but the term start (LSN 3) is not committed.
    let ready = r.step(
        now,
        Input::Ship {
            to: 2,
            term: r.term(),
            prev_lsn: 3,
            last: 3,
            bytes: 0,
        },
        &log,
    );
    let (_, s) = append_to(&ready, 2);
    let _ = r.step(
        now,
        Input::AppendAck {
            ack: ack(2, 1, true, 0, 0),
            sent: s,
        },
        &log,
    );
    assert!(r.lease_valid(now + 1));
    assert_eq!(
        r.step(now + 1, Input::Read, &log).verdict,
        Some(Verdict::Refused(Refused::Barrier { barrier: 3 }))
    );
    // A fixed leader restarted over a log of 2, commit 0.
    let mut c = config(1, 3);
    c.fixed_leader = Some(1);
    let log = MemLog::of(&[1, 1]);
    let mut r = Replica::new(
        c,
        HardState {
            term: 1,
            voted_for: None,
        },
        &log,
        0,
        7,
    );
    assert_eq!(
        r.step(0, Input::Read, &log).verdict,
        Some(Verdict::Refused(Refused::Barrier { barrier: 2 }))
    );
}

#[test]
fn a_follower_refuses_client_requests_naming_the_leader() {
    let log = MemLog::default();
    let mut r = replica(2, 3, &log);
    let _ = r.step(10, Input::Append(append_req(1, 1, (0, 0), &[], 0)), &log);
    for input in [Input::Read, Input::Propose, Input::Transfer { target: 3 }] {
        assert_eq!(
            r.step(10, input, &log).verdict,
            Some(Verdict::Refused(Refused::NotLeader { leader: Some(1) }))
        );
    }
}

// ----- leadership transfer -----

/// A leader in a transfer, caught up on follower 2, with a fresh lease.
fn transferring(log: &mut MemLog) -> (Replica, Time, Ready) {
    let (mut r, now) = leader(3, log);
    let _ = replicate_all(&mut r, log, 2, now, now);
    let ready = r.step(now, Input::Transfer { target: 2 }, log);
    (r, now, ready)
}

#[test]
fn a_transfer_refuses_reads_and_writes_and_tells_the_target_once_caught_up() {
    let mut log = MemLog::default();
    let (mut r, now) = leader(3, &mut log);
    let _ = replicate_all(&mut r, &log, 3, now, now);
    let ready = r.step(now, Input::Transfer { target: 2 }, &log);
    assert_eq!(ready.verdict, Some(Verdict::Ok));
    assert!(ready.messages.is_empty(), "told a target that is behind");
    for input in [Input::Read, Input::Propose] {
        let ready = r.step(now, input, &log);
        assert_eq!(
            ready.verdict,
            Some(Verdict::Refused(Refused::Transferring { target: 2 }))
        );
        assert!(ready.propose.is_none());
    }
    let ready = replicate_all(&mut r, &log, 2, now + 1, now + 2);
    assert!(matches!(
        sent(&ready)[..],
        [Message::TimeoutNow {
            to: 2,
            req: TimeoutNow { term: 1, .. }
        }]
    ));
    let again = r.step(now + 3, Input::Transfer { target: 3 }, &log);
    assert_eq!(
        again.verdict,
        Some(Verdict::Refused(Refused::TransferUnderWay { target: 2 }))
    );
}

/// Review bug 1: however the transfer's caller fares, once `TimeoutNow`
/// may be on its way this node stops leading: on a confirmation, on no
/// answer, and at the deadline if no answer is ever fed back.
#[test]
fn once_timeout_now_may_be_out_the_leader_steps_down() {
    for answer in [
        Some(Some(true)),
        Some(None), // the RPC failed or timed out
        None,       // nothing ever came back (the caller gave up)
    ] {
        let mut log = MemLog::default();
        let (mut r, now, ready) = transferring(&mut log);
        assert!(matches!(
            sent(&ready)[..],
            [Message::TimeoutNow { to: 2, .. }]
        ));
        match answer {
            Some(reply) => {
                let reply = reply.map(|started| TimeoutNowReply {
                    from: 2,
                    term: 1,
                    started,
                    reason: String::new(),
                });
                let _ = r.step(
                    now + 1,
                    Input::TimeoutNowAnswered { target: 2, reply },
                    &log,
                );
            }
            None => {
                let _ = r.step(now + T / 2 - 1, Input::Tick, &log);
                assert_eq!(r.role(), Role::Leader, "gave up before the deadline");
                let _ = r.step(now + T / 2, Input::Tick, &log);
            }
        }
        assert_eq!(r.role(), Role::Follower, "{answer:?}: still leading");
        assert!(
            !r.lease_valid(now + 1),
            "{answer:?}: a lease after handing over"
        );
        assert_eq!(r.transferring_to(), None);
    }
}

#[test]
fn a_target_that_will_not_campaign_leaves_the_leader_leading() {
    let mut log = MemLog::default();
    let (mut r, now, _) = transferring(&mut log);
    let reply = Some(TimeoutNowReply {
        from: 2,
        term: 1,
        started: false,
        reason: "no".into(),
    });
    let ready = r.step(
        now + 1,
        Input::TimeoutNowAnswered { target: 2, reply },
        &log,
    );
    assert_eq!(r.role(), Role::Leader);
    assert_eq!(r.transferring_to(), None);
    assert!(ready.events.iter().any(|e| matches!(
        e,
        Event::TransferEnded {
            outcome: TransferOutcome::TargetRefused { .. },
            ..
        }
    )));
    assert_eq!(
        r.step(now + 1, Input::Propose, &log).verdict,
        Some(Verdict::Ok)
    );
}

#[test]
fn a_target_that_never_catches_up_leaves_the_leader_leading_after_the_deadline() {
    let mut log = MemLog::default();
    let (mut r, now) = leader(3, &mut log);
    let _ = r.step(now, Input::Transfer { target: 2 }, &log);
    let ready = r.step(now + T / 2, Input::Tick, &log);
    assert_eq!(r.role(), Role::Leader);
    assert!(ready.events.iter().any(|e| matches!(
        e,
        Event::TransferEnded {
            outcome: TransferOutcome::TargetBehind { .. },
            ..
        }
    )));
}

#[test]
fn timeout_now_from_a_non_leader_starts_no_campaign() {
    let log = MemLog::default();
    let mut r = replica(2, 3, &log);
    let _ = r.step(10, Input::Append(append_req(1, 1, (0, 0), &[], 0)), &log);
    let ready = r.step(10, Input::TimeoutNow(TimeoutNow { from: 3, term: 1 }), &log);
    assert!(matches!(
        &sent(&ready)[..],
        [Message::TimeoutNowReply {
            reply: TimeoutNowReply { started: false, .. },
            ..
        }]
    ));
    assert_eq!((r.term(), r.role()), (1, Role::Follower));
    let ready = r.step(10, Input::TimeoutNow(TimeoutNow { from: 1, term: 1 }), &log);
    assert_eq!(r.role(), Role::Candidate);
    let requests: Vec<_> = sent(&ready)
        .into_iter()
        .filter_map(|m| match m {
            Message::Vote { req, .. } => Some(req),
            _ => None,
        })
        .collect();
    assert_eq!(requests.len(), 2);
    assert!(requests.iter().all(|q| q.transfer && q.term == 2));
}

#[test]
fn elections_off_keeps_the_fixed_leader_and_refuses_votes_and_transfers() {
    let log = MemLog::default();
    let mut c = config(1, 3);
    c.fixed_leader = Some(1);
    let mut r = Replica::new(
        c,
        HardState {
            term: 1,
            voted_for: None,
        },
        &log,
        0,
        7,
    );
    assert_eq!(r.role(), Role::Leader);
    let _ = r.step(100 * T, Input::Tick, &log);
    assert_eq!(
        r.role(),
        Role::Leader,
        "check quorum ran with elections off"
    );
    let ready = r.step(100 * T, Input::Vote(vote_req(2, 5, (9, 9))), &log);
    assert_eq!(granted(&ready), Some(false));
    assert_eq!(
        r.step(0, Input::Transfer { target: 2 }, &log).verdict,
        Some(Verdict::Refused(Refused::ElectionsOff))
    );
}

/// A candidate that loses its term and follows the winner keeps nothing
/// the old leader vouched for: only what the new leader's own appends
/// show to match commits (here a heartbeat at 7 with commit 8 must not
/// commit our stale LSN 8).
#[test]
fn what_an_old_leader_vouched_for_does_not_outlive_its_term() {
    let log = MemLog::of(&[1; 10]);
    let mut r = replica(2, 3, &log);
    // Leader 1 of term 1 vouches for all ten (they are duplicates here).
    let ready = r.step(
        10,
        Input::Append(append_req(1, 1, (0, 0), &[1; 10], 5)),
        &log,
    );
    assert_eq!(ready.commit, Some(5));
    // We campaign in term 2 (and lose: node 3 wins with 1..=7 of term 1
    // and its term-start entry at 8).
    let _ = r.step(10 + 2 * T, Input::Tick, &log);
    assert_eq!((r.role(), r.term()), (Role::Candidate, 2));
    let ready = r.step(
        10 + 2 * T,
        Input::Append(append_req(3, 2, (7, 1), &[], 8)),
        &log,
    );
    assert_eq!(ready.accepted, Some(true));
    assert!(
        r.commit() <= 7,
        "committed our LSN {} on the word of the old leader",
        r.commit()
    );
}

/// A replicator of an old term (the node lost that term and won a later
/// one meanwhile) ships nothing and resets nothing of the new term.
#[test]
fn a_replicator_of_an_old_term_ships_nothing_and_resets_nothing() {
    let mut log = MemLog::default();
    let (mut r, now) = leader(3, &mut log);
    let old = r.term();
    // Deposed (term 2), then leads term 3.
    let _ = r.step(
        now,
        Input::Vote(VoteRequest {
            transfer: true,
            ..vote_req(3, 2, (9, 9))
        }),
        &log,
    );
    let ready = r.step(10 * T, Input::Tick, &log);
    log.apply(&ready, None);
    let _ = r.step(
        10 * T,
        Input::Persisted {
            version: r.hard_state_version(),
        },
        &log,
    );
    let ready = r.step(10 * T, grant(2, 3), &log);
    log.apply(&ready, None);
    assert!(r.leads_in(3));
    let _ = replicate_all(&mut r, &log, 2, 10 * T, 10 * T);
    let before = r.peers()[&2].clone();
    let ship = Input::Ship {
        to: 2,
        term: old,
        prev_lsn: 0,
        last: 0,
        bytes: 0,
    };
    assert!(
        r.step(10 * T, ship, &log).messages.is_empty(),
        "an old term's replicator shipped"
    );
    let _ = r.step(10 * T, Input::Disconnected { peer: 2, term: old }, &log);
    assert_eq!(
        r.peers()[&2],
        before,
        "an old term's replicator reset this term's progress"
    );
}
