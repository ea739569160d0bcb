//! What the benchmark binaries share: their command line, and a static upstream.
//!
//! `cargo test --all-targets` runs bench binaries without `--bench`; there is
//! nothing to check in that mode, and a load test does not belong in CI, so
//! [`BenchArgs::from_env`] returns `None` then and the benchmark exits.

pub mod services;

/// The flags after `cargo bench --bench NAME --`.
pub struct BenchArgs(Vec<String>);

impl BenchArgs {
    /// The arguments, or `None` (after saying how to run it) outside `cargo bench`.
    pub fn from_env(name: &str) -> Option<Self> {
        let args: Vec<String> = std::env::args().collect();
        if args.iter().any(|a| a == "--bench") {
            Some(Self(args))
        } else {
            println!("{name} benchmark: run it with `cargo bench --bench {name}`");
            None
        }
    }

    /// The value after `name`, or `default`.
    pub fn get<T: std::str::FromStr>(&self, name: &str, default: T) -> T {
        self.text(name).and_then(|v| v.parse().ok()).unwrap_or(default)
    }

    /// The text after `name`, if given.
    pub fn text(&self, name: &str) -> Option<&str> {
        self.0.iter().position(|a| a == name).and_then(|i| self.0.get(i + 1)).map(String::as_str)
    }
}

/// Serves `body` as JSON to every request on `127.0.0.1:port`, single-threaded
/// (so that a proxy's own cost is what shows). Blocks: run it on a thread.
#[allow(dead_code)]
pub fn serve_static(port: u16, body: Vec<u8>) {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
    runtime.block_on(async move {
        let body = bytes::Bytes::from(body);
        let app = axum::Router::new().fallback(move || {
            let body = body.clone();
            async move { ([(axum::http::header::CONTENT_TYPE, "application/json")], body) }
        });
        if let Ok(listener) = tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            let _ = axum::serve(listener, app).await;
        }
    });
}
