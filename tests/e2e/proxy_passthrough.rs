//! The proxy's contract with clients, checked against stub upstreams that
//! show exactly what arrives: headers and raw paths pass through, answers come
//! back unchanged, and icerelay's own errors (502, 504, 413, 404) are Iceberg
//! `ErrorModel`s with a useful message.

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::upstream::{self, Behaviour};
use crate::harness::{Relay, SeaweedFs, free_port, metric_sum};

fn relay_toml(upstream: &str, extra: &str) -> String {
    format!("{extra}\n[primary]\nuri = \"{upstream}\"\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn headers_paths_and_bodies_pass_through_unchanged() {
    let stub = upstream::start(Behaviour::Echo).await;
    // Every request the stub sees is the client's: the read-only check's own
    // loadTable before a write is tested in failover.rs.
    let relay = Relay::start(&relay_toml(&stub.url, "read_only_replicas = false")).await;
    let http = reqwest::Client::new();

    let target = "/v1/wh/namespaces/a%1Fb/tables/t%20x?snapshots=refs&x=%2F";
    let response = http
        .get(format!("{}{target}", relay.url))
        .header("authorization", "Bearer engine-token")
        .header("x-iceberg-access-delegation", "vended-credentials")
        .header("idempotency-key", "0190d1f6-0000-7000-8000-000000000001")
        .header("if-none-match", "\"v0\"")
        .header("x-request-id", "req-123")
        .header("x-test-status", "203")
        .header("connection", "keep-alive, x-hop-header")
        .header("x-hop-header", "must not pass")
        .send()
        .await
        .expect("request");

    // The client sees the upstream's status and headers.
    assert_eq!(response.status().as_u16(), 203);
    assert_eq!(response.headers()["etag"], "\"v1\"");
    assert_eq!(response.headers()["x-upstream"], "echo");
    assert_eq!(response.headers()["x-request-id"], "req-123");
    let echoed: Value = response.json().await.expect("json");

    // The upstream saw the raw path and the end-to-end headers, not the hop-by-hop ones.
    let seen = &stub.requests()[0];
    assert_eq!(seen.target, target, "path and query must stay percent-encoded as sent");
    assert_eq!(echoed["target"], target);
    for (name, value) in [
        ("authorization", "Bearer engine-token"),
        ("x-iceberg-access-delegation", "vended-credentials"),
        ("idempotency-key", "0190d1f6-0000-7000-8000-000000000001"),
        ("if-none-match", "\"v0\""),
        ("x-request-id", "req-123"),
    ] {
        assert_eq!(seen.headers.get(name).and_then(|v| v.to_str().ok()), Some(value), "header {name}");
    }
    assert!(seen.headers.get("x-hop-header").is_none(), "a header named in Connection is hop-by-hop");
    let host = seen.headers.get("host").and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert_eq!(format!("http://{host}"), stub.url, "Host names the upstream");

    // Bodies go both ways, and a missing request id is generated and forwarded.
    let body = vec![b'{'; 300_000];
    let response = http
        .post(format!("{}/v1/wh/namespaces/db/tables/t", relay.url))
        .body(body.clone())
        .send()
        .await
        .expect("request");
    let generated = response.headers().get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let echoed: Value = response.json().await.expect("json");
    assert_eq!(echoed["body_len"], body.len());
    let seen = &stub.requests()[1];
    assert_eq!(seen.body.len(), body.len());
    let forwarded = seen.headers.get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
    assert!(generated.as_deref().is_some_and(|id| id.len() == 36), "generated id {generated:?}");
    assert_eq!(generated, forwarded, "the generated request id is forwarded and returned");
}

#[tokio::test(flavor = "multi_thread")]
async fn streamed_answers_arrive_whole() {
    let size = 5 * 1024 * 1024 + 17;
    let stub = upstream::start(Behaviour::Stream(size)).await;
    let relay = Relay::start(&relay_toml(&stub.url, "")).await;
    let response = reqwest::get(format!("{}/v1/namespaces/db/tables/big", relay.url)).await.expect("request");
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("content-length").is_none(), "a chunked answer stays chunked");
    let bytes = response.bytes().await.expect("body");
    assert_eq!(bytes.len(), size);
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_upstream_is_a_502_error_model() {
    let port = free_port();
    let relay = Relay::start(&relay_toml(&format!("http://127.0.0.1:{port}"), "")).await;
    let response = reqwest::get(format!("{}/v1/config", relay.url)).await.expect("request");
    assert_eq!(response.status(), 502);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["code"], 502);
    assert_eq!(body["error"]["type"], "BadGatewayException");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(&format!("127.0.0.1:{port}")), "names the upstream: {message}");
    assert!(message.to_lowercase().contains("connection refused"), "names the cause: {message}");

    let metrics =
        reqwest::get(format!("{}/metrics", relay.admin_url)).await.expect("metrics").text().await.expect("text");
    assert_eq!(metric_sum(&metrics, "icerelay_proxy_errors_total", &["kind=\"unreachable\""]), 1.0);
    assert_eq!(metric_sum(&metrics, "icerelay_proxy_requests_total", &["route=\"/v1/config\"", "status=\"502\""]), 1.0);
    let ready = reqwest::get(format!("{}/readyz", relay.admin_url)).await.expect("readyz");
    assert_eq!(ready.status(), 503, "not ready while the primary is unreachable");
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_upstream_is_a_504_error_model() {
    let stub = upstream::start(Behaviour::Slow(Duration::from_secs(5))).await;
    let relay =
        Relay::start(&relay_toml(&stub.url, "").replace("[primary]\n", "[primary]\nrequest_timeout = \"300ms\"\n"))
            .await;
    let response = reqwest::get(format!("{}/v1/namespaces", relay.url)).await.expect("request");
    assert_eq!(response.status(), 504);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["type"], "GatewayTimeoutException");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(&stub.url) && message.contains("300ms"), "{message}");
    assert!(message.contains("request id"), "carries the request id: {message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn inspected_bodies_are_bounded_with_a_413() {
    let stub = upstream::start(Behaviour::Echo).await;
    let relay = Relay::start(&relay_toml(&stub.url, "max_body_bytes = 1024\nread_only_replicas = false")).await;
    let http = reqwest::Client::new();
    let big = json!({"table-changes": [], "padding": "x".repeat(2000)}).to_string();

    for path in ["/v1/wh/transactions/commit", "/v1/wh/namespaces/db/tables", "/v1/wh/tables/rename"] {
        let response = http.post(format!("{}{path}", relay.url)).body(big.clone()).send().await.expect("request");
        assert_eq!(response.status(), 413, "{path}");
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["error"]["code"], 413);
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("1024") && message.contains("max_body_bytes"), "{message}");
    }
    // Also without Content-Length (chunked), where the bound is found while reading.
    let stream = futures::stream::iter(vec![Ok::<_, std::io::Error>(bytes::Bytes::from(big.clone()))]);
    let response = http
        .post(format!("{}/v1/wh/transactions/commit", relay.url))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 413);
    assert!(stub.requests().is_empty(), "a refused body never reaches the primary");

    // Bodies icerelay does not inspect stream through whatever their size.
    let response = http
        .post(format!("{}/v1/wh/namespaces/db/tables/t", relay.url))
        .body(big.clone())
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    // And an inspected body under the bound is forwarded byte for byte.
    let small = r#"{"table-changes":[{"identifier":{"namespace":["db"],"name":"t"},"requirements":[],"updates":[]}]}"#;
    let response =
        http.post(format!("{}/v1/wh/transactions/commit", relay.url)).body(small).send().await.expect("request");
    assert_eq!(response.status(), 200);
    let seen = stub.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].body, small.as_bytes());
}

#[tokio::test(flavor = "multi_thread")]
async fn config_uri_cannot_send_clients_around_the_proxy() {
    let answer = json!({"defaults": {"uri": "http://around-the-proxy:1", "warehouse": "s3://w"},
                        "overrides": {"uri": "http://around-again:2", "prefix": "p"}, "endpoints": ["GET /v1/config"]});
    let stub = upstream::start(Behaviour::Fixed(answer.clone())).await;

    let relay = Relay::start(&relay_toml(&stub.url, "public_url = \"http://relay.example:9181/\"")).await;
    let got: Value = reqwest::get(format!("{}/v1/config?warehouse=w", relay.url))
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(got["defaults"], json!({"uri": "http://relay.example:9181", "warehouse": "s3://w"}));
    assert_eq!(got["overrides"], json!({"uri": "http://relay.example:9181", "prefix": "p"}));
    assert_eq!(got["endpoints"], answer["endpoints"]);
    assert_eq!(stub.requests()[0].target, "/v1/config?warehouse=w");

    let relay = Relay::start(&relay_toml(&stub.url, "")).await;
    let got: Value =
        reqwest::get(format!("{}/v1/config", relay.url)).await.expect("request").json().await.expect("json");
    assert_eq!(got["defaults"], json!({"warehouse": "s3://w"}));
    assert_eq!(got["overrides"], json!({"prefix": "p"}));

    // Against the real catalog, which sends no uri, the answer is unchanged byte for byte.
    let seaweed = SeaweedFs::shared();
    let relay = Relay::start(&relay_toml(seaweed.catalog_uri(), "public_url = \"http://relay.example:9181\"")).await;
    let token = crate::proxy_clients::token(seaweed).await;
    let http = reqwest::Client::new();
    let fetch = |base: String| {
        let http = http.clone();
        let token = token.clone();
        async move {
            http.get(format!("{base}/v1/config?warehouse=warehouse"))
                .bearer_auth(token)
                .send()
                .await
                .expect("request")
                .bytes()
                .await
                .expect("body")
        }
    };
    assert_eq!(fetch(relay.url.clone()).await, fetch(seaweed.catalog_uri().to_owned()).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn paths_outside_the_api_get_a_404_error_model() {
    let stub = upstream::start(Behaviour::Echo).await;
    let relay = Relay::start(&relay_toml(&stub.url, "")).await;
    let response = reqwest::get(format!("{}/metrics", relay.url)).await.expect("request");
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["type"], "NotFoundException");
    assert!(stub.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn small_chunked_answers_arrive_whole_in_one_piece() {
    let stub = upstream::start(Behaviour::Stream(70_000)).await;
    let relay = Relay::start(&relay_toml(&stub.url, "")).await;
    // Bigger than the read-ahead bound: still streamed, still whole.
    let bytes = reqwest::get(format!("{}/v1/namespaces/db/tables/t", relay.url)).await.expect("request").bytes().await;
    assert_eq!(bytes.expect("body").len(), 70_000);

    let stub = upstream::start(Behaviour::Stream(1_000)).await;
    let relay = Relay::start(&relay_toml(&stub.url, "")).await;
    let response = reqwest::get(format!("{}/v1/namespaces/db/tables/t", relay.url)).await.expect("request");
    // Read ahead whole, the answer is sent with its length instead of chunked.
    assert_eq!(response.headers().get("content-length").and_then(|v| v.to_str().ok()), Some("1000"));
    assert_eq!(response.bytes().await.expect("body"), vec![b'x'; 1_000]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_truncated_upstream_body_is_an_error_for_the_client_too() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An upstream that promises 1000 bytes, sends 10 and hangs up.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = socket.read(&mut buf).await;
            let _ = socket.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789").await;
            let _ = socket.shutdown().await;
        }
    });
    let relay = Relay::start(&relay_toml(&url, "")).await;
    // Depending on timing the failure shows before or after the head; either
    // way the client must see an error, never a complete-looking short body.
    let outcome = match reqwest::get(format!("{}/v1/namespaces/db/tables/t", relay.url)).await {
        Ok(response) => response.bytes().await.map(|b| b.len()),
        Err(e) => Err(e),
    };
    assert!(outcome.is_err(), "a short body must not look complete: {outcome:?}");
}
