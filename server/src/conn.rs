//! Accepting connections: a bound on open connections, a deadline for a connection's first
//! bytes, and an accept loop that backs off instead of spinning when accepting fails (out of
//! file descriptors).
//!
//! - At most `max_connections` are open at once; one accepted past it is closed at once (and
//!   counted, and logged at most once a second).
//! - A connection that sends nothing within [`FIRST_BYTES_TIMEOUT`] of being accepted is closed:
//!   an idle socket cannot hold a slot (or a TLS handshake) forever. Once it has spoken,
//!   HTTP/2 keepalive pings ([`KEEPALIVE_INTERVAL`], [`KEEPALIVE_TIMEOUT`]) close it if its peer
//!   vanishes.
//! - When `accept` fails (EMFILE, ENFILE, ENOBUFS...), the loop logs and waits, doubling the
//!   wait from [`ACCEPT_BACKOFF_MIN`] to [`ACCEPT_BACKOFF_MAX`], and resets it on the next
//!   success.
//!
//! Every accepted socket gets `TCP_NODELAY` (small answers must not wait for the peer's delayed
//! ACK).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Open connections allowed by default.
pub const CONNECTIONS_MAX_DEFAULT: usize = 4096;
/// Largest `--max-connections`.
pub const CONNECTIONS_MAX: usize = 1_000_000;
/// A connection that sends nothing for this long after it is accepted is closed.
pub const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 keepalive: a ping after this much silence...
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// ...which must be answered within this, or the connection is closed.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// First wait after a failed accept.
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest wait after failed accepts.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Counts of the accept loop, for metrics.
#[derive(Debug, Default)]
pub struct ConnStats {
    /// Connections open now.
    pub open: AtomicUsize,
    /// Connections closed at once because `max_connections` were open.
    pub refused: AtomicU64,
    /// Connections closed because they sent nothing in time.
    pub silent: AtomicU64,
    /// Failed accepts.
    pub accept_errors: AtomicU64,
}

/// An accepted connection: counted while open, closed if it stays silent too long.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    first_bytes: Option<Pin<Box<tokio::time::Sleep>>>,
    stats: Arc<ConnStats>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    this.first_bytes = None;
                }
                Poll::Ready(r)
            }
            Poll::Pending => match this.first_bytes.as_mut().map(|s| s.as_mut().poll(cx)) {
                Some(Poll::Ready(())) => {
                    this.stats.silent.fetch_add(1, Ordering::Relaxed);
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "no bytes within the first-bytes timeout")))
                }
                _ => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Accepts connections from `listener` until the returned stream is dropped: a stream of
/// [`Conn`] for `Server::serve_with_incoming_shutdown`.
pub fn incoming(
    listener: TcpListener,
    max_connections: usize,
    stats: Arc<ConnStats>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let mut backoff = ACCEPT_BACKOFF_MIN;
        let mut last_log: Option<Instant> = None;
        let mut should_log = move || {
            let now = Instant::now();
            let due = last_log.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
            if due {
                last_log = Some(now);
            }
            due
        };
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let stream = match accepted {
                Ok((s, _)) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    s
                }
                Err(e) => {
                    stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                    if should_log() {
                        tracing::error!(error = %e, wait_ms = backoff.as_millis() as u64, "accepting a connection failed; backing off");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            };
            if stats.open.load(Ordering::Acquire) >= max_connections {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                if should_log() {
                    tracing::warn!(max_connections, "connection refused: the most connections are open");
                }
                drop(stream);
                continue;
            }
            if let Err(e) = stream.set_nodelay(true) {
                tracing::warn!(error = %e, "could not set TCP_NODELAY");
            }
            stats.open.fetch_add(1, Ordering::AcqRel);
            let conn = Conn {
                stream,
                first_bytes: Some(Box::pin(tokio::time::sleep(FIRST_BYTES_TIMEOUT))),
                stats: stats.clone(),
            };
            if tx.send(Ok(conn)).await.is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
