//! The network seams for turmoil: a [`Dialer`] that connects over turmoil's
//! simulated TCP, and an accepted-connection stream for
//! [`kv_node::server::serve_incoming`]. This is the only glue between the
//! product's gRPC code and the simulated network.
//!
//! It also models what turmoil cannot: a latency spike in one direction of
//! one link (turmoil's link latency is the same both ways). Each stream's
//! reading side holds back the bytes from its peer for the extra delay
//! [`LinkDelays`] names for that direction, in order; with no delay set, a
//! read goes straight to turmoil's stream. It does not drop, reorder or
//! corrupt bytes (partitions and holds stay turmoil's).

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use kv_node::server::env::{BoxFuture, Dialer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Extra one-way delays of one simulation, per direction (the sender's
/// address, the receiver's address). Shared by every stream of the run.
#[derive(Debug, Clone, Default)]
pub struct LinkDelays(Arc<Mutex<BTreeMap<(IpAddr, IpAddr), Duration>>>);

impl LinkDelays {
    /// Bytes sent from `from` to `to` from now on arrive `delay` later
    /// than the network delivers them (zero: no extra delay).
    pub fn set(&self, from: IpAddr, to: IpAddr, delay: Duration) {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if delay.is_zero() {
            map.remove(&(from, to));
        } else {
            map.insert((from, to), delay);
        }
    }

    /// Every extra delay removed.
    pub fn clear(&self) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    fn get(&self, from: IpAddr, to: IpAddr) -> Duration {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(from, to))
            .copied()
            .unwrap_or_default()
    }
}

/// At most this many bytes are held back per stream: beyond it, the
/// stream stops reading from turmoil (which then pushes back on the
/// sender, as a full receive window would).
const HELD_BYTES_MAX: usize = 64 << 10;

/// A turmoil stream whose reading side applies the [`LinkDelays`] of the
/// direction peer -> this host.
#[derive(Debug)]
pub struct SimStream {
    inner: turmoil::net::TcpStream,
    delays: LinkDelays,
    /// (peer, this host): the direction this side reads.
    direction: Option<(IpAddr, IpAddr)>,
    /// Bytes read from turmoil, with the time each may be handed on; an
    /// empty chunk is the end of the stream.
    held: VecDeque<(Instant, Vec<u8>)>,
    held_bytes: usize,
    /// The end of the stream was read from turmoil (and is held or
    /// handed on).
    eof_read: bool,
    /// The end of the stream was handed on.
    eof_given: bool,
    timer: Option<Pin<Box<Sleep>>>,
}

impl SimStream {
    fn new(inner: turmoil::net::TcpStream, delays: LinkDelays) -> Self {
        let direction = match (inner.peer_addr(), inner.local_addr()) {
            (Ok(peer), Ok(local)) => Some((peer.ip(), local.ip())),
            _ => None,
        };
        SimStream {
            inner,
            delays,
            direction,
            held: VecDeque::new(),
            held_bytes: 0,
            eof_read: false,
            eof_given: false,
            timer: None,
        }
    }

    fn delay(&self) -> Duration {
        self.direction
            .map(|(from, to)| self.delays.get(from, to))
            .unwrap_or_default()
    }
}

impl AsyncRead for SimStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.eof_given {
            return Poll::Ready(Ok(()));
        }
        // Nothing held and no delay: exactly turmoil's stream.
        if this.held.is_empty() && !this.eof_read && this.delay().is_zero() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        // Take in what has arrived, each chunk stamped with when it may be
        // handed on (never before an earlier chunk: order is kept).
        while !this.eof_read && this.held_bytes < HELD_BYTES_MAX {
            let mut chunk = [0u8; 4096];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    let data = read.filled().to_vec();
                    let now = Instant::now();
                    let after = this.held.back().map_or(now, |(at, _)| *at);
                    let at = (now + this.delay()).max(after);
                    this.eof_read = data.is_empty();
                    this.held_bytes += data.len();
                    this.held.push_back((at, data));
                }
                // A broken connection is reported at once.
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => break,
            }
        }
        loop {
            let Some((at, _)) = this.held.front() else {
                return Poll::Pending;
            };
            let at = *at;
            if at > Instant::now() {
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                timer.as_mut().reset(at);
                if timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                continue;
            }
            let Some((_, data)) = this.held.front_mut() else {
                return Poll::Pending;
            };
            if data.is_empty() {
                this.held.pop_front();
                this.eof_given = true;
                return Poll::Ready(Ok(()));
            }
            let n = data.len().min(buf.remaining());
            buf.put_slice(&data[..n]);
            data.drain(..n);
            this.held_bytes -= n;
            if data.is_empty() {
                this.held.pop_front();
            }
            return Poll::Ready(Ok(()));
        }
    }
}

impl AsyncWrite for SimStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Connects to `http://host:port` endpoints over turmoil's TCP (with the
/// run's one-way delays, if it has any).
#[derive(Debug, Clone, Default)]
pub struct SimDialer {
    delays: LinkDelays,
}

impl SimDialer {
    /// A dialer whose streams apply `delays`.
    pub fn with_delays(delays: LinkDelays) -> Self {
        SimDialer { delays }
    }
}

impl Dialer for SimDialer {
    fn dial(
        &self,
        endpoint: Endpoint,
    ) -> BoxFuture<'static, Result<Channel, tonic::transport::Error>> {
        let delays = self.delays.clone();
        Box::pin(async move {
            endpoint
                .connect_with_connector(tower::service_fn(move |uri: Uri| {
                    let delays = delays.clone();
                    async move {
                        let host = uri.host().unwrap_or_default().to_owned();
                        let port = uri.port_u16().unwrap_or(80);
                        let stream =
                            turmoil::net::TcpStream::connect((host.as_str(), port)).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(SimStream::new(
                            stream, delays,
                        )))
                    }
                }))
                .await
        })
    }
}

/// An accepted turmoil connection, as tonic's server wants one (tonic's
/// `Connected` cannot be implemented on turmoil's type directly), with the
/// caller's simulated address (what the simulation's peer identity check
/// goes by).
#[derive(Debug)]
pub struct Accepted(SimStream, SocketAddr);

impl tonic::transport::server::Connected for Accepted {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::TcpConnectInfo {
            local_addr: None,
            remote_addr: Some(self.1),
        }
    }
}

impl AsyncRead for Accepted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Accepted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The connections `listener` accepts, as a stream whose connections apply
/// `delays` (an accept loop task feeds it; the loop ends when the stream is
/// dropped).
pub fn incoming(
    listener: turmoil::net::TcpListener,
    delays: LinkDelays,
) -> ReceiverStream<std::io::Result<Accepted>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let accepted = listener
                .accept()
                .await
                .map(|(s, from)| Accepted(SimStream::new(s, delays.clone()), from));
            if tx.send(accepted).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}
