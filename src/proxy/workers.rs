//! Runs the proxy as one single-threaded runtime per core.
//!
//! Each worker thread has its own `SO_REUSEPORT` listener on the same address,
//! its own runtime and its own pool of upstream connections, so a request is
//! accepted, forwarded and answered on one thread: no work stealing, no
//! cross-thread wake-ups, no shared connection pool. This is the shape of
//! nginx's worker processes, and on a small machine, where the load, the proxy
//! and the catalog share the CPU, it is what lets the proxy cost less than
//! nginx. The kernel spreads new connections over the workers.
//!
//! Everything shared across workers (metrics, the hint sink) is `Sync`; the
//! rest of icerelay (admin listener, replication) runs on the main runtime.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use socket2::{Domain, Protocol, Socket, Type};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::conn;
use crate::config::ConnectionLimits;

/// Listeners bound, one per worker, waiting to be served.
#[derive(Debug)]
pub struct ProxyWorkers {
    listeners: Vec<std::net::TcpListener>,
    addr: SocketAddr,
}

impl ProxyWorkers {
    /// Binds `workers` listeners on `addr` (port 0 picks one port for all).
    pub fn bind(addr: SocketAddr, workers: usize) -> std::io::Result<Self> {
        let first = reuseport_listener(addr)?;
        let addr = first.local_addr()?;
        let mut listeners = vec![first];
        for _ in 1..workers.max(1) {
            listeners.push(reuseport_listener(addr)?);
        }
        Ok(Self { listeners, addr })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown` is cancelled and in-flight requests are done.
    ///
    /// `make_router` runs once on each worker thread, inside its runtime, so
    /// that the upstream client (and its connection tasks) belong to it.
    pub async fn serve<F>(
        self,
        make_router: F,
        limits: ConnectionLimits,
        tls: Option<TlsAcceptor>,
        shutdown: CancellationToken,
    ) -> std::io::Result<()>
    where
        F: Fn() -> std::io::Result<Router> + Send + Sync + 'static,
    {
        let make_router = Arc::new(make_router);
        let mut done = Vec::new();
        for (index, listener) in self.listeners.into_iter().enumerate() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let make_router = make_router.clone();
            let shutdown = shutdown.clone();
            let tls = tls.clone();
            std::thread::Builder::new().name(format!("icerelay-proxy-{index}")).spawn(move || {
                let _ = tx.send(run_worker(listener, make_router.as_ref(), limits, tls, shutdown));
            })?;
            done.push(rx);
        }
        let mut result = Ok(());
        for rx in done {
            let outcome = rx.await.unwrap_or_else(|_| Err(std::io::Error::other("a proxy worker thread panicked")));
            if let Err(e) = outcome {
                // One worker failing stops them all: the caller sees the first error.
                shutdown.cancel();
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        result
    }
}

fn run_worker(
    listener: std::net::TcpListener,
    make_router: &(dyn Fn() -> std::io::Result<Router> + Send + Sync),
    limits: ConnectionLimits,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        // Registering a timer whose deadline is the driver's earliest wakes
        // the driver through its eventfd. Every request arms a timeout, so
        // without a nearer deadline each request would pay that extra wake-up
        // (two syscalls and a scheduler round). A heartbeat keeps a deadline
        // at most a second away, for one wake-up per second instead.
        tokio::spawn(async {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tick.tick().await;
            }
        });
        let listener = tokio::net::TcpListener::from_std(listener)?;
        conn::serve(listener, make_router()?, limits, tls, shutdown).await
    })
}

fn reuseport_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}
