//! The node's seams to the world outside its own code: how it dials other
//! nodes, where it runs engine work that may block on the disk, and the
//! seed of its randomized election timeouts.
//!
//! `kv serve` uses the defaults ([`TcpDialer`], [`Offload::Threads`]). A
//! deterministic simulation swaps in its own dialer (a connector over a
//! simulated network) and [`Offload::Inline`] (no OS threads, which would
//! escape simulated time). Nothing here knows about any simulator; the
//! listening side's seam is [`super::serve_incoming`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tonic::transport::{Channel, Endpoint};

/// A boxed future, as the dialer returns one.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Opens a gRPC channel to an endpoint (its URI is `http://host:port`, its
/// timeouts and keepalives already set by the caller).
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

/// Everything a node takes from its environment.
#[derive(Debug, Clone)]
pub struct NodeEnv {
    /// How it reaches other nodes.
    pub dialer: Arc<dyn Dialer>,
    /// Where blocking engine work runs.
    pub offload: Offload,
    /// Seeds the randomized election timeouts (mixed with the node id).
    pub seed: u64,
}

impl Default for NodeEnv {
    /// The real network, threads, and a seed from the clock.
    fn default() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        NodeEnv {
            dialer: Arc::new(TcpDialer),
            offload: Offload::Threads,
            seed,
        }
    }
}
