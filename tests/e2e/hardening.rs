//! What one hostile client or a misbehaving primary can do to the proxy:
//! dot-segment paths, slow and idle connections, connection floods with a
//! low open-files limit, an answer that stalls after its head.
//!
//! Every wait here is bounded, so a regression fails instead of hanging; no
//! assertion is about speed.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::upstream::{self, Behaviour};
use crate::harness::{Relay, RelayProcess};

fn relay_toml(upstream: &str, extra: &str) -> String {
    format!("{extra}\n[primary]\nuri = \"{upstream}\"\nbody_idle_timeout = \"1s\"\n")
}

fn addr(url: &str) -> String {
    url.trim_start_matches("http://").to_owned()
}

/// Sends `request` raw and reads the answer until the server closes or 10 s pass.
async fn raw(url: &str, request: &str) -> String {
    let mut stream = TcpStream::connect(addr(url)).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// Whether the server closes `stream` within `within` (EOF or reset).
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(within, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dot_segment_paths_are_refused_and_never_forwarded() {
    let stub = upstream::start(Behaviour::Echo).await;
    // A primary with a base path: /v1/../../x would reach /x on a server that resolves dot segments.
    let relay = Relay::start(&relay_toml(&format!("{}/api/catalog", stub.url), "")).await;
    for path in [
        "/v1/../../management/v1/principals",
        "/v1/%2e%2e/%2E%2E/management/v1/principals",
        "/v1/wh/namespaces/./tables",
        "/v1/wh/%2e%2e%2f%2e%2e%2fmanagement",
        "/v1/..;/..;/management/v1/principals",
    ] {
        let answer = raw(&relay.url, &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
        let error: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        assert_eq!(error["error"]["type"], "BadRequestException", "{path}");
        assert!(error["error"]["message"].as_str().is_some_and(|m| m.contains("segment")), "{error}");
    }
    assert!(stub.requests().is_empty(), "nothing reached the primary: {:?}", stub.requests());
    // A dot inside a name is not a dot segment.
    let answer = raw(&relay.url, "GET /v1/wh/namespaces/a.b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_answer_that_stalls_after_its_head_is_cut_off() {
    let stub = upstream::start(Behaviour::Stall).await;
    let relay = Relay::start(&relay_toml(&stub.url, "")).await;
    // A streamed answer (loadTable): the client has the head, so the body is cut off.
    let response = reqwest::get(format!("{}/v1/wh/namespaces/db/tables/t", relay.url)).await.expect("the head arrives");
    assert_eq!(response.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(20), response.bytes()).await;
    let body = body.expect("the stalled answer is cut off instead of hanging");
    assert!(body.is_err(), "an incomplete answer must fail, not look complete: {body:?}");
    // An answer icerelay reads whole (/v1/config, to rewrite it): a clean 502 instead.
    let response = tokio::time::timeout(Duration::from_secs(20), reqwest::get(format!("{}/v1/config", relay.url)))
        .await
        .expect("answered instead of hanging")
        .expect("answered");
    assert_eq!(response.status(), 502);
    let error: Value = response.json().await.expect("an ErrorModel");
    assert!(error["error"]["message"].as_str().is_some_and(|m| m.contains("body_idle_timeout")), "{error}");
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_heads_and_idle_connections_are_closed_and_busy_ones_are_not() {
    let stub = upstream::start(Behaviour::Slow(Duration::from_secs(3))).await;
    let relay =
        Relay::start(&relay_toml(&stub.url, "header_read_timeout = \"1s\"\nidle_timeout = \"2s\"\nproxy_workers = 1"))
            .await;

    // One byte every 300 ms never completes a head: closed after header_read_timeout.
    let mut slow = TcpStream::connect(addr(&relay.url)).await.expect("connect");
    let dripping = async {
        for byte in b"GET /v1/config HTTP/1.1\r\nHost: x\r\nX-Drip: ".iter().cycle() {
            if slow.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    let dripped = tokio::time::timeout(Duration::from_secs(15), dripping).await;
    assert!(dripped.is_ok(), "a connection sending one byte at a time must be closed");

    // A connection that never sends anything: closed after idle_timeout.
    let mut idle = TcpStream::connect(addr(&relay.url)).await.expect("connect");
    assert!(closed_within(&mut idle, Duration::from_secs(15)).await, "an idle connection must be closed");

    // Empty lines are not a request: still cut off.
    let mut blank = TcpStream::connect(addr(&relay.url)).await.expect("connect");
    blank.write_all(b"\r\n\r\n").await.expect("write");
    assert!(closed_within(&mut blank, Duration::from_secs(15)).await, "empty lines do not make a request");

    // A commit whose body never comes: refused once the client stays quiet.
    let answer = raw(
        &relay.url,
        "POST /v1/wh/transactions/commit HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("no request body data"), "{answer}");

    // A request whose answer takes longer than both timeouts is answered.
    let answer = raw(&relay.url, "GET /v1/config HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("late"), "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_beyond_the_cap_are_closed_at_once() {
    let stub = upstream::start(Behaviour::Echo).await;
    let relay = Relay::start(&relay_toml(&stub.url, "max_connections_per_worker = 3\nproxy_workers = 1")).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = TcpStream::connect(addr(&relay.url)).await.expect("connect");
        c.write_all(b"GET /v1/config HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
        let mut buf = [0u8; 512];
        let n = c.read(&mut buf).await.expect("answer");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
        held.push(c);
    }
    let mut over = TcpStream::connect(addr(&relay.url)).await.expect("the kernel accepts");
    assert!(closed_within(&mut over, Duration::from_secs(5)).await, "the fourth connection is closed, not queued");
    // Once one closes, there is room again.
    drop(held.pop());
    let mut answered = false;
    for _ in 0..50 {
        let answer = raw(&relay.url, "GET /v1/config HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
        if answer.starts_with("HTTP/1.1 200") {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(answered, "a slot freed by a closed connection is used again");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_thousand_idle_connections_do_not_starve_normal_requests() {
    // This test process holds the 2,000 connections and the stub's side.
    rlimit::increase_nofile_limit(u64::MAX).expect("raise the test's own open-files limit");
    let stub = upstream::start(Behaviour::Echo).await;
    // icerelay starts with the common soft default of 1,024 descriptors.
    let (relay, _dir) = limited_relay(&stub.url, 2, "-Sn 1024").await;
    assert!(relay.logs().contains("raised the open-files limit"), "{}", relay.logs());

    let mut hostile = Vec::with_capacity(2000);
    for i in 0..2000 {
        match TcpStream::connect(addr(&relay.url)).await {
            Ok(c) => hostile.push(c),
            Err(e) => panic!("connection {i}: {e}"),
        }
    }
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client");
    for i in 0..20 {
        let answer = http.get(format!("{}/v1/config", relay.url)).send().await;
        let status =
            answer.map(|a| a.status().as_u16()).unwrap_or_else(|e| panic!("request {i}: {e}\n{}", relay.logs()));
        assert_eq!(status, 200, "request {i}");
    }
    drop(hostile);
}

mod redirects {
    //! icerelay's own HTTP clients follow no redirect: a redirect is an error
    //! naming both URLs, and the host it points at receives nothing.

    use icerelay::catalog::{CatalogError, ClientSettings, RestCatalog};
    use icerelay::config::{AuthConfig, Secret, StorageConfig, StorageKind};
    use icerelay::storage::Storage;

    use super::*;

    fn settings() -> ClientSettings {
        ClientSettings {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            ca_file: None,
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn catalog_calls_do_not_follow_redirects() {
        let elsewhere = upstream::start(Behaviour::Echo).await;
        let redirecting =
            upstream::start(Behaviour::Redirect(302, format!("{}/v1/config?token=t", elsewhere.url))).await;
        let url = reqwest::Url::parse(&redirecting.url).expect("url");
        let auth = AuthConfig::Bearer { token: Secret::new("catalog-token-5521") };
        let catalog = RestCatalog::new("primary", url, None, &auth, settings()).expect("client");
        let e = catalog.config().await.expect_err("a redirect is an error");
        assert!(matches!(e, CatalogError::Redirect { .. }), "{e}");
        let text = e.to_string();
        assert!(text.contains(&redirecting.url) && text.contains(&elsewhere.url), "names both URLs: {text}");
        assert!(!text.contains("token=t") && !text.contains("catalog-token-5521"), "{text}");
        assert!(elsewhere.requests().is_empty(), "the other host received nothing");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_client_secret_is_never_posted_to_a_redirect_target() {
        let elsewhere = upstream::start(Behaviour::Echo).await;
        let token_endpoint = upstream::start(Behaviour::Redirect(307, format!("{}/steal", elsewhere.url))).await;
        let catalog_stub = upstream::start(Behaviour::Echo).await;
        let auth = AuthConfig::OAuth2 {
            client_id: "icerelay".into(),
            client_secret: Secret::new("client-secret-8812"),
            token_endpoint: Some(reqwest::Url::parse(&format!("{}/token", token_endpoint.url)).expect("url")),
            scope: "catalog".into(),
        };
        let url = reqwest::Url::parse(&catalog_stub.url).expect("url");
        let catalog = RestCatalog::new("primary", url, None, &auth, settings()).expect("client");
        let e = catalog.config().await.expect_err("the token cannot be fetched");
        let text = e.to_string();
        assert!(text.contains("redirect") && text.contains(&elsewhere.url), "{text}");
        assert!(!text.contains("client-secret-8812"), "{text}");
        assert!(elsewhere.requests().is_empty(), "the secret was not re-posted: {:?}", elsewhere.requests());
        assert_eq!(token_endpoint.requests().len(), 1);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn object_store_calls_do_not_follow_redirects() {
        let elsewhere = upstream::start(Behaviour::Echo).await;
        let s3 = upstream::start(Behaviour::Redirect(307, format!("{}/bucket/key", elsewhere.url))).await;
        let storage = Storage::new(&[StorageConfig {
            prefix: "s3://bucket/".into(),
            kind: StorageKind::S3 {
                endpoint: Some(reqwest::Url::parse(&s3.url).expect("url")),
                region: "us-east-1".into(),
                path_style: true,
                access_key_id: Some("AKIDEXAMPLE".into()),
                secret_access_key: Some(Secret::new("s3-secret-3390")),
                session_token: Some(Secret::new("session-token-4471")),
                sse: None,
                storage_class: None,
                ca_file: None,
            },
        }]);
        let e = storage.read("s3://bucket/key", 1024).await.expect_err("a redirect is an error");
        assert!(!e.to_string().contains("s3-secret-3390") && !e.to_string().contains("session-token-4471"), "{e}");
        assert!(!s3.requests().is_empty(), "the store was asked");
        assert!(elsewhere.requests().is_empty(), "the session token did not travel: {:?}", elsewhere.requests());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_file_descriptors_the_accept_loop_backs_off_and_recovers() {
    rlimit::increase_nofile_limit(u64::MAX).expect("raise the test's own open-files limit");
    let stub = upstream::start(Behaviour::Echo).await;
    // A hard limit of 128 descriptors: the flood below exhausts them.
    let (relay, _dir) = limited_relay(&stub.url, 1, "-n 128").await;
    let mut flood = Vec::new();
    for _ in 0..300 {
        if let Ok(c) = TcpStream::connect(addr(&relay.url)).await {
            flood.push(c);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // While accept fails, the loop waits instead of spinning on the error.
    let cpu = || cpu_seconds(relay.pid());
    let before = cpu();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = cpu() - before;
    assert!(used < 1.5, "the accept loop spun: {used:.2} s of CPU in 3 s\n{}", relay.logs());
    assert!(relay.logs().contains("backing off"), "{}", relay.logs());
    // Once the flood is gone, requests are served again.
    drop(flood);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("client");
    let mut served = false;
    for _ in 0..40 {
        if http.get(format!("{}/v1/config", relay.url)).send().await.is_ok_and(|a| a.status() == 200) {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(served, "requests are served once descriptors are free\n{}", relay.logs());
}

/// icerelay as a process in front of `upstream`, with `ulimit <flags>` applied first.
async fn limited_relay(upstream: &str, workers: usize, flags: &str) -> (RelayProcess, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("icerelay.toml");
    std::fs::write(&config, format!("proxy_workers = {workers}\n[primary]\nuri = \"{upstream}\"\n")).expect("config");
    let relay =
        RelayProcess::start_with_ulimit(&["serve", "--config", &config.display().to_string()], &[], Some(flags)).await;
    (relay, dir)
}

/// User + system CPU time of a process, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name (which may contain spaces) start after ") ".
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).expect("stat format");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    ticks / 100.0
}

mod write_settings {
    //! Server-side encryption and storage class reach the store on every
    //! kind of write (a recording stand-in for S3 shows the headers).

    use std::sync::Arc;

    use icerelay::config::{Secret, Sse, StorageConfig, StorageKind};
    use icerelay::storage::Storage;
    use icerelay::storage::checkpoint::NoCheckpoints;
    use icerelay::storage::copy::{Copier, CopySettings, CopyTask};

    use super::*;

    fn s3(prefix: &str, endpoint: &str, sse: Sse) -> StorageConfig {
        StorageConfig {
            prefix: prefix.into(),
            kind: StorageKind::S3 {
                endpoint: Some(reqwest::Url::parse(endpoint).expect("url")),
                region: "us-east-1".into(),
                path_style: true,
                access_key_id: Some("AKIDEXAMPLE".into()),
                secret_access_key: Some(Secret::new("s")),
                session_token: None,
                sse: Some(sse),
                storage_class: Some("STANDARD_IA".into()),
                ca_file: None,
            },
        }
    }

    fn header<'a>(seen: &'a upstream::Seen, name: &str) -> Option<&'a str> {
        seen.headers.get(name).and_then(|v| v.to_str().ok())
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn sse_and_storage_class_headers_go_with_single_and_multipart_writes() {
        let store = upstream::start(Behaviour::Echo).await;
        let dir = tempfile::tempdir().expect("dir");
        let storage = Arc::new(Storage::new(&[
            s3("s3://aes/", &store.url, Sse::Aes256),
            s3("s3://kms/", &store.url, Sse::Kms { key_id: Some("arn:aws:kms:us-east-1:1:key/k".into()) }),
            StorageConfig::local_dir(dir.path()),
        ]));
        // A single PUT (the stand-in's answer fails verification afterwards; the request is what counts).
        let _ = storage.write("s3://aes/t/metadata/v1.metadata.json", bytes::Bytes::from_static(b"{}")).await;
        // A multipart upload, from a local file larger than a part.
        let source = dir.path().join("big.parquet");
        std::fs::write(&source, vec![7u8; 6 * 1024 * 1024]).expect("write");
        let settings =
            CopySettings { parallelism: 1, part_size: 5 * 1024 * 1024, part_concurrency: 1, ..CopySettings::default() };
        let copier = Copier::new(storage.clone(), Arc::new(NoCheckpoints), settings);
        let task =
            CopyTask { source: format!("file://{}", source.display()), target: "s3://kms/t/data/big.parquet".into() };
        let _ = copier.copy(&task).await;

        let writes: Vec<upstream::Seen> =
            store.requests().into_iter().filter(|r| r.method == "PUT" || r.method == "POST").collect();
        let single = writes.iter().find(|r| r.target.contains("/aes/")).expect("the PUT reached the store");
        assert_eq!(header(single, "x-amz-server-side-encryption"), Some("AES256"), "{:?}", single.headers);
        assert_eq!(header(single, "x-amz-storage-class"), Some("STANDARD_IA"));
        let multipart = writes
            .iter()
            .find(|r| r.target.contains("/kms/") && r.target.contains("uploads"))
            .unwrap_or_else(|| panic!("the multipart upload started: {writes:?}"));
        assert_eq!(header(multipart, "x-amz-server-side-encryption"), Some("aws:kms"), "{:?}", multipart.headers);
        assert_eq!(
            header(multipart, "x-amz-server-side-encryption-aws-kms-key-id"),
            Some("arn:aws:kms:us-east-1:1:key/k")
        );
        assert_eq!(header(multipart, "x-amz-storage-class"), Some("STANDARD_IA"));
    }
}
