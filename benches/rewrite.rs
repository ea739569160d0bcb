//! Metadata rewrite throughput of the table copy engine.
//!
//! Generates a table shaped like the one Iceberg's `RewriteTablePath` was
//! measured on (1,024 snapshots, 1,000,160 manifest entries, 80 position-delete
//! files, cumulative manifest lists: 524,800 manifest-list entries), on the
//! local disk, then times `TableCopier` rewriting all of it to another
//! directory with two worker threads: manifest lists, manifests, position
//! deletes and metadata.json, data files left in place (`--metadata-only`, the
//! same work `RewriteTablePath` does). Afterwards every manifest length, every
//! delete-file size and every path of the copy is checked.
//!
//! Records are cloned from the real DuckDB merge-on-read fixture in
//! `tests/fixtures/duckdb_mor_v2`, so the Avro schemas, header metadata and
//! codec are those of a real writer.
//!
//! ```text
//! cargo bench --bench rewrite [-- --rounds 3 --snapshots 1024 --entries 1000160 --deletes 80]
//! ```

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apache_avro::types::Value as Avro;
use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use icerelay::config::{StorageConfig, StorageKind};
use icerelay::rewrite::{PathMap, avro, manifest, manifest_list};
use icerelay::storage::Storage;
use icerelay::storage::checkpoint::NoCheckpoints;
use icerelay::storage::copy::{Copier, CopySettings};
use icerelay::table_copy::{NoProgress, TableCopier};
use serde_json::{Value, json};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const FIXTURE: &str = "tests/fixtures/duckdb_mor_v2";
const DELETE_PATH_FIELD_ID: i32 = 2_147_483_546;
const DELETE_POS_FIELD_ID: i32 = 2_147_483_545;
/// Rows per generated position-delete file.
const DELETE_ROWS: usize = 20_000;

fn main() {
    let Some(args) = support::BenchArgs::from_env("rewrite") else { return };
    let flag = |flag: &str, default: usize| args.get(flag, default);
    let shape = Shape {
        snapshots: flag("--snapshots", 1024),
        entries: flag("--entries", 1_000_160),
        deletes: flag("--deletes", 80),
    };
    let rounds = flag("--rounds", 3);

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let work = tempfile::tempdir_in(std::env::var_os("BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from))
        .expect("temp dir");
    let source_location = format!("file://{}/src/db/table", work.path().display());
    let started = Instant::now();
    let generated = generate(&root.join(FIXTURE), &source_location, &shape);
    println!(
        "generated {} snapshots, {} manifest entries ({} position-delete files), {} manifest-list entries, {:.1} MB of metadata in {:.1} s",
        shape.snapshots,
        generated.manifest_entries,
        shape.deletes,
        generated.list_entries,
        generated.metadata_bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut times = Vec::new();
    for round in 0..rounds {
        let target_location = format!("file://{}/dst{round}/db/table", work.path().display());
        let cpu_before = cpu_time();
        let elapsed = runtime.block_on(rewrite(&generated.metadata_url, &source_location, &target_location));
        match cpu_before.zip(cpu_time()) {
            Some((before, after)) => println!(
                "round {round}: {:.2} s ({:.2} s of CPU)",
                elapsed.as_secs_f64(),
                after.saturating_sub(before).as_secs_f64()
            ),
            None => println!("round {round}: {:.2} s", elapsed.as_secs_f64()),
        }
        let checked = runtime.block_on(verify(&target_location, &source_location, &shape));
        assert_eq!(checked.manifest_entries, generated.manifest_entries, "every entry was rewritten");
        times.push(elapsed);
        std::fs::remove_dir_all(work.path().join(format!("dst{round}"))).expect("clean up");
    }
    times.sort();
    let median = times[times.len() / 2].as_secs_f64();
    let bar = 43.7;
    println!();
    println!("| metric | icerelay | RewriteTablePath (Spark local[2]) |");
    println!("|---|---|---|");
    println!("| median time ({rounds} rounds) | {median:.2} s | {bar} s |");
    println!("| manifest entries/s | {:.0} | {:.0} |", generated.manifest_entries as f64 / median, 1_000_160.0 / bar);
    println!("| metadata MB/s | {:.1} | {:.1} |", generated.metadata_bytes as f64 / 1e6 / median, 198.0 / bar);
    println!("| speed-up | {:.1}x | 1x |", bar / median);
    println!("| manifest_length and delete sizes exact | all | none |");
}

/// CPU time (user and system, all threads) of this process so far, from
/// `/proc/self/stat` (Linux; in clock ticks, assumed to be 100 a second).
/// Less noisy than wall time on a machine shared with other work.
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces; fields are counted after it.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

struct Shape {
    snapshots: usize,
    entries: usize,
    deletes: usize,
}

struct Generated {
    metadata_url: String,
    manifest_entries: usize,
    list_entries: usize,
    metadata_bytes: u64,
}

/// The timed part: everything `copy-table --metadata-only` does.
async fn rewrite(metadata_url: &str, source: &str, target: &str) -> Duration {
    let local = |prefix: &str| StorageConfig { prefix: prefix.to_owned(), kind: StorageKind::Local };
    let storage = Arc::new(Storage::new(&[local(source), local(target)]));
    let copier =
        TableCopier::new(Copier::new(storage, Arc::new(NoCheckpoints), CopySettings::default()), 4).metadata_only();
    let started = Instant::now();
    let metadata = copier.read_metadata(metadata_url).await.expect("metadata");
    let map = PathMap::from_locations(source, target).expect("map");
    let snapshots: BTreeSet<i64> =
        metadata["snapshots"].as_array().expect("snapshots").iter().filter_map(|s| s["snapshot-id"].as_i64()).collect();
    copier.copy_snapshots(&metadata, metadata_url, &map, &snapshots, &NoProgress).await.expect("copy");
    let target_metadata = map.rewrite(metadata_url, "bench").expect("target metadata");
    copier.write_metadata(&metadata, metadata_url, &map, &target_metadata, &|_| false).await.expect("write");
    started.elapsed()
}

struct Checked {
    manifest_entries: usize,
}

/// Every manifest length and delete-file size of the copy is the real size,
/// and no path in it points at the source.
async fn verify(target: &str, source: &str, shape: &Shape) -> Checked {
    let local = |url: &str| PathBuf::from(url.strip_prefix("file://").expect("file URL"));
    let metadata_path = local(&format!("{target}/metadata/v1.metadata.json"));
    let text = std::fs::read_to_string(&metadata_path).expect("target metadata");
    assert!(!text.contains(source), "the copied metadata.json mentions the source");
    let metadata: Value = serde_json::from_str(&text).expect("json");
    let snapshots = metadata["snapshots"].as_array().expect("snapshots");
    assert_eq!(snapshots.len(), shape.snapshots);
    let mut manifests = BTreeSet::new();
    for snapshot in snapshots {
        let list_url = snapshot["manifest-list"].as_str().expect("manifest-list");
        assert!(list_url.starts_with(target), "{list_url}");
        let bytes = std::fs::read(local(list_url)).expect("manifest list");
        for m in manifest_list::list(&bytes, list_url).expect("list") {
            assert!(m.path.starts_with(target), "{}", m.path);
            let real = std::fs::metadata(local(&m.path)).expect("manifest exists").len();
            assert_eq!(m.length as u64, real, "manifest_length of {} in {list_url}", m.path);
            manifests.insert(m.path);
        }
    }
    let mut entries = 0;
    let mut delete_files = 0;
    for path in &manifests {
        let bytes = std::fs::read(local(path)).expect("manifest");
        for entry in manifest::list(&bytes, path).expect("entries") {
            entries += 1;
            assert!(entry.path.starts_with(target), "{} in {path}", entry.path);
            if entry.needs_rewrite() {
                delete_files += 1;
                let real = std::fs::metadata(local(&entry.path)).expect("delete file exists").len();
                assert_eq!(entry.size as u64, real, "file_size_in_bytes of {}", entry.path);
                let rows = icerelay_read_paths(&local(&entry.path));
                assert!(rows.iter().all(|p| p.starts_with(target)), "a delete row still points at the source");
            }
        }
    }
    assert_eq!(delete_files, shape.deletes);
    Checked { manifest_entries: entries }
}

/// The distinct `file_path` values of a position-delete file.
fn icerelay_read_paths(path: &Path) -> BTreeSet<String> {
    let file = std::fs::File::open(path).expect("delete file");
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .expect("parquet")
        .build()
        .expect("reader");
    let mut paths = BTreeSet::new();
    for batch in reader {
        let batch = batch.expect("batch");
        let column = batch.column_by_name("file_path").expect("file_path");
        let strings = column.as_any().downcast_ref::<StringArray>().expect("strings");
        paths.extend(strings.iter().flatten().map(str::to_owned));
    }
    paths
}

// === generation ===

/// Templates taken from the fixture's files.
struct Templates {
    data_header: avro::Header,
    data_entry: Avro,
    delete_header: avro::Header,
    delete_entry: Avro,
    list_header: avro::Header,
    list_data: Avro,
    list_delete: Avro,
    metadata: Value,
}

fn templates(fixture: &Path) -> Templates {
    let index: Value =
        serde_json::from_slice(&std::fs::read(fixture.join("index.json")).expect("index")).expect("json");
    let local = |url: &str| fixture.join(url.rsplit('/').next().expect("name"));
    let metadata: Value =
        serde_json::from_slice(&std::fs::read(local(index["metadata"].as_str().expect("metadata"))).expect("metadata"))
            .expect("json");
    let last = metadata["snapshots"].as_array().and_then(|s| s.last()).expect("a snapshot");
    let list_url = last["manifest-list"].as_str().expect("manifest-list");
    let (list_header, list_records) =
        avro::read(&std::fs::read(local(list_url)).expect("list"), list_url).expect("avro");
    let mut data = None;
    let mut deletes = None;
    for (record, file) in list_records
        .iter()
        .zip(manifest_list::list(&std::fs::read(local(list_url)).expect("list"), list_url).expect("list"))
    {
        let (header, entries) =
            avro::read(&std::fs::read(local(&file.path)).expect("manifest"), &file.path).expect("avro");
        let slot = if file.is_deletes { &mut deletes } else { &mut data };
        if slot.is_none() {
            *slot = Some((header, entries[0].clone(), record.clone()));
        }
    }
    let (data_header, data_entry, list_data) = data.expect("a data manifest");
    let (delete_header, delete_entry, list_delete) = deletes.expect("a delete manifest");
    Templates { data_header, data_entry, delete_header, delete_entry, list_header, list_data, list_delete, metadata }
}

fn generate(fixture: &Path, location: &str, shape: &Shape) -> Generated {
    let t = templates(fixture);
    let dir = PathBuf::from(location.strip_prefix("file://").expect("file URL"));
    std::fs::create_dir_all(dir.join("metadata")).expect("mkdir");
    std::fs::create_dir_all(dir.join("data")).expect("mkdir");
    let mut metadata_bytes = 0u64;

    // Which snapshots add a position-delete file rather than data files.
    let delete_at: BTreeSet<usize> = (0..shape.deletes).map(|i| i * shape.snapshots / shape.deletes + 6).collect();
    let data_snapshots = shape.snapshots - delete_at.len();
    let data_entries = shape.entries - shape.deletes;
    let mut manifests: Vec<Avro> = Vec::new();
    let mut snapshots = Vec::new();
    let mut log = Vec::new();
    let mut data_index = 0;
    let mut list_entries = 0;
    let mut written_data_files: Vec<String> = Vec::new();
    for k in 0..shape.snapshots {
        let snapshot_id = 1_000_000 + k as i64;
        let sequence = k as i64 + 1;
        let manifest_url = format!("{location}/metadata/m-{k:05}.avro");
        let (bytes, list_template, entries) = if delete_at.contains(&k) {
            let path = format!("{location}/data/deletes-{k:05}.parquet");
            let mut recent: Vec<String> = written_data_files.iter().rev().take(8).cloned().collect();
            recent.sort();
            let size = write_position_deletes(&dir.join(format!("data/deletes-{k:05}.parquet")), &recent);
            metadata_bytes += size;
            let mut entry = t.delete_entry.clone();
            set_entry(&mut entry, snapshot_id, &path, DELETE_ROWS as i64, size as i64);
            set_path_bounds(&mut entry, &recent[0], &recent[recent.len() - 1]);
            (avro::write(&t.delete_header, [&entry], &manifest_url).expect("write"), &t.list_delete, 1)
        } else {
            let n = data_entries / data_snapshots + usize::from(data_index < data_entries % data_snapshots);
            data_index += 1;
            let records: Vec<Avro> = (0..n)
                .map(|j| {
                    let path = format!("{location}/data/{k:05}-{j:05}.parquet");
                    let mut entry = t.data_entry.clone();
                    set_entry(&mut entry, snapshot_id, &path, 1000, 65_536);
                    if j < 4 {
                        written_data_files.push(path);
                    }
                    entry
                })
                .collect();
            (avro::write(&t.data_header, &records, &manifest_url).expect("write"), &t.list_data, n)
        };
        std::fs::write(dir.join(format!("metadata/m-{k:05}.avro")), &bytes).expect("write manifest");
        metadata_bytes += bytes.len() as u64;
        let mut list_record = list_template.clone();
        avro::set_string(&mut list_record, "manifest_path", manifest_url);
        avro::set_long(&mut list_record, "manifest_length", bytes.len() as i64);
        avro::set_long(&mut list_record, "added_snapshot_id", snapshot_id);
        avro::set_long(&mut list_record, "sequence_number", sequence);
        avro::set_long(&mut list_record, "min_sequence_number", sequence);
        avro::set_long(&mut list_record, "added_files_count", entries as i64);
        avro::set_long(&mut list_record, "added_data_files_count", entries as i64);
        manifests.push(list_record);

        let list_name = format!("snap-{snapshot_id}.avro");
        let list_url = format!("{location}/metadata/{list_name}");
        let list = avro::write(&t.list_header, &manifests, &list_url).expect("write list");
        list_entries += manifests.len();
        metadata_bytes += list.len() as u64;
        std::fs::write(dir.join("metadata").join(&list_name), &list).expect("write list");
        let mut snapshot = json!({
            "snapshot-id": snapshot_id,
            "sequence-number": sequence,
            "timestamp-ms": 1_790_000_000_000i64 + k as i64,
            "manifest-list": list_url,
            "summary": {"operation": if delete_at.contains(&k) { "delete" } else { "append" }},
            "schema-id": 0,
        });
        if k > 0 {
            snapshot["parent-snapshot-id"] = json!(snapshot_id - 1);
        }
        snapshots.push(snapshot);
        log.push(json!({"snapshot-id": snapshot_id, "timestamp-ms": 1_790_000_000_000i64 + k as i64}));
    }
    let last = 1_000_000 + shape.snapshots as i64 - 1;
    let mut metadata = t.metadata;
    metadata["location"] = json!(location);
    metadata["snapshots"] = json!(snapshots);
    metadata["snapshot-log"] = json!(log);
    metadata["metadata-log"] = json!([]);
    metadata["current-snapshot-id"] = json!(last);
    metadata["last-sequence-number"] = json!(shape.snapshots);
    metadata["refs"] = json!({"main": {"snapshot-id": last, "type": "branch"}});
    let text = serde_json::to_vec(&metadata).expect("json");
    metadata_bytes += text.len() as u64;
    std::fs::write(dir.join("metadata/v1.metadata.json"), text).expect("write metadata");
    Generated {
        metadata_url: format!("{location}/metadata/v1.metadata.json"),
        manifest_entries: shape.entries,
        list_entries,
        metadata_bytes,
    }
}

/// Makes a template entry an `added` entry of `snapshot_id` for `path`.
fn set_entry(entry: &mut Avro, snapshot_id: i64, path: &str, records: i64, size: i64) {
    avro::set_long(entry, "status", 1);
    avro::set_long(entry, "snapshot_id", snapshot_id);
    let file = avro::field_mut(entry, "data_file").expect("data_file");
    assert!(avro::set_string(file, "file_path", path.to_owned()));
    avro::set_long(file, "record_count", records);
    assert!(avro::set_long(file, "file_size_in_bytes", size));
}

/// Points a delete entry's `file_path` bounds at the files it deletes from.
fn set_path_bounds(entry: &mut Avro, lower: &str, upper: &str) {
    let file = avro::field_mut(entry, "data_file").expect("data_file");
    for (name, value) in [("lower_bounds", lower), ("upper_bounds", upper)] {
        let Some(Avro::Array(pairs)) = avro::field_mut(file, name).map(avro::unwrap_union_mut) else { continue };
        for pair in pairs {
            if avro::long(pair, "key") == Some(i64::from(DELETE_PATH_FIELD_ID))
                && let Some(slot) = avro::field_mut(pair, "value")
            {
                *avro::unwrap_union_mut(slot) = Avro::Bytes(value.as_bytes().to_vec());
            }
        }
    }
}

/// A position-delete file deleting rows of `targets`, sorted by path and position.
fn write_position_deletes(path: &Path, targets: &[String]) -> u64 {
    let field = |name: &str, data_type, id: i32| {
        Field::new(name, data_type, false)
            .with_metadata(std::collections::HashMap::from([("PARQUET:field_id".to_owned(), id.to_string())]))
    };
    let schema = Arc::new(Schema::new(vec![
        field("file_path", DataType::Utf8, DELETE_PATH_FIELD_ID),
        field("pos", DataType::Int64, DELETE_POS_FIELD_ID),
    ]));
    let sorted = targets;
    let per_file = DELETE_ROWS / sorted.len();
    let paths: Vec<&str> = (0..DELETE_ROWS).map(|i| sorted[(i / per_file).min(sorted.len() - 1)].as_str()).collect();
    let positions: Vec<i64> = (0..DELETE_ROWS).map(|i| (i % per_file) as i64 * 3).collect();
    let columns: Vec<ArrayRef> = vec![Arc::new(StringArray::from(paths)), Arc::new(Int64Array::from(positions))];
    let batch = RecordBatch::try_new(schema.clone(), columns).expect("batch");
    let file = std::fs::File::create(path).expect("create");
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema, None).expect("writer");
    writer.write(&batch).expect("write");
    writer.close().expect("close");
    std::fs::metadata(path).expect("size").len()
}
