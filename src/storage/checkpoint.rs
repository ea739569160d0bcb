//! Copy checkpoints: the record of files already copied and verified.
//!
//! A checkpoint is written only after a copy was verified, so after a crash
//! (or Ctrl-C) a rerun skips exactly the files that are done. `copy-table`
//! keeps them in a JSON-lines journal on local disk; replication keeps them in
//! its state store, per destination. A lost checkpoint costs one `HEAD` (the
//! target is found complete and not copied again), never correctness.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::state::{CopiedFile, StateError, StateStore};

/// Why a checkpoint could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The journal file failed.
    #[error("copy journal {path}: {source}")]
    Journal {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The state store failed.
    #[error(transparent)]
    State(#[from] StateError),
}

/// Where verified copies are recorded.
#[async_trait]
pub trait CopyCheckpoints: Send + Sync {
    /// The recorded copy of `source`, if any.
    async fn get(&self, source: &str) -> Result<Option<CopiedFile>, CheckpointError>;
    /// Records a verified copy of `source`.
    async fn put(&self, source: &str, file: CopiedFile) -> Result<(), CheckpointError>;
}

/// Records nothing (every file is checked against the target instead).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoCheckpoints;

#[async_trait]
impl CopyCheckpoints for NoCheckpoints {
    async fn get(&self, _source: &str) -> Result<Option<CopiedFile>, CheckpointError> {
        Ok(None)
    }

    async fn put(&self, _source: &str, _file: CopiedFile) -> Result<(), CheckpointError> {
        Ok(())
    }
}

#[derive(Serialize, Deserialize)]
struct JournalLine {
    source: String,
    target: String,
    size: u64,
    checksum: Option<String>,
}

/// An append-only JSON-lines journal file.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    entries: Mutex<(HashMap<String, CopiedFile>, std::fs::File)>,
}

impl Journal {
    /// Opens (creating) the journal at `path` and loads its records. A torn
    /// last line (a crash mid-write) is ignored.
    pub fn open(path: &Path) -> Result<Self, CheckpointError> {
        let err = |source| CheckpointError::Journal { path: path.display().to_string(), source };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(err)?;
        }
        let mut entries = HashMap::new();
        if path.exists() {
            let file = std::fs::File::open(path).map_err(err)?;
            for line in std::io::BufReader::new(file).lines() {
                let line = line.map_err(err)?;
                if let Ok(l) = serde_json::from_str::<JournalLine>(&line) {
                    entries.insert(l.source, CopiedFile { target: l.target, size: l.size, checksum: l.checksum });
                }
            }
        }
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(err)?;
        // After a torn last line, start the next record on a line of its own.
        let ends_cleanly = std::fs::read(path).map_err(err)?.last().is_none_or(|b| *b == b'\n');
        if !ends_cleanly {
            file.write_all(b"\n").map_err(err)?;
        }
        Ok(Self { path: path.to_owned(), entries: Mutex::new((entries, file)) })
    }

    /// Records loaded or written so far.
    pub fn len(&self) -> usize {
        self.entries.lock().map_or(0, |e| e.0.len())
    }

    /// Whether the journal is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl CopyCheckpoints for Journal {
    async fn get(&self, source: &str) -> Result<Option<CopiedFile>, CheckpointError> {
        Ok(self.entries.lock().ok().and_then(|e| e.0.get(source).cloned()))
    }

    async fn put(&self, source: &str, file: CopiedFile) -> Result<(), CheckpointError> {
        let line = JournalLine {
            source: source.to_owned(),
            target: file.target.clone(),
            size: file.size,
            checksum: file.checksum.clone(),
        };
        let mut text = serde_json::to_string(&line).unwrap_or_default();
        text.push('\n');
        let mut guard = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        guard
            .1
            .write_all(text.as_bytes())
            .map_err(|source| CheckpointError::Journal { path: self.path.display().to_string(), source })?;
        guard.0.insert(source.to_owned(), file);
        Ok(())
    }
}

/// Checkpoints in the replication state store, for one destination.
#[derive(Clone)]
pub struct StateCheckpoints {
    store: Arc<dyn StateStore>,
    destination: String,
}

impl StateCheckpoints {
    /// Checkpoints of `destination` in `store`.
    pub fn new(store: Arc<dyn StateStore>, destination: impl Into<String>) -> Self {
        Self { store, destination: destination.into() }
    }
}

#[async_trait]
impl CopyCheckpoints for StateCheckpoints {
    async fn get(&self, source: &str) -> Result<Option<CopiedFile>, CheckpointError> {
        Ok(self.store.copied_file(&self.destination, source).await?)
    }

    async fn put(&self, source: &str, file: CopiedFile) -> Result<(), CheckpointError> {
        Ok(self.store.record_copied_file(&self.destination, source, file).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn journal_survives_reopening_and_a_torn_last_line() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("j/copy.jsonl");
        let journal = Journal::open(&path).expect("open");
        let file = CopiedFile { target: "s3://r/a".into(), size: 3, checksum: Some("abc".into()) };
        journal.put("s3://w/a", file.clone()).await.expect("put");
        drop(journal);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b"{\"source\":\"s3://w/b\",\"tar"))
            .expect("torn line");
        let journal = Journal::open(&path).expect("reopen");
        assert_eq!(journal.get("s3://w/a").await.expect("get"), Some(file));
        assert_eq!(journal.get("s3://w/b").await.expect("get"), None);
        assert_eq!(journal.len(), 1);
        journal.put("s3://w/c", CopiedFile { target: "s3://r/c".into(), size: 1, checksum: None }).await.expect("put");
        drop(journal);
        assert_eq!(Journal::open(&path).expect("reopen").len(), 2, "a record after a torn line is readable");
    }
}
