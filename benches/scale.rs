//! Replication at scale: many tables, many commits, one instance on SQLite
//! and three on PostgreSQL, against real catalogs on loopback.
//!
//! Two SeaweedFS servers (primary and replica). For each setup, `--tables`
//! tables are created through icerelay and bootstrapped onto the replica;
//! then `--commits` metadata commits (`set-properties`, spread over the tables
//! and over the instances) are sent as fast as the primary takes them
//! (`--concurrency` at a time). Measured:
//!
//! - replicated source commits per second, from the first commit to the
//!   moment every replica has the last one, and the lag of each table's last
//!   commit (its answer to its replica showing it, polled every 100 ms);
//! - icerelay's CPU time per source commit and per replica commit (a lane
//!   that lags folds several property commits into one replica commit; no
//!   file is copied, so this is icerelay's own cost per commit);
//! - resident memory at the end, and at `--lanes` lanes (one instance, SQLite);
//! - primary requests per table per reconcile pass;
//! - the state store's size per lane and per hint, and what is left of the
//!   hints at the end.
//!
//! ```text
//! cargo bench --bench scale [-- --tables 1000 --commits 10000 --lanes 10000 --concurrency 16 --only postgres]
//! ```

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use icerelay::state::StateStore;
use serde_json::{Value, json};
use support::services::{Icerelay, Postgres, Seaweed, cpu_time, pct, rss_mib};

/// How often reconcile runs in the benchmark (the default is 60 s).
const RECONCILE_INTERVAL_S: u64 = 10;

fn main() {
    let Some(args) = support::BenchArgs::from_env("scale") else { return };
    let tables = args.get("--tables", 1000usize);
    let commits = args.get("--commits", 10_000usize);
    let lanes = args.get("--lanes", 10_000usize);
    let concurrency = args.get("--concurrency", 16usize);

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let teststack = std::env::var_os("ICERELAY_TESTSTACK").map_or_else(|| root.join(".teststack"), PathBuf::from);
    let work = tempfile::tempdir().expect("temp dir");
    let primary = Seaweed::start(&root, &teststack, &work.path().join("primary"), "warehouse");
    let replica = Seaweed::start(&root, &teststack, &work.path().join("replica"), "replica");
    let postgres = Postgres::start(&root);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let bench = Bench { primary: &primary, replica: &replica, postgres: &postgres, work: work.path(), concurrency };
    let token = runtime.block_on(primary.token());

    println!();
    println!(
        "| setup | source commits/s replicated | lag p50 | lag p99 | CPU per source commit | CPU per replica commit | RSS (max instance) | primary loads per table per pass | reconcile passes per interval |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut sizes = Vec::new();
    let only = args.text("--only").map(str::to_owned);
    let setups = [Setup::Sqlite, Setup::Postgres { instances: 3 }];
    for setup in setups.into_iter().filter(|s| only.as_deref().is_none_or(|o| s.name().to_lowercase().contains(o))) {
        let result = runtime.block_on(bench.run(setup, &token, tables, commits));
        println!(
            "| {} ({tables} tables, {commits} commits) | {:.0} | {:.2} s | {:.2} s | {:.2} ms | {:.2} ms | {:.0} MiB | {:.2} | {:.2} |",
            setup.name(),
            result.rate,
            result.lag_p50,
            result.lag_p99,
            result.cpu_per_commit_ms,
            result.cpu_per_replica_commit_ms,
            result.rss_mib,
            result.loads_per_table_per_pass,
            result.passes_per_interval
        );
        sizes.push((setup, result.store));
    }

    println!();
    println!("| store | bytes per lane | bytes per hint | hints left at the end | replica commits |");
    println!("|---|---:|---:|---:|---:|");
    for (setup, store) in &sizes {
        let per_hint = runtime.block_on(bench.bytes_per_hint(*setup));
        println!(
            "| {} | {:.0} | {:.0} | {} | {} |",
            setup.name(),
            store.bytes_per_lane,
            per_hint,
            store.hints_left,
            store.replica_commits
        );
    }

    if lanes > 0 {
        let (rss, cpu_per_pass) = runtime.block_on(bench.idle_lanes(&token, lanes));
        println!();
        println!("| {lanes} lanes, one instance on SQLite, idle | RSS | CPU per reconcile pass |");
        println!("|---|---:|---:|");
        println!("| after bootstrap and two passes | {rss:.0} MiB | {cpu_per_pass:.0} ms |");
    }
    primary.stop(&root, &teststack);
    replica.stop(&root, &teststack);
}

#[derive(Clone, Copy, Debug)]
enum Setup {
    Sqlite,
    Postgres { instances: usize },
}

impl Setup {
    fn name(self) -> String {
        match self {
            Self::Sqlite => "1 instance, SQLite".into(),
            Self::Postgres { instances } => format!("{instances} instances, PostgreSQL"),
        }
    }

    fn instances(self) -> usize {
        match self {
            Self::Sqlite => 1,
            Self::Postgres { instances } => instances,
        }
    }
}

struct Bench<'a> {
    primary: &'a Seaweed,
    replica: &'a Seaweed,
    postgres: &'a Postgres,
    work: &'a Path,
    concurrency: usize,
}

struct RunResult {
    rate: f64,
    lag_p50: f64,
    lag_p99: f64,
    cpu_per_commit_ms: f64,
    cpu_per_replica_commit_ms: f64,
    rss_mib: f64,
    loads_per_table_per_pass: f64,
    passes_per_interval: f64,
    store: StoreSize,
}

struct StoreSize {
    bytes_per_lane: f64,
    hints_left: i64,
    replica_commits: f64,
}

impl Bench<'_> {
    fn config(&self, namespace: &str, state: &Path, setup: Setup, schema: &str) -> String {
        let auth = "{ type = \"oauth2\", client_id = \"admin\", client_secret = \"adminsecret\" }";
        let state_line = match setup {
            Setup::Sqlite => String::new(),
            Setup::Postgres { .. } => {
                format!("state = {{ type = \"postgres\", url = \"${{ICERELAY_PG_URL}}\", schema = \"{schema}\" }}\n")
            }
        };
        format!(
            "state_dir = \"{}\"\n{state_line}[primary]\nuri = \"{}\"\nwarehouse = \"warehouse\"\nauth = {auth}\n\n[replication]\nreconcile_interval = \"{RECONCILE_INTERVAL_S}s\"\nmax_concurrent_lanes = 16\n\n{}\n{}\n[[destinations]]\nname = \"replica\"\nuri = \"{}\"\nwarehouse = \"replica\"\nauth = {auth}\n\n[[rules]]\nnamespace = \"{namespace}\"\ndestinations = [\"replica\"]\n",
            state.display(),
            self.primary.get("CATALOG_URI"),
            self.primary.storage_toml(),
            self.replica.storage_toml(),
            self.replica.get("CATALOG_URI"),
        )
    }

    fn start(&self, namespace: &str, setup: Setup) -> Vec<Icerelay> {
        let schema = namespace.to_owned();
        (0..setup.instances())
            .map(|i| {
                let state = self.work.join(format!("{namespace}-state{i}"));
                let config = self.work.join(format!("{namespace}-{i}.toml"));
                std::fs::write(&config, self.config(namespace, &state, setup, &schema)).expect("config");
                Icerelay::start_with_env(
                    &["serve", "--config", &config.display().to_string()],
                    &[("ICERELAY_PG_URL", self.postgres.url.as_str())],
                )
            })
            .collect()
    }

    /// Creates `count` tables through `through` (`count` lanes once bootstrapped).
    async fn create_tables(&self, through: &str, token: &str, namespace: &str, count: usize) {
        let http = reqwest::Client::new();
        let auth = format!("Bearer {token}");
        let base = format!("{through}/v1/warehouse");
        let answer = http
            .post(format!("{base}/namespaces"))
            .header("Authorization", &auth)
            .json(&json!({"namespace": [namespace]}));
        assert!(answer.send().await.expect("namespace").status().is_success());
        futures::stream::iter(0..count)
            .map(|i| {
                let (http, auth, base) = (http.clone(), auth.clone(), base.clone());
                async move {
                    let body = json!({"name": format!("t{i}"), "schema": {"type": "struct", "fields": [{"id": 1, "name": "id", "type": "long", "required": false}]}});
                    let answer = http
                        .post(format!("{base}/namespaces/{namespace}/tables"))
                        .header("Authorization", &auth)
                        .json(&body)
                        .send()
                        .await
                        .expect("create");
                    assert!(answer.status().is_success(), "create t{i}: {}", answer.status());
                }
            })
            .buffer_unordered(self.concurrency)
            .collect::<Vec<()>>()
            .await;
    }

    /// Waits until `count` lanes are completed at the locations in `want`
    /// (any location for tables not in it); returns when each table got there.
    async fn wait_converged(
        &self,
        admin: &str,
        count: usize,
        want: &BTreeMap<String, String>,
    ) -> BTreeMap<String, Instant> {
        let mut done: BTreeMap<String, Instant> = BTreeMap::new();
        let deadline = Instant::now() + Duration::from_secs(3600);
        let http = reqwest::Client::new();
        while done.len() < count {
            assert!(Instant::now() < deadline, "not converged within an hour ({} of {count})", done.len());
            if let Ok(answer) = http.get(format!("{admin}/v1/replication/status")).send().await
                && let Ok(status) = answer.json::<Value>().await
            {
                let now = Instant::now();
                for table in status["tables"].as_array().into_iter().flatten() {
                    let name = table["table"].as_str().unwrap_or_default().to_owned();
                    let lane = &table["destinations"][0];
                    let at_target = want.get(&name).is_none_or(|l| lane["source_metadata_location"] == l.as_str());
                    if lane["status"] == "completed" && at_target {
                        done.entry(name).or_insert(now);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        done
    }

    async fn run(&self, setup: Setup, token: &str, tables: usize, commits: usize) -> RunResult {
        let namespace = match setup {
            Setup::Sqlite => "scale_sqlite".to_owned(),
            Setup::Postgres { instances } => format!("scale_pg{instances}"),
        };
        let relays = self.start(&namespace, setup);
        self.create_tables(&relays[0].url, token, &namespace, tables).await;
        self.wait_converged(&relays[0].admin_url, tables, &BTreeMap::new()).await;
        let pids: Vec<u32> = relays.iter().map(Icerelay::pid).collect();
        let cpu = || pids.iter().map(|p| cpu_time(*p)).sum::<Duration>();
        let replica_commits = || async {
            let mut sum = 0.0;
            for relay in &relays {
                sum += metric(&relay.admin_url, "icerelay_replication_commits_total").await;
            }
            sum
        };
        let (cpu_before, commits_before) = (cpu(), replica_commits().await);

        // Commits, as fast as the primary takes them.
        let http = reqwest::Client::new();
        let auth = format!("Bearer {token}");
        let started = Instant::now();
        let answers: Vec<(String, String, Instant)> = futures::stream::iter(0..commits)
            .map(|i| {
                let (http, auth) = (http.clone(), auth.clone());
                let url = format!(
                    "{}/v1/warehouse/namespaces/{namespace}/tables/t{}",
                    relays[i % relays.len()].url,
                    i % tables
                );
                async move {
                    let body = json!({"requirements": [], "updates": [{"action": "set-properties", "updates": {"n": i.to_string()}}]});
                    let answer = http.post(&url).header("Authorization", &auth).json(&body).send().await.expect("commit");
                    assert!(answer.status().is_success(), "{url}: {}", answer.status());
                    let body: Value = answer.json().await.expect("commit answer");
                    let location = body["metadata-location"].as_str().unwrap_or_default().to_owned();
                    (format!("t{}", i % tables), location, Instant::now())
                }
            })
            .buffered(self.concurrency)
            .collect()
            .await;
        // The last commit of each table, in the order they were answered.
        let mut last: BTreeMap<String, (String, Instant)> = BTreeMap::new();
        for (table, location, at) in answers {
            last.insert(table, (location, at));
        }
        let want: BTreeMap<String, String> = last.iter().map(|(t, (l, _))| (t.clone(), l.clone())).collect();
        let reached = self.wait_converged(&relays[0].admin_url, tables, &want).await;
        let finished = reached.values().max().copied().unwrap_or_else(Instant::now);
        let (cpu_after, commits_after) = (cpu(), replica_commits().await);
        let lags: Vec<f64> = last
            .iter()
            .filter_map(|(t, (_, answered))| Some(reached.get(t)?.saturating_duration_since(*answered).as_secs_f64()))
            .collect();
        let spent = (cpu_after - cpu_before).as_secs_f64() * 1000.0;
        let replica_commits_made = commits_after - commits_before;

        // Reconcile: four intervals of passes over the idle tables.
        let checks_before = self.reconcile_counts(&relays).await;
        tokio::time::sleep(Duration::from_secs(4 * RECONCILE_INTERVAL_S + 1)).await;
        let checks_after = self.reconcile_counts(&relays).await;
        let passes = checks_after.0 - checks_before.0;
        let loads = checks_after.1 - checks_before.1;
        let rss = pids.iter().map(|p| rss_mib(*p)).fold(0.0, f64::max);
        let store = self.store_size(setup, &namespace, tables, replica_commits_made).await;
        RunResult {
            rate: commits as f64 / (finished - started).as_secs_f64(),
            lag_p50: pct(&lags, 50.0),
            lag_p99: pct(&lags, 99.0),
            cpu_per_commit_ms: spent / commits as f64,
            cpu_per_replica_commit_ms: spent / replica_commits_made.max(1.0),
            rss_mib: rss,
            loads_per_table_per_pass: loads / passes.max(1.0) / tables as f64,
            passes_per_interval: passes / 4.0,
            store,
        }
    }

    /// (passes, tables loaded or checked) over every instance.
    async fn reconcile_counts(&self, relays: &[Icerelay]) -> (f64, f64) {
        let mut counts = (0.0, 0.0);
        for relay in relays {
            counts.0 += metric(&relay.admin_url, "icerelay_replication_reconcile_passes_total").await;
            counts.1 += metric(&relay.admin_url, "icerelay_replication_reconcile_checks_total").await;
        }
        counts
    }

    async fn store_size(&self, setup: Setup, namespace: &str, lanes: usize, replica_commits: f64) -> StoreSize {
        match setup {
            Setup::Sqlite => {
                let (bytes, hints_left) = sqlite_size(&self.work.join(format!("{namespace}-state0/icerelay.db")));
                StoreSize { bytes_per_lane: bytes as f64 / lanes as f64, hints_left, replica_commits }
            }
            Setup::Postgres { .. } => {
                let (client, connection) =
                    tokio_postgres::connect(&self.postgres.url, tokio_postgres::NoTls).await.expect("postgres");
                tokio::spawn(connection);
                let row = client
                    .query_one(
                        &format!(
                            "SELECT pg_total_relation_size('{namespace}.lanes') + pg_total_relation_size('{namespace}.replicated_snapshots')
                             + pg_total_relation_size('{namespace}.copied_files'), (SELECT count(*) FROM {namespace}.hints)"
                        ),
                        &[],
                    )
                    .await
                    .expect("sizes");
                let bytes: i64 = row.get(0);
                StoreSize { bytes_per_lane: bytes as f64 / lanes as f64, hints_left: row.get(1), replica_commits }
            }
        }
    }

    /// The size of 10,000 recorded hints in a fresh store, per hint.
    async fn bytes_per_hint(&self, setup: Setup) -> f64 {
        const HINTS: usize = 10_000;
        let table = icerelay::catalog::TableIdent::new(icerelay::catalog::Namespace::from_dotted("db"), "t");
        let hints = || {
            (0..100)
                .map(|i| icerelay::proxy::commit_tap::CommitHint {
                    kind: icerelay::proxy::commit_tap::HintKind::Commit,
                    table: icerelay::catalog::TableIdent::new(table.namespace.clone(), format!("table_{i}")),
                    prefix: Some("warehouse".into()),
                    metadata_location: None,
                })
                .collect::<Vec<_>>()
        };
        match setup {
            Setup::Sqlite => {
                let dir = self.work.join("hint-size");
                let size = || sqlite_size(&dir.join("icerelay.db")).0;
                let store = icerelay::state::embedded::EmbeddedStore::open(&dir).expect("store");
                store.append_hints(hints()).await.expect("warm");
                let before = size();
                for _ in 0..HINTS / 100 {
                    store.append_hints(hints()).await.expect("append");
                }
                (size() - before) as f64 / HINTS as f64
            }
            Setup::Postgres { .. } => {
                let settings = icerelay::state::postgres::PostgresSettings {
                    url: icerelay::config::Secret::new(self.postgres.url.clone()),
                    schema: "hint_size".into(),
                    ca_file: None,
                    max_connections: 2,
                    connect_timeout: Duration::from_secs(5),
                };
                let store = Arc::new(icerelay::state::postgres::PostgresStore::open(&settings).await.expect("store"));
                let (client, connection) =
                    tokio_postgres::connect(&self.postgres.url, tokio_postgres::NoTls).await.expect("postgres");
                tokio::spawn(connection);
                let size = || async {
                    client
                        .query_one("SELECT pg_total_relation_size('hint_size.hints')", &[])
                        .await
                        .expect("size")
                        .get::<_, i64>(0)
                };
                store.append_hints(hints()).await.expect("warm");
                let before = size().await;
                for _ in 0..HINTS / 100 {
                    store.append_hints(hints()).await.expect("append");
                }
                (size().await - before) as f64 / HINTS as f64
            }
        }
    }

    /// One instance on SQLite with `count` idle lanes: RSS, and CPU per reconcile pass.
    async fn idle_lanes(&self, token: &str, count: usize) -> (f64, f64) {
        let namespace = "scale_idle";
        let relays = self.start(namespace, Setup::Sqlite);
        self.create_tables(&relays[0].url, token, namespace, count).await;
        self.wait_converged(&relays[0].admin_url, count, &BTreeMap::new()).await;
        let pid = relays[0].pid();
        let before = (cpu_time(pid), self.reconcile_counts(&relays).await.0);
        tokio::time::sleep(Duration::from_secs(2 * RECONCILE_INTERVAL_S + 1)).await;
        let after = (cpu_time(pid), self.reconcile_counts(&relays).await.0);
        let passes = (after.1 - before.1).max(1.0);
        (rss_mib(pid), (after.0 - before.0).as_secs_f64() * 1000.0 / passes)
    }
}

/// An embedded store's size in use (its WAL checkpointed first, free pages
/// not counted) and the hints left in it.
fn sqlite_size(db: &Path) -> (i64, i64) {
    let read = || -> rusqlite::Result<(i64, i64)> {
        let c = rusqlite::Connection::open(db)?;
        c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        let free: i64 = c.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
        let size: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let hints: i64 = c.query_row("SELECT count(*) FROM hints", [], |r| r.get(0))?;
        Ok(((pages - free) * size, hints))
    };
    read().unwrap_or((-1, -1))
}

/// The sum of a metric's series on an admin API.
async fn metric(admin: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{admin}/metrics")).await.expect("metrics").text().await.expect("text");
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
