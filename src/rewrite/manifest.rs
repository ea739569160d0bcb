//! Manifests: one record per data or delete file.
//!
//! Rewriting changes `data_file.file_path` (field 100),
//! `data_file.referenced_data_file` (field 143), the `file_path` bounds of
//! position-delete files (column 2147483546 in `lower_bounds` / `upper_bounds`:
//! a reader uses them to match delete files to data files, so a stale bound
//! silently un-deletes rows), and `file_size_in_bytes` (field 104) of delete
//! files whose contents were rewritten. After a failback with a
//! [`super::SequenceShift`], explicit `sequence_number` and
//! `file_sequence_number` (fields 3 and 4) are shifted. Everything else
//! (metrics, partition values, `first_row_id`, fields this code does not
//! know) is kept byte for byte: only the changed fields are decoded and encoded
//! (see [`avro::Records`]).

use std::borrow::Cow;
use std::collections::HashMap;

use apache_avro::types::Value;

use super::avro::{self, Edit, field, field_mut, unwrap_union_mut};
use super::{PathMap, RewriteError};

/// `status`, field id 0: 0 existing, 1 added, 2 deleted.
pub const STATUS: &str = "status";
/// `sequence_number`, field id 3: the data sequence number (null: inherited).
pub const SEQUENCE_NUMBER: &str = "sequence_number";
/// `file_sequence_number`, field id 4 (null: inherited).
pub const FILE_SEQUENCE_NUMBER: &str = "file_sequence_number";
/// `data_file`, field id 2.
pub const DATA_FILE: &str = "data_file";
/// `content`, field id 134: 0 data, 1 position deletes, 2 equality deletes.
pub const CONTENT: &str = "content";
/// `file_path`, field id 100.
pub const FILE_PATH: &str = "file_path";
/// `file_format`, field id 101.
pub const FILE_FORMAT: &str = "file_format";
/// `file_size_in_bytes`, field id 104.
pub const FILE_SIZE_IN_BYTES: &str = "file_size_in_bytes";
/// `lower_bounds`, field id 125.
pub const LOWER_BOUNDS: &str = "lower_bounds";
/// `upper_bounds`, field id 128.
pub const UPPER_BOUNDS: &str = "upper_bounds";
/// `referenced_data_file`, field id 143.
pub const REFERENCED_DATA_FILE: &str = "referenced_data_file";
/// The reserved field id of the `file_path` column of position-delete files.
pub const DELETE_FILE_PATH_FIELD_ID: i32 = 2_147_483_546;
/// Field ids under which writers record the bounds of a position-delete
/// file's `file_path` column: the spec's, and the `_file` metadata column's
/// (2147483646), which DuckDB 1.5 uses.
pub const PATH_BOUND_FIELD_IDS: [i32; 2] = [DELETE_FILE_PATH_FIELD_ID, 2_147_483_646];

const KIND: &str = "manifest";

/// What a data-file entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileContent {
    /// Rows.
    Data,
    /// Position deletes (Parquet/Avro/ORC files, or Puffin deletion vectors).
    PositionDeletes,
    /// Equality deletes.
    EqualityDeletes,
}

/// One entry of a manifest, as far as copying it is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    /// Entry status: 0 existing, 1 added, 2 deleted.
    pub status: i64,
    /// The file's path.
    pub path: String,
    /// What it holds.
    pub content: FileContent,
    /// `PARQUET`, `AVRO`, `ORC` or `PUFFIN`.
    pub format: String,
    /// Its recorded size.
    pub size: i64,
}

impl ManifestEntry {
    /// Whether readers of this manifest's snapshot need the file (not a `deleted` entry).
    pub fn is_live(&self) -> bool {
        self.status != 2
    }

    /// Whether the file's contents hold paths and must be rewritten, not copied.
    pub fn needs_rewrite(&self) -> bool {
        self.content == FileContent::PositionDeletes
    }

    /// Whether the file is a Puffin deletion vector.
    pub fn is_deletion_vector(&self) -> bool {
        self.format.eq_ignore_ascii_case("puffin")
    }
}

fn invalid(file: &str, detail: String) -> RewriteError {
    RewriteError::InvalidManifest { file: file.to_owned(), kind: KIND, detail }
}

/// The fields a copy reads or changes, by slot (see [`avro::Records`]).
const FIELDS: &[&[&str]] = &[
    &[STATUS],
    &[DATA_FILE, CONTENT],
    &[DATA_FILE, FILE_PATH],
    &[DATA_FILE, FILE_FORMAT],
    &[DATA_FILE, FILE_SIZE_IN_BYTES],
    &[DATA_FILE, REFERENCED_DATA_FILE],
    &[DATA_FILE, LOWER_BOUNDS],
    &[DATA_FILE, UPPER_BOUNDS],
    &[SEQUENCE_NUMBER],
    &[FILE_SEQUENCE_NUMBER],
];
const SLOT_STATUS: usize = 0;
const SLOT_CONTENT: usize = 1;
const SLOT_FILE_PATH: usize = 2;
const SLOT_FILE_FORMAT: usize = 3;
const SLOT_FILE_SIZE: usize = 4;
const SLOT_REFERENCED: usize = 5;
const SLOT_BOUNDS: [usize; 2] = [6, 7];
const SLOT_SEQUENCE_NUMBERS: [usize; 2] = [8, 9];

/// A decoded manifest: its header and entry records, so that it can be both
/// listed and rewritten from one decode (decoding dominates the cost).
pub struct Manifest {
    records: avro::Records,
}

impl Manifest {
    /// Decodes a manifest.
    pub fn read(bytes: &[u8], file: &str) -> Result<Self, RewriteError> {
        Ok(Self { records: avro::Records::read(bytes, file, FIELDS)? })
    }

    /// Its entries.
    pub fn entries(&self, file: &str) -> Result<Vec<ManifestEntry>, RewriteError> {
        self.entries_where(file, |_, _| true)
    }

    /// The entries whose status and content `keep` accepts; only those have
    /// their path and format decoded.
    pub fn entries_where(
        &self,
        file: &str,
        keep: impl Fn(i64, FileContent) -> bool,
    ) -> Result<Vec<ManifestEntry>, RewriteError> {
        let fields = self.fields(file)?;
        let mut entries = Vec::new();
        for record in 0..self.records.len() {
            let (status, content) = status_and_content(&fields, record, file)?;
            if keep(status, content) {
                entries.push(entry(&fields, record, status, content, file)?);
            }
        }
        Ok(entries)
    }

    /// Rewrites it. `new_sizes` gives, by source path, the size of each
    /// delete file whose contents were rewritten; a live position-delete
    /// entry missing from it is an error (its recorded size would be wrong).
    pub fn rewrite(
        &self,
        file: &str,
        map: &PathMap,
        new_sizes: &HashMap<String, i64>,
    ) -> Result<Vec<u8>, RewriteError> {
        let fields = self.fields(file)?;
        fields.write(file, |record, edits| rewrite_entry(&fields, record, edits, file, map, new_sizes))
    }

    fn fields(&self, file: &str) -> Result<avro::Fields<'_>, RewriteError> {
        let fields = self.records.fields(file)?;
        if !self.records.is_empty() {
            for (slot, name) in [(SLOT_STATUS, STATUS), (SLOT_FILE_PATH, FILE_PATH)] {
                if !fields.has(slot) {
                    return Err(invalid(file, format!("an entry has no `{name}`")));
                }
            }
        }
        Ok(fields)
    }
}

/// Lists a manifest's entries.
pub fn list(bytes: &[u8], file: &str) -> Result<Vec<ManifestEntry>, RewriteError> {
    Manifest::read(bytes, file)?.entries(file)
}

/// Rewrites a manifest (see [`Manifest::rewrite`]).
pub fn rewrite(
    bytes: &[u8],
    file: &str,
    map: &PathMap,
    new_sizes: &HashMap<String, i64>,
) -> Result<Vec<u8>, RewriteError> {
    Manifest::read(bytes, file)?.rewrite(file, map, new_sizes)
}

fn status_and_content(
    fields: &avro::Fields<'_>,
    record: usize,
    file: &str,
) -> Result<(i64, FileContent), RewriteError> {
    let long = |slot| fields.long(record, slot, file);
    let status = long(SLOT_STATUS)?.ok_or_else(|| invalid(file, format!("an entry has no `{STATUS}`")))?;
    let content = match long(SLOT_CONTENT)?.unwrap_or(0) {
        0 => FileContent::Data,
        1 => FileContent::PositionDeletes,
        2 => FileContent::EqualityDeletes,
        other => return Err(invalid(file, format!("unknown data_file content {other}"))),
    };
    Ok((status, content))
}

fn entry(
    fields: &avro::Fields<'_>,
    record: usize,
    status: i64,
    content: FileContent,
    file: &str,
) -> Result<ManifestEntry, RewriteError> {
    let string =
        |slot| -> Result<Option<String>, RewriteError> { Ok(fields.text(record, slot, file)?.map(Cow::into_owned)) };
    Ok(ManifestEntry {
        status,
        path: string(SLOT_FILE_PATH)?.ok_or_else(|| invalid(file, format!("an entry has no `{FILE_PATH}`")))?,
        content,
        format: string(SLOT_FILE_FORMAT)?.unwrap_or_else(|| "PARQUET".to_owned()),
        size: fields.long(record, SLOT_FILE_SIZE, file)?.unwrap_or(0),
    })
}

fn rewrite_entry(
    fields: &avro::Fields<'_>,
    record: usize,
    edits: &mut Vec<(usize, Edit)>,
    file: &str,
    map: &PathMap,
    new_sizes: &HashMap<String, i64>,
) -> Result<(), RewriteError> {
    let status = fields.long(record, SLOT_STATUS, file)?.unwrap_or(0);
    let source = fields
        .text(record, SLOT_FILE_PATH, file)?
        .ok_or_else(|| invalid(file, format!("an entry has no `{FILE_PATH}`")))?;
    edits.push((SLOT_FILE_PATH, Edit::Text(map.rewrite(&source, file)?)));
    // DuckDB writes an empty string rather than null when there is none.
    if let Some(referenced) = fields.text(record, SLOT_REFERENCED, file)?.filter(|r| !r.is_empty()) {
        edits.push((SLOT_REFERENCED, Edit::Text(map.rewrite(&referenced, file)?)));
    }
    if let Some(shift) = map.sequence_shift() {
        for slot in SLOT_SEQUENCE_NUMBERS {
            edits.extend(avro::shift_long(fields.value(record, slot, file)?, shift).map(|v| (slot, Edit::Value(v))));
        }
    }
    if fields.long(record, SLOT_CONTENT, file)? == Some(1) {
        let mut bounds = [None, None];
        for (slot, value) in SLOT_BOUNDS.into_iter().zip(&mut bounds) {
            *value = fields.value(record, slot, file)?;
        }
        if rewrite_path_bounds(&mut bounds, map) {
            for (slot, value) in SLOT_BOUNDS.into_iter().zip(bounds) {
                edits.extend(value.map(|v| (slot, Edit::Value(v))));
            }
        }
        if status != 2 {
            let size = *new_sizes
                .get(source.as_ref())
                .ok_or_else(|| invalid(file, format!("no rewritten size is known for delete file {source}")))?;
            if fields.long(record, SLOT_FILE_SIZE, file)?.is_none() {
                return Err(invalid(file, format!("`{FILE_SIZE_IN_BYTES}` of {source} is not a number")));
            }
            edits.push((SLOT_FILE_SIZE, Edit::Long(size)));
        }
    }
    Ok(())
}

/// Rewrites the `file_path` column bounds of a position-delete file (the
/// `lower_bounds` and `upper_bounds` fields); returns whether any is
/// changed. A bound that does not map as a path (a truncated one) is
/// removed: a missing bound only means "unknown" to readers, while a stale
/// one hides deletes.
fn rewrite_path_bounds(bounds: &mut [Option<Value>], map: &PathMap) -> bool {
    let is_path_column =
        |item: &Value| matches!(field(item, "key"), Some(Value::Int(id)) if PATH_BOUND_FIELD_IDS.contains(id));
    let mut changed = false;
    let mut drop_bounds = false;
    for value in bounds.iter_mut().flatten() {
        let Value::Array(items) = unwrap_union_mut(value) else { continue };
        for item in items.iter_mut() {
            if !is_path_column(item) {
                continue;
            }
            let Some(Value::Bytes(raw)) = field_mut(item, "value") else { continue };
            match std::str::from_utf8(raw).ok().and_then(|p| map.map(p)) {
                Some(mapped) => *raw = mapped.into_bytes(),
                None => drop_bounds = true,
            }
            changed = true;
        }
    }
    if drop_bounds {
        for value in bounds.iter_mut().flatten() {
            if let Value::Array(items) = unwrap_union_mut(value) {
                items.retain(|item| !is_path_column(item));
            }
        }
    }
    changed
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::Path;

    use apache_avro::Codec;

    use super::*;
    use crate::rewrite::avro::{long, set_long, set_string, string};

    /// The manifests of a fixture table (`tests/fixtures/`), with its location.
    pub(crate) fn fixture(name: &str, role: &str) -> (String, Vec<(String, Vec<u8>)>) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("index.json")).expect("index")).expect("json");
        let mut files: Vec<(String, Vec<u8>)> = index["files"]
            .as_object()
            .expect("files")
            .iter()
            .filter(|(_, r)| *r == role)
            .map(|(p, _)| (p.clone(), std::fs::read(dir.join(p.rsplit('/').next().expect("name"))).expect("file")))
            .collect();
        files.sort();
        (index["location"].as_str().expect("location").to_owned(), files)
    }

    /// The rewrite as it was done before [`avro::Records`]: every record
    /// decoded into a `Value`, changed, and encoded again.
    fn value_rewrite(bytes: &[u8], file: &str, map: &PathMap, new_sizes: &HashMap<String, i64>) -> Vec<u8> {
        let (header, mut records) = avro::read(bytes, file).expect("read");
        for record in &mut records {
            let status = long(record, STATUS).unwrap_or(0);
            let data_file = field_mut(record, DATA_FILE).expect("data_file");
            let source = string(data_file, FILE_PATH).expect("file_path").to_owned();
            set_string(data_file, FILE_PATH, map.rewrite(&source, file).expect("mapped"));
            if let Some(referenced) =
                string(data_file, REFERENCED_DATA_FILE).filter(|r| !r.is_empty()).map(str::to_owned)
            {
                set_string(data_file, REFERENCED_DATA_FILE, map.rewrite(&referenced, file).expect("mapped"));
            }
            if long(data_file, CONTENT) == Some(1) {
                let mut bounds = [LOWER_BOUNDS, UPPER_BOUNDS].map(|n| field(data_file, n).cloned());
                rewrite_path_bounds(&mut bounds, map);
                for (name, value) in [LOWER_BOUNDS, UPPER_BOUNDS].into_iter().zip(bounds) {
                    if let (Some(slot), Some(value)) = (field_mut(data_file, name), value) {
                        *slot = value;
                    }
                }
                if status != 2 {
                    assert!(set_long(data_file, FILE_SIZE_IN_BYTES, new_sizes[&source]));
                }
            }
        }
        avro::write(&header, &records, file).expect("write")
    }

    #[test]
    fn a_sequence_shift_moves_explicit_numbers_above_the_ancestor() {
        use crate::rewrite::SequenceShift;
        let (location, manifests) = fixture("pyiceberg_v2", "manifest");
        let (path, bytes) = &manifests[0];
        let (header, mut records) = avro::read(bytes, path).expect("read");
        // Explicit numbers, as a carried-over (existing) entry has them: 1 and 4.
        for (i, record) in records.iter_mut().enumerate() {
            for name in [SEQUENCE_NUMBER, FILE_SEQUENCE_NUMBER] {
                *field_mut(record, name).expect("field") =
                    Value::Union(1, Box::new(Value::Long(1 + 3 * (i as i64 % 2))));
            }
        }
        let bytes = avro::write(&header, &records, path).expect("write");
        let map = PathMap::from_locations(&location, "s3://copy-bucket/replica/table")
            .expect("map")
            .with_sequence_shift(Some(SequenceShift { above: 2, by: 10 }));
        let sizes: HashMap<String, i64> = HashMap::new();
        let out = rewrite(&bytes, path, &map, &sizes).expect("rewrite");
        let (_, after) = avro::read(&out, path).expect("read");
        for (i, record) in after.iter().enumerate() {
            let expected = if i % 2 == 0 { 1 } else { 14 };
            assert_eq!(long(record, SEQUENCE_NUMBER), Some(expected), "entry {i}");
            assert_eq!(long(record, FILE_SEQUENCE_NUMBER), Some(expected), "entry {i}");
        }
    }

    #[test]
    fn rewrites_are_the_bytes_of_a_full_decode_and_encode() {
        for name in ["pyiceberg_v2", "duckdb_mor_v2", "duckdb_dv_v3"] {
            let (location, manifests) = fixture(name, "manifest");
            let map = PathMap::from_locations(&location, "s3://copy-bucket/replica/table").expect("map");
            for (path, bytes) in &manifests {
                let entries = list(bytes, path).expect("entries");
                assert!(!entries.is_empty(), "{path}");
                let sizes: HashMap<String, i64> = entries.iter().map(|e| (e.path.clone(), 4242 + e.size)).collect();
                let out = rewrite(bytes, path, &map, &sizes).expect("rewrite");
                assert_eq!(out, value_rewrite(bytes, path, &map, &sizes), "{path}");
                let again = list(&out, path).expect("entries of the copy");
                for (before, after) in entries.iter().zip(&again) {
                    assert_eq!(after.path, map.map(&before.path).expect("mapped"));
                    let size =
                        if before.needs_rewrite() && before.is_live() { 4242 + before.size } else { before.size };
                    assert_eq!(
                        (after.status, after.content, &after.format, after.size),
                        (before.status, before.content, &before.format, size)
                    );
                }
            }
        }
    }

    #[test]
    fn many_entries_in_many_blocks_with_every_codec() {
        let (location, manifests) = fixture("duckdb_mor_v2", "manifest");
        let map = PathMap::from_locations(&location, "s3://copy-bucket/replica/table").expect("map");
        let mut sizes = HashMap::new();
        for (path, bytes) in &manifests {
            let (header, records) = avro::read(bytes, path).expect("read");
            let codecs =
                [Codec::Null, Codec::Deflate(Default::default()), Codec::Snappy, Codec::Zstandard(Default::default())];
            for codec in codecs {
                let mut header = header.clone();
                header.codec = codec;
                header.metadata.insert("avro.codec".into(), <&str>::from(codec).as_bytes().to_vec());
                let many: Vec<Value> = (0..1_500)
                    .map(|i| {
                        let mut r = records[i % records.len()].clone();
                        let data_file = field_mut(&mut r, DATA_FILE).expect("data_file");
                        let p = format!(
                            "{location}/data/{i:05}-{}",
                            string(data_file, FILE_PATH).expect("path").rsplit('/').next().expect("name")
                        );
                        sizes.insert(p.clone(), i as i64);
                        assert!(set_string(data_file, FILE_PATH, p));
                        r
                    })
                    .collect();
                let bytes = avro::write(&header, &many, path).expect("write");
                assert_eq!(
                    rewrite(&bytes, path, &map, &sizes).expect("rewrite"),
                    value_rewrite(&bytes, path, &map, &sizes),
                    "{path} {codec:?}"
                );
            }
        }
    }
}
