//! Real clients through icerelay against a real catalog (SeaweedFS): what a
//! user sees through the proxy must equal what they see directly.

use serde_json::Value;

use crate::harness::{RelayProcess, SeaweedFs, duckdb_extensions, metric_sum, python, unique};

/// An OAuth2 token from the catalog, for raw requests.
pub async fn token(seaweed: &SeaweedFs) -> String {
    let response: Value = reqwest::Client::new()
        .post(format!("{}/v1/oauth/tokens", seaweed.catalog_uri()))
        .form(&[("grant_type", "client_credentials"), ("client_id", "admin"), ("client_secret", seaweed.secret())])
        .send()
        .await
        .expect("token request")
        .json()
        .await
        .expect("token json");
    response["access_token"].as_str().expect("access_token").to_owned()
}

/// icerelay (the real binary) in front of the shared SeaweedFS, with debug
/// JSON logs and icerelay's own OAuth2 credentials taken from the environment.
async fn relay_in_front_of(seaweed: &SeaweedFs) -> RelayProcess {
    let config = tempfile::NamedTempFile::new().expect("config file");
    let text = format!(
        "[primary]\nuri = \"{}\"\nwarehouse = \"{}\"\nauth = {{ type = \"oauth2\", client_id = \"admin\", client_secret = \"${{PRIMARY_SECRET}}\" }}\n",
        seaweed.catalog_uri(),
        seaweed.warehouse()
    );
    std::fs::write(config.path(), text).expect("write config");
    let path = config.path().display().to_string();
    let relay = RelayProcess::start(
        &["--log-format", "json", "serve", "--config", &path],
        &[("PRIMARY_SECRET", seaweed.secret()), ("RUST_LOG", "icerelay=debug,tower_http=debug")],
    )
    .await;
    // The file may go: the configuration was read at start-up.
    drop(config);
    relay
}

fn assert_no_secrets(logs: &str, seaweed: &SeaweedFs) {
    assert!(!logs.contains(seaweed.secret()), "the client secret leaked into the logs");
    // Access tokens are JWTs, which start with `eyJ`.
    assert!(!logs.contains("eyJ"), "a bearer token leaked into the logs");
}

#[tokio::test(flavor = "multi_thread")]
async fn pyiceberg_sees_the_same_through_icerelay_as_directly() {
    let seaweed = SeaweedFs::shared();
    let relay = relay_in_front_of(seaweed).await;

    let direct =
        python("pyiceberg_scenario.py", vec![seaweed.client_conn(seaweed.catalog_uri()).to_string(), unique("direct")])
            .await;
    let proxied =
        python("pyiceberg_scenario.py", vec![seaweed.client_conn(&relay.url).to_string(), unique("relayed")]).await;

    // The scenario did real work (so equality below is not two empty results)...
    let counts: Vec<usize> = direct["time_travel"]
        .as_array()
        .expect("time travel")
        .iter()
        .map(|rows| rows.as_array().map_or(0, Vec::len))
        .collect();
    assert_eq!(counts, [5, 10, 15, 19]);
    assert_eq!(direct["schema_after_evolution"].as_array().map(Vec::len), Some(5));
    assert_eq!(direct["after_rename"]["old_exists"], false);
    assert_eq!(direct["after_drop"]["exists"], false);
    // ...and through icerelay everything a user sees is identical.
    assert_eq!(proxied, direct);

    let metrics =
        reqwest::get(format!("{}/metrics", relay.admin_url)).await.expect("metrics").text().await.expect("text");
    let commits = metric_sum(
        &metrics,
        "icerelay_proxy_requests_total",
        &["route=\"/v1/{prefix}/namespaces/{namespace}/tables/{table}\"", "method=\"POST\"", "status=\"200\""],
    );
    assert!(commits >= 4.0, "three appends, a schema change and an append went through: {commits}\n{metrics}");
    // create, 4 commits + 1 schema commit, rename, drop: each recorded a hint.
    assert!(metric_sum(&metrics, "icerelay_commit_hints_recorded_total", &[]) >= 7.0, "{metrics}");
    let ready = reqwest::get(format!("{}/readyz", relay.admin_url)).await.expect("readyz");
    assert_eq!(ready.status(), 200);
    let ready: Value = ready.json().await.expect("json");
    assert_eq!(ready["primary"]["config_status"], 200, "icerelay's own OAuth2 credentials are accepted");

    let logs = relay.logs();
    assert!(logs.lines().any(|l| l.contains("\"request_id\"")), "JSON logs carry request ids:\n{logs}");
    assert_no_secrets(&logs, seaweed);
}

#[tokio::test(flavor = "multi_thread")]
async fn duckdb_sees_the_same_through_icerelay_as_directly() {
    let seaweed = SeaweedFs::shared();
    let relay = relay_in_front_of(seaweed).await;
    let ext = duckdb_extensions().display().to_string();

    let direct_ns = unique("duck_direct");
    let relay_ns = unique("duck_relayed");
    let direct = python(
        "duckdb_session.py",
        vec![seaweed.client_conn(seaweed.catalog_uri()).to_string(), ext.clone(), direct_ns, "--write".into()],
    )
    .await;
    let proxied = python(
        "duckdb_session.py",
        vec![seaweed.client_conn(&relay.url).to_string(), ext.clone(), relay_ns.clone(), "--write".into()],
    )
    .await;
    assert_eq!(direct["rows"].as_array().map(Vec::len), Some(9), "11 inserted, 2 deleted: {direct}");
    assert_eq!(direct["first_snapshot_rows"], 10);
    assert_eq!(proxied, direct);

    // What DuckDB wrote through icerelay is the same when read directly.
    let read_back =
        python("duckdb_session.py", vec![seaweed.client_conn(seaweed.catalog_uri()).to_string(), ext, relay_ns]).await;
    assert_eq!(read_back, proxied);
    assert_no_secrets(&relay.logs(), seaweed);
}
