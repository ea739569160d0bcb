//! `icerelay copy-table` on tables written by real writers: the copy reads
//! the same as the source at every snapshot (PyIceberg and DuckDB, from its
//! metadata.json and through a catalog after registering it in rustberg), no
//! path points at the source, every recorded size is true, and reruns after
//! an interruption copy only what is missing.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Rustberg, SeaweedFs, duckdb_extensions, icerelay, python, unique};

/// Writes a fixture table (`tests/clients/fixture_tables.py`); returns its metadata location.
async fn fixture(kind: &str, conn: &Value, ns: &str, table: &str) -> String {
    let ext = duckdb_extensions().display().to_string();
    let out = python("fixture_tables.py", vec![kind.into(), conn.to_string(), ns.into(), table.into(), ext]).await;
    out["metadata_location"].as_str().expect("metadata_location").to_owned()
}

fn config_file(text: &str) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().expect("config");
    std::fs::write(file.path(), text).expect("write config");
    file
}

async fn read(spec: Value) -> Value {
    python("read_snapshots.py", vec![spec.to_string(), duckdb_extensions().display().to_string()]).await
}

/// Row counts at every snapshot, for tables too big to compare row by row.
async fn counts(spec: Value) -> Value {
    python("read_snapshots.py", vec![spec.to_string(), duckdb_extensions().display().to_string(), "--counts".into()])
        .await
}

/// The rows every reader sees, by snapshot, for comparison (snapshot order aside).
fn rows(read: &Value, reader: &str) -> Value {
    assert_eq!(read["errors"], json!({}), "a reader failed: {read}");
    read[reader].clone()
}

async fn check(metadata: &str, source_prefix: &str, s3: Option<&Value>) {
    let mut args = vec![metadata.to_owned(), source_prefix.to_owned()];
    if let Some(s3) = s3 {
        args.push(s3.to_string());
    }
    let report = python("check_copy.py", args).await;
    assert_eq!(report["violations"], json!([]), "{metadata}: {report}");
    assert!(report["counts"]["manifests"].as_u64().unwrap_or(0) > 0, "{report}");
}

fn copy_args(
    config: &tempfile::NamedTempFile,
    source: &str,
    target: &str,
    checkpoints: &std::path::Path,
) -> Vec<String> {
    vec![
        "copy-table".into(),
        "--config".into(),
        config.path().display().to_string(),
        "--source-metadata".into(),
        source.into(),
        "--target-location".into(),
        target.into(),
        "--checkpoint-dir".into(),
        checkpoints.display().to_string(),
        "--allow-local".into(),
        checkpoints.display().to_string(),
    ]
}

/// Copies a SeaweedFS table into rustberg's warehouse, registers it, and
/// compares source and copy: from metadata.json and through the catalog.
async fn copy_seaweed_table_into_rustberg(kind: &str) {
    let seaweed = SeaweedFs::shared();
    let rustberg = Rustberg::shared();
    let ns = unique("copysrc");
    let source = fixture(kind, &seaweed.client_conn(seaweed.catalog_uri()), &ns, "t").await;
    let source_location = format!("s3://{}/{ns}/t", seaweed.warehouse());
    let copy_ns = unique("copied");
    let target = format!("{}/{copy_ns}/t", rustberg.warehouse);
    let config = config_file(&seaweed.storage_toml());
    let checkpoints = tempfile::tempdir().expect("dir");
    let mut args = copy_args(&config, &source, &target, checkpoints.path());
    args.extend(["--register".into(), rustberg.uri.clone(), "--register-warehouse".into(), rustberg.warehouse.clone()]);
    args.extend(["--allow-local".into(), rustberg.warehouse_dir().display().to_string()]);
    args.extend(["--table".into(), format!("{copy_ns}.t")]);
    let (code, stdout, stderr) = icerelay(args).await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let copied =
        stdout.lines().find_map(|l| l.strip_prefix("metadata: ")).expect("prints the new metadata location").to_owned();
    assert!(copied.starts_with(&target), "{copied}");
    assert!(stdout.contains(&format!("registered {copy_ns}.t")), "{stdout}");

    let original = read(json!({"metadata": source, "s3": seaweed.s3_json()})).await;
    let direct = read(json!({"metadata": copied})).await;
    let registered = read(json!({"catalog": rustberg.client_conn(), "table": format!("{copy_ns}.t")})).await;
    let snapshots = original["snapshots"].as_array().map_or(0, Vec::len);
    assert!(snapshots >= 5, "the fixture has history: {original}");
    for reader in ["pyiceberg", "duckdb"] {
        assert_eq!(rows(&original, reader).as_object().map(|o| o.len()), Some(snapshots), "every snapshot read");
        assert_eq!(rows(&direct, reader), rows(&original, reader), "{kind}: {reader} from the copy's metadata.json");
        assert_eq!(rows(&registered, reader), rows(&original, reader), "{kind}: {reader} through rustberg");
    }
    check(&copied, &source_location, None).await;
    // The checker is not blind: the source itself is full of source paths.
    let control = python("check_copy.py", vec![source.clone(), source_location, seaweed.s3_json().to_string()]).await;
    assert_ne!(control["violations"], json!([]), "negative control");
}

#[tokio::test(flavor = "multi_thread")]
async fn pyiceberg_table_with_evolution_copies_and_registers() {
    copy_seaweed_table_into_rustberg("pyiceberg").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn duckdb_merge_on_read_table_copies_with_rewritten_position_deletes() {
    copy_seaweed_table_into_rustberg("duckdb-mor").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn v3_deletion_vectors_copy_within_rustberg() {
    let rustberg = Rustberg::shared();
    let ns = unique("dvsrc");
    let source = fixture("duckdb-v3", &rustberg.client_conn(), &ns, "t").await;
    let copy_ns = unique("dvcopy");
    let target = format!("{}/{copy_ns}/t", rustberg.warehouse);
    let config = config_file("");
    let checkpoints = tempfile::tempdir().expect("dir");
    let mut args = copy_args(&config, &source, &target, checkpoints.path());
    args.extend(["--register".into(), rustberg.uri.clone(), "--register-warehouse".into(), rustberg.warehouse.clone()]);
    args.extend(["--allow-local".into(), rustberg.warehouse_dir().display().to_string()]);
    args.extend(["--table".into(), format!("{copy_ns}.t")]);
    let (code, stdout, stderr) = icerelay(args).await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let copied = stdout.lines().find_map(|l| l.strip_prefix("metadata: ")).expect("metadata").to_owned();
    let original = read(json!({"metadata": source})).await;
    let registered = read(json!({"catalog": rustberg.client_conn(), "table": format!("{copy_ns}.t")})).await;
    assert!(source.contains("/metadata/") && original["snapshots"].as_array().map_or(0, Vec::len) >= 5);
    // DuckDB applies deletion vectors; equality of rows shows the rewritten puffins are read.
    assert_eq!(rows(&registered, "duckdb"), rows(&original, "duckdb"));
    assert_eq!(rows(&registered, "pyiceberg"), rows(&original, "pyiceberg"));
    let deleted =
        rows(&original, "duckdb").as_object().map(|o| o.values().any(|r| r.as_array().map_or(0, Vec::len) == 13));
    assert_eq!(deleted, Some(true), "some snapshot shows the deletes applied");
    check(&copied, &format!("{}/{ns}/t", rustberg.warehouse), None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_to_s3_copy_into_another_store() {
    let seaweed = SeaweedFs::shared();
    let other = SeaweedFs::start("copy-target");
    let ns = unique("s3src");
    let source = fixture("duckdb-mor", &seaweed.client_conn(seaweed.catalog_uri()), &ns, "t").await;
    let target = format!("s3://{}/copies/{ns}", other.warehouse());
    // Two stores with the same bucket name: a longer prefix per instance keeps them apart.
    let toml = format!(
        "{}{}",
        seaweed
            .storage_toml()
            .replace(&format!("s3://{}/\"", seaweed.warehouse()), &format!("s3://{}/{ns}/\"", seaweed.warehouse())),
        other
            .storage_toml()
            .replace(&format!("s3://{}/\"", other.warehouse()), &format!("s3://{}/copies/\"", other.warehouse())),
    );
    let config = config_file(&toml);
    let checkpoints = tempfile::tempdir().expect("dir");
    let (code, stdout, stderr) = icerelay(copy_args(&config, &source, &target, checkpoints.path())).await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let copied = stdout.lines().find_map(|l| l.strip_prefix("metadata: ")).expect("metadata").to_owned();
    let original = read(json!({"metadata": source, "s3": seaweed.s3_json()})).await;
    let copy = read(json!({"metadata": copied, "s3": other.s3_json()})).await;
    for reader in ["pyiceberg", "duckdb"] {
        assert_eq!(rows(&copy, reader), rows(&original, reader), "{reader}");
    }
    check(&copied, &format!("s3://{}/{ns}/t", seaweed.warehouse()), Some(&other.s3_json())).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dry_run_prints_the_plan_and_writes_nothing() {
    let seaweed = SeaweedFs::shared();
    let ns = unique("dryrun");
    let source = fixture("duckdb-mor", &seaweed.client_conn(seaweed.catalog_uri()), &ns, "t").await;
    let out = tempfile::tempdir().expect("dir");
    let target = format!("file://{}/t", out.path().display());
    let config = config_file(&seaweed.storage_toml());
    let mut args = copy_args(&config, &source, &target, out.path());
    args.push("--dry-run".into());
    let (code, stdout, stderr) = icerelay(args).await;
    assert_eq!(code, 0, "{stderr}");
    let plan: Value = serde_json::from_str(&stdout).expect("the plan is JSON");
    let files = plan["files"].as_array().expect("files");
    assert!(files.iter().all(|f| f["target"].as_str().is_some_and(|t| t.starts_with(&target))), "{plan}");
    let kinds: std::collections::BTreeSet<&str> = files.iter().filter_map(|f| f["kind"].as_str()).collect();
    for kind in ["data", "position-deletes", "manifest", "manifest-list", "metadata"] {
        assert!(kinds.contains(kind), "{kind} missing from {kinds:?}");
    }
    assert!(files.iter().any(|f| f["kind"] == "position-deletes" && f["action"] == "rewrite"));
    assert!(plan["totals"]["bytes"].as_u64().unwrap_or(0) > 0);
    assert!(!out.path().join("t").exists(), "a dry run writes nothing");
}

#[tokio::test(flavor = "multi_thread")]
async fn metadata_only_leaves_data_files_and_a_full_copy_completes_it() {
    let seaweed = SeaweedFs::shared();
    let ns = unique("metaonly");
    let source = fixture("duckdb-mor", &seaweed.client_conn(seaweed.catalog_uri()), &ns, "t").await;
    let out = tempfile::tempdir().expect("dir");
    let target = format!("file://{}/t", out.path().display());
    let config = config_file(&seaweed.storage_toml());
    let mut args = copy_args(&config, &source, &target, out.path());
    args.push("--metadata-only".into());
    let (code, stdout, stderr) = icerelay(args).await;
    assert_eq!(code, 0, "{stderr}");
    let copied = stdout.lines().find_map(|l| l.strip_prefix("metadata: ")).expect("metadata").to_owned();
    let data: Vec<String> = std::fs::read_dir(out.path().join("t/data"))
        .expect("the rewritten delete files are there")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!data.is_empty() && data.iter().all(|n| n.contains("deletes")), "only delete files: {data:?}");
    assert!(std::path::Path::new(copied.trim_start_matches("file://")).exists());

    // The same copy without --metadata-only brings the data files too.
    let (code, stdout, stderr) = icerelay(copy_args(&config, &source, &target, out.path())).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("metadata: "), "{stdout}");
    let original = read(json!({"metadata": source, "s3": seaweed.s3_json()})).await;
    let copy = read(json!({"metadata": copied})).await;
    for reader in ["pyiceberg", "duckdb"] {
        assert_eq!(rows(&copy, reader), rows(&original, reader), "{reader}");
    }
    check(&copied, &format!("s3://{}/{ns}/t", seaweed.warehouse()), None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupt_manifests_stop_the_copy_before_anything_is_written() {
    let seaweed = SeaweedFs::shared();
    let ns = unique("corrupt");
    let source = fixture("duckdb-mor", &seaweed.client_conn(seaweed.catalog_uri()), &ns, "t").await;
    // A local copy of the table serves as a source we can damage.
    let scratch = tempfile::tempdir().expect("dir");
    let local = format!("file://{}/src", scratch.path().display());
    let config = config_file(&seaweed.storage_toml());
    let (code, stdout, stderr) = icerelay(copy_args(&config, &source, &local, scratch.path())).await;
    assert_eq!(code, 0, "{stderr}");
    let local_metadata = stdout.lines().find_map(|l| l.strip_prefix("metadata: ")).expect("metadata").to_owned();
    let metadata_dir = scratch.path().join("src/metadata");
    let manifest = std::fs::read_dir(&metadata_dir)
        .expect("dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with("-m0.avro")))
        .expect("a manifest");
    let bytes = std::fs::read(&manifest).expect("read");
    std::fs::write(&manifest, &bytes[..bytes.len() / 2]).expect("truncate");

    let target_dir = tempfile::tempdir().expect("dir");
    let target = format!("file://{}/t", target_dir.path().display());
    let mut args = copy_args(&config, &local_metadata, &target, target_dir.path());
    args.extend(["--allow-local".into(), scratch.path().display().to_string()]);
    let (code, stdout, stderr) = icerelay(args).await;
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    let name = manifest.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    assert!(stderr.contains(name) && stderr.contains("corrupt or truncated"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!target_dir.path().join("t").exists(), "nothing written at the target");
}

#[tokio::test(flavor = "multi_thread")]
async fn files_outside_the_table_location_need_a_mapping() {
    let seaweed = SeaweedFs::shared();
    let ns = unique("outside");
    let data_path = format!("s3://{}/{ns}/elsewhere/data", seaweed.warehouse());
    let conn = seaweed.client_conn(seaweed.catalog_uri()).to_string();
    let props = json!({"write.data.path": data_path}).to_string();
    let made = python("make_table.py", vec![conn, ns.clone(), "t".into(), "2".into(), "10".into(), props]).await;
    let source = made["metadata_location"].as_str().expect("location").to_owned();
    let out = tempfile::tempdir().expect("dir");
    let config = config_file(&seaweed.storage_toml());
    let target = format!("file://{}/t", out.path().display());

    let (code, _, stderr) = icerelay(copy_args(&config, &source, &target, out.path())).await;
    assert_eq!(code, 1);
    assert!(
        stderr.contains(&data_path) && stderr.contains("--map"),
        "names the unmapped path and the remedy: {stderr}"
    );

    let mut args = copy_args(&config, &source, &target, out.path());
    args.extend(["--map".into(), format!("{data_path}=file://{}/elsewhere", out.path().display())]);
    let (code, stdout, stderr) = icerelay(args).await;
    assert_eq!(code, 0, "{stderr}");
    let copied = stdout.lines().find_map(|l| l.strip_prefix("metadata: ")).expect("metadata").to_owned();
    let original = read(json!({"metadata": source, "s3": seaweed.s3_json()})).await;
    assert_eq!(rows(&read(json!({"metadata": copied})).await, "duckdb"), rows(&original, "duckdb"));
    assert!(out.path().join("elsewhere").exists(), "data went where the mapping says");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_copy_resumes_without_recopying_finished_files() {
    let seaweed = SeaweedFs::shared();
    let ns = unique("resume");
    let conn = seaweed.client_conn(seaweed.catalog_uri()).to_string();
    let made = python("make_table.py", vec![conn, ns.clone(), "t".into(), "30".into(), "60000".into()]).await;
    let source = made["metadata_location"].as_str().expect("location").to_owned();
    let out = tempfile::tempdir().expect("dir");
    let checkpoints = out.path().join("journal");
    let target = format!("file://{}/t", out.path().display());
    let config = config_file(&seaweed.storage_toml());
    let mut args = copy_args(&config, &source, &target, &checkpoints);
    args.extend(["--parallelism".into(), "1".into(), "--allow-local".into(), out.path().display().to_string()]);

    // Kill the copy (SIGKILL) once some files are recorded as done.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_icerelay"))
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start copy");
    let journal_lines = || {
        std::fs::read_dir(&checkpoints)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .and_then(|e| std::fs::read_to_string(e.path()).ok())
            .map_or(0, |t| t.lines().count())
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while journal_lines() < 8 {
        assert!(Instant::now() < deadline, "the copy never recorded progress");
        assert!(child.try_wait().expect("wait").is_none(), "the copy finished before it could be interrupted");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().expect("kill");
    let _ = child.wait();
    // The files recorded as finished, and when they were written.
    let journal = std::fs::read_dir(&checkpoints).expect("journal dir").filter_map(Result::ok).next().expect("journal");
    let finished: Vec<(std::path::PathBuf, std::time::SystemTime)> = std::fs::read_to_string(journal.path())
        .expect("journal")
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["target"].as_str().map(|t| std::path::PathBuf::from(t.trim_start_matches("file://"))))
        .map(|p| {
            let modified = std::fs::metadata(&p).and_then(|m| m.modified()).expect("a finished file exists");
            (p, modified)
        })
        .collect();
    assert!(finished.len() >= 8);

    let (code, stdout, stderr) = icerelay(args).await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let summary = stdout.lines().find(|l| l.starts_with("copied ")).expect("summary").to_owned();
    let number = |word: &str| -> u64 {
        let words: Vec<&str> = summary.split_whitespace().collect();
        words
            .iter()
            .position(|w| *w == word)
            .and_then(|i| words.get(i + 1))
            .and_then(|n| n.parse().ok())
            .expect("count")
    };
    let (copied, skipped) = (number("copied"), number("skipped"));
    assert!(skipped > 0 && copied > 0, "{summary}");
    for (path, modified) in &finished {
        let now = std::fs::metadata(path).and_then(|m| m.modified()).expect("still there");
        assert_eq!(&now, modified, "{} was copied again", path.display());
    }
    assert!(stderr.contains("resuming"), "{stderr}");
    let copy_metadata = stdout.lines().find_map(|l| l.strip_prefix("metadata: ")).expect("metadata").to_owned();
    check(&copy_metadata, &format!("s3://{}/{ns}/t", seaweed.warehouse()), None).await;
    let original = counts(json!({"metadata": source, "s3": seaweed.s3_json()})).await;
    let copy = counts(json!({"metadata": copy_metadata})).await;
    for reader in ["pyiceberg", "duckdb"] {
        assert_eq!(rows(&copy, reader), rows(&original, reader), "{reader} row counts at every snapshot");
    }
}
