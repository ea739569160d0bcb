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
//!   (counted by [`InFlight`] around the service) neither applies: the
//!   primary's own timeouts bound that.
//! - **HTTP/1.1 only.** Engines' REST clients speak HTTP/1.1 to a plain-http
//!   catalog; serving HTTP/2 with prior knowledge too would only add a
//!   protocol whose handshake a client could stall.
//! - **TLS** (with `tls_cert_file`): the handshake runs on the connection's
//!   own task, within `header_read_timeout`; the timeouts above then watch
//!   the decrypted bytes.
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
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::Service;

use super::idle::{IdleTimeout, Stalled};
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

/// Accepts and serves connections on `listener` (over TLS with `tls`) until
/// `shutdown`, then waits for the connections in flight to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let open = Arc::new(AtomicUsize::new(0));
    let graceful = GracefulShutdown::new();
    // hyper's own header timer (off without a timer) would also close idle
    // keep-alive connections after the short header timeout; GuardedIo tells
    // the two apart.
    let mut builder = http1::Builder::new();
    builder.keep_alive(true);
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
        let slot = OpenConnection::take(&open);
        let connection =
            Connection { router: router.clone(), http: builder.clone(), limits, graceful: graceful.watcher() };
        let tls = tls.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match tls {
                None => connection.serve(stream).await,
                Some(acceptor) => {
                    // The handshake counts as part of the first request's
                    // head: a client that stalls it is cut off as a slow head is.
                    match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => connection.serve(stream).await,
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out (header_read_timeout)"),
                    }
                }
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// What serving one accepted connection needs.
struct Connection {
    router: Router,
    http: http1::Builder,
    limits: ConnectionLimits,
    graceful: Watcher,
}

impl Connection {
    /// Serves HTTP/1.1 on `stream` (plain TCP or TLS) until the client goes or shutdown.
    async fn serve<S>(self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Self { router, http, limits, graceful } = self;
        let requests = Arc::new(Requests::default());
        let io = TokioIo::new(GuardedIo::new(stream, limits, requests.clone()));
        let body_timeout = limits.header_read_timeout;
        let service = tower::service_fn(move |request: http::Request<hyper::body::Incoming>| {
            // A request body must keep coming too: the commit tap and
            // re-signing read it whole before anything reaches the primary.
            let request = request.map(|body| IdleTimeout::new(body, body_timeout, Stalled::Client));
            let mut router = router.clone();
            let busy = InFlight::enter(&requests);
            async move {
                let _busy = busy;
                router.call(request).await
            }
        });
        // A client that goes away or times out ends its connection; that is
        // its business, not an error of the proxy.
        let _ = graceful.watch(http.serve_connection(io, TowerToHyperService::new(service))).await;
    }
}

/// What the service did with a connection's requests, for its [`GuardedIo`].
#[derive(Debug, Default)]
pub struct Requests {
    /// Requests the service has started on, ever.
    started: AtomicUsize,
    /// Requests the service is answering now (until their answer's head).
    in_flight: AtomicUsize,
}

/// A request being answered on a connection; the in-flight count goes down
/// when it is dropped.
struct InFlight(Arc<Requests>);

impl InFlight {
    fn enter(requests: &Arc<Requests>) -> Self {
        requests.started.fetch_add(1, Ordering::Relaxed);
        requests.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(requests.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
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
    /// Reading a request head, which must be complete by `deadline`.
    Head { deadline: Instant, scan: HeadScan },
    /// The head is complete (by `head_deadline`, `started` requests having
    /// been started before it); `answered` once any answer byte was written.
    Busy { answered: bool, head_deadline: Instant, started: usize },
}

/// How far a request head has come: it ends at the first empty line after
/// its request line (`\r\n\r\n`, or bare `\n\n` as parsers accept), while
/// empty lines before the request line are skipped, as parsers skip them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct HeadScan {
    /// A byte other than CR or LF has been seen.
    started: bool,
    /// The current line holds nothing but CR so far.
    line_empty: bool,
}

impl HeadScan {
    /// Feeds bytes; true once the head is complete. Looks at each line, not
    /// each byte: the newlines are found with `memchr`.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        let mut line_start = 0;
        for newline in memchr::memchr_iter(b'\n', bytes) {
            if self.line_ends(&bytes[line_start..newline]) {
                return true;
            }
            line_start = newline + 1;
        }
        self.line_continues(&bytes[line_start..]);
        false
    }

    /// A line (or the rest of one) ends with `text` before its newline; true when it ends the head.
    fn line_ends(&mut self, text: &[u8]) -> bool {
        self.line_continues(text);
        let ends = self.started && self.line_empty;
        self.line_empty = true;
        ends
    }

    /// More of the current line, without its newline.
    fn line_continues(&mut self, text: &[u8]) {
        if text.iter().any(|&b| b != b'\r') {
            self.started = true;
            self.line_empty = false;
        }
    }
}

/// A socket that fails with `TimedOut` when a request head is too slow or a
/// connection waits too long for its next request.
///
/// It follows the HTTP/1 exchange from the bytes and from the count of
/// requests the service is answering: a request head ends at its first empty
/// line, and the first byte read once an answer was written and no request is
/// in flight starts the next head. Its timer is touched only when a read
/// finds nothing, so the bytes of a busy connection pay no timer at all.
#[derive(Debug)]
pub struct GuardedIo<T> {
    inner: T,
    header_timeout: Duration,
    idle_timeout: Duration,
    requests: Arc<Requests>,
    phase: Phase,
    timer: Pin<Box<Sleep>>,
}

impl<T> GuardedIo<T> {
    /// Guards `inner` with the limits' two timeouts; `requests` is what the
    /// service did with this connection's requests.
    pub fn new(inner: T, limits: ConnectionLimits, requests: Arc<Requests>) -> Self {
        let now = Instant::now();
        Self {
            inner,
            header_timeout: limits.header_read_timeout,
            idle_timeout: limits.idle_timeout,
            requests,
            phase: Phase::Idle { since: Some(now) },
            timer: Box::pin(tokio::time::sleep_until(now + limits.idle_timeout)),
        }
    }

    fn answering(&self) -> bool {
        self.requests.in_flight.load(Ordering::Relaxed) > 0
    }

    fn started(&self) -> usize {
        self.requests.started.load(Ordering::Relaxed)
    }

    /// Follows the request cycle through `bytes`, just read.
    fn saw_read(&mut self, bytes: &[u8]) {
        let starts_head = match self.phase {
            Phase::Idle { .. } => true,
            // Body bytes (after a `100 Continue`, say) are not a new head.
            Phase::Busy { answered, .. } => answered && !self.answering(),
            Phase::Head { .. } => false,
        };
        if starts_head {
            self.phase = Phase::Head { deadline: Instant::now() + self.header_timeout, scan: HeadScan::default() };
        }
        if let Phase::Head { deadline, mut scan } = self.phase {
            self.phase = if scan.feed(bytes) {
                Phase::Busy { answered: false, head_deadline: deadline, started: self.started() }
            } else {
                Phase::Head { deadline, scan }
            };
        }
    }

    fn saw_write(&mut self) {
        match self.phase {
            Phase::Busy { head_deadline, started, .. } => {
                self.phase = Phase::Busy { answered: true, head_deadline, started };
            }
            Phase::Idle { .. } => self.phase = Phase::Idle { since: None },
            Phase::Head { .. } => {}
        }
    }

    /// When the connection must have made progress by, given that a read just found nothing.
    fn deadline(&mut self) -> Option<Instant> {
        if self.answering() {
            // The service has the request: the primary's timeouts bound it.
            return None;
        }
        match self.phase {
            Phase::Idle { since: Some(since) } => Some(since + self.idle_timeout),
            Phase::Idle { since: None } | Phase::Busy { answered: true, .. } => {
                // Nothing to read after an answer: the connection is idle from now.
                let now = Instant::now();
                self.phase = Phase::Idle { since: Some(now) };
                Some(now + self.idle_timeout)
            }
            Phase::Head { deadline, .. } => Some(deadline),
            // The service has answered; hyper writes the answer next.
            Phase::Busy { answered: false, started, .. } if self.started() > started => None,
            // A head that looked whole to us but not to hyper (no request
            // came of it): it is still a head, and still has its deadline.
            Phase::Busy { answered: false, head_deadline, .. } => Some(head_deadline),
        }
    }

    fn timed_out(&self) -> io::Error {
        let what = match self.phase {
            Phase::Head { .. } | Phase::Busy { answered: false, .. } => {
                "the request head did not arrive within header_read_timeout"
            }
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
                // Re-arming costs a trip through the timer wheel, and every
                // answered request moves the idle deadline: the timer is only
                // moved earlier, or re-armed once it has fired early.
                if this.timer.deadline() > deadline || this.timer.is_elapsed() {
                    this.timer.as_mut().reset(deadline);
                }
                while this.timer.as_mut().poll(cx).is_ready() {
                    if Instant::now() >= deadline {
                        return Poll::Ready(Err(this.timed_out()));
                    }
                    this.timer.as_mut().reset(deadline);
                }
                Poll::Pending
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    // Real time, scaled down: tokio's paused clock (test-util) would leak
    // into the benchmarked binary through Cargo's feature unification.
    const HEADER: Duration = Duration::from_millis(200);
    const IDLE: Duration = Duration::from_millis(600);
    const TICK: Duration = Duration::from_millis(50);

    fn guarded(server: DuplexStream) -> (GuardedIo<DuplexStream>, Arc<Requests>) {
        let requests = Arc::new(Requests::default());
        let limits =
            ConnectionLimits { header_read_timeout: HEADER, idle_timeout: IDLE, max_connections_per_worker: 1 };
        (GuardedIo::new(server, limits, requests.clone()), requests)
    }

    async fn read_some(io: &mut GuardedIo<DuplexStream>) -> io::Result<usize> {
        let mut buf = [0u8; 256];
        io.read(&mut buf).await
    }

    /// Sends `bytes` one at a time, a second apart, reading as a server would; the error that ends it.
    async fn drip(client: &mut DuplexStream, io: &mut GuardedIo<DuplexStream>, bytes: &[u8]) -> io::Error {
        for byte in bytes.iter().cycle().take(200) {
            client.write_all(&[*byte]).await.expect("write");
            if let Err(e) = read_some(io).await {
                return e;
            }
            tokio::select! {
                r = read_some(io) => if let Err(e) = r { return e },
                () = tokio::time::sleep(TICK) => {}
            }
        }
        panic!("never cut off")
    }

    #[tokio::test]
    async fn a_head_sent_one_byte_at_a_time_is_cut_off() {
        let (mut client, server) = duplex(1024);
        let (mut io, _) = guarded(server);
        let started = Instant::now();
        let e = drip(&mut client, &mut io, b"GET /v1/config HTTP/1.1\r\nHost: x\r\n").await;
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("header_read_timeout"), "{e}");
        assert!(Instant::now() - started >= HEADER, "not before the deadline");
    }

    #[tokio::test]
    async fn blank_lines_or_a_head_no_request_came_of_do_not_end_the_head_deadline() {
        // Empty lines before a request line are skipped by parsers: no head.
        let (mut client, server) = duplex(1024);
        let (mut io, _) = guarded(server);
        client.write_all(b"\r\n\r\n\r\n").await.expect("write");
        let e = drip(&mut client, &mut io, b"\r\n").await;
        assert!(e.to_string().contains("header_read_timeout"), "{e}");
        // A head that looks whole but that the service never got: still timed.
        let (mut client, server) = duplex(1024);
        let (mut io, _) = guarded(server);
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.expect("write");
        read_some(&mut io).await.expect("head");
        let e = read_some(&mut io).await.expect_err("no request was started");
        assert!(e.to_string().contains("header_read_timeout"), "{e}");
    }

    #[tokio::test]
    async fn an_answered_connection_may_idle_until_idle_timeout_but_a_busy_one_forever() {
        let (mut client, server) = duplex(1024);
        let (mut io, requests) = guarded(server);
        client.write_all(b"POST /v1/x HTTP/1.1\r\nExpect: 100-continue\r\n\r\n").await.expect("write");
        read_some(&mut io).await.expect("head");
        let busy = InFlight::enter(&requests);
        // A `100 Continue`, then the body a while later: not a new head.
        io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.expect("continue");
        tokio::time::sleep(HEADER * 2).await;
        client.write_all(b"{\"body\": 1}").await.expect("body");
        read_some(&mut io).await.expect("body");
        // The primary takes longer than both timeouts; nothing fires.
        tokio::select! {
            r = read_some(&mut io) => panic!("no deadline while busy: {r:?}"),
            () = tokio::time::sleep(IDLE * 3) => {}
        }
        drop(busy);
        io.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await.expect("answer");
        // Idle after the answer: the next head may come late, but not later than IDLE.
        let (second, ()) = tokio::join!(read_some(&mut io), async {
            tokio::time::sleep(IDLE - 2 * TICK).await;
            client.write_all(b"GET /v1/config HTTP/1.1\n\n").await.expect("write");
        });
        second.expect("second head in time");
        let busy = InFlight::enter(&requests);
        drop(busy);
        io.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await.expect("answer");
        let started = Instant::now();
        let e = read_some(&mut io).await.expect_err("idle too long");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("idle_timeout"), "{e}");
        assert!(Instant::now() - started >= IDLE, "not before the deadline");
    }

    #[test]
    fn heads_end_at_the_first_empty_line_after_the_request_line() {
        let mut scan = HeadScan::default();
        assert!(!scan.feed(b"\r\n\r\n"), "leading empty lines are skipped");
        assert!(!scan.feed(b"GET / HTTP/1.1\r\nA: b\r"));
        assert!(!scan.feed(b"\n\r"));
        assert!(scan.feed(b"\nbody"));
        assert!(HeadScan::default().feed(b"GET / HTTP/1.1\nA: b\n\n"), "bare LF");
        assert!(!HeadScan::default().feed(b"GET / HTTP/1.1\r\n \r\n"), "a line of a space is not empty");
    }
}
