//! Scripted simulation scenarios: the real cluster under turmoil, each
//! with one fault sequence chosen to expose one way the lease or a
//! leadership transfer could go wrong (see the README's Simulation
//! section). Each takes a few seconds of simulated time and runs every
//! check of a random run after every step; a failure prints the last
//! events and the history like one.

#![allow(clippy::expect_used, clippy::panic)]

use std::time::Duration;

use kv_sim::harness::{Failure, Scenario};

fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

fn check(name: &str, outcome: Result<(), Failure>) {
    if let Err(failure) = outcome {
        panic!("scenario {name} failed: {failure}");
    }
}

/// Waits for a leader that has committed the cold keys' writes (the
/// cluster is settled, nothing in flight), and returns it with its term.
fn settled(s: &mut Scenario<'_>) -> Result<(u64, u64), Failure> {
    let settled = s.run_until(5000, |s| s.leader().is_some() && s.max_commit() >= 9)?;
    assert!(settled, "no leader committed the cold writes within 5 s");
    s.run_for(300)?;
    let leader = s.leader().expect("a leader");
    let term = s.status(leader).expect("the leader runs").term;
    Ok((leader, term))
}

/// The reads the old leader answered in its old term, and the first time
/// (ms) another node led a later term.
fn report(s: &Scenario<'_>, leader: u64, term: u64, since: u64) -> String {
    let served: Vec<String> = s
        .leader_reads()
        .into_iter()
        .filter(|&(at, node, t)| node == leader && t == term && at >= since as f64)
        .map(|(at, _, _)| format!("{:.0}", at - since as f64))
        .collect();
    format!(
        "n{leader} answered reads in term {term} at +{} ms",
        served.join(", +")
    )
}

/// A reconnect probe answered slowly, then the leader cut off: its lease
/// rests on that probe alone, so it must count from when the probe left.
///
/// Three nodes. The leader L's link to follower F: F's messages to L are
/// slowed by 400 ms; F is restarted, so L reconnects and probes it. The
/// moment F has heard the probe, L's messages to F are cut (F's answer
/// still arrives, 400 ms late) and L is cut from the third node both
/// ways; a client reads from L alone. Counted from the probe's send, L's
/// lease (180 ms) ends before F will vote again (300 ms after it heard
/// the probe); counted from its answer's arrival, it would last 580 ms,
/// past the election (F and the third node) and first commit of a new
/// leader, and a read L answers then is flagged (a deposed leader served
/// a read).
#[test]
fn a_slowly_answered_reconnect_probe_does_not_stretch_the_lease() {
    init_logs();
    let mut s = Scenario::new(7, 3, Duration::from_secs(5));
    let outcome = (|| {
        let (leader, term) = settled(&mut s)?;
        let follower = leader % 3 + 1;
        let third = follower % 3 + 1;
        s.slow_oneway(follower, leader, 250, 3000);
        let incarnation = s.restart(follower);
        let heard = s.run_until(1500, |s| s.follows(follower, incarnation, leader, term))?;
        assert!(heard, "n{follower} never heard n{leader}'s reconnect probe");
        let probe = s.now_ms();
        s.note("the follower heard the reconnect probe: cut the leader off");
        s.partition_oneway(leader, follower, 2000);
        s.partition(leader, third, 2000);
        s.pin_reader(leader, 1000, 5);
        let elected = s.run_until(1500, |s| {
            s.leader()
                .is_some_and(|l| l != leader && s.status(l).is_some_and(|st| st.term > term))
        })?;
        assert!(elected, "no new leader within 1.5 s of the cut");
        s.note(&format!(
            "new leader n{} at +{} ms",
            s.leader().unwrap_or(0),
            s.now_ms() - probe
        ));
        s.run_for(800)?;
        eprintln!("{}", report(&s, leader, term, probe));
        Ok(())
    })();
    check("slow probe", outcome.and_then(|()| s.finish().map(|_| ())));
}

/// A leadership transfer whose caller gives up while `TimeoutNow` is out:
/// the old leader must step down all the same, since the target
/// campaigns with votes that skip the wait its lease relies on.
///
/// Three nodes. Both followers' messages to the leader L are slowed by
/// 100 ms (so L hears late that a new term began, and `TimeoutNow`'s
/// answer is late); a transfer to the target T is started by a caller
/// that gives up after 50 ms, with `TimeoutNow` sent and its answer not
/// yet back; a client reads from L alone. T wins at once (the third
/// node's vote is transfer-marked) and commits its term's first entry
/// with it. An old leader still leading after the caller gave up would
/// answer reads from its lease until the new term's answers reach it;
/// such a read is flagged (a deposed leader served a read).
#[test]
fn a_transfer_given_up_while_timeout_now_is_out_steps_the_leader_down() {
    init_logs();
    let mut s = Scenario::new(11, 3, Duration::from_secs(4));
    let outcome = (|| {
        let (leader, term) = settled(&mut s)?;
        let target = leader % 3 + 1;
        for other in (1..=3).filter(|m| *m != leader) {
            s.slow_oneway(other, leader, 100, 1500);
        }
        s.run_for(300)?;
        let start = s.now_ms();
        s.pin_reader(leader, 600, 2);
        s.transfer_given_up(leader, target, 50);
        let elected = s.run_until(1000, |s| {
            s.leader()
                .is_some_and(|l| l == target && s.status(l).is_some_and(|st| st.term > term))
        })?;
        assert!(elected, "n{target} did not take over within 1 s");
        s.note(&format!("n{target} leads at +{} ms", s.now_ms() - start));
        s.run_for(600)?;
        assert_eq!(s.transfers_given_up(), 1, "the caller did not give up");
        eprintln!("{}", report(&s, leader, term, start));
        Ok(())
    })();
    check(
        "transfer given up",
        outcome.and_then(|()| s.finish().map(|_| ())),
    );
}
