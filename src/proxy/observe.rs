//! Records a metric for every request: count by route, method and status,
//! and latency until the response head.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::response::Response;
use http::{Method, Request};
use tower::{Layer, Service};

use super::error::ProxyErrorKind;
use super::router::Classified;
use crate::metrics::{ErrorLabels, ProxyMetrics, RequestLabels, RouteLabels};

/// Builds [`Observe`] services.
#[derive(Debug, Clone)]
pub struct ObserveLayer {
    metrics: Arc<ProxyMetrics>,
}

impl ObserveLayer {
    /// Records into `metrics`.
    pub fn new(metrics: Arc<ProxyMetrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe { inner, metrics: self.metrics.clone() }
    }
}

/// The service built by [`ObserveLayer`].
#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
    metrics: Arc<ProxyMetrics>,
}

impl<S, B> Service<Request<B>> for Observe<S>
where
    S: Service<Request<B>, Response = Response>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let route = req.extensions().get::<Classified>().map_or("(unclassified)", |c| c.route);
        let method = method_label(req.method());
        let started = Instant::now();
        let future = self.inner.call(req);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let result = future.await;
            if let Ok(response) = &result {
                let status = response.status().as_u16();
                metrics.requests.get_or_create(&RequestLabels { route, method, status }).inc();
                metrics.duration.get_or_create(&RouteLabels { route, method }).observe(started.elapsed().as_secs_f64());
                if let Some(ProxyErrorKind(kind)) = response.extensions().get::<ProxyErrorKind>() {
                    metrics.errors.get_or_create(&ErrorLabels { kind }).inc();
                }
            }
            result
        })
    }
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}
