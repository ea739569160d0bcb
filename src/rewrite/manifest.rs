//! Manifests: one record per data or delete file.
//!
//! Rewriting changes `data_file.file_path` (field 100),
//! `data_file.referenced_data_file` (field 143), the `file_path` bounds of
//! position-delete files (column 2147483546 in `lower_bounds` / `upper_bounds`:
//! a reader uses them to match delete files to data files, so a stale bound
//! silently un-deletes rows), and `file_size_in_bytes` (field 104) of delete
//! files whose contents were rewritten. Everything else (metrics, partition
//! values, sequence numbers, `first_row_id`, fields this code does not know)
//! is kept exactly as decoded.

use std::collections::HashMap;

use apache_avro::types::Value;

use super::avro::{self, field, field_mut, long, set_long, set_string, string, unwrap_union_mut};
use super::{PathMap, RewriteError};

/// `status`, field id 0: 0 existing, 1 added, 2 deleted.
pub const STATUS: &str = "status";
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

/// A decoded manifest: its header and entry records, so that it can be both
/// listed and rewritten from one decode (decoding dominates the cost).
pub struct Manifest {
    header: avro::Header,
    records: Vec<Value>,
}

impl Manifest {
    /// Decodes a manifest.
    pub fn read(bytes: &[u8], file: &str) -> Result<Self, RewriteError> {
        let (header, records) = avro::read(bytes, file)?;
        Ok(Self { header, records })
    }

    /// Its entries.
    pub fn entries(&self, file: &str) -> Result<Vec<ManifestEntry>, RewriteError> {
        self.records.iter().map(|r| entry(r, file)).collect()
    }

    /// Rewrites it. `new_sizes` gives, by source path, the size of each
    /// delete file whose contents were rewritten; a live position-delete
    /// entry missing from it is an error (its recorded size would be wrong).
    pub fn rewrite(
        mut self,
        file: &str,
        map: &PathMap,
        new_sizes: &HashMap<String, i64>,
    ) -> Result<Vec<u8>, RewriteError> {
        for record in &mut self.records {
            rewrite_entry(record, file, map, new_sizes)?;
        }
        avro::write(&self.header, &self.records, file)
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

fn entry(record: &Value, file: &str) -> Result<ManifestEntry, RewriteError> {
    let data_file = field(record, DATA_FILE).ok_or_else(|| invalid(file, format!("an entry has no `{DATA_FILE}`")))?;
    let content = match long(data_file, CONTENT).unwrap_or(0) {
        0 => FileContent::Data,
        1 => FileContent::PositionDeletes,
        2 => FileContent::EqualityDeletes,
        other => return Err(invalid(file, format!("unknown data_file content {other}"))),
    };
    Ok(ManifestEntry {
        status: long(record, STATUS).ok_or_else(|| invalid(file, format!("an entry has no `{STATUS}`")))?,
        path: string(data_file, FILE_PATH)
            .ok_or_else(|| invalid(file, format!("an entry has no `{FILE_PATH}`")))?
            .to_owned(),
        content,
        format: string(data_file, FILE_FORMAT).unwrap_or("PARQUET").to_owned(),
        size: long(data_file, FILE_SIZE_IN_BYTES).unwrap_or(0),
    })
}

fn rewrite_entry(
    record: &mut Value,
    file: &str,
    map: &PathMap,
    new_sizes: &HashMap<String, i64>,
) -> Result<(), RewriteError> {
    let status = long(record, STATUS).unwrap_or(0);
    let data_file =
        field_mut(record, DATA_FILE).ok_or_else(|| invalid(file, format!("an entry has no `{DATA_FILE}`")))?;
    let source =
        string(data_file, FILE_PATH).ok_or_else(|| invalid(file, format!("an entry has no `{FILE_PATH}`")))?.to_owned();
    set_string(data_file, FILE_PATH, map.rewrite(&source, file)?);
    // DuckDB writes an empty string rather than null when there is none.
    if let Some(referenced) = string(data_file, REFERENCED_DATA_FILE).filter(|r| !r.is_empty()).map(str::to_owned) {
        set_string(data_file, REFERENCED_DATA_FILE, map.rewrite(&referenced, file)?);
    }
    if long(data_file, CONTENT) == Some(1) {
        rewrite_path_bounds(data_file, map);
        if status != 2 {
            let size = *new_sizes
                .get(&source)
                .ok_or_else(|| invalid(file, format!("no rewritten size is known for delete file {source}")))?;
            if !set_long(data_file, FILE_SIZE_IN_BYTES, size) {
                return Err(invalid(file, format!("`{FILE_SIZE_IN_BYTES}` of {source} is not a number")));
            }
        }
    }
    Ok(())
}

/// Rewrites the `file_path` column bounds of a position-delete file. A bound
/// that does not map as a path (a truncated one) is removed: a missing bound
/// only means "unknown" to readers, while a stale one hides deletes.
fn rewrite_path_bounds(data_file: &mut Value, map: &PathMap) {
    let mut drop_bounds = false;
    for name in [LOWER_BOUNDS, UPPER_BOUNDS] {
        let Some(bounds) = field_mut(data_file, name).map(unwrap_union_mut) else { continue };
        let Value::Array(items) = bounds else { continue };
        for item in items.iter_mut() {
            let is_path_column =
                matches!(field(item, "key"), Some(Value::Int(id)) if PATH_BOUND_FIELD_IDS.contains(id));
            if !is_path_column {
                continue;
            }
            let Some(Value::Bytes(raw)) = field_mut(item, "value") else { continue };
            match std::str::from_utf8(raw).ok().and_then(|p| map.map(p)) {
                Some(mapped) => *raw = mapped.into_bytes(),
                None => drop_bounds = true,
            }
        }
    }
    if drop_bounds {
        for name in [LOWER_BOUNDS, UPPER_BOUNDS] {
            if let Some(Value::Array(items)) = field_mut(data_file, name).map(unwrap_union_mut) {
                items.retain(
                    |item| !matches!(field(item, "key"), Some(Value::Int(id)) if PATH_BOUND_FIELD_IDS.contains(id)),
                );
            }
        }
    }
}
