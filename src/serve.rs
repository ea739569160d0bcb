//! Process lifecycle for `icerelay serve`: bind, run the services, drain.
//!
//! [`Server::bind`] binds both listeners first, so that a test (or a
//! supervisor) can learn the real addresses when it asked for port 0, and so
//! that a port conflict is reported before anything else starts.
//! [`Server::run`] spawns the named services into one `JoinSet` and waits for
//! the shutdown future or the first service to exit; either way it cancels
//! the shared token, lets in-flight requests finish within the grace period,
//! and names any service that did not stop in time.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::admin::replication::ReplicationAdmin;
use crate::admin::{self, AdminState};
use crate::audit::AuditLog;
use crate::catalog::sigv4::Signer;
use crate::catalog::{CatalogError, ClientSettings, RestCatalog};
use crate::config::{AuthConfig, Config, EngineAuth, ListenerTls, PrimaryConfig, StateBackend};
use crate::metrics::Metrics;
use crate::proxy::commit_tap::{HintSink, LogHints};
use crate::proxy::read_only::ReplicaMarks;
use crate::proxy::upstream::{Upstream, UpstreamError, UpstreamSettings};
use crate::proxy::workers::ProxyWorkers;
use crate::proxy::{self, ProxySettings, StackParts};
use crate::replicate::Replicator;
use crate::state::StateError;
use crate::state::StateStore;
use crate::state::embedded::EmbeddedStore;
use crate::state::postgres::PostgresStore;
use crate::tls::ServerCertificate;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// `proxy` or `admin`.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The upstream client could not be built.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The primary's catalog client could not be built.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// A TLS certificate, key or CA file cannot be used.
    #[error("{setting}: {source}")]
    Tls {
        /// The configuration key, e.g. `tls_cert_file` or `primary.ca_file`.
        setting: &'static str,
        /// Cause.
        #[source]
        source: crate::tls::TlsError,
    },
    /// The audit log cannot be written.
    #[error("cannot open the audit log (audit_log): {0}")]
    Audit(#[from] crate::audit::AuditError),
    /// The replication state store could not be opened.
    #[error("cannot open the replication state (state_dir or state): {0}")]
    State(#[from] StateError),
    /// A service stopped with an I/O error.
    #[error("the {service} service failed: {source}")]
    Service {
        /// Which.
        service: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A server with its listeners bound, ready to run.
#[derive(Debug)]
pub struct Server {
    config: Config,
    proxy_workers: ProxyWorkers,
    admin_listener: TcpListener,
    /// TLS of the proxy listener, with `tls_cert_file`.
    proxy_tls: Option<ListenerCertificate>,
    /// TLS of the admin listener, with `admin_tls_cert_file`.
    admin_tls: Option<ListenerCertificate>,
    hints: Arc<dyn HintSink>,
    replicator: Option<Replicator>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for dyn HintSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HintSink")
    }
}

impl Server {
    /// Binds the proxy and admin listeners.
    pub async fn bind(config: Config) -> Result<Self, ServeError> {
        match crate::proxy::conn::raise_open_files_limit() {
            Ok(Some((before, after))) => tracing::info!(before, after, "raised the open-files limit to the hard limit"),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit"),
        }
        let proxy_workers = ProxyWorkers::bind(config.listen, config.proxy_workers)
            .map_err(|source| ServeError::Bind { addr: config.listen, what: "proxy", source })?;
        let admin_listener = TcpListener::bind(config.admin_listen).await.map_err(|source| ServeError::Bind {
            addr: config.admin_listen,
            what: "admin",
            source,
        })?;
        let proxy_tls = ListenerCertificate::load(config.tls.as_ref(), "tls_cert_file")?;
        let admin_tls = ListenerCertificate::load(config.admin_tls.as_ref(), "admin_tls_cert_file")?;
        let metrics = Arc::new(Metrics::new());
        let mut server = Self {
            config,
            proxy_workers,
            admin_listener,
            proxy_tls,
            admin_tls,
            hints: Arc::new(LogHints),
            replicator: None,
            metrics,
        };
        if server.config.replicates() {
            let store: Arc<dyn StateStore> = match &server.config.state {
                StateBackend::Sqlite => Arc::new(EmbeddedStore::open(&server.config.state_dir)?),
                StateBackend::Postgres(settings) => Arc::new(PostgresStore::open(settings).await?),
            };
            let primary = &server.config.primary;
            let catalog = primary_client(primary, primary.request_timeout)?;
            let audit = Arc::new(AuditLog::open(&server.config.audit)?);
            let replicator =
                Replicator::new(&server.config, store, catalog, server.metrics.replication.clone(), audit)?;
            server.hints = Arc::new(replicator.change_log());
            server.replicator = Some(replicator);
        }
        Ok(server)
    }

    /// Sends commit hints to `hints` instead of only logging them.
    pub fn with_hint_sink(mut self, hints: Arc<dyn HintSink>) -> Self {
        self.hints = hints;
        self
    }

    /// The proxy's bound address.
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_workers.local_addr()
    }

    /// The admin listener's bound address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_listener.local_addr().unwrap_or(self.config.admin_listen)
    }

    /// Serves until `shutdown` completes or a service exits, then drains:
    /// builds the proxy and admin services, says what it serves, spawns them
    /// (with the certificate watchers and replication) and waits.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), ServeError> {
        let Self { config, proxy_workers, admin_listener, proxy_tls, admin_tls, hints, replicator, metrics } = self;
        let resign = engine_signer(&config.primary);
        let upstream_settings = upstream_settings(&config, resign.clone())?;
        // Built here once to report a bad URI before serving; each proxy
        // worker builds its own (its pool belongs to the worker's runtime).
        let upstream_display = Upstream::new(&upstream_settings)?.display().to_owned();
        let make_proxy = proxy_factory(&config, upstream_settings, hints, &metrics);
        let replication = replicator.as_ref().map(|r| ReplicationAdmin { context: r.context(), wake: r.waker() });
        let primary = Arc::new(primary_client(&config.primary, Duration::from_secs(10))?);
        let admin_router =
            admin::router(AdminState { metrics: metrics.clone(), primary, replication }, config.admin.clone());

        let admin_addr = admin_listener.local_addr().unwrap_or(config.admin_listen);
        tracing::info!(
            listen = %proxy_workers.local_addr(),
            admin = %admin_addr,
            primary = %upstream_display,
            workers = config.proxy_workers,
            proxy_tls = proxy_tls.is_some(),
            admin_tls = admin_tls.is_some(),
            "icerelay is serving"
        );
        if let Some(signer) = &resign {
            announce_engine_identity(signer).await;
        }
        if config.admin.token.is_none() && !admin_addr.ip().is_loopback() {
            tracing::warn!(admin = %admin_addr, "the admin API has no token and is reachable from other hosts (admin_allow_unauthenticated = true)");
        }

        let token = CancellationToken::new();
        let mut services: Services = JoinSet::new();
        // Certificates are reloaded on SIGHUP or when their files change.
        for (listener, tls) in [("proxy", &proxy_tls), ("admin", &admin_tls)] {
            if let Some(ListenerCertificate { certificate, .. }) = tls {
                let (certificate, stop, every) = (certificate.clone(), token.clone(), config.tls_reload_interval);
                services.spawn(async move {
                    certificate.watch(listener, every, stop).await;
                    ("tls-reload", Ok(()))
                });
            }
        }
        // The admin listener gets the proxy's connection limits and timeouts too.
        let (stop, limits, acceptor) = (token.clone(), config.connections, proxy_tls.map(|tls| tls.acceptor));
        services.spawn(async move { ("proxy", proxy_workers.serve(make_proxy, limits, acceptor, stop).await) });
        if let Some(replicator) = replicator {
            let stop = token.clone();
            tracing::info!(state = %replicator.context().store.describe(), replicate = config.replication.replicate, destinations = config.destinations.len(), rules = config.rules.len(), "replication is on");
            services.spawn(async move {
                replicator.run(stop).await;
                ("replication", Ok(()))
            });
        }
        let (stop, acceptor) = (token.clone(), admin_tls.map(|tls| tls.acceptor));
        services.spawn(async move {
            ("admin", crate::proxy::conn::serve(admin_listener, admin_router, limits, acceptor, stop).await)
        });
        drain(services, shutdown, token, config.shutdown_grace_period).await
    }
}

/// The services `run` spawns, each ending with its name and outcome.
type Services = JoinSet<(&'static str, std::io::Result<()>)>;

/// Waits for `shutdown` or the first service to stop, then stops the others
/// and gives them `grace` to finish; the first failure, if any.
async fn drain(
    mut services: Services,
    shutdown: impl Future<Output = ()>,
    token: CancellationToken,
    grace: Duration,
) -> Result<(), ServeError> {
    let mut failure = None;
    tokio::select! {
        () = shutdown => tracing::info!("shutting down"),
        Some(exited) = services.join_next() => {
            failure = exit_failure(exited);
            tracing::warn!("a service stopped; shutting down the others");
        }
    }
    token.cancel();
    let drained = tokio::time::timeout(grace, async {
        while let Some(exited) = services.join_next().await {
            if let Some(e) = exit_failure(exited) {
                failure.get_or_insert(e);
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(remaining = services.len(), grace = ?grace, "services did not stop within the grace period; aborting them");
        services.abort_all();
    }
    failure.map_or(Ok(()), Err)
}

/// With engine_auth = "sigv4" (validated to come with sigv4 credentials),
/// forwarded requests are signed with the primary's credentials: one signer
/// for every worker, one credential lookup, one identity.
fn engine_signer(primary: &PrimaryConfig) -> Option<Arc<Signer>> {
    match (&primary.engine_auth, &primary.auth) {
        (EngineAuth::SigV4, AuthConfig::SigV4(sigv4)) => Some(Arc::new(Signer::new(sigv4))),
        _ => None,
    }
}

/// Says, once at start, which AWS identity engines act with.
async fn announce_engine_identity(signer: &Signer) {
    match signer.credentials().get(signer.service(), signer.region()).await {
        Ok(c) => tracing::info!(
            key_id = c.access_key_id(),
            service = signer.service(),
            region = signer.region(),
            "engine_auth = sigv4: every forwarded request is signed with icerelay's AWS identity"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "engine_auth = sigv4: no AWS credentials yet; forwarded requests fail until there are")
        }
    }
}

/// How the proxy reaches the primary.
fn upstream_settings(config: &Config, resign: Option<Arc<Signer>>) -> Result<UpstreamSettings, ServeError> {
    let primary = &config.primary;
    Ok(UpstreamSettings {
        uri: primary.uri.clone(),
        connect_timeout: primary.connect_timeout,
        request_timeout: primary.request_timeout,
        body_idle_timeout: primary.body_idle_timeout,
        pool_idle_timeout: primary.pool_idle_timeout,
        pool_max_idle_per_host: primary.pool_max_idle_per_host,
        resign,
        max_body_bytes: config.max_body_bytes,
        tls: Arc::new(
            crate::tls::client_config(primary.ca_file.as_deref())
                .map_err(|source| ServeError::Tls { setting: "primary.ca_file", source })?,
        ),
    })
}

/// Builds one proxy stack per worker, each with its own upstream pool.
fn proxy_factory(
    config: &Config,
    upstream_settings: UpstreamSettings,
    hints: Arc<dyn HintSink>,
    metrics: &Metrics,
) -> impl Fn() -> std::io::Result<axum::Router> + Send + Sync + 'static {
    let proxy_settings = ProxySettings { public_url: config.public_url.clone(), max_body_bytes: config.max_body_bytes };
    let proxy_metrics = metrics.proxy.clone();
    let read_only_replicas = config.read_only_replicas;
    let primary = config.primary.clone();
    move || {
        let upstream = Upstream::new(&upstream_settings).map_err(std::io::Error::other)?;
        // Marks are read with icerelay's own credentials where it has
        // some, by a client per worker (its connections belong to the
        // worker's runtime); else with the engine's.
        let read_only: Option<Option<Arc<dyn ReplicaMarks>>> = match (read_only_replicas, &primary.auth) {
            (false, _) => None,
            (true, AuthConfig::None) => Some(None),
            (true, _) => {
                Some(Some(Arc::new(primary_client(&primary, primary.request_timeout).map_err(std::io::Error::other)?)))
            }
        };
        Ok(proxy::stack(
            &proxy_settings,
            StackParts { upstream, hints: hints.clone(), read_only, metrics: proxy_metrics.clone() },
        ))
    }
}

/// icerelay's own client for the primary catalog.
fn primary_client(primary: &PrimaryConfig, request_timeout: Duration) -> Result<RestCatalog, CatalogError> {
    RestCatalog::new(
        "primary",
        primary.uri.clone(),
        primary.warehouse.clone(),
        &primary.auth,
        ClientSettings { connect_timeout: primary.connect_timeout, request_timeout, ca_file: primary.ca_file.clone() },
    )
}

/// A listener's certificate (reloaded while serving) and the acceptor that serves it.
struct ListenerCertificate {
    certificate: Arc<ServerCertificate>,
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for ListenerCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerCertificate").field("cert_file", &self.certificate.cert_file()).finish()
    }
}

impl ListenerCertificate {
    /// Reads the pair `tls` names; `setting` names it in errors.
    fn load(tls: Option<&ListenerTls>, setting: &'static str) -> Result<Option<Self>, ServeError> {
        let Some(tls) = tls else { return Ok(None) };
        let error = |source| ServeError::Tls { setting, source };
        let certificate = ServerCertificate::load(&tls.cert_file, &tls.key_file).map_err(error)?;
        let acceptor = certificate.acceptor().map_err(error)?;
        Ok(Some(Self { certificate, acceptor }))
    }
}

fn exit_failure(exited: Result<(&'static str, std::io::Result<()>), tokio::task::JoinError>) -> Option<ServeError> {
    match exited {
        Ok((_, Ok(()))) => None,
        Ok((service, Err(source))) => Some(ServeError::Service { service, source }),
        Err(join) => Some(ServeError::Service { service: "unknown", source: std::io::Error::other(join.to_string()) }),
    }
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
