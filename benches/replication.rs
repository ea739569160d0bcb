//! Replication lag and commit-path overhead, against real catalogs on loopback.
//!
//! Two SeaweedFS servers (primary and replica) and two icerelay processes in
//! front of the primary: one that only proxies, one that replicates the
//! namespace `bench_lag` to the replica.
//!
//! - **Commit-path overhead**: the same metadata commit (`updateTable` with
//!   `set-properties`) sent in turn directly to the primary, through the
//!   proxy-only icerelay and through the replicating one (which records a
//!   change hint in its state store before answering), one at a time;
//!   p50/p99 of each and what icerelay adds. Twice: against SeaweedFS, and
//!   against a static upstream answering the captured commit response (whose
//!   own latency barely varies, so icerelay's cost is what the p99 shows).
//! - **Replication lag**: PyIceberg appends small batches through the
//!   replicating icerelay; the lag of each is the time from the commit's
//!   answer to the replica catalog listing the snapshot (`tests/clients/lag.py`).
//!
//! ```text
//! cargo bench --bench replication [-- --commits 300 --appends 40]
//! ```

#[path = "support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use support::services::{Icerelay, Seaweed, free_port_range, pct, pct_sorted};

use serde_json::{Value, json};

fn main() {
    let Some(args) = support::BenchArgs::from_env("replication") else { return };
    let flag = |flag: &str, default: usize| args.get(flag, default);
    let commits = flag("--commits", 300);
    let appends = flag("--appends", 40);

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let teststack = std::env::var_os("ICERELAY_TESTSTACK").map_or_else(|| root.join(".teststack"), PathBuf::from);
    let work = tempfile::tempdir().expect("temp dir");
    let primary = Seaweed::start(&root, &teststack, &work.path().join("primary"), "warehouse");
    let replica = Seaweed::start(&root, &teststack, &work.path().join("replica"), "replica");

    let config = work.path().join("icerelay.toml");
    std::fs::write(&config, replicating_config(&primary, &replica, &work.path().join("state"))).expect("config");
    let replicating = Icerelay::start(&["serve", "--config", &config.display().to_string()]);
    let proxy_only = Icerelay::start(&["serve", "--upstream", &primary.get("CATALOG_URI")]);

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let (token, captured) = runtime.block_on(prepare_commits(&primary));
    let targets = [primary.get("CATALOG_URI"), proxy_only.url.clone(), replicating.url.clone()];
    let seaweed = runtime.block_on(commit_latencies(&targets, &token, commits));
    print_commits(&format!("updateTable against SeaweedFS, {commits} sequential commits each"), &seaweed);

    // The same against a static upstream answering the captured commit
    // response at once: what is left is icerelay's own cost.
    let static_port = free_port_range(0);
    std::thread::spawn(move || support::serve_static(static_port, captured));
    let static_url = format!("http://127.0.0.1:{static_port}");
    let static_config = work.path().join("static.toml");
    let config_text = replicating_config(&primary, &replica, &work.path().join("static-state"))
        .replace(
            &format!("uri = \"{}\"\nwarehouse = \"warehouse\"", primary.get("CATALOG_URI")),
            &format!("uri = \"{static_url}\""),
        )
        .replace("namespace = \"bench_lag\"", "namespace = \"not_listed\"");
    std::fs::write(&static_config, config_text).expect("config");
    let static_replicating = Icerelay::start(&["serve", "--config", &static_config.display().to_string()]);
    let static_proxy = Icerelay::start(&["serve", "--upstream", &static_url]);
    let targets = [static_url.clone(), static_proxy.url.clone(), static_replicating.url.clone()];
    let fixed = runtime.block_on(commit_latencies(&targets, &token, commits * 4));
    print_commits(&format!("updateTable against a static upstream, {} sequential commits each", commits * 4), &fixed);
    drop(static_replicating);
    drop(static_proxy);

    let conn = |s: &Seaweed, uri: &str| {
        json!({"uri": uri, "warehouse": s.get("WAREHOUSE"), "credential": "admin:adminsecret",
               "s3": {"endpoint": s.get("S3_ENDPOINT"), "access_key_id": "admin", "secret_access_key": "adminsecret"}})
    };
    let out = Command::new(teststack.join("venv/bin/python"))
        .arg(root.join("tests/clients/lag.py"))
        .arg(conn(&primary, &replicating.url).to_string())
        .arg(conn(&replica, &replica.get("CATALOG_URI")).to_string())
        .arg("bench_lag.events")
        .arg(appends.to_string())
        .current_dir(root.join("tests/clients"))
        .stderr(Stdio::inherit())
        .output()
        .expect("lag.py");
    assert!(out.status.success(), "lag.py failed");
    let report: Value = serde_json::from_slice(&out.stdout).expect("lag.py prints JSON");
    let mut lags: Vec<f64> = report["lags_ms"].as_array().expect("lags").iter().filter_map(Value::as_f64).collect();
    lags.sort_by(f64::total_cmp);
    println!();
    println!(
        "| replication lag, {appends} appends (commit answered -> replica lists the snapshot) | p50 | p99 | max |"
    );
    println!("|---|---:|---:|---:|");
    println!(
        "| SeaweedFS -> SeaweedFS, through icerelay | {:.0} ms | {:.0} ms | {:.0} ms |",
        pct_sorted(&lags, 50.0),
        pct_sorted(&lags, 99.0),
        lags.last().copied().unwrap_or(f64::NAN)
    );
    drop(replicating);
    drop(proxy_only);
    primary.stop(&root, &teststack);
    replica.stop(&root, &teststack);
}

/// Creates the table the commits go to; returns a token and one real commit response.
async fn prepare_commits(primary: &Seaweed) -> (String, Vec<u8>) {
    let http = reqwest::Client::new();
    let catalog = primary.get("CATALOG_URI");
    let token = primary.token().await;
    let auth = format!("Bearer {token}");
    let base = format!("{catalog}/v1/warehouse");
    for (url, body) in [
        (format!("{base}/namespaces"), json!({"namespace": ["bench_commit"]})),
        (
            format!("{base}/namespaces/bench_commit/tables"),
            json!({"name": "t", "schema": {"type": "struct", "fields": [{"id": 1, "name": "id", "type": "long", "required": false}]}}),
        ),
        (format!("{base}/namespaces/bench_commit/tables/t"), commit_body("first")),
    ] {
        let answer = http.post(&url).header("Authorization", &auth).json(&body).send().await.expect("setup");
        assert!(answer.status().is_success(), "{url} answered {}", answer.status());
        if url.ends_with("/tables/t") {
            return (token, answer.bytes().await.expect("body").to_vec());
        }
    }
    unreachable!("the last request returns")
}

fn commit_body(n: &str) -> Value {
    json!({"requirements": [], "updates": [{"action": "set-properties", "updates": {"n": n}}]})
}

/// Latencies in ms of metadata commits sent to each target in turn, one at a time.
async fn commit_latencies(targets: &[String; 3], token: &str, commits: usize) -> [Vec<f64>; 3] {
    let http = reqwest::Client::new();
    let auth = format!("Bearer {token}");
    let mut latencies = [Vec::new(), Vec::new(), Vec::new()];
    for i in 0..commits + 20 {
        for (t, target) in targets.iter().enumerate() {
            let started = Instant::now();
            let answer = http
                .post(format!("{target}/v1/warehouse/namespaces/bench_commit/tables/t"))
                .header("Authorization", &auth)
                .json(&commit_body(&format!("{i}-{t}")))
                .send()
                .await
                .expect("commit");
            assert!(answer.status().is_success(), "{} answered {}", answer.url(), answer.status());
            answer.bytes().await.expect("body");
            // The first rounds warm connections and caches up.
            if i >= 20 {
                latencies[t].push(started.elapsed().as_secs_f64() * 1000.0);
            }
        }
    }
    latencies
}

fn print_commits(title: &str, [direct, plain, hinted]: &[Vec<f64>; 3]) {
    println!();
    println!("| {title} | p50 | p99 | added at p50 | added at p99 |");
    println!("|---|---:|---:|---:|---:|");
    for (name, lat) in
        [("direct", direct), ("icerelay, proxy only", plain), ("icerelay, replicating (hint recorded)", hinted)]
    {
        println!(
            "| {name} | {:.2} ms | {:.2} ms | {:+.2} ms | {:+.2} ms |",
            pct(lat, 50.0),
            pct(lat, 99.0),
            pct(lat, 50.0) - pct(direct, 50.0),
            pct(lat, 99.0) - pct(direct, 99.0)
        );
    }
}

fn replicating_config(primary: &Seaweed, replica: &Seaweed, state: &Path) -> String {
    let auth = "{ type = \"oauth2\", client_id = \"admin\", client_secret = \"adminsecret\" }";
    format!(
        "state_dir = \"{}\"\n[primary]\nuri = \"{}\"\nwarehouse = \"warehouse\"\nauth = {auth}\n\n{}\n{}\n[[destinations]]\nname = \"replica\"\nuri = \"{}\"\nwarehouse = \"replica\"\nauth = {auth}\n\n[[rules]]\nnamespace = \"bench_lag\"\ndestinations = [\"replica\"]\n",
        state.display(),
        primary.get("CATALOG_URI"),
        primary.storage_toml(),
        replica.storage_toml(),
        replica.get("CATALOG_URI"),
    )
}
