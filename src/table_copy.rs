//! Copying a table's files to another location, with every path rewritten.
//!
//! This is the engine behind `icerelay copy-table` and behind replication's
//! bootstrap and incremental copies. For the selected snapshots it copies, in
//! an order that never lets metadata reference a file that is not there yet:
//!
//! 1. per manifest: the live data and equality-delete files byte for byte,
//!    the position-delete files and deletion vectors rewritten, then the
//!    manifest itself, rewritten with the new delete-file sizes;
//! 2. the manifest lists, rewritten with the new manifest lengths;
//! 3. statistics and partition-statistics files, byte for byte;
//! 4. last, and only if asked, the rewritten `metadata.json`.
//!
//! Every write is checkpointed; a manifest (or manifest list) whose checkpoint
//! is present at the target is not read again, because everything it
//! references was written before it. That makes reruns after a crash, and
//! replication's copies of one more snapshot, cost only what is new.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use serde_json::Value;

use crate::rewrite::metadata::{self, ReferenceKind};
use crate::rewrite::{PathMap, RewriteError, manifest, manifest_list, position_deletes, puffin};
use crate::storage::checkpoint::CheckpointError;
use crate::storage::copy::{Copier, CopyError, CopyOutcome, CopyReport, CopyTask};
use crate::storage::{Storage, StorageError};

/// Largest `metadata.json` read into memory.
pub const METADATA_LIMIT: u64 = 512 * 1024 * 1024;
/// Largest manifest or manifest list read into memory.
pub const MANIFEST_LIMIT: u64 = 512 * 1024 * 1024;
/// Largest delete file rewritten in memory.
pub const DELETE_FILE_LIMIT: u64 = 2 * 1024 * 1024 * 1024;

/// Errors of a table copy.
#[derive(Debug, thiserror::Error)]
pub enum TableCopyError {
    /// Reading or writing a file failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Copying a file failed.
    #[error(transparent)]
    Copy(#[from] CopyError),
    /// A file could not be rewritten.
    #[error(transparent)]
    Rewrite(#[from] RewriteError),
    /// A checkpoint could not be read or written.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A rewrite task stopped without an answer (it panicked or was cancelled).
    #[error("a rewrite task stopped unexpectedly: {0}")]
    Task(String),
    /// The source metadata is not JSON.
    #[error("{file} is not JSON: {detail}")]
    MetadataJson {
        /// The file.
        file: String,
        /// Why.
        detail: String,
    },
}

impl TableCopyError {
    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Storage(e) => e.is_retryable(),
            Self::Copy(e) => e.is_retryable(),
            Self::Checkpoint(_) => true,
            Self::Rewrite(_) | Self::MetadataJson { .. } | Self::Task(_) => false,
        }
    }
}

/// What a file of the plan is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileKind {
    /// A data file.
    Data,
    /// An equality-delete file.
    EqualityDeletes,
    /// A position-delete file (rewritten).
    PositionDeletes,
    /// A deletion vector (rewritten).
    DeletionVector,
    /// A manifest (rewritten).
    Manifest,
    /// A manifest list (rewritten).
    ManifestList,
    /// A statistics file.
    Statistics,
    /// A partition statistics file.
    PartitionStatistics,
    /// The table metadata (rewritten).
    Metadata,
}

/// One file of a dry-run plan.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedFile {
    /// Source path.
    pub source: String,
    /// Target path.
    pub target: String,
    /// What it is.
    pub kind: FileKind,
    /// `copy` (byte for byte), `rewrite`, or `leave` (metadata-only copies).
    pub action: &'static str,
    /// Size at the source, as recorded in the metadata that references it.
    pub size: Option<u64>,
}

/// Progress of a copy, for a progress bar or log lines.
pub trait CopyProgress: Send + Sync {
    /// More files were found to handle.
    fn discovered(&self, files: u64, bytes: u64);
    /// A file is done.
    fn done(&self, bytes: u64, skipped: bool);
}

/// Ignores progress.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl CopyProgress for NoProgress {
    fn discovered(&self, _files: u64, _bytes: u64) {}
    fn done(&self, _bytes: u64, _skipped: bool) {}
}

/// The outcome of copying snapshots.
#[derive(Debug, Clone, Default)]
pub struct CopiedSnapshots {
    /// Target manifest list of each copied snapshot.
    pub manifest_lists: BTreeMap<i64, String>,
    /// File totals.
    pub report: CopyReport,
}

/// Copies tables (or parts of them) with their paths rewritten.
#[derive(Clone)]
pub struct TableCopier {
    copier: Copier,
    manifest_parallelism: usize,
    copy_data_files: bool,
}

/// Per-run bookkeeping shared by the manifest tasks.
struct Run<'a> {
    map: Arc<PathMap>,
    progress: &'a dyn CopyProgress,
    report: Mutex<CopyReport>,
    manifest_lengths: Mutex<HashMap<String, i64>>,
}

impl Run<'_> {
    fn count(&self, outcome: CopyOutcome) {
        let (bytes, skipped) = match outcome {
            CopyOutcome::Copied { bytes } => (bytes, false),
            CopyOutcome::Skipped { bytes } => (bytes, true),
        };
        self.progress.done(bytes, skipped);
        if let Ok(mut r) = self.report.lock() {
            r.add(outcome);
        }
    }
}

impl TableCopier {
    /// A table copier on top of a file copier.
    pub fn new(copier: Copier, manifest_parallelism: usize) -> Self {
        Self { copier, manifest_parallelism: manifest_parallelism.max(1), copy_data_files: true }
    }

    /// Rewrites and writes metadata, manifests and delete files but leaves
    /// data files and equality deletes to something else (bucket replication,
    /// a copy that already happened). Their paths are still mapped.
    pub fn metadata_only(mut self) -> Self {
        self.copy_data_files = false;
        self
    }

    fn storage(&self) -> &Arc<Storage> {
        self.copier.storage()
    }

    /// Reads and parses a `metadata.json`.
    pub async fn read_metadata(&self, url: &str) -> Result<Value, TableCopyError> {
        let bytes = self.storage().read(url, METADATA_LIMIT).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| TableCopyError::MetadataJson { file: url.to_owned(), detail: e.to_string() })
    }

    /// Copies every file the `snapshots` of `metadata` need (not the metadata itself).
    pub async fn copy_snapshots(
        &self,
        metadata: &Value,
        metadata_url: &str,
        map: &PathMap,
        snapshots: &BTreeSet<i64>,
        progress: &dyn CopyProgress,
    ) -> Result<CopiedSnapshots, TableCopyError> {
        let run = Run {
            map: Arc::new(map.clone()),
            progress,
            report: Mutex::new(CopyReport::default()),
            manifest_lengths: Mutex::new(HashMap::new()),
        };
        let rewritten = metadata::rewrite_metadata(metadata, map, metadata_url, &|_| false)?;
        let selected = |id: Option<i64>| id.is_some_and(|id| snapshots.contains(&id));

        // Manifest lists not checkpointed yet, and the manifests they list.
        let mut lists = Vec::new();
        let mut manifests: BTreeSet<String> = BTreeSet::new();
        let mut done_lists = BTreeMap::new();
        for reference in rewritten.references.iter().filter(|r| selected(r.snapshot_id)) {
            match reference.kind {
                ReferenceKind::ManifestList => {
                    if self.is_done(&reference.source, &reference.target).await? {
                        run.count(CopyOutcome::Skipped { bytes: 0 });
                        done_lists.insert(reference.snapshot_id.unwrap_or_default(), reference.target.clone());
                        continue;
                    }
                    let bytes = self.storage().read(&reference.source, MANIFEST_LIMIT).await?;
                    for m in manifest_list::list(&bytes, &reference.source)? {
                        manifests.insert(m.path);
                    }
                    lists.push((reference.clone(), bytes));
                }
                ReferenceKind::Manifest => {
                    manifests.insert(reference.source.clone());
                }
                ReferenceKind::Statistics | ReferenceKind::PartitionStatistics => {}
            }
        }
        progress.discovered((lists.len() + manifests.len()) as u64, 0);

        // 0. Read and check every manifest still to copy before writing
        // anything: a corrupt or truncated one stops the copy with the
        // target untouched. (Each is read again when it is copied, so memory
        // does not grow with the table.)
        let mut pending = Vec::new();
        for path in &manifests {
            let target = map.rewrite(path, path)?;
            if self.checkpointed_size(path, &target).await?.is_none() {
                pending.push(path.clone());
            }
        }
        futures::stream::iter(pending)
            .map(|path| {
                let map = run.map.clone();
                async move {
                    let bytes = self.storage().read(&path, MANIFEST_LIMIT).await?;
                    on_cpu(move || {
                        for entry in manifest::list(&bytes, &path)? {
                            map.rewrite(&entry.path, &path)?;
                        }
                        Ok(())
                    })
                    .await
                }
            })
            .buffer_unordered(self.manifest_parallelism)
            .try_collect::<Vec<()>>()
            .await?;

        // 1. Manifests and everything they reference.
        let run_ref = &run;
        futures::stream::iter(manifests)
            .map(|path| async move { self.copy_manifest(&path, run_ref).await })
            .buffer_unordered(self.manifest_parallelism)
            .try_collect::<Vec<()>>()
            .await?;

        // 2. Manifest lists.
        let mut copied = CopiedSnapshots { manifest_lists: done_lists, report: CopyReport::default() };
        let lengths = Arc::new(run.manifest_lengths.lock().map(|l| l.clone()).unwrap_or_default());
        let written: Vec<(i64, String)> = futures::stream::iter(lists)
            .map(|(reference, bytes)| {
                let (map, lengths) = (run.map.clone(), lengths.clone());
                let source = reference.source.clone();
                async move {
                    let out = on_cpu(move || manifest_list::rewrite(&bytes, &source, &map, &lengths)).await?;
                    let outcome = self.copier.put(&reference.source, &reference.target, Bytes::from(out)).await?;
                    run_ref.count(outcome);
                    Ok::<_, TableCopyError>((reference.snapshot_id.unwrap_or_default(), reference.target))
                }
            })
            .buffer_unordered(self.manifest_parallelism)
            .try_collect()
            .await?;
        copied.manifest_lists.extend(written);

        // 3. Statistics files.
        let stats: Vec<CopyTask> = rewritten
            .references
            .iter()
            .filter(|r| selected(r.snapshot_id))
            .filter(|r| matches!(r.kind, ReferenceKind::Statistics | ReferenceKind::PartitionStatistics))
            .map(|r| CopyTask { source: r.source.clone(), target: r.target.clone() })
            .collect();
        progress.discovered(stats.len() as u64, 0);
        self.copier.copy_all(stats, &|_, outcome| run.count(outcome)).await?;

        copied.report = run.report.lock().map(|r| *r).unwrap_or_default();
        Ok(copied)
    }

    /// Whether `source` was written to `target` before and is still there whole.
    async fn is_done(&self, source: &str, target: &str) -> Result<bool, TableCopyError> {
        Ok(self.checkpointed_size(source, target).await?.is_some())
    }

    async fn checkpointed_size(&self, source: &str, target: &str) -> Result<Option<u64>, TableCopyError> {
        let Some(done) = self.copier.checkpoints().get(source).await? else { return Ok(None) };
        if done.target != target {
            return Ok(None);
        }
        Ok(self.storage().head(target).await?.filter(|found| found.size == done.size).map(|found| found.size))
    }

    /// Copies one manifest's files, then the rewritten manifest.
    async fn copy_manifest(&self, source: &str, run: &Run<'_>) -> Result<(), TableCopyError> {
        let target = run.map.rewrite(source, source)?;
        if let Some(size) = self.checkpointed_size(source, &target).await? {
            run.count(CopyOutcome::Skipped { bytes: size });
            if let Ok(mut lengths) = run.manifest_lengths.lock() {
                lengths.insert(source.to_owned(), size as i64);
            }
            return Ok(());
        }
        let bytes = self.storage().read(source, MANIFEST_LIMIT).await?;
        let (parsed, entries) = {
            let source = source.to_owned();
            on_cpu(move || {
                let parsed = manifest::Manifest::read(&bytes, &source)?;
                let entries = parsed.entries(&source)?;
                Ok((parsed, entries))
            })
            .await?
        };
        let live: Vec<&manifest::ManifestEntry> =
            entries.iter().filter(|e| e.is_live() && (self.copy_data_files || e.needs_rewrite())).collect();
        run.progress.discovered(live.len() as u64, live.iter().map(|e| e.size.max(0) as u64).sum());

        let copies: Vec<CopyTask> = live
            .iter()
            .filter(|e| !e.needs_rewrite())
            .map(|e| Ok(CopyTask { source: e.path.clone(), target: run.map.rewrite(&e.path, source)? }))
            .collect::<Result<_, RewriteError>>()?;
        self.copier.copy_all(copies, &|_, outcome| run.count(outcome)).await?;

        let mut delete_sizes = HashMap::new();
        for entry in live.iter().filter(|e| e.needs_rewrite()) {
            if delete_sizes.contains_key(&entry.path) {
                continue;
            }
            let target = run.map.rewrite(&entry.path, source)?;
            let original = self.storage().read(&entry.path, DELETE_FILE_LIMIT).await?;
            let (map, path, is_dv) = (run.map.clone(), entry.path.clone(), entry.is_deletion_vector());
            let out = on_cpu(move || {
                if is_dv {
                    puffin::rewrite(&original, &path, &map)
                } else {
                    position_deletes::rewrite(&original, &path, &map)
                }
            })
            .await?;
            delete_sizes.insert(entry.path.clone(), out.len() as i64);
            run.count(self.copier.put(&entry.path, &target, Bytes::from(out)).await?);
        }

        let out = {
            let (map, source) = (run.map.clone(), source.to_owned());
            on_cpu(move || parsed.rewrite(&source, &map, &delete_sizes)).await?
        };
        let length = out.len() as i64;
        run.count(self.copier.put(source, &target, Bytes::from(out)).await?);
        if let Ok(mut lengths) = run.manifest_lengths.lock() {
            lengths.insert(source.to_owned(), length);
        }
        Ok(())
    }

    /// Writes the rewritten metadata to `target_url`; returns the rewritten JSON.
    ///
    /// `keep_log_entry` decides which `metadata-log` entries will exist at the target.
    pub async fn write_metadata(
        &self,
        metadata: &Value,
        metadata_url: &str,
        map: &PathMap,
        target_url: &str,
        keep_log_entry: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<Value, TableCopyError> {
        let rewritten = metadata::rewrite_metadata(metadata, map, metadata_url, keep_log_entry)?;
        let bytes = serde_json::to_vec(&rewritten.value)
            .map_err(|e| TableCopyError::MetadataJson { file: target_url.to_owned(), detail: e.to_string() })?;
        self.storage().write(target_url, Bytes::from(bytes)).await?;
        Ok(rewritten.value)
    }

    /// Lists everything a copy of `snapshots` would write, reading manifest
    /// lists and manifests but writing nothing.
    pub async fn plan(
        &self,
        metadata: &Value,
        metadata_url: &str,
        map: &PathMap,
        snapshots: &BTreeSet<i64>,
        target_metadata: &str,
    ) -> Result<Vec<PlannedFile>, TableCopyError> {
        let rewritten = metadata::rewrite_metadata(metadata, map, metadata_url, &|_| false)?;
        let mut files = Vec::new();
        let mut manifests = BTreeSet::new();
        for reference in rewritten.references.iter().filter(|r| r.snapshot_id.is_some_and(|id| snapshots.contains(&id)))
        {
            let kind = match reference.kind {
                ReferenceKind::ManifestList => {
                    let bytes = self.storage().read(&reference.source, MANIFEST_LIMIT).await?;
                    for m in manifest_list::list(&bytes, &reference.source)? {
                        manifests.insert((m.path, m.length));
                    }
                    FileKind::ManifestList
                }
                ReferenceKind::Manifest => {
                    manifests.insert((reference.source.clone(), 0));
                    continue;
                }
                ReferenceKind::Statistics => FileKind::Statistics,
                ReferenceKind::PartitionStatistics => FileKind::PartitionStatistics,
            };
            let action = if kind == FileKind::ManifestList { "rewrite" } else { "copy" };
            files.push(PlannedFile {
                source: reference.source.clone(),
                target: reference.target.clone(),
                kind,
                action,
                size: None,
            });
        }
        let mut seen = BTreeSet::new();
        for (path, length) in manifests {
            let bytes = self.storage().read(&path, MANIFEST_LIMIT).await?;
            for e in manifest::list(&bytes, &path)?.into_iter().filter(|e| e.is_live()) {
                if !seen.insert(e.path.clone()) {
                    continue;
                }
                let kind = match (e.content, e.is_deletion_vector()) {
                    (manifest::FileContent::Data, _) => FileKind::Data,
                    (manifest::FileContent::EqualityDeletes, _) => FileKind::EqualityDeletes,
                    (manifest::FileContent::PositionDeletes, true) => FileKind::DeletionVector,
                    (manifest::FileContent::PositionDeletes, false) => FileKind::PositionDeletes,
                };
                files.push(PlannedFile {
                    target: map.rewrite(&e.path, &path)?,
                    source: e.path.clone(),
                    kind,
                    action: match (e.needs_rewrite(), self.copy_data_files) {
                        (true, _) => "rewrite",
                        (false, true) => "copy",
                        (false, false) => "leave",
                    },
                    size: u64::try_from(e.size).ok(),
                });
            }
            files.push(PlannedFile {
                target: map.rewrite(&path, &path)?,
                source: path,
                kind: FileKind::Manifest,
                action: "rewrite",
                size: u64::try_from(length).ok().filter(|l| *l > 0),
            });
        }
        files.push(PlannedFile {
            source: metadata_url.to_owned(),
            target: target_metadata.to_owned(),
            kind: FileKind::Metadata,
            action: "rewrite",
            size: None,
        });
        Ok(files)
    }
}

/// Runs parsing and rewriting on the blocking pool: they are CPU-bound, and
/// on the async workers they would rewrite one manifest at a time however
/// many are in flight.
async fn on_cpu<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, RewriteError> + Send + 'static,
) -> Result<T, TableCopyError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| TableCopyError::Task(e.to_string()))?.map_err(Into::into)
}
