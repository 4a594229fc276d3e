//! A linearizability checker for single-key register histories.
//!
//! The simulation and `kv verify` record every client operation with its
//! invocation (`call`) and completion (`ret`) time and its result. This module decides whether
//! that history is linearizable: whether every operation can be given a
//! single point in time between its call and its return such that, executed
//! in that order, a plain register would produce exactly the observed results.
//!
//! How it works:
//! - The history is split by key and each key is checked on its own
//!   (linearizability is compositional, so this loses nothing and turns one
//!   exponential search into many small ones).
//! - Each key is a register whose state is "absent" or a value. A put sets a
//!   value, a delete makes it absent, and a get is legal iff it observed the
//!   current state.
//! - The search is Wing & Gong's algorithm with Lowe's memoization ("Testing
//!   for linearizability", 2017), as used by Porcupine: walk a list of call and
//!   return events in time order; try to linearize any op whose call comes
//!   before the first pending return; backtrack when that return is reached
//!   with its op still pending. A cache of (set of linearized ops, register
//!   state) pairs prunes configurations that were already explored and failed.
//! - Register-specific shortcuts keep heavily concurrent histories fast. Each
//!   is argued where it is implemented and cross-checked against brute force
//!   in the tests: a get that is legal now is linearized at once, with no
//!   alternative tried; a write is not linearized while gets still to come
//!   need the current value and no pending write could restore it; values
//!   that no get observed are all one state; unknown-outcome writes that no
//!   get observed are left out; unknown-outcome writes of one value (retries)
//!   are used in call order only.
//! - An op whose outcome is unknown (timeout, "outcome unknown") completes at
//!   +infinity: it may take effect at any point after its call. A write placed
//!   after everything else changes nothing observed, so "it never happened" is
//!   covered too. A get without a result (failed or unknown) observed nothing
//!   and is ignored.
//!
//! What it deliberately does not do: it checks single-key register semantics
//! only. It knows nothing of multi-key transactions, scans, compare-and-set,
//! or ordering guarantees across keys, and it does not check durability or
//! liveness. The search is exponential in the worst case (many concurrent
//! writes to one key), so it runs under a wall-clock budget and a memory limit
//! and may answer [`Verdict::Unknown`]. The budget is the only use of real
//! time here; it never changes a definite verdict.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// What a client asked for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Input {
    Put(Vec<u8>),
    Delete,
    Get,
}

/// What the client was told.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Output {
    /// Write acknowledged. (For a get this carries no observation, so such a
    /// get is ignored.)
    Written,
    /// Read result: `None` means the key was absent. (For a put or delete only
    /// "not unknown" matters: the write is taken as acknowledged.)
    Read(Option<Vec<u8>>),
    /// Outcome unknown (timeout, "outcome unknown"): the op may or may not have
    /// taken effect. It completes at +infinity. A get with this output is
    /// ignored.
    Unknown,
}

/// One client operation on one key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Operation {
    pub client: u64,
    pub key: Vec<u8>,
    pub input: Input,
    pub output: Output,
    /// Invocation time (ns since the history began: simulated time in the
    /// simulation, monotonic time in `kv verify`).
    pub call: u64,
    /// Completion time; must be `>= call`. Ignored (treated as +infinity) when
    /// `output` is [`Output::Unknown`]. Op A precedes op B iff `A.ret < B.call`;
    /// equal times are concurrent.
    pub ret: u64,
}

/// The result of [`check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Not linearizable (or malformed): which key, and a readable explanation
    /// (the ops of that key sorted by call time, and the longest linearizable
    /// prefix found).
    Illegal {
        key: Vec<u8>,
        explanation: String,
    },
    /// The time budget (or the memory limit of the search) ran out before a
    /// verdict for this key (the first such key in key order). Only returned
    /// if no key was found illegal.
    Unknown {
        key: Vec<u8>,
    },
}

/// How many search steps run between two looks at the clock.
const DEADLINE_CHECK_STEPS: u64 = 1024;
/// The memo cache of one key may use about this much memory; beyond it the
/// search gives up on the key ([`Verdict::Unknown`]) rather than exhaust
/// the machine. It grows by roughly `ops / 8 + 48` bytes per configuration.
const MEMO_BYTES_MAX: usize = 256 << 20;
/// Values longer than this are truncated in readable output.
const SHOW_VALUE_BYTES_MAX: usize = 32;
/// "No node" in the event list.
const NIL: usize = usize::MAX;
/// The event list's sentinel node.
const HEAD: usize = 0;

/// Checks `history` for linearizability, key by key in sorted key order.
///
/// Returns the first illegal key if there is one, else the first key whose
/// search ran out of `budget` (shared by all keys), else [`Verdict::Ok`].
/// Never panics, whatever the input.
pub fn check(history: &[Operation], budget: Duration) -> Verdict {
    // `None` means the budget is too large to represent: no deadline.
    let deadline = Instant::now().checked_add(budget);
    let mut by_key: BTreeMap<&[u8], Vec<usize>> = BTreeMap::new();
    for (index, op) in history.iter().enumerate() {
        by_key.entry(&op.key).or_default().push(index);
    }
    let mut first_given_up = None;
    for (key, indices) in by_key {
        let explanation = match prepare(history, &indices) {
            Err(explanation) => explanation,
            Ok(ops) => match search(&ops, deadline) {
                Search::Linearizable => continue,
                Search::GaveUp => {
                    // Keep going: a later key may still be proven illegal,
                    // which is worth more than "unknown".
                    first_given_up.get_or_insert(key);
                    continue;
                }
                Search::Stuck { prefix, state } => explain(history, &indices, &ops, &prefix, state),
            },
        };
        return Verdict::Illegal {
            key: key.to_vec(),
            explanation,
        };
    }
    match first_given_up {
        Some(key) => Verdict::Unknown { key: key.to_vec() },
        None => Verdict::Ok,
    }
}

/// A readable dump of `history`: one line per op, sorted by call time.
pub fn format_history(history: &[Operation]) -> String {
    let indices: Vec<usize> = (0..history.len()).collect();
    format_ops(history, &indices)
}

/// The register state of one key as a small number: [`ABSENT`],
/// [`UNOBSERVED`], or `FIRST_OBSERVED + i` for the `i`-th distinct value that
/// some get observed. Equal values get equal numbers, so the memo cache also
/// works when values repeat.
type State = usize;
/// The key is absent (the initial state).
const ABSENT: State = 0;
/// The register holds a value that no get observed. All such values behave
/// alike (no get is legal until the next write), so they share one state,
/// which makes more configurations equal in the memo cache.
const UNOBSERVED: State = 1;
const FIRST_OBSERVED: State = 2;

/// The ops of one key, reduced to what the search needs.
struct KeyOps<'a> {
    ops: Vec<KeyOp>,
    /// The value of state `FIRST_OBSERVED + i` is `observed[i]`.
    observed: Vec<&'a [u8]>,
}

struct KeyOp {
    /// Index into the caller's history, for explanations.
    index: usize,
    step: Step,
    call: u64,
    /// `None` means +infinity (outcome unknown).
    ret: Option<u64>,
    /// For a write with unknown outcome: the previous such write (by call
    /// time) of the same state, which must be linearized before this one.
    /// Such writes are interchangeable except for their call times, so if a
    /// linearization exists, one exists that uses them in call order; trying
    /// only that order keeps retries of one value from multiplying the search.
    after: Option<usize>,
}

#[derive(Clone, Copy)]
enum Step {
    /// A put or delete, setting this state.
    Write(State),
    /// A get that observed this state.
    Read(State),
}

impl Step {
    /// Whether this op, linearized next in `state`, leaves it unchanged and
    /// could equally be linearized later: a legal get, or a write of an
    /// unobserved value over an unobserved value (see `Searcher::absorbed`).
    fn is_absorbed_in(self, state: State) -> bool {
        match self {
            Step::Read(seen) => seen == state,
            Step::Write(value) => value == UNOBSERVED && state == UNOBSERVED,
        }
    }
}

/// Reduces the ops of one key (`indices` into `history`) to what the search
/// needs. Errs with an explanation if an op returns before it is called.
///
/// Two kinds of op are left out, as they cannot affect the verdict:
/// - gets without a result, which observed nothing;
/// - writes with unknown outcome whose value no get observed. Such a write
///   can always go last (it may complete at +infinity), where it changes
///   nothing observed; and wherever else a linearization puts it, removing it
///   leaves a linearization, since no get can follow it before another write.
fn prepare<'a>(history: &'a [Operation], indices: &[usize]) -> Result<KeyOps<'a>, String> {
    let ops_of_key = || {
        indices
            .iter()
            .filter_map(|&i| history.get(i).map(|op| (i, op)))
    };
    // First the states gets observed, so that writes can be mapped onto them.
    let mut states: HashMap<&[u8], State> = HashMap::new();
    let mut observed: Vec<&[u8]> = Vec::new();
    let mut absent_observed = false;
    for (_, op) in ops_of_key() {
        match (&op.input, &op.output) {
            (Input::Get, Output::Read(Some(value))) => {
                states.entry(value).or_insert_with(|| {
                    observed.push(value);
                    FIRST_OBSERVED + observed.len() - 1
                });
            }
            (Input::Get, Output::Read(None)) => absent_observed = true,
            _ => {}
        }
    }
    let state_of = |value: &[u8]| states.get(value).copied().unwrap_or(UNOBSERVED);
    let mut ops = Vec::with_capacity(indices.len());
    for (index, op) in ops_of_key() {
        let step = match (&op.input, &op.output) {
            (Input::Get, Output::Read(seen)) => {
                Step::Read(seen.as_deref().map_or(ABSENT, state_of))
            }
            (Input::Get, Output::Written | Output::Unknown) => continue,
            (Input::Put(value), _) => Step::Write(state_of(value)),
            (Input::Delete, _) => Step::Write(ABSENT),
        };
        let ret = match op.output {
            Output::Unknown => {
                let observed = match step {
                    Step::Write(UNOBSERVED) => false,
                    Step::Write(ABSENT) => absent_observed,
                    Step::Write(_) | Step::Read(_) => true,
                };
                if !observed {
                    continue;
                }
                None
            }
            Output::Written | Output::Read(_) => Some(op.ret),
        };
        if ret.is_some_and(|ret| ret < op.call) {
            return Err(format!(
                "malformed history: op #{index} returns at {} before it is called at {}\n{}",
                op.ret,
                op.call,
                format_ops(history, indices)
            ));
        }
        ops.push(KeyOp {
            index,
            step,
            call: op.call,
            ret,
            after: None,
        });
    }
    // A get of a value that nothing wrote can never be linearized; say so
    // plainly rather than search for it.
    let written: HashSet<State> = ops
        .iter()
        .filter_map(|op| match op.step {
            Step::Write(value) => Some(value),
            Step::Read(_) => None,
        })
        .collect();
    for op in &ops {
        if let Step::Read(seen) = op.step
            && seen != ABSENT
            && !written.contains(&seen)
        {
            return Err(format!(
                "not linearizable: get #{} observed a value that no op wrote to this key\n{}",
                op.index,
                format_ops(history, indices)
            ));
        }
    }
    // Chain the unknown-outcome writes of each state in call order.
    let mut unknown_writes: Vec<(State, u64, usize)> = ops
        .iter()
        .enumerate()
        .filter_map(|(i, op)| match (op.step, op.ret) {
            (Step::Write(value), None) => Some((value, op.call, i)),
            _ => None,
        })
        .collect();
    unknown_writes.sort_unstable();
    for pair in unknown_writes.windows(2) {
        if let [(state, _, previous), (next_state, _, i)] = *pair
            && state == next_state
            && let Some(op) = ops.get_mut(i)
        {
            op.after = Some(previous);
        }
    }
    Ok(KeyOps { ops, observed })
}

/// The call and return events of one key's ops as a doubly linked list in
/// time order, so that ops can be lifted out and put back in O(1).
/// Node 0 is a sentinel head; node `n` is the `n`-th event in time order.
struct Events {
    next: Vec<usize>,
    prev: Vec<usize>,
    /// The op (index into the key's ops) of each node.
    op: Vec<usize>,
    /// For a call node, its return node; `None` for return nodes and the head.
    ret_node: Vec<Option<usize>>,
}

impl Events {
    fn new(ops: &[KeyOp]) -> Events {
        // Sort key: (infinite, time, is_return, op). Calls sort before returns
        // at the same time, so an op returning at t and one called at t are
        // concurrent, as precedence is strict (`ret < call`). Unknown returns
        // go last, after every finite time.
        let mut events: Vec<(bool, u64, bool, usize)> = Vec::with_capacity(2 * ops.len());
        for (i, op) in ops.iter().enumerate() {
            events.push((false, op.call, false, i));
            events.push((op.ret.is_none(), op.ret.unwrap_or(u64::MAX), true, i));
        }
        events.sort_unstable();
        let nodes = events.len() + 1;
        let mut list = Events {
            next: (1..=nodes)
                .map(|n| if n == nodes { NIL } else { n })
                .collect(),
            prev: (0..nodes).map(|n| n.wrapping_sub(1)).collect(),
            op: vec![NIL; nodes],
            ret_node: vec![None; nodes],
        };
        let mut call_node = vec![HEAD; ops.len()];
        for (position, &(_, _, is_return, i)) in events.iter().enumerate() {
            let node = position + 1;
            list.op[node] = i;
            if is_return {
                // Calls sort before their own return (call <= ret was checked).
                list.ret_node[call_node[i]] = Some(node);
            } else {
                call_node[i] = node;
            }
        }
        list
    }

    fn unlink(&mut self, node: usize) {
        let (prev, next) = (self.prev[node], self.next[node]);
        self.next[prev] = next;
        if next != NIL {
            self.prev[next] = prev;
        }
    }

    /// Undoes `unlink(node)`; the node kept its own links.
    fn relink(&mut self, node: usize) {
        let (prev, next) = (self.prev[node], self.next[node]);
        self.next[prev] = node;
        if next != NIL {
            self.prev[next] = node;
        }
    }

    /// Removes a call node and its return node from the list.
    fn lift(&mut self, call: usize, ret: usize) {
        self.unlink(call);
        self.unlink(ret);
    }

    /// Undoes `lift`, in reverse order (dancing links).
    fn unlift(&mut self, call: usize, ret: usize) {
        self.relink(ret);
        self.relink(call);
    }
}

enum Search {
    Linearizable,
    /// No linearization exists. `prefix` is the longest linearizable prefix
    /// found (indices into the key's ops), `state` the state after it.
    Stuck {
        prefix: Vec<usize>,
        state: State,
    },
    /// Out of time or memo space.
    GaveUp,
}

/// One linearized op on the search stack.
struct Frame {
    call: usize,
    ret: usize,
    state_before: State,
    /// Linearized greedily (see [`Searcher::absorbed`]): there is no
    /// alternative to try at this depth, so backtracking skips past it.
    forced: bool,
}

/// The search state for one key.
struct Searcher<'a> {
    ops: &'a [KeyOp],
    list: Events,
    /// Bit `i` is set iff op `i` is linearized (on the stack).
    linearized: Vec<u64>,
    /// Every configuration (linearized set, state) reached so far. One that
    /// is reached again must have failed, as success ends the search.
    cache: HashSet<(Box<[u64]>, State)>,
    stack: Vec<Frame>,
    state: State,
    /// Per state: how many gets observing it are not linearized yet.
    reads_pending: Vec<usize>,
    /// Per state: how many writes setting it are not linearized yet.
    writes_pending: Vec<usize>,
    /// The longest prefix seen, kept incrementally: `best[..low_water]`
    /// always equals the ops of `stack[..low_water]`, so a new record only
    /// copies the frames pushed since the previous one.
    best: Vec<usize>,
    best_state: State,
    low_water: usize,
}

impl Searcher<'_> {
    fn new<'a>(key: &'a KeyOps) -> Searcher<'a> {
        let states = FIRST_OBSERVED + key.observed.len();
        let mut reads_pending = vec![0; states];
        let mut writes_pending = vec![0; states];
        for op in &key.ops {
            match op.step {
                Step::Read(seen) => reads_pending[seen] += 1,
                Step::Write(value) => writes_pending[value] += 1,
            }
        }
        Searcher {
            ops: &key.ops,
            list: Events::new(&key.ops),
            linearized: vec![0; key.ops.len().div_ceil(64)],
            cache: HashSet::new(),
            stack: Vec::new(),
            state: ABSENT,
            reads_pending,
            writes_pending,
            best: Vec::new(),
            best_state: ABSENT,
            low_water: 0,
        }
    }

    /// Tries to linearize the op whose call node is `call` next. Returns
    /// false if it is illegal now, cannot lead to a linearization, or leads
    /// to an already explored (and therefore failed) configuration.
    fn linearize(&mut self, call: usize, ret: usize, forced: bool) -> bool {
        let op = self.list.op[call];
        let step = self.ops[op].step;
        if let Some(previous) = self.ops[op].after
            && self.linearized[previous / 64] & (1 << (previous % 64)) == 0
        {
            return false;
        }
        let new_state = match step {
            Step::Read(seen) if seen != self.state => return false,
            Step::Read(_) => self.state,
            Step::Write(value) => {
                // Pruning: gets still to come that observe the current state
                // need it back later, which only a pending write of it can do.
                let state = self.state;
                if value != state
                    && self.reads_pending[state] > 0
                    && self.writes_pending[state] == 0
                {
                    return false;
                }
                value
            }
        };
        let (word, bit) = (op / 64, 1u64 << (op % 64));
        self.linearized[word] |= bit;
        if !self
            .cache
            .insert((self.linearized.as_slice().into(), new_state))
        {
            self.linearized[word] &= !bit;
            return false;
        }
        match step {
            Step::Read(seen) => self.reads_pending[seen] -= 1,
            Step::Write(value) => self.writes_pending[value] -= 1,
        }
        self.stack.push(Frame {
            call,
            ret,
            state_before: self.state,
            forced,
        });
        self.state = new_state;
        self.list.lift(call, ret);
        if self.stack.len() > self.best.len() {
            let low = self.low_water;
            self.best.truncate(low);
            let list = &self.list;
            self.best
                .extend(self.stack[low..].iter().map(|f| list.op[f.call]));
            self.best_state = self.state;
            self.low_water = self.stack.len();
        }
        true
    }

    /// Undoes linearizations up to and including the most recent free choice,
    /// and returns the node after that op's call, from where to look for an
    /// alternative. `None` when there is nothing left to undo.
    fn backtrack(&mut self) -> Option<usize> {
        while let Some(frame) = self.stack.pop() {
            self.low_water = self.low_water.min(self.stack.len());
            self.state = frame.state_before;
            let op = self.list.op[frame.call];
            self.linearized[op / 64] &= !(1u64 << (op % 64));
            match self.ops[op].step {
                Step::Read(seen) => self.reads_pending[seen] += 1,
                Step::Write(value) => self.writes_pending[value] += 1,
            }
            self.list.unlift(frame.call, frame.ret);
            if !frame.forced {
                return Some(self.list.next[frame.call]);
            }
        }
        None
    }

    /// The first op that could be linearized next (its call comes before
    /// every pending return) without changing the state, and that could as
    /// well be linearized later; see [`Step::is_absorbed_in`].
    ///
    /// Linearizing such an op at once loses nothing: if any order works, the
    /// one with this op moved to the front works too. No pending op precedes
    /// it, it leaves the state as it is, and where it was taken from nothing
    /// changes: a get changes no state, and a write of an unobserved value is
    /// followed by another write (no get is legal before one). Without this,
    /// the search would try every subset of the many concurrent gets that saw
    /// the same value, which is exponential in the concurrency.
    fn absorbed(&self) -> Option<(usize, usize)> {
        let mut node = self.list.next[HEAD];
        while let Some(&Some(ret)) = self.list.ret_node.get(node) {
            if self.ops[self.list.op[node]].step.is_absorbed_in(self.state) {
                return Some((node, ret));
            }
            node = self.list.next[node];
        }
        None
    }
}

/// Wing–Gong–Lowe search over one key's ops.
fn search(key: &KeyOps, deadline: Option<Instant>) -> Search {
    let mut s = Searcher::new(key);
    let memo_entries_max = MEMO_BYTES_MAX / (s.linearized.len() * 8 + 48);
    // The event to consider next; `None` at a configuration just reached.
    let mut entry: Option<usize> = None;
    let mut steps: u64 = 0;
    while s.list.next[HEAD] != NIL {
        let out_of_time = steps.is_multiple_of(DEADLINE_CHECK_STEPS)
            && deadline.is_some_and(|d| Instant::now() >= d);
        if out_of_time || s.cache.len() > memo_entries_max {
            return Search::GaveUp;
        }
        steps += 1;
        let node = match entry {
            Some(node) => node,
            None => match s.absorbed() {
                Some((call, ret)) => {
                    if s.linearize(call, ret, true) {
                        continue;
                    }
                    // This configuration plus that op was explored and
                    // failed, so this one fails too: backtrack (below).
                    NIL
                }
                None => s.list.next[HEAD],
            },
        };
        // `node` is NIL only as above; then `get` yields `None`: backtrack.
        if let Some(&Some(ret)) = s.list.ret_node.get(node) {
            // A call event: try to linearize its op now, else look further.
            entry = if s.linearize(node, ret, false) {
                None
            } else {
                Some(s.list.next[node])
            };
        } else {
            // A return event whose op is still pending: every op that could go
            // next has been tried. Undo the latest choice and try the next.
            let Some(next) = s.backtrack() else {
                return Search::Stuck {
                    prefix: s.best,
                    state: s.best_state,
                };
            };
            entry = Some(next);
        }
    }
    Search::Linearizable
}

/// The explanation for a key with no linearization: the furthest the search
/// got, then every op of the key (`indices` into `history`).
fn explain(
    history: &[Operation],
    indices: &[usize],
    key: &KeyOps,
    prefix: &[usize],
    state: State,
) -> String {
    let mut out = format!(
        "not linearizable. The search got furthest with this linearizable prefix \
         ({} of the {} ops that matter):\n",
        prefix.len(),
        key.ops.len()
    );
    for op in prefix.iter().filter_map(|&i| key.ops.get(i)) {
        if let Some(recorded) = history.get(op.index) {
            let _ = writeln!(out, "  #{} {}", op.index, describe(recorded));
        }
    }
    let holds = match state {
        ABSENT => "nothing (absent)".to_string(),
        UNOBSERVED => "a value no get observed".to_string(),
        observed => key
            .observed
            .get(observed - FIRST_OBSERVED)
            .map_or_else(|| "?".to_string(), |value| show(value)),
    };
    let _ = writeln!(
        out,
        "after which the register holds {holds}, and no other op can go next \
         without making some get impossible.\nAll ops on this key, by call time:"
    );
    out.push_str(&format_ops(history, indices));
    out
}

/// One line per op (`indices` into `history`), sorted by call time.
fn format_ops(history: &[Operation], indices: &[usize]) -> String {
    let mut sorted: Vec<(usize, &Operation)> = indices
        .iter()
        .filter_map(|&i| history.get(i).map(|op| (i, op)))
        .collect();
    sorted.sort_by_key(|&(i, op)| (op.call, i));
    let mut out = String::new();
    for (i, op) in sorted {
        let ret = match op.output {
            Output::Unknown => "inf".to_string(),
            _ => op.ret.to_string(),
        };
        let _ = writeln!(
            out,
            "  #{i:<5} [{:>12} .. {ret:>12}] client {:<4} key {}  {}",
            op.call,
            op.client,
            show(&op.key),
            describe(op)
        );
    }
    out
}

/// "put "v" -> ok", "get -> absent", ...
fn describe(op: &Operation) -> String {
    let input = match &op.input {
        Input::Put(value) => format!("put {}", show(value)),
        Input::Delete => "delete".to_string(),
        Input::Get => "get".to_string(),
    };
    let output = match &op.output {
        Output::Written => "ok".to_string(),
        Output::Read(Some(value)) => show(value),
        Output::Read(None) => "absent".to_string(),
        Output::Unknown => "unknown".to_string(),
    };
    format!("{input} -> {output}")
}

/// A value as a quoted string if it is printable UTF-8, else as hex;
/// truncated to [`SHOW_VALUE_BYTES_MAX`].
fn show(value: &[u8]) -> String {
    let truncated = if value.len() > SHOW_VALUE_BYTES_MAX {
        format!("...({} bytes)", value.len())
    } else {
        String::new()
    };
    match std::str::from_utf8(value) {
        Ok(text) if !text.chars().any(char::is_control) => {
            let mut end = text.len().min(SHOW_VALUE_BYTES_MAX);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            format!("{:?}{truncated}", &text[..end])
        }
        _ => {
            let mut hex = String::from("0x");
            for byte in value.iter().take(SHOW_VALUE_BYTES_MAX) {
                let _ = write!(hex, "{byte:02x}");
            }
            hex + &truncated
        }
    }
}
