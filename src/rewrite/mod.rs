//! Path rewriting of Iceberg table files, pure and free of I/O.
//!
//! A replica (or a table copy) must not contain a single path that points at
//! the source's storage, and must keep everything else exactly. Each file
//! format gets its own module, working on the raw representation so that
//! fields icerelay does not know survive untouched:
//!
//! - [`path_map`]: [`PathMap`], source prefix to target prefix, longest first.
//! - [`metadata`]: `metadata.json` as `serde_json::Value`.
//! - [`avro`]: reading and writing Avro container files with the writer schema
//!   and every header key kept verbatim (the base of the two below).
//! - [`manifest_list`] and [`manifest`]: Avro manifest lists and manifests.
//! - [`position_deletes`]: Parquet position-delete files.
//! - [`puffin`]: deletion-vector Puffin files (Iceberg v3).
//! - [`sequence`]: sequence numbers shifted on a replica after a failback.
//!
//! Everything takes values or bytes and returns values or bytes; reading and
//! writing storage is the caller's business (`storage`, `table_copy`).

pub mod avro;
pub mod manifest;
pub mod manifest_list;
pub mod metadata;
pub mod path_map;
pub mod position_deletes;
pub mod puffin;
pub mod sequence;

pub use path_map::PathMap;
pub use sequence::SequenceShift;

/// Why a file could not be rewritten.
#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    /// A mapping pair is unusable.
    #[error("invalid path mapping {from:?} -> {to:?}: both sides must be absolute URLs or paths")]
    InvalidMapping {
        /// Source prefix.
        from: String,
        /// Target prefix.
        to: String,
    },
    /// A path that no mapping covers.
    #[error(
        "path {path} (in {found_in}) is not under any mapped prefix ({}); add a mapping for it (--map FROM=TO)",
        if prefixes.is_empty() { "no mappings".to_owned() } else { prefixes.join(", ") }
    )]
    UnmappedPath {
        /// The path.
        path: String,
        /// The file it was found in.
        found_in: String,
        /// The source prefixes that are mapped.
        prefixes: Vec<String>,
    },
    /// `metadata.json` is not valid table metadata.
    #[error("{file} is not valid Iceberg table metadata: {detail}")]
    InvalidMetadata {
        /// The file.
        file: String,
        /// What is wrong.
        detail: String,
    },
    /// An Avro file could not be decoded or encoded.
    #[error("{file} is not a readable Avro file (corrupt or truncated?): {source}")]
    Avro {
        /// The file.
        file: String,
        /// Cause.
        #[source]
        source: Box<apache_avro::Error>,
    },
    /// An Avro file's structure contradicts itself or its size (a length,
    /// count or block running past the end, a schema that cannot describe it).
    #[error("{file} is not a readable Avro file (corrupt or truncated?): {detail}")]
    CorruptAvro {
        /// The file.
        file: String,
        /// What is wrong, and where.
        detail: String,
    },
    /// An Avro manifest or manifest list lacks a field the spec requires.
    #[error("{file} is not a valid Iceberg {kind}: {detail}")]
    InvalidManifest {
        /// The file.
        file: String,
        /// `manifest` or `manifest list`.
        kind: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// A Parquet delete file could not be read or written.
    #[error("{file} is not a readable Parquet position-delete file (corrupt or truncated?): {detail}")]
    Parquet {
        /// The file.
        file: String,
        /// Cause.
        detail: String,
    },
    /// A Puffin file could not be read.
    #[error("{file} is not a readable Puffin file: {detail}")]
    Puffin {
        /// The file.
        file: String,
        /// What is wrong.
        detail: String,
    },
}

impl RewriteError {
    pub(crate) fn avro(file: &str, source: apache_avro::Error) -> Self {
        Self::Avro { file: file.to_owned(), source: Box::new(source) }
    }
}

#[cfg(test)]
mod fixture_tests;
#[cfg(test)]
mod mutation_tests;
