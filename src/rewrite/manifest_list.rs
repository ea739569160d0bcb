//! Manifest lists (`snap-*.avro`): one record per manifest of a snapshot.
//!
//! Rewriting changes `manifest_path` (field 500) and sets `manifest_length`
//! (field 501) to the size of the rewritten manifest: a stale length makes
//! readers that trust it (Trino) fail. After a failback with a
//! [`super::SequenceShift`], `sequence_number` and `min_sequence_number`
//! (515, 516) are shifted too. Every other field is kept byte for byte (see
//! [`avro::Records`]).

use std::collections::HashMap;

use super::avro::{self, Edit};
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
/// `sequence_number`, field id 515 (v2+).
pub const SEQUENCE_NUMBER: &str = "sequence_number";
/// `min_sequence_number`, field id 516 (v2+).
pub const MIN_SEQUENCE_NUMBER: &str = "min_sequence_number";

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

/// The fields a copy reads or changes, by slot (see [`avro::Records`]).
const FIELDS: &[&[&str]] = &[
    &[MANIFEST_PATH],
    &[MANIFEST_LENGTH],
    &[CONTENT],
    &[PARTITION_SPEC_ID],
    &[ADDED_SNAPSHOT_ID],
    &[SEQUENCE_NUMBER],
    &[MIN_SEQUENCE_NUMBER],
];
const SLOT_PATH: usize = 0;
const SLOT_LENGTH: usize = 1;
const SLOT_CONTENT: usize = 2;
const SLOT_SPEC_ID: usize = 3;
const SLOT_ADDED_SNAPSHOT_ID: usize = 4;
const SLOT_SEQUENCE_NUMBERS: [usize; 2] = [5, 6];

fn invalid(file: &str, detail: String) -> RewriteError {
    RewriteError::InvalidManifest { file: file.to_owned(), kind: KIND, detail }
}

/// A decoded manifest list, listed and rewritten from one decode.
pub struct ManifestList {
    records: avro::Records,
}

impl ManifestList {
    /// Decodes a manifest list.
    pub fn read(bytes: &[u8], file: &str) -> Result<Self, RewriteError> {
        Ok(Self { records: avro::Records::read(bytes, file, FIELDS)? })
    }

    /// The paths of the manifests it lists (only they are decoded).
    pub fn manifest_paths(&self, file: &str) -> Result<Vec<String>, RewriteError> {
        let fields = self.records.fields(file)?;
        (0..self.records.len())
            .map(|r| match fields.text(r, SLOT_PATH, file)? {
                Some(path) => Ok(path.into_owned()),
                None => Err(invalid(file, format!("a record has no `{MANIFEST_PATH}`"))),
            })
            .collect()
    }

    /// The memory it holds (see [`avro::Records::held_bytes`]).
    pub fn held_bytes(&self) -> usize {
        self.records.held_bytes()
    }

    /// Gives back spare buffer room, to be kept a while.
    pub fn shrink_to_fit(&mut self) {
        self.records.shrink_to_fit();
    }

    /// The manifests it lists.
    pub fn manifests(&self, file: &str) -> Result<Vec<ManifestFile>, RewriteError> {
        let fields = self.records.fields(file)?;
        (0..self.records.len())
            .map(|r| {
                let long = |slot| fields.long(r, slot, file);
                let path = fields
                    .text(r, SLOT_PATH, file)?
                    .ok_or_else(|| invalid(file, format!("a record has no `{MANIFEST_PATH}`")))?
                    .into_owned();
                Ok(ManifestFile {
                    path,
                    length: long(SLOT_LENGTH)?
                        .ok_or_else(|| invalid(file, format!("a record has no `{MANIFEST_LENGTH}`")))?,
                    is_deletes: long(SLOT_CONTENT)? == Some(1),
                    partition_spec_id: long(SLOT_SPEC_ID)?.unwrap_or(0),
                    added_snapshot_id: long(SLOT_ADDED_SNAPSHOT_ID)?,
                })
            })
            .collect()
    }

    /// Rewrites it: each `manifest_path` through `map`, each
    /// `manifest_length` from `lengths` (source manifest path to the length
    /// of its rewritten copy). A manifest without a known length is an error.
    pub fn rewrite(&self, file: &str, map: &PathMap, lengths: &HashMap<String, i64>) -> Result<Vec<u8>, RewriteError> {
        let fields = self.records.fields(file)?;
        fields.write(file, |record, edits| {
            let source = fields
                .text(record, SLOT_PATH, file)?
                .ok_or_else(|| invalid(file, format!("a record has no `{MANIFEST_PATH}`")))?;
            let length = *lengths
                .get(source.as_ref())
                .ok_or_else(|| invalid(file, format!("no rewritten length is known for manifest {source}")))?;
            if fields.long(record, SLOT_LENGTH, file)?.is_none() {
                return Err(invalid(file, format!("`{MANIFEST_LENGTH}` of {source} is not a number")));
            }
            edits.push((SLOT_PATH, Edit::Text(map.rewrite(&source, file)?)));
            edits.push((SLOT_LENGTH, Edit::Long(length)));
            if let Some(shift) = map.sequence_shift() {
                for slot in SLOT_SEQUENCE_NUMBERS {
                    edits.extend(
                        avro::shift_long(fields.value(record, slot, file)?, shift).map(|v| (slot, Edit::Value(v))),
                    );
                }
            }
            Ok(())
        })
    }
}

/// Lists the manifests of a manifest list.
pub fn list(bytes: &[u8], file: &str) -> Result<Vec<ManifestFile>, RewriteError> {
    ManifestList::read(bytes, file)?.manifests(file)
}

/// Rewrites a manifest list (see [`ManifestList::rewrite`]).
pub fn rewrite(
    bytes: &[u8],
    file: &str,
    map: &PathMap,
    lengths: &HashMap<String, i64>,
) -> Result<Vec<u8>, RewriteError> {
    ManifestList::read(bytes, file)?.rewrite(file, map, lengths)
}

#[cfg(test)]
mod tests {
    use apache_avro::Codec;

    use super::*;
    use apache_avro::types::Value;

    use crate::rewrite::avro::{set_long, set_string, string};
    use crate::rewrite::manifest::tests::fixture;

    /// The rewrite as it was done before [`avro::Records`]: every record
    /// decoded into a `Value`, changed, and encoded again.
    fn value_rewrite(bytes: &[u8], file: &str, map: &PathMap, lengths: &HashMap<String, i64>) -> Vec<u8> {
        let (header, mut records) = avro::read(bytes, file).expect("read");
        for record in &mut records {
            let source = string(record, MANIFEST_PATH).expect("path").to_owned();
            set_string(record, MANIFEST_PATH, map.rewrite(&source, file).expect("mapped"));
            assert!(set_long(record, MANIFEST_LENGTH, lengths[&source]));
        }
        avro::write(&header, &records, file).expect("write")
    }

    #[test]
    fn rewrites_are_the_bytes_of_a_full_decode_and_encode() {
        for name in ["pyiceberg_v2", "duckdb_mor_v2", "duckdb_dv_v3"] {
            let (location, lists) = fixture(name, "manifest-list");
            let map = PathMap::from_locations(&location, "s3://copy-bucket/replica/table").expect("map");
            for (path, bytes) in &lists {
                let manifests = list(bytes, path).expect("list");
                let lengths: HashMap<String, i64> = manifests.iter().map(|m| (m.path.clone(), m.length * 3)).collect();
                let out = rewrite(bytes, path, &map, &lengths).expect("rewrite");
                assert_eq!(out, value_rewrite(bytes, path, &map, &lengths), "{path}");
                let again = list(&out, path).expect("list the copy");
                assert_eq!(again.len(), manifests.len());
                for (before, after) in manifests.iter().zip(&again) {
                    assert_eq!(after.path, map.map(&before.path).expect("mapped"));
                    assert_eq!(after.length, before.length * 3);
                    assert_eq!(
                        (after.is_deletes, after.partition_spec_id, after.added_snapshot_id),
                        (before.is_deletes, before.partition_spec_id, before.added_snapshot_id)
                    );
                }
                let mut missing = lengths.clone();
                missing.remove(&manifests[0].path);
                assert!(rewrite(bytes, path, &map, &missing).is_err(), "a manifest without a known length");
            }
        }
    }

    #[test]
    fn a_sequence_shift_moves_the_numbers_above_the_ancestor_and_nothing_else() {
        use crate::rewrite::SequenceShift;
        let numbers = |bytes: &[u8], path: &str| -> Vec<(Option<i64>, Option<i64>)> {
            let (_, records) = avro::read(bytes, path).expect("read");
            records.iter().map(|r| (avro::long(r, SEQUENCE_NUMBER), avro::long(r, MIN_SEQUENCE_NUMBER))).collect()
        };
        let (location, lists) = fixture("pyiceberg_v2", "manifest-list");
        let (path, bytes) = &lists[lists.len() - 1];
        let before = numbers(bytes, path);
        assert!(before.iter().any(|(s, _)| s.is_some_and(|n| n > 1)), "the fixture has several numbers: {before:?}");
        let shift = SequenceShift { above: 1, by: 5 };
        let map = PathMap::from_locations(&location, "s3://copy-bucket/replica/table")
            .expect("map")
            .with_sequence_shift(Some(shift));
        let lengths: HashMap<String, i64> =
            list(bytes, path).expect("list").iter().map(|m| (m.path.clone(), m.length)).collect();
        let out = rewrite(bytes, path, &map, &lengths).expect("rewrite");
        let after = numbers(&out, path);
        let expected: Vec<_> =
            before.iter().map(|(s, m)| (s.map(|n| shift.apply(n)), m.map(|n| shift.apply(n)))).collect();
        assert_eq!(after, expected);
        assert_eq!(list(&out, path).expect("list").len(), lengths.len(), "everything else is kept");
    }

    #[test]
    fn many_manifests_in_many_blocks_with_every_codec() {
        let (location, lists) = fixture("pyiceberg_v2", "manifest-list");
        let map = PathMap::from_locations(&location, "s3://copy-bucket/replica/table").expect("map");
        let (path, bytes) = &lists[lists.len() - 1];
        let (header, records) = avro::read(bytes, path).expect("read");
        let mut lengths = HashMap::new();
        for codec in
            [Codec::Null, Codec::Deflate(Default::default()), Codec::Snappy, Codec::Zstandard(Default::default())]
        {
            let mut header = header.clone();
            header.codec = codec;
            header.metadata.insert("avro.codec".into(), <&str>::from(codec).as_bytes().to_vec());
            let many: Vec<Value> = (0..3_000)
                .map(|i| {
                    let mut r = records[i % records.len()].clone();
                    let p = format!("{location}/metadata/m-{i:05}.avro");
                    lengths.insert(p.clone(), 10_000 + i as i64);
                    assert!(set_string(&mut r, MANIFEST_PATH, p));
                    r
                })
                .collect();
            let bytes = avro::write(&header, &many, path).expect("write");
            let out = rewrite(&bytes, path, &map, &lengths).expect("rewrite");
            assert_eq!(out, value_rewrite(&bytes, path, &map, &lengths), "{codec:?}");
            assert_eq!(list(&out, path).expect("list").len(), 3_000);
        }
    }
}
