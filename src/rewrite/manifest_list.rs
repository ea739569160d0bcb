//! Manifest lists (`snap-*.avro`): one record per manifest of a snapshot.
//!
//! Rewriting changes `manifest_path` (field 500) and sets `manifest_length`
//! (field 501) to the size of the rewritten manifest: a stale length makes
//! readers that trust it (Trino) fail. Every other field is kept as decoded.

use std::collections::HashMap;

use super::avro::{self, long, set_long, set_string, string};
use super::{PathMap, RewriteError};

/// `manifest_path`, field id 500.
pub const MANIFEST_PATH: &str = "manifest_path";
/// `manifest_length`, field id 501.
pub const MANIFEST_LENGTH: &str = "manifest_length";
/// `partition_spec_id`, field id 502.
pub const PARTITION_SPEC_ID: &str = "partition_spec_id";
/// `content`, field id 517 (v2+): 0 data, 1 deletes.
pub const CONTENT: &str = "content";
/// `added_snapshot_id`, field id 503.
pub const ADDED_SNAPSHOT_ID: &str = "added_snapshot_id";

const KIND: &str = "manifest list";

/// One manifest as a manifest list describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestFile {
    /// Its path.
    pub path: String,
    /// Its length as recorded.
    pub length: i64,
    /// Whether it lists delete files (v2 `content` = 1).
    pub is_deletes: bool,
    /// The partition spec its entries were written with.
    pub partition_spec_id: i64,
    /// The snapshot that added it.
    pub added_snapshot_id: Option<i64>,
}

/// Lists the manifests of a manifest list.
pub fn list(bytes: &[u8], file: &str) -> Result<Vec<ManifestFile>, RewriteError> {
    let (_, records) = avro::read(bytes, file)?;
    records
        .iter()
        .map(|r| {
            let invalid = |field: &str| RewriteError::InvalidManifest {
                file: file.to_owned(),
                kind: KIND,
                detail: format!("a record has no `{field}`"),
            };
            Ok(ManifestFile {
                path: string(r, MANIFEST_PATH).ok_or_else(|| invalid(MANIFEST_PATH))?.to_owned(),
                length: long(r, MANIFEST_LENGTH).ok_or_else(|| invalid(MANIFEST_LENGTH))?,
                is_deletes: long(r, CONTENT) == Some(1),
                partition_spec_id: long(r, PARTITION_SPEC_ID).unwrap_or(0),
                added_snapshot_id: long(r, ADDED_SNAPSHOT_ID),
            })
        })
        .collect()
}

/// Rewrites a manifest list: each `manifest_path` through `map`, each
/// `manifest_length` from `lengths` (source manifest path to the length of its
/// rewritten copy). A manifest without a known length is an error.
pub fn rewrite(
    bytes: &[u8],
    file: &str,
    map: &PathMap,
    lengths: &HashMap<String, i64>,
) -> Result<Vec<u8>, RewriteError> {
    let (header, mut records) = avro::read(bytes, file)?;
    for record in &mut records {
        let source = string(record, MANIFEST_PATH)
            .ok_or_else(|| RewriteError::InvalidManifest {
                file: file.to_owned(),
                kind: KIND,
                detail: format!("a record has no `{MANIFEST_PATH}`"),
            })?
            .to_owned();
        let length = *lengths.get(&source).ok_or_else(|| RewriteError::InvalidManifest {
            file: file.to_owned(),
            kind: KIND,
            detail: format!("no rewritten length is known for manifest {source}"),
        })?;
        let target = map.rewrite(&source, file)?;
        set_string(record, MANIFEST_PATH, target);
        if !set_long(record, MANIFEST_LENGTH, length) {
            return Err(RewriteError::InvalidManifest {
                file: file.to_owned(),
                kind: KIND,
                detail: format!("`{MANIFEST_LENGTH}` of {source} is not a number"),
            });
        }
    }
    avro::write(&header, &records, file)
}
