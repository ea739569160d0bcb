//! Rewriting `metadata.json` as raw JSON.
//!
//! Only the fields that hold paths change: `location`, each snapshot's
//! `manifest-list` (or v1's inline `manifests`), `statistics[*].statistics-path`,
//! `partition-statistics[*].statistics-path`, path-valued properties and the
//! `metadata-log`. Everything else, including fields this code does not know,
//! is left exactly as it was.

use std::collections::BTreeSet;

use serde_json::Value;

use super::{PathMap, RewriteError};

/// Table properties whose values are paths.
pub const PATH_PROPERTIES: [&str; 4] =
    ["write.data.path", "write.metadata.path", "write.object-storage.path", "write.folder-storage.path"];

/// What kind of file a metadata file references.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReferenceKind {
    /// A snapshot's manifest list.
    ManifestList,
    /// A manifest listed inline by a v1 snapshot.
    Manifest,
    /// A table statistics file (Puffin).
    Statistics,
    /// A partition statistics file.
    PartitionStatistics,
}

/// A file referenced by rewritten metadata, with its old and new path.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Reference {
    /// The path in the source.
    pub source: String,
    /// The path in the rewritten file.
    pub target: String,
    /// What it is.
    pub kind: ReferenceKind,
    /// The snapshot it belongs to.
    pub snapshot_id: Option<i64>,
}

/// A rewritten value and the files it references.
#[derive(Debug, Clone, PartialEq)]
pub struct Rewritten<T> {
    /// The rewritten value.
    pub value: T,
    /// Every referenced file, source and target path.
    pub references: Vec<Reference>,
}

/// Rewrites the paths of table metadata read from `found_in`.
///
/// `keep_log_entry` decides, for each `metadata-log` entry (by its source
/// path), whether the file will exist at the target; entries that will not
/// are dropped so the log never dangles.
pub fn rewrite_metadata(
    metadata: &Value,
    map: &PathMap,
    found_in: &str,
    keep_log_entry: &(dyn Fn(&str) -> bool + Sync),
) -> Result<Rewritten<Value>, RewriteError> {
    let invalid = |detail: &str| RewriteError::InvalidMetadata { file: found_in.to_owned(), detail: detail.to_owned() };
    let mut value = metadata.clone();
    let root = value.as_object_mut().ok_or_else(|| invalid("not a JSON object"))?;
    let mut references = Vec::new();

    let location = match root.get("location") {
        None => return Err(invalid("no `location`")),
        Some(location) => location.as_str().ok_or_else(|| invalid("`location` is not a string"))?,
    };
    let location = map.rewrite(location, found_in)?;
    root.insert("location".into(), Value::String(location));

    if let Some(snapshots) = root.get_mut("snapshots") {
        let snapshots = snapshots.as_array_mut().ok_or_else(|| invalid("`snapshots` is not an array"))?;
        for snapshot in snapshots {
            let snapshot = snapshot.as_object_mut().ok_or_else(|| invalid("a snapshot is not an object"))?;
            let snapshot_id = snapshot.get("snapshot-id").and_then(Value::as_i64);
            if snapshot.get("manifest-list").is_some_and(|list| !list.is_string() && !list.is_null()) {
                return Err(invalid("a snapshot's `manifest-list` is not a string"));
            }
            if let Some(list) = snapshot.get("manifest-list").and_then(Value::as_str) {
                let target = map.rewrite(list, found_in)?;
                references.push(Reference {
                    source: list.to_owned(),
                    target: target.clone(),
                    kind: ReferenceKind::ManifestList,
                    snapshot_id,
                });
                snapshot.insert("manifest-list".into(), Value::String(target));
            } else if let Some(manifests) = snapshot.get_mut("manifests").and_then(Value::as_array_mut) {
                for manifest in manifests {
                    let source = manifest.as_str().ok_or_else(|| invalid("a v1 `manifests` entry is not a string"))?;
                    let target = map.rewrite(source, found_in)?;
                    references.push(Reference {
                        source: source.to_owned(),
                        target: target.clone(),
                        kind: ReferenceKind::Manifest,
                        snapshot_id,
                    });
                    *manifest = Value::String(target);
                }
            } else {
                return Err(invalid("a snapshot has neither `manifest-list` nor `manifests`"));
            }
        }
    }

    for (field, kind) in
        [("statistics", ReferenceKind::Statistics), ("partition-statistics", ReferenceKind::PartitionStatistics)]
    {
        let Some(entries) = root.get_mut(field) else { continue };
        let entries = entries.as_array_mut().ok_or_else(|| invalid(&format!("`{field}` is not an array")))?;
        for entry in entries {
            let entry = entry.as_object_mut().ok_or_else(|| invalid(&format!("a `{field}` entry is not an object")))?;
            let snapshot_id = entry.get("snapshot-id").and_then(Value::as_i64);
            let path = entry
                .get("statistics-path")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid(&format!("a `{field}` entry has no `statistics-path`")))?;
            let target = map.rewrite(path, found_in)?;
            references.push(Reference { source: path.to_owned(), target: target.clone(), kind, snapshot_id });
            entry.insert("statistics-path".into(), Value::String(target));
        }
    }

    if let Some(properties) = root.get_mut("properties").and_then(Value::as_object_mut) {
        for key in PATH_PROPERTIES {
            if let Some(path) = properties.get(key).and_then(Value::as_str) {
                let target = map.rewrite(path, &format!("{found_in} (property {key})"))?;
                properties.insert(key.to_owned(), Value::String(target));
            }
        }
    }

    if let Some(log) = root.get_mut("metadata-log") {
        let entries = log.as_array_mut().ok_or_else(|| invalid("`metadata-log` is not an array"))?;
        let mut kept = Vec::with_capacity(entries.len());
        for mut entry in entries.drain(..) {
            let path = match entry.get("metadata-file") {
                Some(Value::String(path)) => path.clone(),
                Some(_) => return Err(invalid("a `metadata-log` entry's `metadata-file` is not a string")),
                None => return Err(invalid("a `metadata-log` entry has no `metadata-file`")),
            };
            if keep_log_entry(&path) {
                let target = map.rewrite(&path, found_in)?;
                if let Some(obj) = entry.as_object_mut() {
                    obj.insert("metadata-file".into(), Value::String(target));
                }
                kept.push(entry);
            }
        }
        *entries = kept;
    }
    Ok(Rewritten { value, references })
}

/// Keeps only the snapshots in `keep` (copy-table `--snapshots current`):
/// removes the others, the refs and log entries that point at them, and their
/// statistics.
pub fn retain_snapshots(metadata: &mut Value, keep: &BTreeSet<i64>) {
    let Some(root) = metadata.as_object_mut() else { return };
    let kept = |v: &Value, field: &str| v.get(field).and_then(Value::as_i64).is_some_and(|id| keep.contains(&id));
    for (field, id_field) in [
        ("snapshots", "snapshot-id"),
        ("snapshot-log", "snapshot-id"),
        ("statistics", "snapshot-id"),
        ("partition-statistics", "snapshot-id"),
    ] {
        if let Some(items) = root.get_mut(field).and_then(Value::as_array_mut) {
            items.retain(|item| kept(item, id_field));
        }
    }
    if let Some(refs) = root.get_mut("refs").and_then(Value::as_object_mut) {
        refs.retain(|_, r| kept(r, "snapshot-id"));
    }
    // A kept snapshot whose parent is gone keeps its parent id: that is
    // history, as after an expiry on the source.
}

/// The ids of every snapshot in the metadata.
pub fn snapshot_ids(metadata: &Value) -> BTreeSet<i64> {
    metadata
        .get("snapshots")
        .and_then(Value::as_array)
        .map(|s| s.iter().filter_map(|s| s.get("snapshot-id").and_then(Value::as_i64)).collect())
        .unwrap_or_default()
}

/// The ids of the table's current snapshot and of every snapshot a ref points at.
pub fn current_snapshot_ids(metadata: &Value) -> BTreeSet<i64> {
    let mut ids = BTreeSet::new();
    if let Some(id) = metadata.get("current-snapshot-id").and_then(Value::as_i64).filter(|id| *id >= 0) {
        ids.insert(id);
    }
    if let Some(refs) = metadata.get("refs").and_then(Value::as_object) {
        ids.extend(refs.values().filter_map(|r| r.get("snapshot-id").and_then(Value::as_i64)));
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn sample() -> Value {
        json!({
            "format-version": 2, "table-uuid": "u", "location": "s3://w/db/t",
            "last-sequence-number": 2, "last-updated-ms": 1, "current-snapshot-id": 2,
            "snapshots": [
                {"snapshot-id": 1, "manifest-list": "s3://w/db/t/metadata/snap-1.avro", "summary": {"operation": "append"}},
                {"snapshot-id": 2, "parent-snapshot-id": 1, "manifest-list": "s3://w/db/t/metadata/snap-2.avro",
                 "summary": {"operation": "append"}, "x-unknown": {"deep": [1, 2]}}
            ],
            "refs": {"main": {"snapshot-id": 2, "type": "branch"}, "old": {"snapshot-id": 1, "type": "tag"}},
            "snapshot-log": [{"snapshot-id": 1, "timestamp-ms": 10}, {"snapshot-id": 2, "timestamp-ms": 20}],
            "statistics": [{"snapshot-id": 2, "statistics-path": "s3://w/db/t/metadata/stats-2.puffin", "file-size-in-bytes": 9}],
            "partition-statistics": [{"snapshot-id": 1, "statistics-path": "s3://w/db/t/metadata/ps-1.parquet", "file-size-in-bytes": 3}],
            "properties": {"write.data.path": "s3://w/db/t/data", "owner": "me"},
            "metadata-log": [{"metadata-file": "s3://w/db/t/metadata/v1.metadata.json", "timestamp-ms": 1},
                             {"metadata-file": "s3://w/db/t/metadata/v2.metadata.json", "timestamp-ms": 2}],
            "some-future-field": {"keep": true}
        })
    }

    #[test]
    fn rewrites_every_path_and_nothing_else() {
        let map = PathMap::from_locations("s3://w/db/t", "file:///r/db/t").expect("valid");
        let out = rewrite_metadata(&sample(), &map, "m.json", &|p| p.ends_with("v2.metadata.json")).expect("rewrites");
        let v = &out.value;
        assert_eq!(v["location"], "file:///r/db/t");
        assert_eq!(v["snapshots"][1]["manifest-list"], "file:///r/db/t/metadata/snap-2.avro");
        assert_eq!(v["statistics"][0]["statistics-path"], "file:///r/db/t/metadata/stats-2.puffin");
        assert_eq!(v["partition-statistics"][0]["statistics-path"], "file:///r/db/t/metadata/ps-1.parquet");
        assert_eq!(v["properties"]["write.data.path"], "file:///r/db/t/data");
        assert_eq!(
            v["metadata-log"],
            json!([{"metadata-file": "file:///r/db/t/metadata/v2.metadata.json", "timestamp-ms": 2}])
        );
        assert_eq!(v["some-future-field"], json!({"keep": true}));
        assert_eq!(v["snapshots"][1]["x-unknown"], json!({"deep": [1, 2]}));
        assert_eq!(v["refs"], sample()["refs"]);
        assert_eq!(out.references.len(), 4);
        assert!(!v.to_string().contains("s3://w/"), "no source path left: {v}");
    }

    #[test]
    fn v1_inline_manifests_are_rewritten() {
        let v1 = json!({"format-version": 1, "location": "s3://w/t",
            "snapshots": [{"snapshot-id": 5, "manifests": ["s3://w/t/metadata/a.avro", "s3://w/t/metadata/b.avro"]}]});
        let map = PathMap::from_locations("s3://w/t", "s3://r/t").expect("valid");
        let out = rewrite_metadata(&v1, &map, "m.json", &|_| true).expect("rewrites");
        assert_eq!(
            out.value["snapshots"][0]["manifests"],
            json!(["s3://r/t/metadata/a.avro", "s3://r/t/metadata/b.avro"])
        );
        assert!(out.references.iter().all(|r| r.kind == ReferenceKind::Manifest && r.snapshot_id == Some(5)));
    }

    #[test]
    fn unmapped_and_invalid_metadata_are_errors() {
        let map = PathMap::from_locations("s3://w/db/t", "s3://r/db/t").expect("valid");
        let mut bad = sample();
        bad["snapshots"][0]["manifest-list"] = json!("s3://other/snap.avro");
        let e = rewrite_metadata(&bad, &map, "s3://w/db/t/metadata/v3.metadata.json", &|_| true).expect_err("unmapped");
        assert!(e.to_string().contains("s3://other/snap.avro"));
        assert!(rewrite_metadata(&json!([1]), &map, "m", &|_| true).is_err());
        assert!(rewrite_metadata(&json!({"snapshots": []}), &map, "m", &|_| true).is_err(), "no location");
    }

    #[test]
    fn retaining_the_current_snapshot_drops_the_rest_consistently() {
        let mut v = sample();
        let keep = BTreeSet::from([2]);
        retain_snapshots(&mut v, &keep);
        assert_eq!(v["snapshots"].as_array().map(Vec::len), Some(1));
        assert_eq!(v["refs"], json!({"main": {"snapshot-id": 2, "type": "branch"}}));
        assert_eq!(v["snapshot-log"], json!([{"snapshot-id": 2, "timestamp-ms": 20}]));
        assert_eq!(v["partition-statistics"], json!([]));
        assert_eq!(current_snapshot_ids(&sample()), BTreeSet::from([1, 2]));
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            "[a-z:/._-]{0,20}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("x-[a-z]{1,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn unknown_fields_survive_and_every_path_is_mapped(extra in arb_json(), snapshot_extra in arb_json()) {
            let mut v = sample();
            v["x-extra"] = extra.clone();
            v["snapshots"][0]["x-extra"] = snapshot_extra.clone();
            let map = PathMap::from_locations("s3://w/db/t", "s3://r/db/t").expect("valid");
            let out = rewrite_metadata(&v, &map, "m", &|_| true).expect("rewrites");
            prop_assert_eq!(&out.value["x-extra"], &extra);
            prop_assert_eq!(&out.value["snapshots"][0]["x-extra"], &snapshot_extra);
            for r in &out.references {
                prop_assert!(r.target.starts_with("s3://r/db/t/"));
                prop_assert_eq!(map.map(&r.source), Some(r.target.clone()));
            }
        }
    }
}
