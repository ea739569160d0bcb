//! Classifies each request once into an [`Operation`] of the REST spec.
//!
//! Every later layer (metrics, tracing, the commit tap, the `/v1/config`
//! rewrite) reads the [`Classified`] value this layer stores in the request's
//! extensions instead of parsing the path again. Classification never
//! rejects anything: an unknown path is `Operation::Other` and is still
//! forwarded, because the primary, not icerelay, decides what it serves.
//!
//! Paths have the form `/v1/{prefix}/namespaces/...` where the prefix is
//! optional and may itself contain slashes; it ends at the first segment that
//! names a top-level resource (`namespaces`, `tables`, `transactions`, `views`).

use std::borrow::Cow;
use std::task::{Context, Poll};

use http::{Method, Request};
use tower::{Layer, Service};

use crate::catalog::{Namespace, TableIdent};

/// The REST operations icerelay distinguishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    /// `GET /v1/config`.
    Config,
    /// `POST /v1/oauth/tokens`.
    OAuthToken,
    /// `GET .../namespaces/{namespace}/tables/{table}`.
    LoadTable(TableIdent),
    /// `POST .../namespaces/{namespace}/tables/{table}` (commit to one table).
    UpdateTable(TableIdent),
    /// `DELETE .../namespaces/{namespace}/tables/{table}`.
    DropTable(TableIdent),
    /// `POST .../namespaces/{namespace}/tables` (the name is in the body).
    CreateTable(Namespace),
    /// `POST .../namespaces/{namespace}/register`.
    RegisterTable(Namespace),
    /// `POST .../tables/rename`.
    RenameTable,
    /// `POST .../transactions/commit`.
    CommitTransaction,
    /// Anything else under `/v1/`, forwarded without inspection.
    Other,
    /// A path outside the Iceberg REST API (not under `/v1/`).
    NotIceberg,
}

impl Operation {
    /// The single table the operation names in its path, if any.
    pub fn table(&self) -> Option<&TableIdent> {
        match self {
            Self::LoadTable(t) | Self::UpdateTable(t) | Self::DropTable(t) => Some(t),
            _ => None,
        }
    }
}

/// What the classifier learnt about a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified {
    /// The operation.
    pub operation: Operation,
    /// The spec's route template, e.g. `/v1/{prefix}/namespaces/{namespace}/tables/{table}`.
    /// Used as a metric label, so it never contains identifiers.
    pub route: &'static str,
    /// The `{prefix}` part of the path, if present.
    pub prefix: Option<String>,
}

/// Classifies a request from its method and raw (still percent-encoded) path.
///
/// Read as a server's router (JAX-RS, say) would route it: a trailing `/`
/// and `;` matrix parameters do not change the resource, and a keyword of
/// the API may be percent-encoded (`%6Eamespaces`). Otherwise such a write
/// would reach a table unseen by the read-only check and the commit tap.
pub fn classify(method: &Method, path: &str) -> Classified {
    let Some(rest) = path.strip_prefix("/v1/") else {
        return Classified { operation: Operation::NotIceberg, route: "(outside /v1)", prefix: None };
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let decoded: Vec<Cow<'_, str>> = rest.split('/').map(routed_segment).collect();
    let segments: Vec<&str> = decoded.iter().map(AsRef::as_ref).collect();
    match segments.as_slice() {
        ["config"] => {
            let operation = if method == Method::GET { Operation::Config } else { Operation::Other };
            return Classified { operation, route: "/v1/config", prefix: None };
        }
        ["oauth", "tokens"] => {
            return Classified { operation: Operation::OAuthToken, route: "/v1/oauth/tokens", prefix: None };
        }
        _ => {}
    }
    let start = segments.iter().position(|s| matches!(*s, "namespaces" | "tables" | "transactions" | "views"));
    let Some(start) = start else {
        return Classified { operation: Operation::Other, route: "/v1/(unknown)", prefix: None };
    };
    let prefix = (start > 0).then(|| segments[..start].join("/"));
    let (operation, route) = classify_resource(method, &segments[start..]);
    Classified { operation, route, prefix }
}

/// The words of the REST API's paths.
const KEYWORDS: [&str; 17] = [
    "config",
    "oauth",
    "tokens",
    "namespaces",
    "tables",
    "transactions",
    "views",
    "properties",
    "register",
    "register-view",
    "credentials",
    "plan",
    "tasks",
    "metrics",
    "rename",
    "commit",
    "v1",
];

/// A path segment as routed: without matrix parameters, and decoded when it
/// spells a keyword; identifiers stay encoded (they are decoded once, later).
fn routed_segment(segment: &str) -> Cow<'_, str> {
    let segment = segment.split(';').next().unwrap_or_default();
    if segment.contains('%')
        && let Ok(decoded) = percent_encoding::percent_decode_str(segment).decode_utf8()
        && KEYWORDS.contains(&decoded.as_ref())
    {
        return Cow::Owned(decoded.into_owned());
    }
    Cow::Borrowed(segment)
}

fn classify_resource(method: &Method, segments: &[&str]) -> (Operation, &'static str) {
    use Operation as Op;
    let post = method == Method::POST;
    let table = |ns: &str, t: &str| TableIdent::from_path_segments(ns, t);
    let namespace = |ns: &str| Namespace::from_path_segment(ns);
    match segments {
        ["namespaces"] => (Op::Other, "/v1/{prefix}/namespaces"),
        ["namespaces", _] => (Op::Other, "/v1/{prefix}/namespaces/{namespace}"),
        ["namespaces", _, "properties"] => (Op::Other, "/v1/{prefix}/namespaces/{namespace}/properties"),
        ["namespaces", ns, "tables"] => {
            let op = match namespace(ns) {
                Some(ns) if post => Op::CreateTable(ns),
                _ => Op::Other,
            };
            (op, "/v1/{prefix}/namespaces/{namespace}/tables")
        }
        ["namespaces", ns, "register"] => {
            let op = match namespace(ns) {
                Some(ns) if post => Op::RegisterTable(ns),
                _ => Op::Other,
            };
            (op, "/v1/{prefix}/namespaces/{namespace}/register")
        }
        ["namespaces", ns, "tables", t] => {
            let op = match table(ns, t) {
                Some(t) if *method == Method::GET => Op::LoadTable(t),
                Some(t) if post => Op::UpdateTable(t),
                Some(t) if *method == Method::DELETE => Op::DropTable(t),
                _ => Op::Other,
            };
            (op, "/v1/{prefix}/namespaces/{namespace}/tables/{table}")
        }
        ["namespaces", _, "tables", _, sub] => (
            Op::Other,
            match *sub {
                "credentials" => "/v1/{prefix}/namespaces/{namespace}/tables/{table}/credentials",
                "plan" => "/v1/{prefix}/namespaces/{namespace}/tables/{table}/plan",
                "tasks" => "/v1/{prefix}/namespaces/{namespace}/tables/{table}/tasks",
                "metrics" => "/v1/{prefix}/namespaces/{namespace}/tables/{table}/metrics",
                _ => "/v1/{prefix}/namespaces/{namespace}/tables/{table}/(unknown)",
            },
        ),
        ["namespaces", _, "tables", _, "plan", _] => {
            (Op::Other, "/v1/{prefix}/namespaces/{namespace}/tables/{table}/plan/{plan-id}")
        }
        ["namespaces", _, "register-view"] => (Op::Other, "/v1/{prefix}/namespaces/{namespace}/register-view"),
        ["namespaces", _, "views"] => (Op::Other, "/v1/{prefix}/namespaces/{namespace}/views"),
        ["namespaces", _, "views", _] => (Op::Other, "/v1/{prefix}/namespaces/{namespace}/views/{view}"),
        ["tables", "rename"] if post => (Op::RenameTable, "/v1/{prefix}/tables/rename"),
        ["tables", "rename"] => (Op::Other, "/v1/{prefix}/tables/rename"),
        ["views", "rename"] => (Op::Other, "/v1/{prefix}/views/rename"),
        ["transactions", "commit"] if post => (Op::CommitTransaction, "/v1/{prefix}/transactions/commit"),
        ["transactions", "commit"] => (Op::Other, "/v1/{prefix}/transactions/commit"),
        _ => (Op::Other, "/v1/{prefix}/(unknown)"),
    }
}

// === impl ClassifyLayer ===

/// Stores a [`Classified`] in every request's extensions.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClassifyLayer;

impl<S> Layer<S> for ClassifyLayer {
    type Service = Classify<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Classify { inner }
    }
}

/// The service built by [`ClassifyLayer`].
#[derive(Debug, Clone)]
pub struct Classify<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for Classify<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let classified = classify(req.method(), req.uri().path());
        req.extensions_mut().insert(classified);
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident(ns: &[&str], name: &str) -> TableIdent {
        TableIdent::new(Namespace::new(ns.iter().map(|s| s.to_string()).collect()), name)
    }

    #[test]
    fn table_operations_with_and_without_prefix() {
        let c = classify(&Method::POST, "/v1/warehouse/namespaces/a%1Fb/tables/t1");
        assert_eq!(c.operation, Operation::UpdateTable(ident(&["a", "b"], "t1")));
        assert_eq!(c.prefix.as_deref(), Some("warehouse"));
        assert_eq!(c.route, "/v1/{prefix}/namespaces/{namespace}/tables/{table}");

        let c = classify(&Method::GET, "/v1/namespaces/db/tables/t1");
        assert_eq!(c.operation, Operation::LoadTable(ident(&["db"], "t1")));
        assert_eq!(c.prefix, None);

        let c = classify(&Method::DELETE, "/v1/a/b/namespaces/db/tables/t1");
        assert_eq!(c.operation, Operation::DropTable(ident(&["db"], "t1")));
        assert_eq!(c.prefix.as_deref(), Some("a/b"));

        assert_eq!(classify(&Method::HEAD, "/v1/namespaces/db/tables/t1").operation, Operation::Other);
    }

    #[test]
    fn paths_a_server_routes_to_the_same_table_classify_as_that_table() {
        let t = ident(&["db"], "t");
        for path in [
            "/v1/namespaces/db/tables/t/",
            "/v1/namespaces/db/tables/t;x=1",
            "/v1/namespaces;a=b/db/tables;c/t",
            "/v1/%6Eamespaces/db/%74ables/t",
        ] {
            assert_eq!(classify(&Method::DELETE, path).operation, Operation::DropTable(t.clone()), "{path}");
        }
        assert_eq!(
            classify(&Method::POST, "/v1/transactions/%63ommit/").operation,
            Operation::CommitTransaction,
            "an encoded keyword and a trailing slash"
        );
        // Identifiers stay encoded until they are decoded once: `%2541` is
        // the name `%41`, not `A`.
        assert_eq!(
            classify(&Method::DELETE, "/v1/namespaces/db/tables/%2541").operation,
            Operation::DropTable(ident(&["db"], "%41"))
        );
        assert_eq!(
            classify(&Method::DELETE, "/v1/namespaces/db/tables/a%3Bb").operation,
            Operation::DropTable(ident(&["db"], "a;b")),
            "an encoded `;` is part of the name"
        );
    }

    #[test]
    fn body_carrying_operations() {
        let ns = Namespace::new(vec!["db".into()]);
        assert_eq!(classify(&Method::POST, "/v1/p/namespaces/db/tables").operation, Operation::CreateTable(ns.clone()));
        assert_eq!(classify(&Method::GET, "/v1/p/namespaces/db/tables").operation, Operation::Other);
        assert_eq!(classify(&Method::POST, "/v1/p/namespaces/db/register").operation, Operation::RegisterTable(ns));
        assert_eq!(classify(&Method::POST, "/v1/p/tables/rename").operation, Operation::RenameTable);
        assert_eq!(classify(&Method::POST, "/v1/transactions/commit").operation, Operation::CommitTransaction);
    }

    #[test]
    fn config_token_and_other() {
        assert_eq!(classify(&Method::GET, "/v1/config").operation, Operation::Config);
        assert_eq!(classify(&Method::POST, "/v1/oauth/tokens").operation, Operation::OAuthToken);
        let c = classify(&Method::POST, "/v1/p/namespaces/db/tables/t/metrics");
        assert_eq!(c.operation, Operation::Other);
        assert_eq!(c.route, "/v1/{prefix}/namespaces/{namespace}/tables/{table}/metrics");
        assert_eq!(classify(&Method::GET, "/v2/config").operation, Operation::NotIceberg);
        assert_eq!(classify(&Method::GET, "/v1/whatever").route, "/v1/(unknown)");
    }

    #[test]
    fn undecodable_identifiers_fall_back_to_other() {
        assert_eq!(classify(&Method::POST, "/v1/namespaces/%FF/tables/t").operation, Operation::Other);
    }
}
