//! The rewriters on tables written by real writers (`tests/fixtures/`, made by
//! `tests/fixtures/make_fixtures.sh`): PyIceberg v2 with schema and partition
//! evolution, DuckDB v2 merge-on-read position deletes, DuckDB v3 deletion vectors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use apache_avro::types::Value as Avro;
use serde_json::Value;

use super::*;

pub(super) const TARGET: &str = "s3://copy-bucket/replica/table";

/// A fixture table: its directory and its `index.json` (source path to role).
pub(super) struct Fixture {
    dir: PathBuf,
    index: Value,
}

impl Fixture {
    pub(super) fn load(name: &str) -> Self {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
        let index: Value =
            serde_json::from_slice(&std::fs::read(dir.join("index.json")).expect("index.json")).expect("json");
        Self { dir, index }
    }

    pub(super) fn location(&self) -> &str {
        self.index["location"].as_str().expect("location")
    }

    pub(super) fn read(&self, path: &str) -> Vec<u8> {
        let name = path.rsplit('/').next().expect("name");
        std::fs::read(self.dir.join(name)).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    pub(super) fn paths(&self, role: &str) -> Vec<String> {
        let files = self.index["files"].as_object().expect("files");
        let mut paths: Vec<String> = files.iter().filter(|(_, r)| *r == role).map(|(p, _)| p.clone()).collect();
        paths.sort();
        paths
    }
}

/// Everything a table copy would write, rewritten in memory, by source path.
struct Copy {
    map: PathMap,
    files: HashMap<String, Vec<u8>>,
    delete_sizes: HashMap<String, i64>,
    manifest_lengths: HashMap<String, i64>,
}

fn copy(f: &Fixture) -> Copy {
    let map = PathMap::from_locations(f.location(), TARGET).expect("map");
    let mut files = HashMap::new();
    let mut delete_sizes = HashMap::new();
    for path in f.paths("position-deletes") {
        let out = position_deletes::rewrite(&f.read(&path), &path, &map).expect("position deletes");
        delete_sizes.insert(path.clone(), out.len() as i64);
        files.insert(path, out);
    }
    for path in f.paths("puffin") {
        let out = puffin::rewrite(&f.read(&path), &path, &map).expect("puffin");
        delete_sizes.insert(path.clone(), out.len() as i64);
        files.insert(path, out);
    }
    let mut manifest_lengths = HashMap::new();
    for path in f.paths("manifest") {
        let out = manifest::rewrite(&f.read(&path), &path, &map, &delete_sizes).expect("manifest");
        manifest_lengths.insert(path.clone(), out.len() as i64);
        files.insert(path, out);
    }
    for path in f.paths("manifest-list") {
        let out = manifest_list::rewrite(&f.read(&path), &path, &map, &manifest_lengths).expect("manifest list");
        files.insert(path, out);
    }
    for path in f.paths("metadata") {
        let value: Value = serde_json::from_slice(&f.read(&path)).expect("metadata");
        let out = metadata::rewrite_metadata(&value, &map, &path, &|_| false).expect("metadata");
        files.insert(path, serde_json::to_vec(&out.value).expect("json"));
    }
    Copy { map, files, delete_sizes, manifest_lengths }
}

/// Every string and byte string inside an Avro value.
fn avro_strings(v: &Avro, out: &mut Vec<String>) {
    match v {
        Avro::String(s) => out.push(s.clone()),
        Avro::Bytes(b) | Avro::Fixed(_, b) => out.push(String::from_utf8_lossy(b).into_owned()),
        Avro::Union(_, inner) => avro_strings(inner, out),
        Avro::Array(items) => items.iter().for_each(|i| avro_strings(i, out)),
        Avro::Map(m) => m.values().for_each(|i| avro_strings(i, out)),
        Avro::Record(fields) => fields.iter().for_each(|(_, i)| avro_strings(i, out)),
        _ => {}
    }
}

/// Replaces every occurrence of the target prefix by the source prefix, and
/// zeroes the lengths and sizes a rewrite is meant to change.
fn normalise(v: &mut Avro, from: &str, to: &str) {
    match v {
        Avro::String(s) if !from.is_empty() && s.starts_with(from) => *s = format!("{to}{}", &s[from.len()..]),
        Avro::Bytes(b) if !from.is_empty() && b.starts_with(from.as_bytes()) => {
            let rest = b[from.len()..].to_vec();
            *b = [to.as_bytes(), &rest].concat();
        }
        Avro::Union(_, inner) => normalise(inner, from, to),
        Avro::Array(items) => items.iter_mut().for_each(|i| normalise(i, from, to)),
        Avro::Map(m) => m.values_mut().for_each(|i| normalise(i, from, to)),
        Avro::Record(fields) => {
            for (name, value) in fields.iter_mut() {
                if name == "manifest_length" || name == "file_size_in_bytes" {
                    *value = Avro::Null;
                } else {
                    normalise(value, from, to);
                }
            }
        }
        _ => {}
    }
}

fn check(name: &str) {
    let f = Fixture::load(name);
    let c = copy(&f);
    let source = f.location().to_owned();
    assert!(!f.paths("manifest").is_empty() && !f.paths("manifest-list").is_empty(), "{name}: fixture is empty");

    for (path, bytes) in &c.files {
        let role = f.index["files"][path].as_str().expect("role");
        let mut strings = Vec::new();
        match role {
            "manifest" | "manifest-list" => {
                let (header, records) = avro::read(bytes, path).expect("rewritten avro reads");
                let (original_header, mut original) = avro::read(&f.read(path), path).expect("original reads");
                assert_eq!(header.metadata, original_header.metadata, "{path}: header kept verbatim");
                records.iter().for_each(|r| avro_strings(r, &mut strings));
                // Everything but paths, lengths and sizes is exactly what it was.
                let mut rewritten = records.clone();
                rewritten.iter_mut().for_each(|r| normalise(r, TARGET, &source));
                original.iter_mut().for_each(|r| normalise(r, "", ""));
                assert_eq!(rewritten, original, "{path}: only paths, lengths and sizes changed");
            }
            "metadata" => strings.push(String::from_utf8_lossy(bytes).into_owned()),
            "puffin" => strings.extend(puffin::referenced_files(bytes, path).expect("footer")),
            "position-deletes" => strings.push(String::from_utf8_lossy(bytes).into_owned()),
            other => panic!("unexpected role {other}"),
        }
        for s in &strings {
            assert!(!s.contains(&source), "{name}: {path} still holds a source path: {s}");
        }
    }

    // Every recorded length and size is the real size of the rewritten file.
    for path in f.paths("manifest-list") {
        for m in manifest_list::list(&c.files[&path], &path).expect("list") {
            let source_path =
                c.files.keys().find(|p| c.map.map(p).as_deref() == Some(m.path.as_str())).expect("known manifest");
            assert_eq!(m.length, c.files[source_path].len() as i64, "manifest_length of {}", m.path);
            assert_eq!(c.manifest_lengths[source_path], m.length);
        }
    }
    for path in f.paths("manifest") {
        for e in manifest::list(&c.files[&path], &path).expect("entries") {
            if e.needs_rewrite() && e.is_live() {
                let source_path =
                    c.delete_sizes.keys().find(|p| c.map.map(p).as_deref() == Some(e.path.as_str())).expect("known");
                assert_eq!(e.size, c.files[source_path].len() as i64, "file_size_in_bytes of {}", e.path);
            }
        }
    }
}

#[test]
fn pyiceberg_v2_with_schema_and_partition_evolution() {
    check("pyiceberg_v2");
}

#[test]
fn duckdb_v2_merge_on_read_position_deletes() {
    let f = Fixture::load("duckdb_mor_v2");
    assert!(!f.paths("position-deletes").is_empty(), "the fixture has position-delete files");
    check("duckdb_mor_v2");
}

#[test]
fn duckdb_v3_deletion_vectors() {
    let f = Fixture::load("duckdb_dv_v3");
    assert!(!f.paths("puffin").is_empty(), "the fixture has deletion vectors");
    check("duckdb_dv_v3");
}

#[test]
fn truncated_and_corrupted_real_manifests_are_errors() {
    let f = Fixture::load("pyiceberg_v2");
    let map = PathMap::from_locations(f.location(), TARGET).expect("map");
    for path in f.paths("manifest").into_iter().take(2) {
        let bytes = f.read(&path);
        for cut in [0, 7, 64, bytes.len() / 3, bytes.len() - 5] {
            assert!(manifest::rewrite(&bytes[..cut], &path, &map, &HashMap::new()).is_err(), "{path} cut at {cut}");
        }
        let mut corrupt = bytes.clone();
        let n = corrupt.len();
        corrupt[n / 2..n / 2 + 32].fill(0xee);
        assert!(manifest::list(&corrupt, &path).is_err(), "{path} corrupted");
    }
}
