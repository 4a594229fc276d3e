//! The network seams for turmoil: a [`Dialer`] that connects over turmoil's
//! simulated TCP, and an accepted-connection stream for
//! [`kv_node::server::serve_incoming`]. This is the only glue between the
//! product's gRPC code and the simulated network; it holds no logic.

use std::pin::Pin;
use std::task::{Context, Poll};

use kv_node::server::env::{BoxFuture, Dialer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Connects to `http://host:port` endpoints over turmoil's TCP.
#[derive(Debug, Clone, Copy, Default)]
pub struct SimDialer;

impl Dialer for SimDialer {
    fn dial(
        &self,
        endpoint: Endpoint,
    ) -> BoxFuture<'static, Result<Channel, tonic::transport::Error>> {
        Box::pin(async move {
            endpoint
                .connect_with_connector(tower::service_fn(|uri: Uri| async move {
                    let host = uri.host().unwrap_or_default().to_owned();
                    let port = uri.port_u16().unwrap_or(80);
                    let stream = turmoil::net::TcpStream::connect((host.as_str(), port)).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }))
                .await
        })
    }
}

/// An accepted turmoil connection, as tonic's server wants one (tonic's
/// `Connected` cannot be implemented on turmoil's type directly).
#[derive(Debug)]
pub struct Accepted(turmoil::net::TcpStream);

impl tonic::transport::server::Connected for Accepted {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
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

/// The connections `listener` accepts, as a stream (an accept loop task
/// feeds it; the loop ends when the stream is dropped).
pub fn incoming(listener: turmoil::net::TcpListener) -> ReceiverStream<std::io::Result<Accepted>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let accepted = listener.accept().await.map(|(s, _)| Accepted(s));
            if tx.send(accepted).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}
