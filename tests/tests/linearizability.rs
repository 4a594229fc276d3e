//! Tests of the linearizability checker itself: hand-written histories with
//! known verdicts, a cross-check against a brute-force checker on thousands of
//! random tiny histories, and a larger history as a performance sanity check.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kv_sim::linearizability::{Input, Operation, Output, Verdict, check, format_history};

/// Generous: the hand-written histories take microseconds.
const BUDGET: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Builders for hand-written histories. Times are [call, ret].

fn put(client: u64, key: &str, value: &str, call: u64, ret: u64) -> Operation {
    op(
        client,
        key,
        Input::Put(value.into()),
        Output::Written,
        call,
        ret,
    )
}

/// A put whose outcome is unknown (timed out); it completes at +infinity.
fn put_unknown(client: u64, key: &str, value: &str, call: u64) -> Operation {
    op(
        client,
        key,
        Input::Put(value.into()),
        Output::Unknown,
        call,
        call + 1,
    )
}

fn delete(client: u64, key: &str, call: u64, ret: u64) -> Operation {
    op(client, key, Input::Delete, Output::Written, call, ret)
}

fn delete_unknown(client: u64, key: &str, call: u64) -> Operation {
    op(client, key, Input::Delete, Output::Unknown, call, call + 1)
}

/// A get that observed `seen` (`None`: absent).
fn get(client: u64, key: &str, seen: Option<&str>, call: u64, ret: u64) -> Operation {
    let seen = seen.map(|v| v.as_bytes().to_vec());
    op(client, key, Input::Get, Output::Read(seen), call, ret)
}

fn op(client: u64, key: &str, input: Input, output: Output, call: u64, ret: u64) -> Operation {
    Operation {
        client,
        key: key.into(),
        input,
        output,
        call,
        ret,
    }
}

/// The one helper every hand-written case goes through: `None` expects a
/// linearizable history, `Some(key)` expects `key` to be reported illegal.
#[track_caller]
fn check_case(history: &[Operation], illegal_key: Option<&str>) {
    let verdict = check(history, BUDGET);
    let ok = match (&verdict, illegal_key) {
        (Verdict::Ok, None) => true,
        (Verdict::Illegal { key, explanation }, Some(expected)) => {
            assert!(!explanation.is_empty());
            key.as_slice() == expected.as_bytes()
        }
        _ => false,
    };
    assert!(
        ok,
        "expected {}, got {verdict:?}\n{}",
        illegal_key.map_or("Ok".to_string(), |k| format!("Illegal on key {k:?}")),
        format_history(history)
    );
}

// ---------------------------------------------------------------------------
// Hand-written histories.

#[test]
fn empty_history_is_ok() {
    check_case(&[], None);
}

#[test]
fn sequential_puts_and_gets_are_ok() {
    check_case(
        &[
            get(1, "k", None, 0, 5),
            put(1, "k", "a", 10, 20),
            get(1, "k", Some("a"), 30, 40),
            put(2, "k", "b", 50, 60),
            get(1, "k", Some("b"), 70, 80),
        ],
        None,
    );
}

#[test]
fn get_of_a_value_never_written_is_illegal() {
    check_case(
        &[put(1, "k", "a", 0, 10), get(2, "k", Some("zzz"), 20, 30)],
        Some("k"),
    );
    check_case(&[get(2, "k", Some("a"), 0, 10)], Some("k"));
}

#[test]
fn stale_read_after_a_completed_put_is_illegal() {
    check_case(
        &[put(1, "k", "a", 0, 10), get(2, "k", None, 20, 30)],
        Some("k"),
    );
    check_case(
        &[
            put(1, "k", "a", 0, 10),
            put(1, "k", "b", 20, 30),
            get(2, "k", Some("a"), 40, 50),
        ],
        Some("k"),
    );
}

#[test]
fn a_get_concurrent_with_a_put_may_see_old_or_new() {
    let base = [put(1, "k", "a", 0, 10), put(1, "k", "b", 20, 40)];
    for seen in ["a", "b"] {
        let mut history = base.to_vec();
        history.push(get(2, "k", Some(seen), 25, 35));
        check_case(&history, None);
    }
    // But not a value older than the last completed put.
    let mut history = base.to_vec();
    history.push(get(2, "k", None, 25, 35));
    check_case(&history, Some("k"));
}

#[test]
fn gets_after_two_concurrent_puts_must_agree_on_their_order() {
    let puts = [put(1, "k", "a", 0, 10), put(2, "k", "b", 0, 10)];
    // Either put may win, but once both are done nothing changes the value.
    for (first, second, legal) in [("a", "a", true), ("b", "b", true), ("a", "b", false)] {
        let mut history = puts.to_vec();
        history.push(get(3, "k", Some(first), 20, 30));
        history.push(get(3, "k", Some(second), 40, 50));
        check_case(&history, if legal { None } else { Some("k") });
    }
    // While a get overlaps both puts it may see the loser, then the winner.
    let mut history = puts.to_vec();
    history[1].ret = 30;
    history.push(get(3, "k", Some("a"), 5, 15));
    history.push(get(4, "k", Some("b"), 40, 50));
    check_case(&history, None);
}

#[test]
fn delete_makes_the_key_absent() {
    let base = [put(1, "k", "a", 0, 10), delete(1, "k", 20, 30)];
    let mut history = base.to_vec();
    history.push(get(2, "k", None, 40, 50));
    check_case(&history, None);

    let mut history = base.to_vec();
    history.push(get(2, "k", Some("a"), 40, 50));
    check_case(&history, Some("k"));

    // Concurrent with the delete, both outcomes are possible.
    for seen in [Some("a"), None] {
        let mut history = base.to_vec();
        history.push(get(2, "k", seen, 25, 35));
        check_case(&history, None);
    }

    // A put after the delete is visible again; a delete of an absent key is fine.
    check_case(
        &[
            delete(1, "k", 0, 5),
            put(1, "k", "b", 10, 20),
            get(2, "k", Some("b"), 30, 40),
            delete(1, "k", 50, 60),
            get(2, "k", None, 70, 80),
        ],
        None,
    );
}

#[test]
fn an_unknown_write_may_have_taken_effect() {
    check_case(
        &[
            put(1, "k", "a", 0, 10),
            put_unknown(1, "k", "b", 20),
            get(2, "k", Some("b"), 100, 110),
        ],
        None,
    );
    // It may take effect long after everything that was called before it.
    check_case(
        &[
            put_unknown(1, "k", "b", 0),
            get(2, "k", None, 10, 20),
            put(3, "k", "a", 30, 40),
            get(2, "k", Some("a"), 50, 60),
            get(2, "k", Some("b"), 70, 80),
        ],
        None,
    );
}

#[test]
fn an_unknown_write_may_never_have_taken_effect() {
    check_case(
        &[
            put(1, "k", "a", 0, 10),
            put_unknown(1, "k", "b", 20),
            get(2, "k", Some("a"), 30, 40),
            get(2, "k", Some("a"), 50, 60),
        ],
        None,
    );
    check_case(
        &[
            put(1, "k", "a", 0, 10),
            delete_unknown(1, "k", 20),
            get(2, "k", Some("a"), 30, 40),
        ],
        None,
    );
}

#[test]
fn an_unknown_write_cannot_be_undone_once_seen() {
    check_case(
        &[
            put(1, "k", "a", 0, 10),
            put_unknown(1, "k", "b", 20),
            get(2, "k", Some("b"), 30, 40),
            get(2, "k", Some("a"), 50, 60),
        ],
        Some("k"),
    );
    check_case(
        &[
            put(1, "k", "a", 0, 10),
            delete_unknown(1, "k", 20),
            get(2, "k", None, 30, 40),
            get(3, "k", Some("a"), 50, 60),
        ],
        Some("k"),
    );
}

#[test]
fn an_unknown_write_cannot_take_effect_before_its_call() {
    check_case(
        &[get(2, "k", Some("b"), 0, 10), put_unknown(1, "k", "b", 20)],
        Some("k"),
    );
}

#[test]
fn keys_are_checked_independently() {
    // "x" holding "a" says nothing about "y".
    check_case(
        &[
            put(1, "x", "a", 0, 10),
            get(2, "y", None, 20, 30),
            get(2, "x", Some("a"), 20, 30),
        ],
        None,
    );
    // The same value name under another key is a different write.
    check_case(
        &[put(1, "x", "a", 0, 10), get(2, "y", Some("a"), 20, 30)],
        Some("y"),
    );
    // With several illegal keys the first in key order is reported.
    check_case(
        &[
            get(2, "zz", Some("q"), 0, 10),
            get(2, "b", Some("q"), 0, 10),
            put(1, "a", "v", 0, 10),
            get(2, "c", Some("q"), 0, 10),
        ],
        Some("b"),
    );
}

#[test]
fn equal_timestamps_are_concurrent() {
    // The put returns at 10 and the get is called at 10: they overlap, so the
    // get may be linearized first.
    check_case(&[put(1, "k", "a", 0, 10), get(2, "k", None, 10, 20)], None);
    // One tick later the put strictly precedes the get.
    check_case(
        &[put(1, "k", "a", 0, 10), get(2, "k", None, 11, 20)],
        Some("k"),
    );
    // Zero-length ops at the same instant are concurrent too.
    check_case(
        &[
            put(1, "k", "a", 5, 5),
            get(2, "k", None, 5, 5),
            get(3, "k", Some("a"), 5, 5),
        ],
        None,
    );
}

#[test]
fn new_old_inversion_across_two_readers_is_illegal() {
    // Reader 1 sees the new value, and a later reader 2 sees the old one, both
    // while the write is in flight: atomic registers forbid this.
    check_case(
        &[
            put(1, "k", "old", 0, 10),
            put(1, "k", "new", 20, 100),
            get(2, "k", Some("new"), 30, 40),
            get(3, "k", Some("old"), 50, 60),
        ],
        Some("k"),
    );
    // The same reads in the other order are fine.
    check_case(
        &[
            put(1, "k", "old", 0, 10),
            put(1, "k", "new", 20, 100),
            get(2, "k", Some("old"), 30, 40),
            get(3, "k", Some("new"), 50, 60),
        ],
        None,
    );
}

#[test]
fn repeated_values_are_handled() {
    // The workload writes unique values, but correctness must not depend on it.
    check_case(
        &[
            put(1, "k", "a", 0, 10),
            put(1, "k", "b", 20, 30),
            put(1, "k", "a", 40, 50),
            get(2, "k", Some("a"), 60, 70),
        ],
        None,
    );
    check_case(
        &[
            put(1, "k", "a", 0, 10),
            put(1, "k", "b", 20, 30),
            put(1, "k", "a", 40, 50),
            get(2, "k", Some("b"), 60, 70),
        ],
        Some("k"),
    );
}

#[test]
fn gets_without_a_result_are_ignored() {
    check_case(
        &[
            put(1, "k", "a", 0, 10),
            op(2, "k", Input::Get, Output::Unknown, 20, 30),
            op(2, "k", Input::Get, Output::Written, 20, 30),
            get(2, "k", Some("a"), 40, 50),
        ],
        None,
    );
}

#[test]
fn an_op_returning_before_its_call_is_reported_as_malformed() {
    let history = [put(1, "k", "a", 20, 10)];
    let Verdict::Illegal { key, explanation } = check(&history, BUDGET) else {
        panic!("expected Illegal, got {:?}", check(&history, BUDGET));
    };
    assert_eq!(key, b"k");
    assert!(explanation.contains("malformed"), "{explanation}");
    // The recorded ret of an unknown op is ignored, so it cannot be malformed.
    check_case(&[op(1, "k", Input::Delete, Output::Unknown, 20, 10)], None);
}

#[test]
fn an_exhausted_budget_gives_unknown_unless_a_key_is_illegal() {
    let history = [put(1, "a", "v", 0, 10), get(2, "b", None, 20, 30)];
    assert_eq!(
        check(&history, Duration::ZERO),
        Verdict::Unknown { key: b"a".to_vec() }
    );
    // A malformed key is illegal without any search, and beats "unknown".
    let history = [put(1, "a", "v", 0, 10), put(1, "b", "v", 20, 10)];
    assert!(matches!(
        check(&history, Duration::ZERO),
        Verdict::Illegal { key, .. } if key == b"b"
    ));
}

#[test]
fn the_explanation_shows_the_longest_prefix_and_the_ops() {
    let history = [
        put(7, "k", "old", 0, 10),
        put(8, "k", "new", 20, 100),
        get(9, "k", Some("new"), 30, 40),
        get(6, "k", Some("old"), 50, 60),
        put(5, "k2", "x", 0, 10),
    ];
    let Verdict::Illegal { key, explanation } = check(&history, BUDGET) else {
        panic!("expected Illegal, got {:?}", check(&history, BUDGET));
    };
    assert_eq!(key, b"k");
    // After "put old", "put new" would leave the later "get old" impossible,
    // and "get new" is illegal: the search gets no further.
    assert!(
        explanation.contains("(1 of the 4 ops that matter)"),
        "{explanation}"
    );
    assert!(explanation.contains("holds \"old\""), "{explanation}");
    for needle in ["client 7", "client 8", "client 9", "client 6", "\"old\""] {
        assert!(explanation.contains(needle), "{needle} in {explanation}");
    }
    assert!(!explanation.contains("\"k2\""), "{explanation}");
}

#[test]
fn a_get_of_a_value_nothing_wrote_is_explained_as_such() {
    let history = [put(1, "k", "a", 0, 10), get(2, "k", Some("zzz"), 20, 30)];
    let Verdict::Illegal { explanation, .. } = check(&history, BUDGET) else {
        panic!("expected Illegal, got {:?}", check(&history, BUDGET));
    };
    assert!(
        explanation.contains("get #1 observed a value that no op wrote"),
        "{explanation}"
    );
}

#[test]
fn many_retries_of_one_value_do_not_blow_up_the_search() {
    // A client retries the same put 40 times with unknown outcome while the
    // key keeps changing, then a new-old inversion at the very end makes the
    // search exhaust every alternative. Were the retries' order not fixed
    // (they are interchangeable), there would be 2^40 ways to use them.
    let mut history = Vec::new();
    let mut t = 0;
    for i in 0..160 {
        let value = format!("w{i}");
        history.push(put(1, "k", &value, t, t + 50));
        history.push(get(2, "k", Some(&value), t + 60, t + 70));
        t += 100;
    }
    for retry in 0..40 {
        history.push(put_unknown(9, "k", "retried", retry * 400));
    }
    history.push(put(9, "k", "retried", t, t + 10));
    history.push(get(9, "k", Some("retried"), t + 20, t + 30));
    let t = t + 100;
    history.push(put(1, "k", "old", t, t + 10));
    history.push(put(1, "k", "new", t + 20, t + 200));
    history.push(get(2, "k", Some("new"), t + 30, t + 40));
    history.push(get(3, "k", Some("old"), t + 50, t + 60));
    check_case(&history, Some("k"));
}

#[test]
fn format_history_mentions_each_op() {
    let long = "v".repeat(100);
    let history = [
        get(42, "k", Some("value-one"), 30, 40),
        put(41, "k", "value-one", 0, 10),
        op(
            43,
            "k",
            Input::Put(vec![0, 159, 255]),
            Output::Unknown,
            15,
            16,
        ),
        delete(44, "k2", 50, 60),
        put(45, "k", &long, 70, 80),
    ];
    let text = format_history(&history);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), history.len(), "{text}");
    // Sorted by call time.
    assert!(lines[0].contains("client 41"), "{text}");
    assert!(lines[1].contains("client 43"), "{text}");
    assert!(lines[2].contains("client 42"), "{text}");
    for (client, needle) in [
        (41, "put \"value-one\" -> ok"),
        (42, "get -> \"value-one\""),
        (43, "put 0x009fff -> unknown"),
        (44, "delete -> ok"),
        (45, "...(100 bytes)"),
    ] {
        let line = lines
            .iter()
            .find(|line| line.contains(&format!("client {client} ")))
            .unwrap_or_else(|| panic!("no line for client {client} in\n{text}"));
        assert!(line.contains(needle), "{needle} in {line}");
    }
    assert!(
        lines[1].contains("inf"),
        "unknown ops complete at +infinity: {text}"
    );
    assert!(!text.contains(&long), "long values are truncated: {text}");
}

// ---------------------------------------------------------------------------
// Cross-check against brute force on random tiny histories.

/// splitmix64: a small, good, deterministic generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0; the modulo bias is irrelevant here).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
}

fn is_unknown(op: &Operation) -> bool {
    op.output == Output::Unknown
}

fn observes_nothing(op: &Operation) -> bool {
    op.input == Input::Get && !matches!(op.output, Output::Read(_))
}

/// Completion time, `None` for +infinity.
fn ret_of(op: &Operation) -> Option<u64> {
    (!is_unknown(op)).then_some(op.ret)
}

/// Linearizability by exhaustive search, written as plainly as possible and
/// independently of the checker: for every subset of the unknown writes to
/// leave out (they never took effect), try every order of the remaining ops
/// that respects real-time precedence, executing them against a map of keys.
fn brute_force(history: &[Operation]) -> bool {
    let ops: Vec<&Operation> = history.iter().filter(|op| !observes_nothing(op)).collect();
    let unknown: Vec<usize> = (0..ops.len()).filter(|&i| is_unknown(ops[i])).collect();
    (0..1u32 << unknown.len()).any(|omit| {
        let mut done = vec![false; ops.len()];
        for (bit, &i) in unknown.iter().enumerate() {
            done[i] = omit & (1 << bit) != 0;
        }
        orders_exist(&ops, &mut done, &mut BTreeMap::new())
    })
}

fn orders_exist(
    ops: &[&Operation],
    done: &mut [bool],
    state: &mut BTreeMap<Vec<u8>, Vec<u8>>,
) -> bool {
    if done.iter().all(|&d| d) {
        return true;
    }
    for i in 0..ops.len() {
        if done[i] {
            continue;
        }
        // `i` may go next only if no pending op returned before `i` was called.
        let preceded =
            (0..ops.len()).any(|j| !done[j] && ret_of(ops[j]).is_some_and(|ret| ret < ops[i].call));
        if preceded {
            continue;
        }
        let op = ops[i];
        let before = state.get(&op.key).cloned();
        let legal = match (&op.input, &op.output) {
            (Input::Put(value), _) => {
                state.insert(op.key.clone(), value.clone());
                true
            }
            (Input::Delete, _) => {
                state.remove(&op.key);
                true
            }
            (Input::Get, Output::Read(seen)) => *seen == before,
            (Input::Get, _) => unreachable!("filtered out"),
        };
        if legal {
            done[i] = true;
            let found = orders_exist(ops, done, state);
            done[i] = false;
            if found {
                return true;
            }
        }
        match before {
            Some(value) => state.insert(op.key.clone(), value),
            None => state.remove(&op.key),
        };
    }
    false
}

/// A random tiny history: mostly derived from a real execution (so often
/// linearizable), sometimes with one read result replaced by a random one.
fn random_tiny_history(rng: &mut Rng, ops_max: u64) -> Vec<Operation> {
    let keys = 1 + rng.below(2);
    let ops_count = 1 + rng.below(ops_max);
    let unique_values = rng.percent(50);
    let mut history = Vec::new();
    for n in 0..ops_count {
        let key = format!("k{}", rng.below(keys));
        let call = rng.below(15);
        let ret = call + rng.below(8); // small times: many overlaps and ties
        let input = match rng.below(10) {
            0..=3 => Input::Put(if unique_values {
                format!("v{n}").into_bytes()
            } else {
                format!("v{}", rng.below(2)).into_bytes()
            }),
            4 => Input::Delete,
            _ => Input::Get,
        };
        let output = if rng.percent(if input == Input::Get { 10 } else { 25 }) {
            Output::Unknown
        } else if input == Input::Get {
            Output::Read(None) // filled in below
        } else {
            Output::Written
        };
        history.push(op(rng.below(4), &key, input, output, call, ret));
    }

    // Run it: each op takes effect at a point within its interval (an unknown
    // write at any point after its call, or never), ties broken at random.
    let mut points: Vec<(u64, u64, usize)> = Vec::new();
    for (i, op) in history.iter().enumerate() {
        let point = if !is_unknown(op) {
            op.call + rng.below(op.ret - op.call + 1)
        } else if rng.percent(30) {
            continue;
        } else {
            op.call + rng.below(20)
        };
        points.push((point, rng.next(), i));
    }
    points.sort_unstable();
    let mut state: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    for (_, _, i) in points {
        let op = &mut history[i];
        match (&op.input, &mut op.output) {
            (Input::Put(value), _) => {
                state.insert(op.key.clone(), value.clone());
            }
            (Input::Delete, _) => {
                state.remove(&op.key);
            }
            (Input::Get, Output::Read(seen)) => *seen = state.get(&op.key).cloned(),
            (Input::Get, _) => {}
        }
    }

    // Often corrupt the reads: replace one result, or swap two (which makes
    // subtler violations, such as new-old inversions).
    let reads: Vec<usize> = (0..history.len())
        .filter(|&i| matches!(history[i].output, Output::Read(_)))
        .collect();
    if !reads.is_empty() && rng.percent(60) {
        let i = reads[rng.below(reads.len() as u64) as usize];
        let j = reads[rng.below(reads.len() as u64) as usize];
        if i != j && rng.percent(50) {
            let output = history[i].output.clone();
            history[i].output = std::mem::replace(&mut history[j].output, output);
        } else {
            history[i].output = Output::Read(match rng.below(4) {
                0 => None,
                1 => Some(b"never-written".to_vec()),
                _ => Some(format!("v{}", rng.below(ops_count)).into_bytes()),
            });
        }
    }
    history
}

#[test]
fn agrees_with_brute_force_on_random_tiny_histories() {
    const CASES: u64 = 20_000;
    let (mut legal, mut illegal, mut with_unknown) = (0, 0, 0);
    for seed in 0..CASES {
        let mut rng = Rng(seed);
        let history = random_tiny_history(&mut rng, 8);
        let expected = brute_force(&history);
        let verdict = check(&history, BUDGET);
        let agrees = match verdict {
            Verdict::Ok => expected,
            Verdict::Illegal { .. } => !expected,
            Verdict::Unknown { .. } => false,
        };
        assert!(
            agrees,
            "seed {seed}: brute force says linearizable={expected}, check says {verdict:?}\n{}",
            format_history(&history)
        );
        if expected {
            legal += 1;
        } else {
            illegal += 1;
        }
        if history.iter().any(is_unknown) {
            with_unknown += 1;
        }
    }
    println!("{legal} linearizable, {illegal} not, {with_unknown} with unknown outcomes");
    // Both verdicts must be common, or the agreement proves little.
    assert!(legal >= CASES / 5, "only {legal} linearizable of {CASES}");
    assert!(
        illegal >= CASES / 5,
        "only {illegal} not linearizable of {CASES}"
    );
    assert!(
        with_unknown >= CASES / 5,
        "only {with_unknown} with unknowns"
    );
}

// ---------------------------------------------------------------------------
// Performance sanity (not a benchmark: it prints the time, and fails only if
// the generous budget runs out).

/// A linearizable history of `clients * ops_per_client` ops over `keys` keys,
/// produced by running a real register: each client issues ops back to back
/// with random durations, each op takes effect at a random point within its
/// interval, and about 5% of writes time out (some of those never apply).
fn random_large_history(
    rng: &mut Rng,
    clients: u64,
    ops_per_client: u64,
    keys: u64,
) -> Vec<Operation> {
    let mut history = Vec::new();
    let mut points: Vec<(u64, usize)> = Vec::new();
    let mut value = 0u64;
    for client in 0..clients {
        let mut now = rng.below(1_000);
        for _ in 0..ops_per_client {
            let call = now + rng.below(100);
            let ret = call + 1 + rng.below(2_000);
            now = ret;
            let key = format!("key-{}", rng.below(keys));
            let input = match rng.below(10) {
                0..=3 => {
                    value += 1;
                    Input::Put(format!("value-{value}").into_bytes())
                }
                4 => Input::Delete,
                _ => Input::Get,
            };
            let unknown = input != Input::Get && rng.percent(5);
            let (output, point) = if unknown {
                (
                    Output::Unknown,
                    rng.percent(50).then(|| call + rng.below(10_000)),
                )
            } else if input == Input::Get {
                (Output::Read(None), Some(call + rng.below(ret - call + 1)))
            } else {
                (Output::Written, Some(call + rng.below(ret - call + 1)))
            };
            if let Some(point) = point {
                points.push((point, history.len()));
            }
            history.push(op(client, &key, input, output, call, ret));
        }
    }
    points.sort_unstable();
    let mut state: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    for (_, i) in points {
        let op = &mut history[i];
        match (&op.input, &mut op.output) {
            (Input::Put(value), _) => {
                state.insert(op.key.clone(), value.clone());
            }
            (Input::Delete, _) => {
                state.remove(&op.key);
            }
            (Input::Get, Output::Read(seen)) => *seen = state.get(&op.key).cloned(),
            (Input::Get, _) => {}
        }
    }
    history
}

#[test]
fn a_large_concurrent_history_is_checked_quickly() {
    let mut rng = Rng(7);
    // 200 clients over 10 keys: about 20 ops in flight per key at any time.
    let mut history = random_large_history(&mut rng, 200, 10, 10);
    assert_eq!(history.len(), 2_000);
    let started = Instant::now();
    let verdict = check(&history, BUDGET);
    println!("checked {} ops in {:?}", history.len(), started.elapsed());
    assert_eq!(verdict, Verdict::Ok);

    // One stale read in the middle makes it illegal: a get that returns the
    // value of a put that was overwritten before the get was called. The
    // search must then exhaust every alternative for that key.
    let acked_write = |op: &Operation| op.input != Input::Get && op.output == Output::Written;
    let (i, stale) = (1_000..history.len())
        .filter(|&i| matches!(history[i].output, Output::Read(_)))
        .find_map(|i| {
            let get = &history[i];
            let same_key = |op: &&Operation| op.key == get.key && acked_write(op);
            let old = history.iter().filter(same_key).find(|old| {
                matches!(old.input, Input::Put(_))
                    && history
                        .iter()
                        .filter(same_key)
                        .any(|newer| old.ret < newer.call && newer.ret < get.call)
            })?;
            let Input::Put(value) = &old.input else {
                return None;
            };
            Some((i, value.clone()))
        })
        .unwrap();
    let key = history[i].key.clone();
    history[i].output = Output::Read(Some(stale));
    let started = Instant::now();
    let verdict = check(&history, BUDGET);
    println!("checked it with one stale read in {:?}", started.elapsed());
    assert!(
        matches!(&verdict, Verdict::Illegal { key: k, .. } if *k == key),
        "{verdict:?}"
    );
}
