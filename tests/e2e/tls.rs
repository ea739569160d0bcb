//! TLS end to end, with a CA made by the test: engines reach icerelay over
//! TLS, icerelay reaches `https` catalogs (here: icerelays with a TLS listener
//! in front of the real SeaweedFS catalogs) through `ca_file`, the admin API
//! and `icerelay status` speak TLS, a wrong CA is refused with a message that
//! says what to set, and listener certificates are replaced on SIGHUP or on a
//! file change without dropping the connections already open.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use serde_json::{Value, json};

use crate::harness::tls::{ServerPair, TestCa};
use crate::harness::{Relay, RelayProcess, SeaweedFs, icerelay, unique};
use crate::replication::{Replica, assert_replica_matches, source_rows, wait_replicated, write_with};

/// `https://localhost:PORT` for a listener icerelay reports as `http://127.0.0.1:PORT`.
fn https(url: &str) -> String {
    url.replace("http://127.0.0.1", "https://localhost")
}

fn toml_path(path: &Path) -> String {
    path.display().to_string()
}

/// An icerelay with a TLS listener (certificate `name` from `ca`) forwarding
/// to `upstream`, with `extra` configuration.
async fn tls_front(ca: &TestCa, dir: &Path, name: &str, upstream: &str, extra: &str) -> (RelayProcess, ServerPair) {
    let pair = ca.issue(dir, name);
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "tls_cert_file = {:?}\ntls_key_file = {:?}\n{extra}\n",
            toml_path(&pair.cert_file),
            toml_path(&pair.key_file)
        ),
    )
    .expect("config");
    (RelayProcess::start(&["serve", "--config", &toml_path(&config), "--upstream", upstream], &[]).await, pair)
}

#[tokio::test(flavor = "multi_thread")]
async fn engines_catalogs_and_the_admin_api_over_tls_with_a_private_ca() {
    let (source, replica) = (SeaweedFs::shared(), SeaweedFs::shared_replica());
    let ca = TestCa::shared();
    let dir = tempfile::tempdir().expect("dir");
    let (source_front, _) = tls_front(ca, dir.path(), "source-front", source.catalog_uri(), "").await;
    let (replica_front, _) = tls_front(ca, dir.path(), "replica-front", replica.catalog_uri(), "").await;
    let own = ca.issue(dir.path(), "icerelay");
    let ns = unique("tls");
    let table = format!("{ns}.t");
    let ca_file = toml_path(&ca.ca_file);
    let toml = format!(
        "state_dir = {state:?}\ntls_cert_file = {cert:?}\ntls_key_file = {key:?}\nadmin_tls_cert_file = {cert:?}\nadmin_tls_key_file = {key:?}\n\
         [primary]\nuri = \"{primary}\"\nwarehouse = \"{swh}\"\nauth = {sauth}\nca_file = {ca_file:?}\n\n\
         [replication]\nreconcile_interval = \"2s\"\nretry_initial_backoff = \"200ms\"\nretry_max_backoff = \"2s\"\n\n\
         {sstorage}\n[[destinations]]\nname = \"dr\"\nuri = \"{destination}\"\nwarehouse = \"{rwh}\"\nauth = {rauth}\nca_file = {ca_file:?}\n\n\
         {rstorage}\n[[rules]]\nnamespace = \"{ns}\"\ndestinations = [\"dr\"]\n",
        state = toml_path(&dir.path().join("state")),
        cert = toml_path(&own.cert_file),
        key = toml_path(&own.key_file),
        primary = https(&source_front.url),
        swh = source.warehouse(),
        sauth = source.auth_toml(),
        sstorage = source.storage_toml(),
        destination = https(&replica_front.url),
        rwh = replica.warehouse(),
        rauth = replica.auth_toml(),
        rstorage = replica.storage_toml(),
    );
    let relay = Relay::start(&toml).await;
    let (url, admin) = (https(&relay.url), https(&relay.admin_url));

    // PyIceberg trusts the CA through its ssl.cabundle, as an engine would be configured.
    let mut conn = source.client_conn(&url);
    conn["ca_file"] = json!(ca_file);
    write_with(conn.clone(), &table, json!([{"op": "create"}, {"op": "append", "rows": 3}])).await;
    let written = write_with(conn, &table, json!([{"op": "append", "start": 10, "rows": 2}])).await;
    let status = wait_replicated(&admin, &table, written["metadata_location"].as_str().expect("location")).await;
    let rows = source_rows(&table).await;
    assert_replica_matches(Replica::Seaweed(replica), &table, &rows, &status).await;

    // The CLI reads the TLS admin API with --ca-file, and says what is missing without it.
    let (code, out, err) = icerelay(vec![
        "status".into(),
        "--admin".into(),
        admin.clone(),
        "--ca-file".into(),
        ca_file.clone(),
        table.clone(),
    ])
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("completed"), "{out}");
    let (code, out, err) = icerelay(vec!["status".into(), "--admin".into(), admin, table.clone()]).await;
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("certificate") && err.contains("set ca_file"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_catalog_certificate_from_another_ca_is_refused_with_what_to_set() {
    let source = SeaweedFs::shared();
    let dir = tempfile::tempdir().expect("dir");
    let (front, _) = tls_front(TestCa::shared(), dir.path(), "front", source.catalog_uri(), "").await;
    let other = TestCa::new("other");
    let relay = Relay::start(&format!(
        "[primary]\nuri = \"{}\"\nca_file = {:?}\n",
        https(&front.url),
        toml_path(&other.ca_file)
    ))
    .await;

    let answer = reqwest::get(format!("{}/v1/config", relay.url)).await.expect("proxy answers");
    assert_eq!(answer.status(), 502);
    let body: Value = answer.json().await.expect("ErrorModel");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("certificate") && message.contains("set ca_file"), "{body}");

    let ready = reqwest::get(format!("{}/readyz", relay.admin_url)).await.expect("readyz");
    assert_eq!(ready.status(), 503);
    let ready: Value = ready.json().await.expect("json");
    let error = ready["primary"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("certificate") && error.contains("set ca_file"), "{ready}");
}

/// A TLS connection to `addr` trusting `ca`, and the certificate the server presented.
async fn connect(addr: &str, ca: &Path) -> (SendRequest<Empty<Bytes>>, Vec<u8>) {
    let config = icerelay::tls::client_config(Some(ca)).expect("client config");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.expect("handshake");
    let presented = stream.get_ref().1.peer_certificates().expect("certificates")[0].to_vec();
    let (send, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("http");
    tokio::spawn(connection);
    (send, presented)
}

/// Sends a request on an open connection; returns its status.
async fn request(send: &mut SendRequest<Empty<Bytes>>) -> u16 {
    let request = http::Request::get("/v1/config").header("host", "localhost").body(Empty::new()).expect("request");
    let response = send.send_request(request).await.expect("the connection still serves");
    let status = response.status().as_u16();
    response.into_body().collect().await.expect("body");
    status
}

/// Opens connections until one presents `der`.
async fn wait_presented(addr: &str, ca: &Path, der: &[u8], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, presented) = connect(addr, ca).await;
        if presented == der {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: the new certificate was not served within 15 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn listener_certificates_are_replaced_on_sighup_and_on_file_change_without_dropping_connections() {
    let ca = TestCa::shared();
    let dir = tempfile::tempdir().expect("dir");
    // The primary is unreachable: every request gets icerelay's own 502, which
    // is all a connection test needs. File checks are off: SIGHUP only.
    let (mut front, first) =
        tls_front(ca, dir.path(), "front", "http://127.0.0.1:1", "tls_reload_interval = \"0s\"").await;
    let addr = front.url.trim_start_matches("http://").to_owned();
    let (mut open, presented) = connect(&addr, &ca.ca_file).await;
    assert_eq!(presented, first.der);
    assert_eq!(request(&mut open).await, 502);

    // Rotated files are not noticed without a signal...
    let second = ca.issue(dir.path(), "front");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(connect(&addr, &ca.ca_file).await.1, first.der, "no file checks with tls_reload_interval = 0s");
    // ...and served after SIGHUP.
    // The shell's own `kill`: a fresh machine may have no kill binary.
    let status =
        std::process::Command::new("sh").args(["-c", &format!("kill -HUP {}", front.pid())]).status().expect("kill");
    assert!(status.success());
    wait_presented(&addr, &ca.ca_file, &second.der, "after SIGHUP").await;
    assert!(front.logs().contains("TLS certificate reloaded"), "{}", front.logs());
    // The connection opened before keeps its certificate and is served.
    assert_eq!(request(&mut open).await, 502);
    let _ = front.terminate();

    // With the default file check, rotated files alone are enough.
    let (mut front, first) = tls_front(ca, dir.path(), "watched", "http://127.0.0.1:1", "").await;
    let addr = front.url.trim_start_matches("http://").to_owned();
    let (mut open, presented) = connect(&addr, &ca.ca_file).await;
    assert_eq!(presented, first.der);
    let rotated = ca.issue(dir.path(), "watched");
    wait_presented(&addr, &ca.ca_file, &rotated.der, "after a file change").await;
    assert_eq!(request(&mut open).await, 502);
    let _ = front.terminate();
}
