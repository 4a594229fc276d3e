//! One simulated run: a 3-, 4- or 5-node cluster of the real node code
//! (engine, replication, gRPC server) as turmoil hosts, each on its own
//! [`SimStorage`] disk, clients as turmoil clients, and faults — all derived
//! from one seed.
//!
//! A run has two phases (see the README's Simulation section):
//! 1. **Chaos.** Clients issue PUT/GET/DEL on a small key set with unique
//!    values, at the `quorum` and `local` acknowledgement levels, while the
//!    test body injects partitions (symmetric, one-way, leader isolation,
//!    any subset of the members cut from the rest, the leader left with
//!    exactly one follower), holds, latency spikes (both ways of a link,
//!    or one direction only), power losses (one node or several at once),
//!    process restarts, long cut-offs, disk I/O errors and leadership
//!    transfers (some whose caller gives up midway), while a stranger host
//!    sends forged replication messages ([`crate::stranger`]). After every
//!    step the invariants are checked ([`Checker`]), among them that no
//!    forged message was heard and no node reached the forged term.
//! 2. **Recovery.** Every fault is healed. The cluster must converge (equal
//!    applied LSN and state digest on every node) within a bounded simulated
//!    time, a final write must succeed, and a final read of every key joins
//!    the history, which is then checked for linearizability.
//!
//! Most clients make unary calls through the CLI's client (redirects
//! followed); the loops of one more host share a `Kv.Batch` stream
//! (`SharedStream`), so the batch API's histories are checked too. The
//! members elect their leader, except in every fifth seed (node 1 fixed).
//!
//! [`Scenario`] runs the same cluster and checks scripted instead: no
//! workload and no random faults, the test injecting each fault when it
//! chooses (`tests/tests/scenarios.rs`).
//!
//! What it does not do: disk loss (a node's disk always comes back).

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, UNIX_EPOCH};

use kv_node::client::batch_client::BatchClient;
use kv_node::client::cluster_client::{CallError, Client};
use kv_node::engine::{Engine, EngineError, Op};
use kv_node::server::config::{Ack, Member, NodeConfig};
use kv_node::server::env::Dialer;
use kv_node::server::env::{Clock, MAX_CLOCK_DRIFT, NodeEnv, Offload};
use kv_node::server::{Node, serve_incoming};
use kv_node::storage::{SimOptions, SimStorage};
use kv_proto::v1 as pb;

use crate::linearizability::{self, Input, Operation, Output, Verdict};
use crate::net::{LinkDelays, SimDialer, incoming};
use crate::rng::Rng;
use crate::stranger::{FORGED_TERM, SimPeerAuth, StrangerTally, stranger};

/// The port every node listens on (each host has its own address).
const PORT: u16 = 7000;
/// Keys the workload uses: few, so operations collide.
const KEYS: usize = 4;
/// Keys written once at the start and read at the end: their only record
/// soon lives in snapshots alone, so recovery must load those.
const COLD_KEYS: usize = 8;
/// Data directory on each node's own disk.
const DATA_DIR: &str = "/kv";
/// Client ids of the readers pinned to one node start after this.
const PINNED_READER_IDS: u64 = 10_000;

/// What to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Everything derives from it.
    pub seed: u64,
    /// Cluster size (3, 4 or 5).
    pub nodes: usize,
    /// Concurrent workload clients.
    pub clients: usize,
    /// Clients that only read (reads keep flowing while writers wait on
    /// a leader that cannot commit).
    pub readers: usize,
    /// Workload clients on one more host that share one `Kv.Batch` stream
    /// (the client API for many callers) instead of making unary calls.
    pub batch_clients: usize,
    /// Length of the chaos phase (simulated).
    pub chaos: Duration,
    /// Inject faults (false: a calm run, for the workload's own checks).
    pub faults: bool,
    /// Fewer successful operations than this fails the run.
    pub min_successful_ops: usize,
    /// The members elect their leader (the product's default); false: node
    /// 1 is the fixed leader.
    pub elections: bool,
    /// Also inject the faults added later, from a random stream of their
    /// own: any subset of the members cut from the rest (the leader left
    /// with exactly one follower, too), one direction of one link slowed,
    /// and leadership transfers whose caller gives up after a random
    /// delay. False: the fault schedule the regression seeds found their
    /// bugs with, unchanged.
    pub extra_faults: bool,
}

impl RunOptions {
    /// The options a seed gets in the sweep: 3 nodes in half the seeds, 4
    /// in a quarter (`seed % 4 == 1`), 5 in a quarter (`seed % 4 == 3`);
    /// elections, except every fifth seed (a fixed leader); every fault.
    pub fn for_seed(seed: u64) -> RunOptions {
        RunOptions {
            nodes: match seed % 4 {
                1 => 4,
                3 => 5,
                _ => 3,
            },
            extra_faults: true,
            ..RunOptions::as_found(seed)
        }
    }

    /// The options a regression seed found its bug with: 5 nodes if
    /// `seed % 4 == 3`, else 3, and none of the faults added since
    /// (`extra_faults`), so the seed replays the very same run.
    pub fn as_found(seed: u64) -> RunOptions {
        RunOptions {
            seed,
            nodes: if seed % 4 == 3 { 5 } else { 3 },
            clients: 4,
            readers: 2,
            batch_clients: 2,
            chaos: Duration::from_secs(6),
            faults: true,
            min_successful_ops: 40,
            elections: seed % 5 != 4,
            extra_faults: false,
        }
    }
}

/// What a passing run did.
#[derive(Debug, Clone)]
pub struct Report {
    /// Its seed.
    pub seed: u64,
    /// Hash of the run's event trace (faults, operations, final state):
    /// equal for two runs of one seed.
    pub trace_hash: u64,
    /// Writes acknowledged.
    pub writes_acked: usize,
    /// Reads that returned.
    pub reads_ok: usize,
    /// Operations whose outcome stayed unknown.
    pub unknown: usize,
    /// Operations of the batch-stream clients that succeeded (in the
    /// history like every other).
    pub batch_ops_ok: usize,
    /// Faults injected.
    pub faults: usize,
    /// Leadership transfers started, and how many of them the old leader
    /// reported done (the target campaigning, the old leader stepped down).
    pub transfers: (usize, usize),
    /// Leadership transfers whose caller gave up before any reply (the
    /// call dropped, cancelling the transfer on the leader).
    pub transfers_given_up: usize,
    /// A stranger's forged replication messages refused with
    /// `PERMISSION_DENIED` (none answered: that fails the run).
    pub forged_refused: usize,
    /// Simulated time at the end.
    pub sim_time: Duration,
    /// The last applied LSN (equal on every node).
    pub applied_lsn: u64,
}

/// Why a run failed, with what it takes to replay it.
#[derive(Debug)]
pub struct Failure {
    /// Its seed.
    pub seed: u64,
    /// It ran as a regression seed runs ([`RunOptions::as_found`]).
    pub as_found: bool,
    /// What went wrong.
    pub message: String,
    /// The recent events, readable.
    pub trace_tail: Vec<String>,
    /// The client history, readable (empty if not yet relevant).
    pub history: String,
    /// A scripted run ([`Scenario`]): rerun its test, not a seed.
    pub scripted: bool,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "simulation seed {} failed: {}", self.seed, self.message)?;
        if self.scripted {
            writeln!(
                f,
                "a scripted scenario: rerun its test in tests/tests/scenarios.rs (SIM_VERBOSE=1 prints its events)"
            )?;
        } else {
            writeln!(
                f,
                "replay it: SIM_SEED={}{} cargo test -p kv-sim --test simulation replay -- --exact --nocapture",
                self.seed,
                if self.as_found { " SIM_AS_FOUND=1" } else { "" }
            )?;
        }
        writeln!(f, "last events:")?;
        for line in &self.trace_tail {
            writeln!(f, "  {line}")?;
        }
        if !self.history.is_empty() {
            writeln!(f, "history:\n{}", self.history)?;
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn node_name(id: u64) -> String {
    format!("n{id}")
}

fn now_ns() -> u64 {
    turmoil::sim_elapsed().unwrap_or_default().as_nanos() as u64
}

/// One node's current incarnation, as its host publishes it.
#[derive(Default)]
struct Slot {
    node: Option<Arc<Node>>,
    /// Bumped by every start.
    incarnation: u64,
    /// The last LSN the engine recovered at its latest start.
    recovered_last: u64,
    /// The term and vote (0: none) it recovered at its latest start.
    recovered_vote: (u64, u64),
    /// The durable LSN of the incarnation that was last stopped, read as
    /// it stopped: what its next start must find (it may be below what the
    /// last check saw, if the log was legitimately cut back since, e.g. a
    /// snapshot install replaced conflicting records).
    stopped_durable: Option<u64>,
    /// The engine of the incarnation that was last stopped, while the node
    /// is down: its records up to `stopped_durable` are what its disk
    /// holds (the checker reads their terms).
    stopped_engine: Option<Arc<Engine>>,
}

type Slots = Arc<Mutex<Vec<Slot>>>;

/// The events of a run, hashed as they happen, the latest kept readable.
struct Trace {
    /// Print every event as it happens (`SIM_VERBOSE=1`).
    verbose: bool,
    hash: DefaultHasher,
    tail: std::collections::VecDeque<String>,
}

impl Trace {
    fn new() -> Self {
        Trace {
            verbose: std::env::var_os("SIM_VERBOSE").is_some(),
            hash: DefaultHasher::new(),
            tail: std::collections::VecDeque::new(),
        }
    }
    fn event(&mut self, step: u64, what: String) {
        if self.verbose {
            eprintln!("[{step:>6} ms] {what}");
        }
        step.hash(&mut self.hash);
        what.hash(&mut self.hash);
        if self.tail.len() == 60 {
            self.tail.pop_front();
        }
        self.tail.push_back(format!("[{:>6} ms] {what}", step));
    }
}

/// A write the leader acknowledged, and where: it must be in the final log
/// at that LSN (at `local`, unless the leader lost power after its call).
#[derive(Debug, Clone)]
struct AckedWrite {
    key: Vec<u8>,
    value: Option<Vec<u8>>,
    call: u64,
    lsn: u64,
    local: bool,
}

/// What the clients recorded.
#[derive(Default)]
struct Recorded {
    ops: Vec<Operation>,
    acked: Vec<AckedWrite>,
    /// Leader reads: (called at ns, the node that answered, its term).
    leader_reads: Vec<(u64, u64, u64)>,
    writes_acked: usize,
    reads_ok: usize,
    unknown: usize,
    final_write_ok: bool,
    final_reads_done: bool,
}

impl Recorded {
    /// A leader read that returned `reply`, called at `call`, returned at `ret`.
    fn leader_read(&mut self, client: u64, key: Vec<u8>, call: u64, ret: u64, reply: pb::GetReply) {
        self.reads_ok += 1;
        self.leader_reads.push((call, reply.node_id, reply.term));
        self.ops.push(Operation {
            client,
            key,
            input: Input::Get,
            output: Output::Read(reply.found.then_some(reply.value)),
            call,
            ret,
        });
    }
}

type History = Arc<Mutex<Recorded>>;

fn node_config(id: u64, nodes: usize, elections: bool) -> NodeConfig {
    let members = (1..=nodes as u64)
        .map(|m| Member {
            id: m,
            addr: SocketAddr::new(turmoil::lookup(node_name(m)), PORT),
            peer_addr: None,
        })
        .collect();
    NodeConfig {
        cluster_id: "sim".into(),
        node_id: id,
        listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), PORT),
        peer_listen: None,
        tls: None,
        allow_plaintext_non_loopback: true,
        data_dir: DATA_DIR.into(),
        leader: (!elections).then_some(1),
        members,
        ack: Ack::Quorum,
        write_timeout_ms: 1000,
        rpc_timeout_ms: 500,
        heartbeat_ms: 50,
        election_timeout_ms: 300,
        batch_records_max: 32,
        inflight_bytes_max: 16 << 10,
        key_bytes_max: 64,
        value_bytes_max: 256,
        // Small, so snapshots, segment rolls and WAL deletion happen often
        // and a cut-off follower needs a snapshot install.
        snapshot_wal_bytes: 6 << 10,
        segment_bytes_max: 4096,
        metrics_listen: None,
        log_format: Default::default(),
    }
}

fn endpoints(nodes: usize) -> Vec<SocketAddr> {
    (1..=nodes as u64)
        .map(|m| SocketAddr::new(turmoil::lookup(node_name(m)), PORT))
        .collect()
}

fn sim_client(nodes: usize) -> Client {
    sim_client_from(nodes, 0)
}

/// A client whose endpoint list starts at node `first + 1` (as a fresh
/// client process configured with another node first would).
fn sim_client_from(nodes: usize, first: usize) -> Client {
    let mut list = endpoints(nodes);
    list.rotate_left(first % nodes.max(1));
    Client::with_dialer(
        list,
        Duration::from_millis(1500),
        Arc::new(SimDialer::default()),
    )
}

/// The client ids of the batch-stream workload loops (after the unary
/// clients, the cold writer and the readers).
fn batch_client_ids(options: &RunOptions) -> std::ops::Range<u64> {
    let first = (options.clients + options.readers) as u64 + 2;
    first..first + options.batch_clients as u64
}

/// How long a workload call through a shared batch stream may take before
/// its outcome counts as unknown (the unary client's timeout).
const BATCH_CALL_TIMEOUT: Duration = Duration::from_millis(1500);

/// A `Kv.Batch` stream that several workload loops of one host share. It
/// does not follow redirects by itself: after any failure but a refused
/// argument, the next call opens a new stream, to the leader the failure
/// named, else to the next node.
#[derive(Clone)]
struct SharedStream {
    nodes: usize,
    /// The node to open the next stream to (an index into `endpoints`),
    /// and the open stream.
    state: Arc<Mutex<(usize, Option<BatchClient>)>>,
}

impl SharedStream {
    fn new(nodes: usize) -> Self {
        SharedStream {
            nodes,
            state: Arc::new(Mutex::new((0, None))),
        }
    }

    async fn open(&self) -> Result<BatchClient, CallError> {
        let target = {
            let state = lock(&self.state);
            if let Some(stream) = &state.1 {
                return Ok(stream.clone());
            }
            state.0
        };
        let addr = endpoints(self.nodes)[target];
        let unreachable =
            |why: String| CallError::Unreachable(format!("batch stream to {addr}: {why}"));
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| unreachable(e.to_string()))?;
        let opened = tokio::time::timeout(BATCH_CALL_TIMEOUT, async {
            let channel = SimDialer::default()
                .dial(endpoint)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            BatchClient::open(channel, BATCH_CALL_TIMEOUT)
                .await
                .map_err(|s| unreachable(s.message().to_owned()))
        })
        .await;
        match opened {
            Ok(Ok(stream)) => {
                lock(&self.state).1 = Some(stream.clone());
                Ok(stream)
            }
            Ok(Err(e)) => {
                self.move_on(None);
                Err(e)
            }
            Err(_) => {
                self.move_on(None);
                Err(unreachable("timed out opening".into()))
            }
        }
    }

    /// Drops the stream; the next one goes to `leader` (an address from a
    /// "not leader" failure) if it names a member, else to the next node.
    fn move_on(&self, leader: Option<&str>) {
        let all = endpoints(self.nodes);
        let named = leader
            .and_then(|l| l.parse::<SocketAddr>().ok())
            .and_then(|l| all.iter().position(|a| *a == l));
        let mut state = lock(&self.state);
        state.0 = named.unwrap_or((state.0 + 1) % self.nodes);
        state.1 = None;
    }

    /// Runs one call on the stream (which bounds it by
    /// [`BATCH_CALL_TIMEOUT`]). Like
    /// the unary client, it tries another node (the leader named, else the
    /// next) while the call provably did not run there: the stream could
    /// not be opened, or the node refused with "not leader".
    async fn call<T, Fut>(&self, call: impl Fn(BatchClient) -> Fut) -> Result<T, CallError>
    where
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        // The unary client's budget: twice its timeout.
        let give_up = tokio::time::Instant::now() + 2 * BATCH_CALL_TIMEOUT;
        let mut tries = 0u64;
        loop {
            tries += 1;
            let last = tokio::time::Instant::now() >= give_up;
            let stream = match self.open().await {
                Ok(stream) => stream,
                Err(e) if last => return Err(e),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20 * tries.min(10))).await;
                    continue;
                }
            };
            // The stream bounds the wait itself (BATCH_CALL_TIMEOUT).
            match call(stream).await {
                Ok(reply) => return Ok(reply),
                Err(status) => {
                    if status.code() == tonic::Code::InvalidArgument {
                        return Err(CallError::Status(status));
                    }
                    let leader = status
                        .metadata()
                        .get(kv_node::server::LEADER_METADATA)
                        .and_then(|v| v.to_str().ok());
                    self.move_on(leader);
                    if status.code() != tonic::Code::FailedPrecondition || last {
                        return Err(CallError::Status(status));
                    }
                    tokio::time::sleep(Duration::from_millis(20 * tries.min(10))).await;
                }
            }
        }
    }
}

/// A workload client's way to the cluster.
#[derive(Clone)]
enum Api {
    /// The CLI's client: unary calls, redirects followed.
    Unary,
    /// A batch stream shared with the other loops of its host.
    Batch(SharedStream),
}

/// One call's connection: a unary client or the shared batch stream.
enum Conn<'a> {
    Unary(&'a Client),
    Batch(&'a SharedStream),
}

/// One call through a [`Conn`]: the same method of the unary client or of
/// the shared stream (retried there like the unary client's redirects).
macro_rules! via {
    ($conn:expr, $method:ident, $req:expr) => {
        match $conn {
            Conn::Unary(client) => client.$method($req).await,
            Conn::Batch(shared) => {
                let req = $req;
                shared
                    .call(|s| {
                        let req = req.clone();
                        async move { s.$method(req).await }
                    })
                    .await
            }
        }
    };
}

impl Conn<'_> {
    async fn get(&self, req: pb::GetRequest) -> Result<pb::GetReply, CallError> {
        via!(self, get, req)
    }

    async fn put(&self, req: pb::PutRequest) -> Result<pb::WriteReply, CallError> {
        via!(self, put, req)
    }

    async fn delete(&self, req: pb::DeleteRequest) -> Result<pb::WriteReply, CallError> {
        via!(self, delete, req)
    }
}

/// The outcome of one client write.
fn write_outcome(result: &Result<pb::WriteReply, CallError>) -> Option<Result<u64, ()>> {
    match result {
        Ok(reply) => Some(Ok(reply.lsn)),
        // Refused before it was written: no effect, not in the history.
        Err(CallError::Status(s)) if s.code() == tonic::Code::InvalidArgument => None,
        // Anything else may or may not have taken effect.
        Err(_) => Some(Err(())),
    }
}

/// One workload client: random operations until the chaos phase ends.
async fn workload(
    client_id: u64,
    seed: u64,
    nodes: usize,
    until: Duration,
    history: History,
    reads_only: bool,
    api: Api,
) -> turmoil::Result {
    let mut rng = Rng::new(seed);
    let sticky = sim_client(nodes);
    let mut seq = 0u64;
    while turmoil::sim_elapsed().unwrap_or_default() < until {
        // Mostly the same client, which sticks to the node that answered
        // last; sometimes a fresh one that starts at a random node, so
        // clients disagree about who leads (a deposed leader that still
        // believes it leads keeps getting some of them).
        let fresh;
        let client = match &api {
            Api::Batch(shared) => Conn::Batch(shared),
            Api::Unary if rng.below(4) == 0 => {
                fresh = sim_client_from(nodes, rng.below(nodes as u64) as usize);
                Conn::Unary(&fresh)
            }
            Api::Unary => Conn::Unary(&sticky),
        };
        let key = format!("k{}", rng.below(KEYS as u64)).into_bytes();
        let roll = rng.below(100);
        let call = now_ns();
        if roll < 45 || reads_only {
            let resp = client
                .get(pb::GetRequest {
                    key: key.clone(),
                    consistency: pb::ReadConsistency::Default as i32,
                })
                .await;
            let ret = now_ns();
            if let Ok(reply) = resp {
                lock(&history).leader_read(client_id, key, call, ret, reply);
            }
        } else {
            seq += 1;
            let local = rng.below(100) < 20;
            let ack = if local {
                pb::AckLevel::Local
            } else {
                pb::AckLevel::Quorum
            } as i32;
            let (input, value, resp) = if roll < 85 {
                let value = format!("c{client_id}.{seq}").into_bytes();
                let resp = client
                    .put(pb::PutRequest {
                        key: key.clone(),
                        value: value.clone(),
                        ack,
                    })
                    .await;
                (Input::Put(value.clone()), Some(value), resp)
            } else {
                let resp = client
                    .delete(pb::DeleteRequest {
                        key: key.clone(),
                        ack,
                    })
                    .await;
                (Input::Delete, None, resp)
            };
            let ret = now_ns();
            let outcome = write_outcome(&resp);
            let mut h = lock(&history);
            match outcome {
                None => {}
                Some(Ok(lsn)) => {
                    h.writes_acked += 1;
                    h.acked.push(AckedWrite {
                        key: key.clone(),
                        value,
                        call,
                        lsn,
                        local,
                    });
                    // At `local` a write becomes visible once committed,
                    // which may be after its ack: for linearizability it
                    // takes effect "some time after its call"; its survival
                    // is checked on its own.
                    let output = if local {
                        Output::Unknown
                    } else {
                        Output::Written
                    };
                    h.ops.push(Operation {
                        client: client_id,
                        key,
                        input,
                        output,
                        call,
                        ret,
                    });
                }
                Some(Err(())) => {
                    h.unknown += 1;
                    h.ops.push(Operation {
                        client: client_id,
                        key,
                        input,
                        output: Output::Unknown,
                        call,
                        ret,
                    });
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.below(15))).await;
    }
    Ok(())
}

/// At the start: each cold key written once (retried while the outcome is
/// a definite refusal; an unknown outcome stays in the history as such).
async fn cold_writer(client_id: u64, nodes: usize, history: History) -> turmoil::Result {
    let client = sim_client(nodes);
    for k in 0..COLD_KEYS {
        let key = format!("cold{k}").into_bytes();
        let value = format!("once{k}").into_bytes();
        for _ in 0..20 {
            let call = now_ns();
            let resp = client
                .put(pb::PutRequest {
                    key: key.clone(),
                    value: value.clone(),
                    ack: pb::AckLevel::Quorum as i32,
                })
                .await;
            let ret = now_ns();
            let output = match write_outcome(&resp) {
                None => continue,
                Some(Ok(lsn)) => {
                    let mut h = lock(&history);
                    h.writes_acked += 1;
                    h.acked.push(AckedWrite {
                        key: key.clone(),
                        value: Some(value.clone()),
                        call,
                        lsn,
                        local: false,
                    });
                    Output::Written
                }
                Some(Err(())) => Output::Unknown,
            };
            let done = output == Output::Written;
            lock(&history).ops.push(Operation {
                client: client_id,
                key: key.clone(),
                input: Input::Put(value.clone()),
                output,
                call,
                ret,
            });
            if done {
                break;
            }
            // Unknown: the same value again is harmless (the checker
            // allows retries of one value).
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// After the faults are healed: one write that must succeed, then a read
/// of every key (each joins the history).
async fn final_client(
    client_id: u64,
    nodes: usize,
    start: Duration,
    history: History,
) -> turmoil::Result {
    let wait = start.saturating_sub(turmoil::sim_elapsed().unwrap_or_default());
    tokio::time::sleep(wait).await;
    let client = sim_client(nodes);
    let key = b"k0".to_vec();
    let value = b"final".to_vec();
    for _ in 0..40 {
        let call = now_ns();
        let resp = client
            .put(pb::PutRequest {
                key: key.clone(),
                value: value.clone(),
                ack: pb::AckLevel::Quorum as i32,
            })
            .await;
        let ret = now_ns();
        let ok = resp.is_ok();
        {
            let mut h = lock(&history);
            h.ops.push(Operation {
                client: client_id,
                key: key.clone(),
                input: Input::Put(value.clone()),
                output: if ok { Output::Written } else { Output::Unknown },
                call,
                ret,
            });
            if ok {
                h.final_write_ok = true;
            }
        }
        if ok {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let keys = (0..KEYS)
        .map(|k| format!("k{k}"))
        .chain((0..COLD_KEYS).map(|k| format!("cold{k}")));
    for key in keys {
        let key = key.into_bytes();
        for _ in 0..40 {
            let call = now_ns();
            let resp = client
                .get(pb::GetRequest {
                    key: key.clone(),
                    consistency: pb::ReadConsistency::Default as i32,
                })
                .await;
            let ret = now_ns();
            if let Ok(reply) = resp {
                lock(&history).ops.push(Operation {
                    client: client_id,
                    key: key.clone(),
                    input: Input::Get,
                    output: Output::Read(reply.found.then_some(reply.value)),
                    call,
                    ret,
                });
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    lock(&history).final_reads_done = true;
    Ok(())
}

/// Reads from node `node` alone (no redirect followed, as a client
/// that trusts the node it talks to would), every `every` until `until`
/// (simulated): each answered read joins the history and the checked
/// leader reads. Aimed at a leader that may have been deposed, so the
/// check that no deposed leader serves a read has reads to look at.
async fn pinned_reader(
    client_id: u64,
    node: u64,
    until: Duration,
    every: Duration,
    history: History,
) -> turmoil::Result {
    let addr = SocketAddr::new(turmoil::lookup(node_name(node)), PORT);
    let mut client = None;
    while turmoil::sim_elapsed().unwrap_or_default() < until {
        if client.is_none() {
            let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                .timeout(Duration::from_millis(100));
            client = tokio::time::timeout(
                Duration::from_millis(100),
                SimDialer::default().dial(endpoint),
            )
            .await
            .ok()
            .and_then(Result::ok)
            .map(pb::kv_client::KvClient::new);
        }
        if let Some(kv) = client.as_mut() {
            let key = b"k0".to_vec();
            let call = now_ns();
            let reply = tokio::time::timeout(
                Duration::from_millis(100),
                kv.get(pb::GetRequest {
                    key: key.clone(),
                    consistency: pb::ReadConsistency::Default as i32,
                }),
            )
            .await;
            let ret = now_ns();
            match reply {
                Ok(Ok(reply)) => {
                    lock(&history).leader_read(client_id, key, call, ret, reply.into_inner());
                }
                Ok(Err(status)) if status.code() == tonic::Code::FailedPrecondition => {}
                // A broken or stuck connection: dial again.
                _ => client = None,
            }
        }
        tokio::time::sleep(every).await;
    }
    Ok(())
}

/// A fault that ends later, and how to undo it.
#[derive(Debug, Clone)]
enum Heal {
    Repair(String, String),
    RepairOneway(String, String),
    Release(String, String),
    Latency(String, String),
    Restart(u64),
    /// Power loss now (its disk stopped mid-operation), back after the ms.
    PowerOff(u64, u64),
    /// Every node's clock back to its own rate.
    ClockRates,
    /// The extra one-way delay from the first node to the second ends.
    Delay(u64, u64),
    /// Arm a crash point: the disk stops this many operations after its
    /// next snapshot rename (`None`: at the first directory sync after
    /// it), and the power goes at once.
    Trap(u64, Option<u64>),
}

/// The invariants the README's Simulation section lists, checked after every step.
struct Checker {
    nodes: usize,
    /// Per node: the incarnation last seen, its commit LSN then, and its
    /// durable LSN then (a durable LSN must survive a crash).
    seen_incarnation: Vec<u64>,
    last_commit: Vec<u64>,
    last_durable: Vec<u64>,
    /// Per node: the term and vote (0: none) it last showed. Both were
    /// durable before it showed them, so a restart must bring them back.
    last_vote: Vec<(u64, u64)>,
    /// The highest commit LSN any node ever reported, and the term of its
    /// record there (`None`: that node no longer knew it).
    commit_high: u64,
    commit_high_term: Option<u64>,
    /// Leaders seen per term.
    leaders: BTreeMap<u64, BTreeSet<u64>>,
    /// Committed records seen so far: LSN -> (term, hash of the operation,
    /// the node it was first seen on).
    committed: BTreeMap<u64, (u64, u64, u64)>,
    /// Per node: records compared through this LSN (this incarnation).
    compared_through: Vec<u64>,
    /// Per term: when (simulated ns, at the end of a step) a record of
    /// that term was first seen committed.
    first_commit_ns: BTreeMap<u64, u64>,
}

fn op_hash(op: &Op) -> u64 {
    let mut h = DefaultHasher::new();
    match op {
        Op::Put { key, value } => (0u8, key, value).hash(&mut h),
        Op::Delete { key } => (1u8, key).hash(&mut h),
    }
    h.finish()
}

impl Checker {
    fn new(nodes: usize) -> Self {
        Checker {
            nodes,
            seen_incarnation: vec![0; nodes],
            last_commit: vec![0; nodes],
            last_durable: vec![0; nodes],
            last_vote: vec![(0, 0); nodes],
            commit_high: 0,
            commit_high_term: None,
            leaders: BTreeMap::new(),
            committed: BTreeMap::new(),
            compared_through: vec![0; nodes],
            first_commit_ns: BTreeMap::new(),
        }
    }

    fn majority(&self) -> usize {
        self.nodes / 2 + 1
    }

    /// Checks every live node's positions; `deep` also compares committed
    /// records across nodes.
    fn check(&mut self, slots: &[Slot], deep: bool, now_ns: u64) -> Result<(), String> {
        for (i, slot) in slots.iter().enumerate() {
            let id = i as u64 + 1;
            let Some(node) = &slot.node else { continue };
            let engine = node.engine();
            let st = engine.stats();
            let commit = engine.commit_lsn();
            let (applied, durable, last) = (st.applied_lsn, st.durable_lsn, st.last_lsn);
            if let Some(divergence) = engine.divergence() {
                return Err(format!("node {id}: divergence alarm: {divergence}"));
            }
            if node.term() >= FORGED_TERM {
                return Err(format!(
                    "node {id} is in term {}, a stranger's forged term",
                    node.term()
                ));
            }
            if !(applied <= commit && commit <= durable && durable <= last) {
                return Err(format!(
                    "node {id}: positions out of order: applied {applied}, commit {commit}, durable {durable}, last {last}"
                ));
            }
            if slot.incarnation != self.seen_incarnation[i] {
                // A restart: everything it had made durable must be there.
                let durable_before = slot.stopped_durable.unwrap_or(self.last_durable[i]);
                if slot.recovered_last < durable_before {
                    return Err(format!(
                        "node {id}: restarted with its log ending at LSN {}, but LSN {durable_before} was durable before",
                        slot.recovered_last
                    ));
                }
                // Its term and vote too (a vote forgotten is a second vote
                // in the same term, and two leaders).
                let (term, vote) = self.last_vote[i];
                let (r_term, r_vote) = slot.recovered_vote;
                if r_term < term || (r_term == term && vote != 0 && r_vote != vote) {
                    return Err(format!(
                        "node {id}: restarted in term {r_term} with vote {r_vote}, but had term {term} with vote {vote} before"
                    ));
                }
                self.seen_incarnation[i] = slot.incarnation;
                self.compared_through[i] = 0;
            } else if commit < self.last_commit[i] {
                return Err(format!(
                    "node {id}: commit LSN went back from {} to {commit}",
                    self.last_commit[i]
                ));
            }
            self.last_commit[i] = commit;
            self.last_durable[i] = durable;
            if let Some(term) = engine.term_at(commit).filter(|_| commit > 0) {
                self.first_commit_ns.entry(term).or_insert(now_ns);
            }
            if commit > self.commit_high
                || (commit == self.commit_high && self.commit_high_term.is_none())
            {
                self.commit_high = commit;
                self.commit_high_term = engine.term_at(commit);
            }
            let status = node.status();
            self.last_vote[i] = (status.term, status.voted_for);
            if status.role == "leader" {
                let leaders = self.leaders.entry(status.term).or_default();
                leaders.insert(id);
                if leaders.len() > 1 {
                    return Err(format!(
                        "two leaders in term {}: nodes {leaders:?}",
                        status.term
                    ));
                }
                // Leader completeness: a record committed in term T is in
                // the log of every leader of a term after T. (A deposed
                // leader of an older term may still think it leads.)
                if let Some((term, _, _)) = self.committed.get(&self.commit_high).copied()
                    && status.term > term
                    && engine.term_at(self.commit_high) != Some(term)
                    && self.commit_high >= engine.wal_first_lsn()
                {
                    return Err(format!(
                        "leader n{id} of term {} lacks LSN {} committed in term {term} (its log ends at {last})",
                        status.term, self.commit_high
                    ));
                }
            }
        }
        self.check_commit_high_held(slots)?;
        if deep {
            self.compare_records(slots)?;
        }
        Ok(())
    }

    /// The highest committed record is durable on a majority: the record
    /// itself (the same LSN with the same term), not only a log that
    /// reaches its position, since a minority may hold another term's
    /// record there. A node that is down counts with what it had made
    /// durable (its stopped engine's records up to there). Where a node
    /// no longer knows the term at that LSN (folded into a snapshot), or
    /// the term of the committed record is unknown, its position counts.
    fn check_commit_high_held(&self, slots: &[Slot]) -> Result<(), String> {
        let high = self.commit_high;
        if high == 0 {
            return Ok(());
        }
        let views: Vec<(u64, Option<u64>, bool)> = slots
            .iter()
            .enumerate()
            .map(|(i, slot)| {
                let durable = self.last_durable[i];
                let engine = slot
                    .node
                    .as_ref()
                    .map(|n| n.engine())
                    .or(slot.stopped_engine.as_ref());
                let term = engine.and_then(|e| e.term_at(high));
                let holds = durable >= high
                    && match (self.commit_high_term, term) {
                        (Some(want), Some(got)) => want == got,
                        _ => true,
                    };
                (durable, term, holds)
            })
            .collect();
        let holders = views.iter().filter(|v| v.2).count();
        if holders < self.majority() {
            let seen: Vec<String> = views
                .iter()
                .zip(slots)
                .enumerate()
                .map(|(i, ((durable, term, _), slot))| {
                    format!(
                        "n{}: durable {durable}, term {} at LSN {high}{}",
                        i + 1,
                        term.map_or("?".into(), |t| t.to_string()),
                        if slot.node.is_none() { " (down)" } else { "" }
                    )
                })
                .collect();
            return Err(format!(
                "LSN {high} is committed (term {}) but that record is durable on only {holders} of {} nodes ({} needed): {}",
                self.commit_high_term.map_or("?".into(), |t| t.to_string()),
                self.nodes,
                self.majority(),
                seen.join("; ")
            ));
        }
        Ok(())
    }

    /// Only the newest leader serves reads: a read called after a record
    /// of a later term was committed (so a later leader was elected and
    /// may have committed writes) must not be answered by an older term's
    /// leader. The lease is what guarantees it; check quorum alone does
    /// not, when clocks drift.
    fn check_leader_reads(&self, reads: &[(u64, u64, u64)]) -> Result<(), String> {
        for &(call, node, term) in reads {
            if let Some((later, at)) = self
                .first_commit_ns
                .range(term + 1..)
                .map(|(t, at)| (*t, *at))
                .filter(|(_, at)| *at < call)
                .min_by_key(|(_, at)| *at)
            {
                return Err(format!(
                    "n{node} answered a read in term {term} called at {:.3} s, but a record of term {later} was committed by {:.3} s: a deposed leader served a read",
                    call as f64 / 1e9,
                    at as f64 / 1e9
                ));
            }
        }
        Ok(())
    }

    /// A committed LSN holds the same record (term and operation) on every
    /// node that has it.
    fn compare_records(&mut self, slots: &[Slot]) -> Result<(), String> {
        for (i, slot) in slots.iter().enumerate() {
            let Some(node) = &slot.node else { continue };
            let engine = node.engine();
            let commit = engine.commit_lsn();
            let mut from = (self.compared_through[i] + 1).max(engine.wal_first_lsn());
            while from <= commit {
                let records = match engine.read_from(from, 256) {
                    Ok(records) => records,
                    // Its disk stopped (an injected fault): look again later.
                    Err(EngineError::Io { .. }) => break,
                    Err(e) => return Err(format!("node {}: read LSN {from}: {e}", i + 1)),
                };
                if records.is_empty() {
                    break;
                }
                for r in records.iter().take_while(|r| r.lsn <= commit) {
                    let mine = (r.term, op_hash(&r.op), i as u64 + 1);
                    let reference = *self.committed.entry(r.lsn).or_insert(mine);
                    if (reference.0, reference.1) != (mine.0, mine.1) {
                        return Err(format!(
                            "committed LSN {} differs: term {} on node {} (commit {commit}), term {} on node {}",
                            r.lsn,
                            mine.0,
                            i + 1,
                            reference.0,
                            reference.2
                        ));
                    }
                    from = r.lsn + 1;
                }
                if records.last().is_some_and(|r| r.lsn >= commit) {
                    break;
                }
            }
            self.compared_through[i] = from - 1;
        }
        Ok(())
    }
}

/// Runs one seed to the end; `Err` says what broke.
pub fn run(options: &RunOptions) -> Result<Report, Failure> {
    let mut run = Run::new(options);
    let outcome = run.drive();
    let trace_tail: Vec<String> = run.trace.tail.iter().cloned().collect();
    match outcome {
        Ok(report) => Ok(report),
        Err((message, with_history)) => Err(Failure {
            seed: options.seed,
            as_found: !options.extra_faults,
            message,
            trace_tail,
            history: if with_history {
                linearizability::format_history(&lock(&run.history).ops)
            } else {
                String::new()
            },
            scripted: false,
        }),
    }
}

struct Run<'a> {
    /// What the stranger's forged messages met.
    strangers: Arc<StrangerTally>,
    options: RunOptions,
    sim: turmoil::Sim<'a>,
    rng: Rng,
    slots: Slots,
    disks: Vec<SimStorage>,
    history: History,
    trace: Trace,
    checker: Checker,
    heals: Vec<(u64, Heal)>,
    down: BTreeSet<u64>,
    /// Nodes whose disk has an armed crash point: they lose power the
    /// moment it is reached.
    trapped: BTreeSet<u64>,
    /// Leader reads already checked against later terms' commits.
    reads_checked: usize,
    /// Each node's own clock rate (1.0: true time).
    clock_rates: Vec<f64>,
    /// Each node's clock rate now (`f64` bits), read by its `Clock`.
    rate_handles: Vec<Arc<AtomicU64>>,
    /// When (ms) a leader lost power or leadership changed hands: a write
    /// acknowledged at `local` before then may be lost.
    leader_disruptions: Vec<u64>,
    faults: usize,
    /// Leadership transfers started (each from a client of its own), and
    /// those reported done.
    transfers_started: usize,
    transfers_done: Arc<AtomicU64>,
    /// Transfers whose caller gives up after a random delay (each from a
    /// client of its own), and how many gave up before any reply.
    transfers_abandoned: usize,
    transfers_given_up: Arc<AtomicU64>,
    /// The random stream of the faults added later (`extra_faults`): the
    /// schedule of the others stays what it was.
    extra: Rng,
    /// One-way extra delays, read by every node's streams.
    delays: LinkDelays,
    /// Readers pinned to one node started so far (their names and ids).
    pinned_readers: u64,
    /// A reconnect under a slow ack direction being set up: once the
    /// follower has heard the leader's reconnect probe, the leader is cut
    /// off ([`Run::check_probe_watch`]).
    probe_watch: Option<ProbeWatch>,
    step: u64,
}

/// See [`Run::check_probe_watch`].
#[derive(Debug, Clone)]
struct ProbeWatch {
    leader: u64,
    term: u64,
    follower: u64,
    /// The follower's incarnation when it was restarted: the probe is the
    /// first request its next incarnation hears.
    incarnation: u64,
    /// The watch is dropped at this step if the probe never came.
    expires: u64,
    /// How long the leader stays cut off.
    cut_ms: u64,
}

impl Run<'_> {
    fn new(options: &RunOptions) -> Self {
        let mut rng = Rng::new(options.seed);
        let mut sim = turmoil::Builder::new()
            .rng_seed(rng.next_u64())
            .epoch(UNIX_EPOCH + Duration::from_secs(1_800_000_000))
            .simulation_duration(Duration::from_secs(3600))
            .min_message_latency(Duration::from_micros(200))
            .max_message_latency(Duration::from_millis(3))
            .tcp_capacity(4096)
            .build();
        let slots: Slots = Arc::new(Mutex::new(
            (0..options.nodes).map(|_| Slot::default()).collect(),
        ));
        let mut disks = Vec::new();
        // Clock rates draw from their own stream, so the faults a seed
        // injects stay as they were before clocks drifted.
        let mut clocks = Rng::new(options.seed ^ 0xC10C_0000_0000_0000);
        let mut clock_rates = Vec::new();
        let mut rate_handles = Vec::new();
        let delays = LinkDelays::default();
        for id in 1..=options.nodes as u64 {
            let disk = SimStorage::new(SimOptions {
                seed: rng.next_u64(),
                torn_tails: true,
                independent_names: true,
            });
            disks.push(disk.clone());
            let slots = slots.clone();
            let delays = delays.clone();
            let nodes = options.nodes;
            let elections = options.elections;
            let node_seed = rng.next_u64();
            // Its clock runs fast or slow, within the drift the lease
            // tolerates (some margin kept).
            let drift = MAX_CLOCK_DRIFT * 0.8 * (clocks.below(2001) as f64 / 1000.0 - 1.0);
            clock_rates.push(1.0 + drift);
            let rate = Arc::new(AtomicU64::new((1.0 + drift).to_bits()));
            rate_handles.push(rate.clone());
            sim.host(node_name(id), move || {
                let disk = disk.clone();
                let slots = slots.clone();
                let rate = rate.clone();
                let delays = delays.clone();
                async move {
                    let config = node_config(id, nodes, elections);
                    let engine = match Engine::open(Arc::new(disk), config.engine_config()) {
                        Ok(engine) => engine,
                        // An injected I/O error: the process exits, and the
                        // supervisor starts it again later.
                        Err(EngineError::Io { .. }) => return Ok(()),
                        Err(e) => return Err(format!("node {id} cannot open its disk: {e}").into()),
                    };
                    let recovered_last = engine.last_lsn();
                    let env = NodeEnv {
                        dialer: Arc::new(SimDialer::with_delays(delays.clone())),
                        offload: Offload::Inline,
                        clock: Clock::drifting(rate.clone()),
                        // A round's records sit written but not yet durable
                        // for a tick, where a power loss can find them.
                        sync_latency: Duration::from_millis(1),
                        seed: node_seed,
                        // Who calls its peer service: the member whose
                        // address the connection comes from, else nobody.
                        peer_auth: Arc::new(SimPeerAuth::new(
                            (1..=nodes as u64)
                                .map(|m| turmoil::lookup(node_name(m)))
                                .collect(),
                        )),
                        ..NodeEnv::default()
                    };
                    let node = match Node::with_env(config, Arc::new(engine), env) {
                        Ok(node) => node,
                        Err(e) if matches!(e.downcast_ref(), Some(EngineError::Io { .. })) => {
                            return Ok(());
                        }
                        Err(e) => return Err(format!("node {id} cannot start: {e:#}").into()),
                    };
                    {
                        let mut slots = lock(&slots);
                        let slot = &mut slots[id as usize - 1];
                        slot.node = Some(node.clone());
                        slot.stopped_engine = None;
                        slot.incarnation += 1;
                        slot.recovered_last = recovered_last;
                        let status = node.status();
                        slot.recovered_vote = (status.term, status.voted_for);
                    }
                    let listener =
                        turmoil::net::TcpListener::bind((IpAddr::V4(Ipv4Addr::UNSPECIFIED), PORT))
                            .await?;
                    serve_incoming(
                        node,
                        incoming(listener, delays),
                        None,
                        None,
                        std::future::pending(),
                    )
                    .await?;
                    Ok(())
                }
            });
        }
        let history: History = Arc::new(Mutex::new(Recorded::default()));
        for c in 1..=options.clients as u64 {
            let seed = rng.next_u64();
            sim.client(
                format!("c{c}"),
                workload(
                    c,
                    seed,
                    options.nodes,
                    options.chaos,
                    history.clone(),
                    false,
                    Api::Unary,
                ),
            );
        }
        // Their own random stream: the faults a seed injects stay put.
        let mut readers = Rng::new(options.seed ^ 0x5EAD_0000_0000_0000);
        for r in 1..=options.readers as u64 {
            let id = options.clients as u64 + 1 + r;
            sim.client(
                format!("r{r}"),
                workload(
                    id,
                    readers.next_u64(),
                    options.nodes,
                    options.chaos,
                    history.clone(),
                    true,
                    Api::Unary,
                ),
            );
        }
        if options.batch_clients > 0 {
            // One host whose workload loops share one batch stream, with
            // their own random streams (the faults a seed injects stay put).
            let mut batch = Rng::new(options.seed ^ 0xBA7C_0000_0000_0000);
            let loops: Vec<_> = batch_client_ids(options)
                .map(|id| (id, batch.next_u64()))
                .collect();
            let (nodes, chaos, history) = (options.nodes, options.chaos, history.clone());
            sim.client("cbatch", async move {
                let shared = SharedStream::new(nodes);
                let runs = loops.into_iter().map(|(id, seed)| {
                    workload(
                        id,
                        seed,
                        nodes,
                        chaos,
                        history.clone(),
                        false,
                        Api::Batch(shared.clone()),
                    )
                });
                futures_util::future::try_join_all(runs).await?;
                Ok(())
            });
        }
        sim.client(
            "ccold",
            cold_writer(options.clients as u64 + 1, options.nodes, history.clone()),
        );
        // A stranger forging replication messages through the chaos phase
        // (not in the regression seeds' schedule, which predates it).
        let strangers = Arc::new(StrangerTally::default());
        if options.faults && options.extra_faults {
            sim.client(
                "stranger",
                stranger(
                    options.seed ^ 0x57A4_0000_0000_0000,
                    options.nodes,
                    PORT,
                    options.chaos,
                    strangers.clone(),
                ),
            );
        }
        let final_start = options.chaos + Duration::from_secs(1);
        sim.client(
            "cfinal",
            final_client(0, options.nodes, final_start, history.clone()),
        );
        Run {
            options: options.clone(),
            sim,
            rng,
            slots,
            disks,
            history,
            trace: Trace::new(),
            checker: Checker::new(options.nodes),
            heals: Vec::new(),
            down: BTreeSet::new(),
            trapped: BTreeSet::new(),
            reads_checked: 0,
            clock_rates,
            rate_handles,
            leader_disruptions: Vec::new(),
            faults: 0,
            transfers_started: 0,
            transfers_done: Arc::default(),
            transfers_abandoned: 0,
            transfers_given_up: Arc::default(),
            extra: Rng::new(options.seed ^ 0xFA17_0000_0000_0000),
            delays,
            pinned_readers: 0,
            probe_watch: None,
            step: 0,
            strangers,
        }
    }

    fn event(&mut self, what: String) {
        self.trace.event(self.step, what);
    }

    fn random_node(&mut self) -> u64 {
        self.rng.below(self.options.nodes as u64) + 1
    }

    fn other_nodes(&self, id: u64) -> Vec<String> {
        (1..=self.options.nodes as u64)
            .filter(|m| *m != id)
            .map(node_name)
            .collect()
    }

    fn heal_at(&mut self, after_ms: u64, heal: Heal) {
        self.heals.push((self.step + after_ms, heal));
    }

    /// Forgets node `id`'s running incarnation, noting its durable LSN.
    fn stop_slot(&mut self, id: u64) {
        let mut slots = lock(&self.slots);
        let slot = &mut slots[id as usize - 1];
        if let Some(node) = slot.node.take() {
            slot.stopped_durable = Some(node.engine().durable_lsn());
            slot.stopped_engine = Some(node.engine().clone());
        }
    }

    /// Power loss: the disk keeps only what was synced (and maybe a torn
    /// tail); the process dies with it.
    fn power_off(&mut self, id: u64) {
        self.stop_slot(id);
        self.disks[id as usize - 1].crash();
        self.sim.crash(node_name(id));
        self.down.insert(id);
        if self.leader() == Some(id) {
            self.leader_disruptions.push(self.step);
        }
    }

    fn restart(&mut self, id: u64) {
        self.stop_slot(id);
        self.sim.bounce(node_name(id));
        self.down.remove(&id);
    }

    fn inject_fault(&mut self) {
        let n = self.options.nodes as u64;
        let roll = self.rng.below(100);
        self.faults += 1;
        match roll {
            0..=14 => {
                let (a, b) = (self.random_node(), self.random_node());
                if a != b {
                    let ms = 100 + self.rng.below(1500);
                    self.event(format!("partition n{a} <-> n{b} for {ms} ms"));
                    self.sim.partition(node_name(a), node_name(b));
                    self.heal_at(ms, Heal::Repair(node_name(a), node_name(b)));
                }
            }
            15..=24 => {
                let (a, b) = (self.random_node(), self.random_node());
                if a != b {
                    let ms = 100 + self.rng.below(1500);
                    self.event(format!("one-way partition n{a} -> n{b} for {ms} ms"));
                    self.sim.partition_oneway(node_name(a), node_name(b));
                    self.heal_at(ms, Heal::RepairOneway(node_name(a), node_name(b)));
                }
            }
            25..=31 => {
                let ms = 200 + self.rng.below(2000);
                let leader = self.leader().unwrap_or(1);
                self.event(format!("isolate the leader n{leader} for {ms} ms"));
                for other in self.other_nodes(leader) {
                    self.sim.partition(node_name(leader), other.clone());
                    self.heal_at(ms, Heal::Repair(node_name(leader), other));
                }
                if self.rng.below(2) == 0 {
                    // The worst drift the lease must tolerate: the deposed
                    // leader's clock slow, everyone else's fast, so it
                    // believes in its leadership longest while the others
                    // elect soonest.
                    let skew = MAX_CLOCK_DRIFT * 0.9;
                    self.event(format!(
                        "clocks skewed: n{leader} at {:.3}x, the others at {:.3}x, for {ms} ms",
                        1.0 - skew,
                        1.0 + skew
                    ));
                    for (i, handle) in self.rate_handles.iter().enumerate() {
                        let rate = if i as u64 + 1 == leader {
                            1.0 - skew
                        } else {
                            1.0 + skew
                        };
                        handle.store(rate.to_bits(), Ordering::Relaxed);
                    }
                    self.heal_at(ms, Heal::ClockRates);
                }
            }
            32..=41 => {
                let (a, b) = (self.random_node(), self.random_node());
                if a != b {
                    let ms = 20 + self.rng.below(400);
                    self.event(format!("hold n{a} <-> n{b} for {ms} ms"));
                    self.sim.hold(node_name(a), node_name(b));
                    self.heal_at(ms, Heal::Release(node_name(a), node_name(b)));
                }
            }
            42..=49 => {
                let (a, b) = (self.random_node(), self.random_node());
                if a != b {
                    let lat = 20 + self.rng.below(300);
                    let ms = 100 + self.rng.below(1000);
                    self.event(format!("latency {lat} ms on n{a} <-> n{b} for {ms} ms"));
                    self.sim.set_link_latency(
                        node_name(a),
                        node_name(b),
                        Duration::from_millis(lat),
                    );
                    self.heal_at(ms, Heal::Latency(node_name(a), node_name(b)));
                }
            }
            50..=63 => {
                let id = match self.leader() {
                    Some(leader) if self.rng.below(4) == 0 => leader,
                    _ => self.random_node(),
                };
                if !self.down.contains(&id) {
                    let ms = 50 + self.rng.below(1500);
                    self.event(format!("power loss on n{id}, back in {ms} ms"));
                    self.power_off(id);
                    self.heal_at(ms, Heal::Restart(id));
                }
            }
            64..=73 => {
                let id = self.random_node();
                if !self.down.contains(&id) {
                    self.event(format!("process restart of n{id} (page cache kept)"));
                    self.restart(id);
                }
            }
            74..=79 => {
                let count = 2 + self.rng.below(n - 1);
                let mut ids: Vec<u64> = (1..=n).collect();
                self.rng.shuffle(&mut ids);
                ids.truncate(count as usize);
                ids.retain(|id| !self.down.contains(id));
                let ms = 50 + self.rng.below(1000);
                self.event(format!("power loss on {ids:?} at once, back in {ms} ms"));
                for id in ids {
                    self.power_off(id);
                    self.heal_at(ms, Heal::Restart(id));
                }
            }
            80..=85 => {
                // A follower: the one after the leader, then some more.
                let leader = self.leader().unwrap_or(1);
                let id = (leader + self.rng.below(n - 1)) % n + 1;
                let mut ms = 2000 + self.rng.below(2000);
                if self.rng.below(2) == 0 {
                    // Back, it will likely catch up by a snapshot install:
                    // crash in the middle of it, 0-7 operations after the
                    // snapshot's rename, or at the first directory sync
                    // after it (the install then has removed old log
                    // segments the sync would have made durable). It comes
                    // back early enough for the install to happen in the
                    // chaos phase (the leader's snapshots make it needed
                    // however short the cut-off).
                    let ops = self.rng.below(16);
                    let chaos_ms = self.options.chaos.as_millis() as u64;
                    ms = ms.min(chaos_ms.saturating_sub(self.step + 500)).max(300);
                    self.heal_at(ms, Heal::Trap(id, (ops < 8).then_some(ops)));
                }
                self.event(format!("cut off follower n{id} for {ms} ms"));
                for other in self.other_nodes(id) {
                    self.sim.partition(node_name(id), other.clone());
                    self.heal_at(ms, Heal::Repair(node_name(id), other));
                }
            }
            86..=89 => {
                // A planned leadership transfer (`kv transfer-leader`), from
                // a client of its own, in the middle of everything else.
                if let Some(leader) = self.leader() {
                    let target = (leader + self.rng.below(n - 1)) % n + 1;
                    self.transfers_started += 1;
                    let name = format!("transfer{}", self.transfers_started);
                    self.event(format!("{name}: hand leadership n{leader} -> n{target}"));
                    let (nodes, done) = (self.options.nodes, self.transfers_done.clone());
                    self.sim.client(name, async move {
                        let client = sim_client_from(nodes, leader as usize - 1);
                        let outcome = client.transfer_leader(target).await;
                        tracing::debug!(?outcome, target, "leadership transfer");
                        if outcome.is_ok() {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(())
                    });
                }
            }
            93..=99 => {
                // The disk stops after a few more operations (mid-round,
                // mid-snapshot, mid-rename), then the power goes.
                let id = self.random_node();
                if !self.down.contains(&id) {
                    let ops = self.rng.below(12);
                    let after = 1 + self.rng.below(30);
                    let back = 50 + self.rng.below(1000);
                    self.event(format!(
                        "n{id}'s disk stops after {ops} more operations; power loss in {after} ms"
                    ));
                    self.disks[id as usize - 1].fail_after_ops(ops);
                    self.heal_at(after, Heal::PowerOff(id, back));
                }
            }
            _ => {
                let id = self.random_node();
                if !self.down.contains(&id) {
                    let disk = &self.disks[id as usize - 1];
                    if self.rng.below(2) == 0 {
                        disk.fail_next_sync();
                        self.event(format!("the next fsync on n{id} fails"));
                    } else {
                        disk.fail_next_write();
                        self.event(format!("the next write on n{id} fails"));
                    }
                }
            }
        }
    }

    fn ip(&self, id: u64) -> IpAddr {
        self.sim.lookup(node_name(id))
    }

    /// Cuts every link between `side` and the other members (`oneway`:
    /// only the direction from `side` to the rest), for `ms`.
    fn cut_off(&mut self, side: &[u64], oneway: bool, ms: u64) {
        let rest: Vec<u64> = (1..=self.options.nodes as u64)
            .filter(|m| !side.contains(m))
            .collect();
        self.event(format!(
            "partition {side:?} {} {rest:?} for {ms} ms",
            if oneway { "->" } else { "<->" }
        ));
        for &a in side {
            for &b in &rest {
                let (a, b) = (node_name(a), node_name(b));
                if oneway {
                    self.sim.partition_oneway(a.clone(), b.clone());
                    self.heal_at(ms, Heal::RepairOneway(a, b));
                } else {
                    self.sim.partition(a.clone(), b.clone());
                    self.heal_at(ms, Heal::Repair(a, b));
                }
            }
        }
    }

    /// Slows the direction `from -> to` by `lat` ms, for `ms`.
    fn slow_oneway(&mut self, from: u64, to: u64, lat: u64, ms: u64) {
        self.event(format!(
            "one-way latency {lat} ms on n{from} -> n{to} for {ms} ms"
        ));
        let (a, b) = (self.ip(from), self.ip(to));
        self.delays.set(a, b, Duration::from_millis(lat));
        self.heal_at(ms, Heal::Delay(from, to));
    }

    /// Starts a client that reads from node `node` alone every 5 ms for
    /// `for_ms` (see [`pinned_reader`]).
    fn pin_reader(&mut self, node: u64, for_ms: u64) {
        self.pinned_readers += 1;
        let name = format!("pinned{}", self.pinned_readers);
        self.event(format!("{name}: reads from n{node} alone for {for_ms} ms"));
        let until = self.sim.elapsed() + Duration::from_millis(for_ms);
        self.sim.client(
            name,
            pinned_reader(
                PINNED_READER_IDS + self.pinned_readers,
                node,
                until,
                Duration::from_millis(5),
                self.history.clone(),
            ),
        );
    }

    /// A reconnect whose probe is answered slowly, then the leader cut
    /// off: once the follower of [`ProbeWatch`] has heard the leader (in
    /// its new incarnation, so the reconnect probe first), the leader's
    /// messages to it are cut (its answers still arrive, late) and the
    /// leader is cut from everyone else both ways; a reader pinned to the
    /// leader keeps asking. The leader's lease may rest on that probe
    /// alone: counted from when the probe left, it ends before the
    /// follower will vote again; counted from when its answer arrived, it
    /// outlasts the election of a new leader by the slow direction's delay.
    fn check_probe_watch(&mut self) {
        let Some(w) = self.probe_watch.clone() else {
            return;
        };
        if self.step > w.expires {
            self.probe_watch = None;
            self.event(format!(
                "n{} never heard n{}'s reconnect probe: no cut",
                w.follower, w.leader
            ));
            return;
        }
        let (heard, leads) = {
            let slots = lock(&self.slots);
            let heard = {
                let slot = &slots[w.follower as usize - 1];
                slot.incarnation > w.incarnation
                    && slot.node.as_ref().is_some_and(|n| {
                        let st = n.status();
                        st.leader_id == w.leader && st.term == w.term
                    })
            };
            let leads = slots[w.leader as usize - 1]
                .node
                .as_ref()
                .is_some_and(|n| n.status().role == "leader");
            (heard, leads)
        };
        if !heard {
            return;
        }
        self.probe_watch = None;
        if !leads {
            return;
        }
        self.event(format!(
            "n{} heard n{}'s reconnect probe: cut the leader off",
            w.follower, w.leader
        ));
        self.cut_leader_after_probe(w.leader, w.follower, w.cut_ms);
        // The worst drift the lease must survive, as in a leader
        // isolation: the cut-off leader's clock slow, the others' fast.
        let skew = MAX_CLOCK_DRIFT * 0.9;
        self.event(format!(
            "clocks skewed: n{} at {:.3}x, the others at {:.3}x, for {} ms",
            w.leader,
            1.0 - skew,
            1.0 + skew,
            w.cut_ms
        ));
        for (i, handle) in self.rate_handles.iter().enumerate() {
            let rate = if i as u64 + 1 == w.leader {
                1.0 - skew
            } else {
                1.0 + skew
            };
            handle.store(rate.to_bits(), Ordering::Relaxed);
        }
        self.heal_at(w.cut_ms, Heal::ClockRates);
        self.pin_reader(w.leader, w.cut_ms.min(1000));
    }

    /// The cut of [`Run::check_probe_watch`]: `leader -> follower` one way,
    /// `leader <-> everyone else` both ways, for `ms`.
    fn cut_leader_after_probe(&mut self, leader: u64, follower: u64, ms: u64) {
        let (l, f) = (node_name(leader), node_name(follower));
        self.event(format!(
            "one-way partition n{leader} -> n{follower}, and n{leader} <-> the rest, for {ms} ms"
        ));
        self.sim.partition_oneway(l.clone(), f.clone());
        self.heal_at(ms, Heal::RepairOneway(l.clone(), f));
        for other in self.other_nodes(leader) {
            if other != node_name(follower) {
                self.sim.partition(l.clone(), other.clone());
                self.heal_at(ms, Heal::Repair(l.clone(), other));
            }
        }
    }

    /// The faults added later (`RunOptions::extra_faults`), drawn from
    /// their own random stream.
    fn inject_extra_fault(&mut self) {
        let n = self.options.nodes as u64;
        let leader = self.leader();
        self.faults += 1;
        match self.extra.below(100) {
            0..=34 => {
                // Any proper subset of the members cut from the rest: with
                // 4 or 5 members, a side of two has no majority either way
                // (4: both sides of a 2-2 split).
                let size = 1 + self.extra.below(n - 1);
                let mut ids: Vec<u64> = (1..=n).collect();
                self.extra.shuffle(&mut ids);
                ids.truncate(size as usize);
                ids.sort_unstable();
                let oneway = self.extra.below(4) == 0;
                let ms = 200 + self.extra.below(1800);
                self.cut_off(&ids, oneway, ms);
            }
            35..=49 => {
                // The leader keeps exactly one follower: of four or five,
                // a minority that must stop acknowledging writes and
                // serving reads, while the rest elect a new leader.
                let Some(leader) = leader else { return };
                let follower = (leader + self.extra.below(n - 1)) % n + 1;
                let ms = 300 + self.extra.below(1700);
                let mut side = vec![leader, follower];
                side.sort_unstable();
                self.event(format!(
                    "the leader n{leader} keeps only follower n{follower}"
                ));
                self.cut_off(&side, false, ms);
            }
            65..=74 => {
                // A reconnect whose probe is answered slowly: a follower's
                // messages to the leader slowed by 120-260 ms (less than
                // check quorum's election timeout, so the leader waits for
                // the answer rather than stepping down first), the follower
                // restarted (its stream breaks, the leader reconnects and
                // probes), and once it has heard the probe the leader is
                // cut off (`check_probe_watch`), with a reader pinned to it.
                let Some(leader) = leader else { return };
                let follower = (leader + self.extra.below(n - 1)) % n + 1;
                let lat = 120 + self.extra.below(141);
                let cut_ms = 800 + self.extra.below(700);
                let term = lock(&self.slots)[leader as usize - 1]
                    .node
                    .as_ref()
                    .map(|l| l.status().term);
                // (With a fixed leader there is no lease, and the restarted
                // follower knows its leader before hearing it.)
                let Some(term) =
                    term.filter(|_| !self.down.contains(&follower) && self.options.elections)
                else {
                    return;
                };
                let incarnation = lock(&self.slots)[follower as usize - 1].incarnation;
                self.slow_oneway(follower, leader, lat, 800 + lat + 200);
                self.event(format!(
                    "process restart of n{follower}: n{leader} reconnects with its acks slowed"
                ));
                self.restart(follower);
                self.probe_watch = Some(ProbeWatch {
                    leader,
                    term,
                    follower,
                    incarnation,
                    expires: self.step + 800,
                    cut_ms,
                });
            }
            50..=64 => {
                // One direction of one link slowed (the other way stays
                // fast): mostly between the leader and a follower, either
                // way, so a lease that counts from when an answer arrived
                // rather than when its request left is overstated by it.
                let (from, to) = match leader {
                    Some(leader) if self.extra.below(4) != 0 => {
                        let follower = (leader + self.extra.below(n - 1)) % n + 1;
                        if self.extra.below(2) == 0 {
                            (leader, follower)
                        } else {
                            (follower, leader)
                        }
                    }
                    _ => {
                        let a = self.extra.below(n) + 1;
                        (a, (a + self.extra.below(n - 1)) % n + 1)
                    }
                };
                let lat = 20 + self.extra.below(181);
                let ms = 200 + self.extra.below(1300);
                self.slow_oneway(from, to, lat, ms);
            }
            _ => {
                // A leadership transfer whose caller gives up after 0-400
                // ms: the call is dropped, so the leader's transfer is
                // cancelled wherever it is (waiting for the target to
                // catch up, or for the answer to TimeoutNow). Half the
                // time the target's answers to the leader are slowed, so
                // the cancellation often lands while TimeoutNow is out;
                // a quarter of the time everyone's messages to the leader
                // are, so it also hears late that a new term began.
                // Three times in four, everyone's messages to the leader
                // are slowed by 60-120 ms and the caller gives up between
                // half that and twice it: the target catches up (its acks
                // are late), `TimeoutNow` goes out, and its answer is due
                // about one delay later, so the cancellation mostly lands
                // while it is out; the leader hears late that a new term
                // began. A reader pinned to the leader meanwhile asks it
                // for reads (clients have been sent to the target).
                let Some(leader) = leader else { return };
                let target = (leader + self.extra.below(n - 1)) % n + 1;
                let (give_up, pin_ms) = if self.extra.below(4) < 3 {
                    let lat = 60 + self.extra.below(61);
                    let give_up = lat / 2 + self.extra.below(lat * 3 / 2 + 1);
                    for from in (1..=n).filter(|m| *m != leader) {
                        self.slow_oneway(from, leader, lat, give_up + 2 * lat + 200);
                    }
                    (give_up, give_up + 2 * lat + 300)
                } else {
                    let give_up = self.extra.below(401);
                    let slow = self.extra.below(4);
                    if slow < 3 {
                        let lat = 20 + self.extra.below(181);
                        let from: Vec<u64> = if slow == 2 {
                            (1..=n).filter(|m| *m != leader).collect()
                        } else {
                            vec![target]
                        };
                        for from in from {
                            self.slow_oneway(from, leader, lat, give_up + 300);
                        }
                    }
                    (give_up, give_up + 300)
                };
                self.pin_reader(leader, pin_ms);
                self.transfers_abandoned += 1;
                let name = format!("abandoned{}", self.transfers_abandoned);
                self.event(format!(
                    "{name}: hand leadership n{leader} -> n{target}, giving up after {give_up} ms"
                ));
                let nodes = self.options.nodes;
                let (done, given_up) =
                    (self.transfers_done.clone(), self.transfers_given_up.clone());
                self.sim.client(name, async move {
                    let client = sim_client_from(nodes, leader as usize - 1);
                    let call = client.transfer_leader(target);
                    match tokio::time::timeout(Duration::from_millis(give_up), call).await {
                        Ok(outcome) => {
                            tracing::debug!(?outcome, target, "leadership transfer");
                            if outcome.is_ok() {
                                done.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(_) => {
                            given_up.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(())
                });
            }
        }
    }

    fn apply_heals(&mut self, all: bool) {
        let now = self.step;
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.heals)
            .into_iter()
            .partition(|(at, _)| all || *at <= now);
        self.heals = later;
        for (_, heal) in due {
            match heal {
                Heal::Repair(a, b) => self.sim.repair(a, b),
                Heal::RepairOneway(a, b) => self.sim.repair_oneway(a, b),
                Heal::Release(a, b) => self.sim.release(a, b),
                Heal::Latency(a, b) => {
                    self.sim.set_link_latency(a, b, Duration::from_millis(1));
                }
                Heal::Restart(id) => {
                    if self.down.contains(&id) {
                        self.event(format!("n{id} powers back on"));
                        self.restart(id);
                    }
                }
                Heal::Trap(id, ops) => {
                    if !all && !self.down.contains(&id) {
                        // As an operator's SNAP twice would, the leader
                        // drops its log up to now: the follower coming
                        // back needs its snapshot.
                        let leader = self
                            .leader()
                            .filter(|l| *l != id)
                            .and_then(|l| lock(&self.slots)[l as usize - 1].node.clone());
                        if let Some(leader) = leader {
                            let engine = leader.engine();
                            let taken = engine.snapshot().and_then(|_| engine.snapshot());
                            self.event(format!(
                                "the leader n{} snapshots twice: {}",
                                leader.status().node_id,
                                match taken {
                                    Ok(info) => format!("at LSN {}", info.lsn),
                                    Err(e) => e.to_string(),
                                }
                            ));
                        }
                        let disk = &self.disks[id as usize - 1];
                        match ops {
                            Some(ops) => disk.stop_after_rename("snap-", ops),
                            None => disk.stop_at_dir_sync_after_rename("snap-"),
                        }
                        self.event(match ops {
                            Some(ops) => format!(
                                "n{id}'s disk will stop {ops} operations after its next snapshot rename"
                            ),
                            None => format!(
                                "n{id}'s disk will stop at the first directory sync after its next snapshot rename"
                            ),
                        });
                        self.trapped.insert(id);
                    }
                }
                Heal::Delay(from, to) => {
                    let (from, to) = (self.ip(from), self.ip(to));
                    self.delays.set(from, to, Duration::ZERO);
                }
                Heal::ClockRates => {
                    for (handle, rate) in self.rate_handles.iter().zip(&self.clock_rates) {
                        handle.store(rate.to_bits(), Ordering::Relaxed);
                    }
                }
                Heal::PowerOff(id, back) => {
                    if !self.down.contains(&id) && !all {
                        self.event(format!("power loss on n{id}, back in {back} ms"));
                        self.power_off(id);
                        self.heal_at(back, Heal::Restart(id));
                    }
                }
            }
        }
    }

    /// A node whose engine was poisoned by an I/O error takes no more
    /// writes until restarted, and one that hit an I/O error while opening
    /// exited: a supervisor restarts both.
    /// A node whose disk reached its armed crash point loses power now.
    fn spring_traps(&mut self) {
        let sprung: Vec<u64> = self
            .trapped
            .iter()
            .copied()
            .filter(|id| self.disks[*id as usize - 1].stopped())
            .collect();
        for id in sprung {
            self.trapped.remove(&id);
            if !self.down.contains(&id) {
                let back = 50 + self.rng.below(500);
                self.event(format!(
                    "n{id}'s disk reached its crash point: power loss, back in {back} ms"
                ));
                self.power_off(id);
                self.heal_at(back, Heal::Restart(id));
            }
        }
    }

    fn restart_poisoned(&mut self) {
        for id in 1..=self.options.nodes as u64 {
            if !self.down.contains(&id) && !self.sim.is_host_running(node_name(id)) {
                self.event(format!(
                    "n{id} exited after an I/O error at start: start it again"
                ));
                self.restart(id);
            }
        }
        let poisoned: Vec<u64> = lock(&self.slots)
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                s.node
                    .as_ref()
                    .is_some_and(|n| n.engine().stats().poisoned.is_some())
            })
            .map(|(i, _)| i as u64 + 1)
            .collect();
        for id in poisoned {
            self.event(format!("n{id} is poisoned by an I/O error: restart it"));
            self.restart(id);
        }
    }

    fn step_once(&mut self) -> Result<bool, (String, bool)> {
        let done = self
            .sim
            .step()
            .map_err(|e| (format!("a host failed: {e}"), true))?;
        self.step += 1;
        let deep = self.step.is_multiple_of(5);
        let slots = lock(&self.slots);
        let terms_with_leaders = self.checker.leaders.len();
        let now = self.sim.elapsed().as_nanos() as u64;
        let checked = self.checker.check(&slots, deep, now);
        drop(slots);
        checked.map_err(|e| (format!("invariant violated: {e}"), true))?;
        if let Some(heard) = self.strangers.violation() {
            return Err((format!("invariant violated: {heard}"), true));
        }
        // Reads answered since the last step (a record of a later term
        // seen committed from now on is later than their call, so each
        // read needs checking once).
        let reads = {
            let h = lock(&self.history);
            h.leader_reads[self.reads_checked..].to_vec()
        };
        self.reads_checked += reads.len();
        self.checker
            .check_leader_reads(&reads)
            .map_err(|e| (format!("invariant violated: {e}"), true))?;
        if self.checker.leaders.len() != terms_with_leaders {
            self.leader_disruptions.push(self.step);
        }
        Ok(done)
    }

    fn drive(&mut self) -> Result<Report, (String, bool)> {
        let chaos_ms = self.options.chaos.as_millis() as u64;
        for (i, rate) in self.clock_rates.clone().into_iter().enumerate() {
            self.event(format!("n{}'s clock runs at {rate:.3}x true time", i + 1));
        }
        // Chaos.
        let mut next_fault = 200 + self.rng.below(400);
        let mut next_extra = 300 + self.extra.below(600);
        while self.step < chaos_ms {
            if self.options.faults && self.step >= next_fault {
                self.inject_fault();
                next_fault = self.step + 100 + self.rng.below(900);
            }
            if self.options.faults && self.options.extra_faults && self.step >= next_extra {
                self.inject_extra_fault();
                next_extra = self.step + 400 + self.extra.below(1200);
            }
            self.spring_traps();
            self.check_probe_watch();
            self.apply_heals(false);
            if self.step.is_multiple_of(50) {
                self.restart_poisoned();
            }
            self.step_once()?;
        }
        self.recover()
    }

    /// The recovery phase and the final checks: every fault healed, every
    /// node started, convergence, the final write and reads, every
    /// acknowledged write kept, a linearizable history.
    fn recover(&mut self) -> Result<Report, (String, bool)> {
        self.trapped.clear();
        // Recovery: heal everything, restart whoever is down.
        self.event("chaos ends: heal every fault".into());
        self.apply_heals(true);
        self.delays.clear();
        for d in &self.disks {
            d.clear_faults();
        }
        let down: Vec<u64> = self.down.iter().copied().collect();
        for id in down {
            self.restart(id);
        }
        let deadline = self.step + 30_000;
        let mut clients_done = false;
        let mut converged_at = None;
        while self.step < deadline {
            if self.step.is_multiple_of(50) {
                self.restart_poisoned();
            }
            clients_done |= self.step_once()?;
            if clients_done && let Some(applied) = self.converged() {
                converged_at = Some(applied);
                break;
            }
        }
        let statuses = self.statuses();
        let recorded = lock(&self.history);
        if !recorded.final_write_ok {
            return Err((
                format!("the final write never succeeded after healing: {statuses}"),
                true,
            ));
        }
        if !recorded.final_reads_done {
            return Err(("the final reads did not finish".into(), true));
        }
        let Some(applied_lsn) = converged_at else {
            return Err((
                format!("no convergence within 30 s of healing: {statuses}"),
                false,
            ));
        };
        let ok = recorded.writes_acked + recorded.reads_ok;
        if ok < self.options.min_successful_ops {
            return Err((
                format!(
                    "only {ok} successful operations (at least {} required): the cluster was not doing work",
                    self.options.min_successful_ops
                ),
                false,
            ));
        }
        let ops = recorded.ops.clone();
        let acked = recorded.acked.clone();
        let (writes_acked, reads_ok, unknown) =
            (recorded.writes_acked, recorded.reads_ok, recorded.unknown);
        let batch_ids = batch_client_ids(&self.options);
        let batch_ops_ok = ops
            .iter()
            .filter(|op| batch_ids.contains(&op.client) && op.output != Output::Unknown)
            .count();
        drop(recorded);
        self.check_acked_writes(&acked)?;
        match linearizability::check(&ops, Duration::from_secs(20)) {
            Verdict::Ok => {}
            Verdict::Illegal { key, explanation } => {
                return Err((
                    format!(
                        "history not linearizable for key {}:\n{explanation}",
                        String::from_utf8_lossy(&key)
                    ),
                    true,
                ));
            }
            Verdict::Unknown { key } => {
                return Err((
                    format!(
                        "linearizability check ran out of time on key {}",
                        String::from_utf8_lossy(&key)
                    ),
                    true,
                ));
            }
        }
        for op in &ops {
            format!("{op:?}").hash(&mut self.trace.hash);
        }
        applied_lsn.hash(&mut self.trace.hash);
        Ok(Report {
            seed: self.options.seed,
            trace_hash: self.trace.hash.finish(),
            writes_acked,
            reads_ok,
            unknown,
            batch_ops_ok,
            faults: self.faults,
            transfers: (
                self.transfers_started + self.transfers_abandoned,
                self.transfers_done.load(Ordering::Relaxed) as usize,
            ),
            transfers_given_up: self.transfers_given_up.load(Ordering::Relaxed) as usize,
            forged_refused: self.strangers.refused.load(Ordering::Relaxed) as usize,
            sim_time: Duration::from_millis(self.step),
            applied_lsn,
        })
    }

    /// Every acknowledged write is in every node's final log at its LSN
    /// (where the log still holds that LSN; older ones were folded into
    /// snapshots, and the history check covers them). One acknowledged at
    /// `local` may be missing only if the leader lost power after its call.
    fn check_acked_writes(&self, acked: &[AckedWrite]) -> Result<(), (String, bool)> {
        let nodes: Vec<Arc<Node>> = lock(&self.slots)
            .iter()
            .filter_map(|s| s.node.clone())
            .collect();
        for node in &nodes {
            let engine = node.engine();
            let id = node.status().node_id;
            for ack in acked {
                if ack.local && self.leader_lost_power_after(ack.call) {
                    continue;
                }
                if ack.lsn < engine.wal_first_lsn() {
                    continue;
                }
                // Past the log's end, the write is simply not there.
                let found = if ack.lsn > engine.last_lsn() {
                    Vec::new()
                } else {
                    engine
                        .read_from(ack.lsn, 1)
                        .map_err(|e| (format!("node {id}: read LSN {}: {e}", ack.lsn), false))?
                };
                let matches = found.first().is_some_and(|r| {
                    r.lsn == ack.lsn
                        && match (&r.op, &ack.value) {
                            (Op::Put { key, value }, Some(v)) => *key == ack.key && value == v,
                            (Op::Delete { key }, None) => *key == ack.key,
                            _ => false,
                        }
                });
                if !matches {
                    return Err((
                        format!(
                            "a write acknowledged at `{}` (LSN {}, key {}) is not in node {id}'s final log (which ends at LSN {})",
                            if ack.local { "local" } else { "quorum" },
                            ack.lsn,
                            String::from_utf8_lossy(&ack.key),
                            engine.last_lsn()
                        ),
                        true,
                    ));
                }
            }
        }
        Ok(())
    }

    fn leader_lost_power_after(&self, call_ns: u64) -> bool {
        self.leader_disruptions
            .iter()
            .any(|ms| ms * 1_000_000 >= call_ns)
    }

    /// The node that leads the highest term now, if any runs.
    fn leader(&self) -> Option<u64> {
        lock(&self.slots)
            .iter()
            .filter_map(|s| s.node.as_ref())
            .map(|n| n.status())
            .filter(|s| s.role == "leader")
            .max_by_key(|s| s.term)
            .map(|s| s.node_id)
    }

    /// `Some(applied)` once every node runs, and all have applied the
    /// leader's whole log with identical digests.
    fn converged(&self) -> Option<u64> {
        let leader = self.leader()?;
        let slots = lock(&self.slots);
        let mut seen: Option<(u64, u64)> = None;
        let leader_last = slots[leader as usize - 1]
            .node
            .as_ref()?
            .engine()
            .last_lsn();
        for slot in slots.iter() {
            let status = slot.node.as_ref()?.status();
            if status.applied_lsn != leader_last {
                return None;
            }
            let this = (status.applied_lsn, status.digest);
            if *seen.get_or_insert(this) != this {
                return None;
            }
        }
        seen.map(|(applied, _)| applied)
    }

    fn statuses(&self) -> String {
        let slots = lock(&self.slots);
        slots
            .iter()
            .enumerate()
            .map(|(i, s)| match &s.node {
                None => format!("n{}: down", i + 1),
                Some(n) => {
                    let st = n.status();
                    format!(
                        "n{}: {} wal from {} snapshot {} last {} durable {} commit {} applied {} digest {:016x}",
                        i + 1,
                        st.role,
                        n.engine().wal_first_lsn(),
                        st.snapshot_lsn,
                        st.last_lsn,
                        st.durable_lsn,
                        st.commit_lsn,
                        st.applied_lsn,
                        st.digest
                    )
                }
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// A scripted run: the real cluster under turmoil with no workload and no
/// random faults, driven step by step by a test that injects the faults
/// it needs at the moments it chooses. Every step runs the same checks as
/// a random run ([`Checker`], the leader-read check), and [`Scenario::finish`]
/// runs the recovery phase and the final checks.
pub struct Scenario<'a> {
    run: Run<'a>,
}

impl Scenario<'_> {
    /// A cluster of `nodes` members (elections on) whose clocks run at true
    /// time, seeded by `seed`; the script must be done by `length` (the
    /// final write and reads start a second later).
    pub fn new(seed: u64, nodes: usize, length: Duration) -> Self {
        let options = RunOptions {
            seed,
            nodes,
            clients: 0,
            readers: 0,
            batch_clients: 0,
            chaos: length,
            faults: false,
            min_successful_ops: 1,
            elections: true,
            extra_faults: false,
        };
        let mut run = Run::new(&options);
        for id in 1..=nodes as u64 {
            run.clock_rates[id as usize - 1] = 1.0;
            run.rate_handles[id as usize - 1].store(1.0f64.to_bits(), Ordering::Relaxed);
        }
        Scenario { run }
    }

    fn failure(&self, (message, with_history): (String, bool)) -> Failure {
        Failure {
            seed: self.run.options.seed,
            as_found: false,
            message,
            trace_tail: self.run.trace.tail.iter().cloned().collect(),
            history: if with_history {
                linearizability::format_history(&lock(&self.run.history).ops)
            } else {
                String::new()
            },
            scripted: true,
        }
    }

    /// Simulated time now, in ms.
    pub fn now_ms(&self) -> u64 {
        self.run.step
    }

    /// Notes `what` in the trace (printed with `SIM_VERBOSE=1`, and in a
    /// failure's last events).
    pub fn note(&mut self, what: &str) {
        self.run.event(what.to_owned());
    }

    /// Runs `ms` of simulated time, every check after every step.
    pub fn run_for(&mut self, ms: u64) -> Result<(), Failure> {
        self.run_until(ms, |_| false).map(|_| ())
    }

    /// Runs until `done` holds (checked before each step), for at most
    /// `max_ms`; returns whether it held.
    pub fn run_until(
        &mut self,
        max_ms: u64,
        mut done: impl FnMut(&mut Self) -> bool,
    ) -> Result<bool, Failure> {
        let end = self.run.step + max_ms;
        while self.run.step < end {
            if done(self) {
                return Ok(true);
            }
            self.run.apply_heals(false);
            if let Err(e) = self.run.step_once() {
                return Err(self.failure(e));
            }
        }
        Ok(done(self))
    }

    /// The node that leads the highest term now, if any runs.
    pub fn leader(&self) -> Option<u64> {
        self.run.leader()
    }

    /// Node `id`'s status, if it runs.
    pub fn status(&self, id: u64) -> Option<pb::StatusReply> {
        lock(&self.run.slots)[id as usize - 1]
            .node
            .as_ref()
            .map(|n| n.status())
    }

    /// The highest commit LSN any node shows now.
    pub fn max_commit(&self) -> u64 {
        (1..=self.run.options.nodes as u64)
            .filter_map(|id| self.status(id))
            .map(|s| s.commit_lsn)
            .max()
            .unwrap_or(0)
    }

    /// Leader reads answered so far: (called at ms, node, term).
    pub fn leader_reads(&self) -> Vec<(f64, u64, u64)> {
        lock(&self.run.history)
            .leader_reads
            .iter()
            .map(|&(call, node, term)| (call as f64 / 1e6, node, term))
            .collect()
    }

    /// Pins node `id`'s clock to `rate` times true time (for the rest of
    /// the run).
    pub fn set_clock_rate(&mut self, id: u64, rate: f64) {
        self.run
            .event(format!("n{id}'s clock runs at {rate:.3}x true time"));
        self.run.clock_rates[id as usize - 1] = rate;
        self.run.rate_handles[id as usize - 1].store(rate.to_bits(), Ordering::Relaxed);
    }

    /// The direction `from -> to` slowed by `lat` ms, for `ms`.
    pub fn slow_oneway(&mut self, from: u64, to: u64, lat: u64, ms: u64) {
        self.run.slow_oneway(from, to, lat, ms);
    }

    /// Every link between `side` and the other members cut both ways, for
    /// `ms`.
    pub fn cut_off(&mut self, side: &[u64], ms: u64) {
        self.run.cut_off(side, false, ms);
    }

    /// `a <-> b` cut both ways, for `ms`.
    pub fn partition(&mut self, a: u64, b: u64, ms: u64) {
        self.run
            .event(format!("partition n{a} <-> n{b} for {ms} ms"));
        let (a, b) = (node_name(a), node_name(b));
        self.run.sim.partition(a.clone(), b.clone());
        self.run.heal_at(ms, Heal::Repair(a, b));
    }

    /// `from -> to` cut (one way), for `ms`.
    pub fn partition_oneway(&mut self, from: u64, to: u64, ms: u64) {
        self.run
            .event(format!("one-way partition n{from} -> n{to} for {ms} ms"));
        let (a, b) = (node_name(from), node_name(to));
        self.run.sim.partition_oneway(a.clone(), b.clone());
        self.run.heal_at(ms, Heal::RepairOneway(a, b));
    }

    /// Node `id`'s process restarted (its page cache kept): its streams
    /// break at once. Returns the incarnation it had.
    pub fn restart(&mut self, id: u64) -> u64 {
        let incarnation = lock(&self.run.slots)[id as usize - 1].incarnation;
        self.run.event(format!("process restart of n{id}"));
        self.run.restart(id);
        incarnation
    }

    /// Node `id` runs an incarnation after `incarnation` and follows
    /// `leader` in `term` (it has accepted a request from it).
    pub fn follows(&self, id: u64, incarnation: u64, leader: u64, term: u64) -> bool {
        let slots = lock(&self.run.slots);
        let slot = &slots[id as usize - 1];
        slot.incarnation > incarnation
            && slot.node.as_ref().is_some_and(|n| {
                let st = n.status();
                st.leader_id == leader && st.term == term
            })
    }

    /// A client reading from node `id` alone every `every_ms`, for `ms`.
    pub fn pin_reader(&mut self, id: u64, ms: u64, every_ms: u64) {
        self.run.pinned_readers += 1;
        let n = self.run.pinned_readers;
        let until = self.run.sim.elapsed() + Duration::from_millis(ms);
        self.run
            .event(format!("pinned{n}: reads from n{id} alone for {ms} ms"));
        self.run.sim.client(
            format!("pinned{n}"),
            pinned_reader(
                PINNED_READER_IDS + n,
                id,
                until,
                Duration::from_millis(every_ms),
                self.run.history.clone(),
            ),
        );
    }

    /// A quorum write of `key` = `value` from a client of its own (it joins
    /// the history).
    pub fn write(&mut self, key: &str, value: &str) {
        let (nodes, history) = (self.run.options.nodes, self.run.history.clone());
        let (key, value) = (key.as_bytes().to_vec(), value.as_bytes().to_vec());
        self.run.pinned_readers += 1;
        let n = self.run.pinned_readers;
        self.run.event(format!("writer{n}: one quorum write"));
        self.run.sim.client(format!("writer{n}"), async move {
            let client = sim_client(nodes);
            let call = now_ns();
            let resp = client
                .put(pb::PutRequest {
                    key: key.clone(),
                    value: value.clone(),
                    ack: pb::AckLevel::Quorum as i32,
                })
                .await;
            let ret = now_ns();
            let mut h = lock(&history);
            let output = match write_outcome(&resp) {
                None => return Ok(()),
                Some(Ok(lsn)) => {
                    h.writes_acked += 1;
                    h.acked.push(AckedWrite {
                        key: key.clone(),
                        value: Some(value.clone()),
                        call,
                        lsn,
                        local: false,
                    });
                    Output::Written
                }
                Some(Err(())) => {
                    h.unknown += 1;
                    Output::Unknown
                }
            };
            h.ops.push(Operation {
                client: PINNED_READER_IDS + n,
                key,
                input: Input::Put(value),
                output,
                call,
                ret,
            });
            Ok(())
        });
    }

    /// `TransferLeader` from `from` to `target`, from a client of its own
    /// that gives up (drops the call) after `give_up_ms`.
    pub fn transfer_given_up(&mut self, from: u64, target: u64, give_up_ms: u64) {
        self.run.transfers_abandoned += 1;
        let name = format!("abandoned{}", self.run.transfers_abandoned);
        self.run.event(format!(
            "{name}: hand leadership n{from} -> n{target}, giving up after {give_up_ms} ms"
        ));
        let nodes = self.run.options.nodes;
        let given_up = self.run.transfers_given_up.clone();
        self.run.sim.client(name, async move {
            let client = sim_client_from(nodes, from as usize - 1);
            let call = client.transfer_leader(target);
            if tokio::time::timeout(Duration::from_millis(give_up_ms), call)
                .await
                .is_err()
            {
                given_up.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        });
    }

    /// Transfers given up by their caller so far.
    pub fn transfers_given_up(&self) -> u64 {
        self.run.transfers_given_up.load(Ordering::Relaxed)
    }

    /// The rest of the script's time, then recovery and the final checks
    /// of a random run.
    pub fn finish(mut self) -> Result<Report, Failure> {
        let chaos_ms = self.run.options.chaos.as_millis() as u64;
        let rest = chaos_ms.saturating_sub(self.run.step);
        self.run_for(rest)?;
        let outcome = self.run.recover();
        outcome.map_err(|e| self.failure(e))
    }
}
