//! Client connections: the accept loop, its limits, and the timeouts that
//! keep one client from holding the proxy.
//!
//! - **A cap per worker.** A connection beyond `max_connections_per_worker`
//!   is closed as soon as it is accepted, not queued: a flood of idle
//!   connections costs the clients that open them, not the ones already served.
//! - **Accept errors back off.** Out of file descriptors (`EMFILE`), the
//!   listener would otherwise fail in a tight loop; it waits 5 ms, doubling up
//!   to 1 s, and logs once per episode.
//! - **Timeouts on the socket itself** ([`GuardedIo`]): a request head must
//!   arrive whole within `header_read_timeout` of its first byte (one byte a
//!   second keeps nobody's connection), and a connection waiting for its next
//!   request is closed after `idle_timeout`. While a request is being answered
//!   neither applies: the primary's own timeouts bound that.
//! - **Graceful shutdown.** Accepting stops at once; connections finish their
//!   request in flight and close.
//!
//! The open-files limit is raised to the hard limit once at start
//! ([`raise_open_files_limit`]), so the cap, not the soft default of 1,024
//! descriptors, is what bounds connections.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use crate::config::ConnectionLimits;

/// First wait after a failed `accept`.
const ACCEPT_BACKOFF_START: Duration = Duration::from_millis(5);
/// Longest wait between failed `accept`s.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Raises the soft open-files limit to the hard limit; returns (before, after)
/// when it changed anything.
pub fn raise_open_files_limit() -> io::Result<Option<(u64, u64)>> {
    let (before, _) = rlimit::Resource::NOFILE.get()?;
    let after = rlimit::increase_nofile_limit(u64::MAX)?;
    Ok((after > before).then_some((before, after)))
}

/// Accepts and serves connections on `listener` until `shutdown`, then
/// waits for the connections in flight to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let open = Arc::new(AtomicUsize::new(0));
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's own header timer would also close idle keep-alive connections
    // after the (short) header timeout; GuardedIo tells the two apart.
    builder.http1().keep_alive(true);
    let mut backoff = ACCEPT_BACKOFF_START;
    let mut refused_logged = false;
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, _) = match accepted {
            Ok(a) => {
                backoff = ACCEPT_BACKOFF_START;
                a
            }
            Err(e) => {
                if backoff == ACCEPT_BACKOFF_START {
                    tracing::warn!(error = %e, "cannot accept connections; backing off (raise the open-files limit or lower max_connections_per_worker)");
                }
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        if open.load(Ordering::Relaxed) >= limits.max_connections_per_worker {
            // Dropping the stream closes it: refused at once, never queued.
            drop(stream);
            if !refused_logged {
                tracing::warn!(
                    limit = limits.max_connections_per_worker,
                    "connection limit reached; closing new connections until some end (max_connections_per_worker)"
                );
                refused_logged = true;
            }
            continue;
        }
        refused_logged = false;
        // Without TCP_NODELAY a response written as head + body waits for
        // the client's delayed ACK (Nagle), adding ~40 ms per request.
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(GuardedIo::new(stream, limits.header_read_timeout, limits.idle_timeout));
        let connection = builder.serve_connection(io, TowerToHyperService::new(router.clone())).into_owned();
        let connection = graceful.watch(connection);
        let slot = OpenConnection::take(&open);
        tokio::spawn(async move {
            let _slot = slot;
            // A client that goes away or times out ends its connection; that
            // is its business, not an error of the proxy.
            let _ = connection.await;
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// One counted connection; the count goes down when it is dropped.
struct OpenConnection(Arc<AtomicUsize>);

impl OpenConnection {
    fn take(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        Self(open.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

// === impl GuardedIo ===

/// Where a connection is in its request cycle, as seen from its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the first byte of a request, since the instant noted
    /// (noted lazily, the first time a read finds nothing).
    Idle { since: Option<Instant> },
    /// Reading a request head, which must be complete by `deadline`;
    /// `matched` bytes of the blank line that ends it have been seen.
    Head { deadline: Instant, matched: usize },
    /// The head is complete; `answered` once any answer byte was written.
    Busy { answered: bool },
    /// HTTP/2 with prior knowledge: frames, not heads. Only `idle` applies.
    Http2,
}

/// The blank line that ends an HTTP/1 request head.
const HEAD_END: &[u8; 4] = b"\r\n\r\n";
/// The start of the HTTP/2 connection preface.
const H2_PREFACE_START: &[u8] = b"PRI * HTTP/2.0";

/// A socket that fails with `TimedOut` when a request head is too slow or a
/// connection waits too long for its next request.
///
/// It follows the HTTP/1 exchange from the bytes alone: a request head ends
/// at the first blank line, and the first byte read after answer bytes were
/// written starts the next head. Its timer is touched only when a read finds
/// nothing, so the bytes of a busy connection pay no timer at all.
#[derive(Debug)]
pub struct GuardedIo<T> {
    inner: T,
    header_timeout: Duration,
    idle_timeout: Duration,
    phase: Phase,
    timer: Pin<Box<Sleep>>,
}

impl<T> GuardedIo<T> {
    /// Guards `inner` with the two timeouts.
    pub fn new(inner: T, header_timeout: Duration, idle_timeout: Duration) -> Self {
        let now = Instant::now();
        Self {
            inner,
            header_timeout,
            idle_timeout,
            phase: Phase::Idle { since: Some(now) },
            timer: Box::pin(tokio::time::sleep_until(now + idle_timeout)),
        }
    }

    /// Follows the request cycle through `bytes`, just read.
    fn saw_read(&mut self, bytes: &[u8]) {
        let starts_head = match self.phase {
            Phase::Idle { .. } => true,
            Phase::Busy { answered } => answered,
            Phase::Head { .. } | Phase::Http2 => false,
        };
        if starts_head {
            if bytes.starts_with(H2_PREFACE_START) {
                self.phase = Phase::Http2;
                return;
            }
            self.phase = Phase::Head { deadline: Instant::now() + self.header_timeout, matched: 0 };
        }
        if let Phase::Head { deadline, mut matched } = self.phase {
            for &byte in bytes {
                matched = if byte == HEAD_END[matched] { matched + 1 } else { usize::from(byte == b'\r') };
                if matched == HEAD_END.len() {
                    self.phase = Phase::Busy { answered: false };
                    return;
                }
            }
            self.phase = Phase::Head { deadline, matched };
        }
    }

    fn saw_write(&mut self) {
        match self.phase {
            Phase::Busy { .. } => self.phase = Phase::Busy { answered: true },
            // Bytes going out (an HTTP/2 ack, a `100 Continue`) are activity.
            Phase::Idle { .. } => self.phase = Phase::Idle { since: None },
            Phase::Head { .. } | Phase::Http2 => {}
        }
    }

    /// When the connection must have made progress by, given that a read just found nothing.
    fn deadline(&mut self) -> Option<Instant> {
        match self.phase {
            Phase::Idle { since: Some(since) } => Some(since + self.idle_timeout),
            Phase::Idle { since: None } | Phase::Busy { answered: true } => {
                // Nothing to read after an answer: the connection is idle from now.
                let now = Instant::now();
                self.phase = Phase::Idle { since: Some(now) };
                Some(now + self.idle_timeout)
            }
            Phase::Head { deadline, .. } => Some(deadline),
            Phase::Busy { answered: false } | Phase::Http2 => None,
        }
    }

    fn timed_out(&self) -> io::Error {
        let what = match self.phase {
            Phase::Head { .. } => "the request head did not arrive within header_read_timeout",
            _ => "the connection was idle for idle_timeout",
        };
        io::Error::new(io::ErrorKind::TimedOut, what)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GuardedIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = &buf.filled()[before..];
                if !read.is_empty() {
                    this.saw_read(read);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let Some(deadline) = this.deadline() else { return Poll::Pending };
                if this.timer.deadline() != deadline {
                    this.timer.as_mut().reset(deadline);
                }
                match this.timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(this.timed_out())),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GuardedIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.inner).poll_write(cx, data);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            this.saw_write();
        }
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            this.saw_write();
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    const HEADER: Duration = Duration::from_secs(10);
    const IDLE: Duration = Duration::from_secs(60);

    async fn read_some(io: &mut GuardedIo<tokio::io::DuplexStream>) -> io::Result<usize> {
        let mut buf = [0u8; 256];
        io.read(&mut buf).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_sent_one_byte_at_a_time_is_cut_off() {
        let (mut client, server) = duplex(1024);
        let mut io = GuardedIo::new(server, HEADER, IDLE);
        let started = Instant::now();
        let mut outcome = Ok(0);
        for byte in b"GET /v1/config HTTP/1.1\r\nHost: x\r\n".iter().cycle().take(100) {
            client.write_all(&[*byte]).await.expect("write");
            outcome = read_some(&mut io).await;
            if outcome.is_err() {
                break;
            }
            tokio::select! {
                r = read_some(&mut io) => { outcome = r; break; }
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        let e = outcome.expect_err("timed out");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("header_read_timeout"), "{e}");
        assert!(Instant::now() - started <= HEADER + Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn an_answered_connection_may_idle_until_idle_timeout_but_a_busy_one_forever() {
        let (mut client, server) = duplex(1024);
        let mut io = GuardedIo::new(server, HEADER, IDLE);
        client.write_all(b"GET /v1/config HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
        read_some(&mut io).await.expect("head");
        // Busy: the primary takes longer than both timeouts; nothing fires.
        tokio::select! {
            r = read_some(&mut io) => panic!("no deadline while busy: {r:?}"),
            () = tokio::time::sleep(IDLE * 3) => {}
        }
        io.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await.expect("answer");
        // Idle after the answer: the next head may come late, but not later than IDLE.
        let (second, ()) = tokio::join!(read_some(&mut io), async {
            tokio::time::sleep(IDLE - Duration::from_secs(1)).await;
            client.write_all(b"GET /v1/config HTTP/1.1\r\n\r\n").await.expect("write");
        });
        second.expect("second head in time");
        io.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await.expect("answer");
        let started = Instant::now();
        let e = read_some(&mut io).await.expect_err("idle too long");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("idle_timeout"), "{e}");
        assert_eq!(Instant::now() - started, IDLE);
    }

    #[tokio::test]
    async fn heads_end_at_the_first_blank_line_even_split_across_reads() {
        let (_client, server) = duplex(8);
        let mut io = GuardedIo::new(server, HEADER, IDLE);
        io.saw_read(b"GET / HTTP/1.1\r\nA: b\r");
        assert!(matches!(io.phase, Phase::Head { matched: 1, .. }), "{:?}", io.phase);
        io.saw_read(b"\n\r");
        assert!(matches!(io.phase, Phase::Head { matched: 3, .. }), "{:?}", io.phase);
        io.saw_read(b"\nbody");
        assert_eq!(io.phase, Phase::Busy { answered: false });
        io.saw_read(b"more body");
        assert_eq!(io.phase, Phase::Busy { answered: false }, "body bytes are not a new head");
        io.saw_write();
        io.saw_read(b"GET");
        assert!(matches!(io.phase, Phase::Head { .. }), "a read after an answer starts the next head");
        let (_client, server) = duplex(8);
        let mut h2 = GuardedIo::new(server, HEADER, IDLE);
        h2.saw_read(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        assert_eq!(h2.phase, Phase::Http2);
    }
}
