//! The node's seams to the world outside its own code: how it dials other
//! nodes (and secures those connections), how it tells who is calling its
//! peer service, where it runs engine work that may block on the disk, the
//! clock its elections are timed by, and the seed of its randomized
//! election timeouts.
//!
//! `kv serve` uses the defaults ([`TcpDialer`], plaintext and
//! [`TrustClaims`], [`Offload::Threads`], the real monotonic [`Clock`]),
//! with TLS and [`super::auth::Certificates`] when its config has `[tls]`.
//! A deterministic simulation swaps in its own dialer (a connector over a
//! simulated network), its own [`PeerAuth`] (by simulated address),
//! [`Offload::Inline`] (no OS threads, which would escape simulated time)
//! and clocks that drift.
//! Nothing here knows about any simulator; the listening side's seam is
//! [`super::serve_incoming`].

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::time::Instant;

use tonic::transport::{Channel, Endpoint};

use super::auth::{PeerAuth, TrustClaims};
use crate::tls::Transport;

/// A boxed future, as the dialer returns one.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Opens a gRPC channel to an endpoint (its URI, TLS, timeouts and
/// keepalives already set by the caller).
pub trait Dialer: Send + Sync + std::fmt::Debug + 'static {
    /// Connects to `endpoint`.
    fn dial(
        &self,
        endpoint: Endpoint,
    ) -> BoxFuture<'static, Result<Channel, tonic::transport::Error>>;
}

/// The real network: TCP with Nagle's algorithm off.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpDialer;

impl Dialer for TcpDialer {
    fn dial(
        &self,
        endpoint: Endpoint,
    ) -> BoxFuture<'static, Result<Channel, tonic::transport::Error>> {
        Box::pin(async move { endpoint.tcp_nodelay(true).connect().await })
    }
}

/// Where blocking engine work (a WAL read, a snapshot, a term file sync)
/// runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Offload {
    /// On tokio's blocking threads, and group commit on its own OS thread,
    /// so the async tasks never wait for the disk.
    #[default]
    Threads,
    /// On the calling task, and group commit as a task: for storage that
    /// never blocks (in memory) and for a single-threaded deterministic
    /// simulation.
    Inline,
}

impl Offload {
    /// Runs `f` where this policy says; an error only if its thread died.
    pub async fn run<T, F>(self, f: F) -> Result<T, tokio::task::JoinError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        match self {
            Offload::Threads => tokio::task::spawn_blocking(f).await,
            Offload::Inline => Ok(f()),
        }
    }
}

/// The clock a node times its elections by: election timeouts, vote
/// stickiness, the read lease and check quorum. Real nodes read tokio's
/// monotonic clock. A drifting clock runs at a rate (set while it runs)
/// relative to that one, as a real clock may run fast or slow; the lease
/// is built to stay safe while every node's rate is within
/// [`MAX_CLOCK_DRIFT`] of true time (see `runtime.rs`).
#[derive(Debug, Clone, Default)]
pub struct Clock {
    drift: Option<Arc<Drift>>,
}

/// How far (as a fraction) a node's clock rate may differ from true time
/// without breaking the lease: with rates in `[1 - d, 1 + d]`, a lease of
/// `(1 - d) / (1 + d)` of the election timeout still ends before any
/// follower can vote for another leader.
pub const MAX_CLOCK_DRIFT: f64 = 0.25;

#[derive(Debug)]
struct Drift {
    /// The rate, as `f64` bits (shared with whoever sets it).
    rate: Arc<AtomicU64>,
    /// (real, drifted, rate) at the last change of rate; `None` until the
    /// first reading.
    anchor: Mutex<Option<(Instant, Instant, f64)>>,
}

impl Clock {
    /// A clock that runs at `rate` times the real one; the caller may
    /// change the rate later through the returned handle (`f64` bits).
    pub fn drifting(rate: Arc<AtomicU64>) -> Clock {
        Clock {
            drift: Some(Arc::new(Drift {
                rate,
                anchor: Mutex::new(None),
            })),
        }
    }

    /// Now, on this clock (monotonic, whatever the rate does).
    pub fn now(&self) -> Instant {
        let real = Instant::now();
        let Some(drift) = &self.drift else {
            return real;
        };
        let rate = f64::from_bits(drift.rate.load(Ordering::Relaxed)).clamp(0.01, 100.0);
        let mut anchor = drift.anchor.lock().unwrap_or_else(PoisonError::into_inner);
        let (real0, virt0, rate0) = *anchor.get_or_insert((real, real, rate));
        let virt = virt0 + real.saturating_duration_since(real0).mul_f64(rate0);
        if rate != rate0 {
            *anchor = Some((real, virt, rate));
        }
        virt
    }

    /// Time since `earlier` (a reading of this clock).
    pub fn since(&self, earlier: Instant) -> std::time::Duration {
        self.now().saturating_duration_since(earlier)
    }
}

/// Everything a node takes from its environment.
#[derive(Debug, Clone)]
pub struct NodeEnv {
    /// How it reaches other nodes.
    pub dialer: Arc<dyn Dialer>,
    /// How its connections to other nodes are secured (TLS with its node
    /// certificate, or plaintext).
    pub peer_transport: Transport,
    /// Who is calling its peer service.
    pub peer_auth: Arc<dyn PeerAuth>,
    /// Where blocking engine work runs.
    pub offload: Offload,
    /// What its elections are timed by.
    pub clock: Clock,
    /// With [`Offload::Inline`]: time the flusher lets pass between
    /// writing a round and syncing it (a simulated disk's fsync time).
    /// Zero for real disks, whose fsync takes its own time.
    pub sync_latency: std::time::Duration,
    /// Seeds the randomized election timeouts (mixed with the node id).
    pub seed: u64,
}

impl Default for NodeEnv {
    /// The real network in plaintext, threads, and a seed from the clock.
    fn default() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        NodeEnv {
            dialer: Arc::new(TcpDialer),
            peer_transport: Transport::plaintext(),
            peer_auth: Arc::new(TrustClaims),
            offload: Offload::Threads,
            clock: Clock::default(),
            sync_latency: std::time::Duration::ZERO,
            seed,
        }
    }
}
