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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use serde_json::Value;

mod cpu;

use crate::rewrite::manifest_list::ManifestList;
use crate::rewrite::metadata::{self, Reference, ReferenceKind};
use crate::rewrite::{PathMap, RewriteError, avro, manifest, manifest_list, position_deletes, puffin};
use crate::storage::checkpoint::CheckpointError;
use crate::storage::copy::{Copier, CopyError, CopyOutcome, CopyReport, CopyTask};
use crate::storage::{Storage, StorageError};

/// Largest `metadata.json` read into memory.
pub const METADATA_LIMIT: u64 = 512 * 1024 * 1024;
/// Largest manifest or manifest list read into memory.
pub const MANIFEST_LIMIT: u64 = 512 * 1024 * 1024;
/// Largest delete file rewritten in memory.
pub const DELETE_FILE_LIMIT: u64 = 2 * 1024 * 1024 * 1024;
/// Memory for manifests rewritten while they are checked and kept until
/// the copy writes them; beyond it, a manifest is read and decoded again
/// when it is copied. With the manifests in flight (one decoded per core,
/// and up to twice the parallelism read ahead, as read) it bounds a copy's
/// memory whatever the table's size.
pub const PREPARED_LIMIT: usize = 64 * 1024 * 1024;
/// Most memory the manifest lists decoded to find the manifests may hold
/// until they are rewritten (the others are read again then).
pub const KEPT_LISTS_LIMIT: usize = 16 * 1024 * 1024;

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

    /// The URL of a file the copy found missing, if that is why it failed.
    pub fn missing_url(&self) -> Option<&str> {
        match self {
            Self::Storage(e) | Self::Copy(CopyError::Storage { error: e, .. }) => e.missing_url(),
            _ => None,
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

    /// Threads for decoding and rewriting (see [`cpu`]).
    fn cpu_threads(&self) -> usize {
        cpu::threads(self.manifest_parallelism)
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

    /// Copies every file the `snapshots` of `metadata` need (not the metadata
    /// itself), in phases: the manifest lists are read for the manifests
    /// they list; every manifest is read and checked before anything is
    /// written (step 0); then the manifests and their files are written
    /// (step 1), the manifest lists with the new manifest lengths (step 2)
    /// and the statistics files (step 3).
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
        let selected = |kinds: &[ReferenceKind]| -> Vec<Reference> {
            let wanted =
                |r: &&Reference| r.snapshot_id.is_some_and(|id| snapshots.contains(&id)) && kinds.contains(&r.kind);
            rewritten.references.iter().filter(wanted).cloned().collect()
        };

        let Listed { lists, mut manifests, done_lists } =
            self.read_lists(selected(&[ReferenceKind::ManifestList]), &run).await?;
        manifests.extend(selected(&[ReferenceKind::Manifest]).into_iter().map(|r| r.source));
        progress.discovered((lists.len() + manifests.len()) as u64, 0);
        let checked = self.check_manifests(&manifests, &run).await?;
        self.copy_manifests(manifests, checked, &run).await?;
        let mut copied = CopiedSnapshots { manifest_lists: done_lists, report: CopyReport::default() };
        copied.manifest_lists.extend(self.rewrite_lists(lists, &run).await?);
        let stats: Vec<CopyTask> = selected(&[ReferenceKind::Statistics, ReferenceKind::PartitionStatistics])
            .into_iter()
            .map(|r| CopyTask { source: r.source, target: r.target })
            .collect();
        progress.discovered(stats.len() as u64, 0);
        self.copier.copy_all(stats, &|_, outcome| run.count(outcome)).await?;

        copied.report = run.report.lock().map(|r| *r).unwrap_or_default();
        Ok(copied)
    }

    /// The manifest lists not checkpointed yet, and the manifests they list.
    /// Decoded lists are kept for step 2 up to `KEPT_LISTS_LIMIT` bytes in
    /// all; step 2 reads the others again, so that memory does not grow with
    /// the table's history.
    async fn read_lists(&self, lists: Vec<Reference>, run: &Run<'_>) -> Result<Listed, TableCopyError> {
        let budget = AtomicUsize::new(KEPT_LISTS_LIMIT);
        let mut listed = Listed::default();
        let reads = futures::stream::iter(lists)
            .map(|reference| async move {
                if self.is_done(&reference.source, &reference.target).await? {
                    return Ok((reference, None));
                }
                let bytes = self.storage().read(&reference.source, MANIFEST_LIMIT).await?;
                Ok((reference, Some(bytes)))
            })
            .buffer_unordered(self.manifest_parallelism);
        let decode = move |(reference, bytes): (Reference, Option<Bytes>)| {
            let Some(bytes) = bytes else { return Ok((reference, ListRead::Done)) };
            let mut list = ManifestList::read(&bytes, &reference.source)?;
            let manifests = list.manifest_paths(&reference.source)?;
            list.shrink_to_fit();
            let kept = reserve(&budget, list.held_bytes()).then(|| Box::new(list));
            Ok((reference, ListRead::Read { manifests, kept }))
        };
        let mut read_lists = std::pin::pin!(cpu::map(reads, self.cpu_threads(), decode));
        // Taken in as they come: a long history lists each manifest many times.
        while let Some((reference, read)) = read_lists.try_next().await? {
            match read {
                ListRead::Done => {
                    run.count(CopyOutcome::Skipped { bytes: 0 });
                    listed.done_lists.insert(reference.snapshot_id.unwrap_or_default(), reference.target);
                }
                ListRead::Read { manifests, kept } => {
                    listed.manifests.extend(manifests);
                    listed.lists.push((reference, kept));
                }
            }
        }
        Ok(listed)
    }

    /// Step 0: reads and checks every manifest still to copy before writing
    /// anything: a corrupt or truncated one stops the copy with the target
    /// untouched. A manifest that lists no position-delete file to rewrite
    /// is rewritten here already (its rewrite needs no new file sizes) and
    /// kept for step 1, up to `PREPARED_LIMIT` bytes in all; the others are
    /// read again when they are copied, so memory stays bounded however
    /// large the table.
    async fn check_manifests(&self, manifests: &BTreeSet<String>, run: &Run<'_>) -> Result<Checked, TableCopyError> {
        let mut pending = Vec::new();
        let mut done = HashMap::new();
        for path in manifests {
            let target = run.map.rewrite(path, path)?;
            match self.checkpointed_size(path, &target).await? {
                Some(size) => {
                    done.insert(path.clone(), size);
                }
                None => pending.push(path.clone()),
            }
        }
        let budget = AtomicUsize::new(PREPARED_LIMIT);
        let (map, copy_data_files) = (run.map.clone(), self.copy_data_files);
        let reads = futures::stream::iter(pending)
            .map(|path| async move {
                let bytes = self.storage().read(&path, MANIFEST_LIMIT).await?;
                Ok((path, bytes))
            })
            .buffer_unordered(self.manifest_parallelism);
        let check = move |(path, bytes): (String, Bytes)| {
            Ok(prepare(&bytes, &path, &map, copy_data_files, &budget)?.map(|prepared| (path, prepared)))
        };
        let prepared =
            cpu::map(reads, self.cpu_threads(), check).try_filter_map(|p| async move { Ok(p) }).try_collect().await?;
        Ok(Checked { prepared: Mutex::new(prepared), done })
    }

    /// Step 1: the manifests and everything they reference.
    async fn copy_manifests(
        &self,
        manifests: BTreeSet<String>,
        checked: Checked,
        run: &Run<'_>,
    ) -> Result<(), TableCopyError> {
        let checked = &checked;
        futures::stream::iter(manifests)
            .map(|path| async move {
                let ready = checked.prepared.lock().ok().and_then(|mut p| p.remove(&path));
                self.copy_manifest(&path, run, checked.done.get(&path).copied(), ready).await
            })
            .buffer_unordered(self.manifest_parallelism)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Step 2: the manifest lists, with the lengths of the manifests written
    /// in step 1; the target manifest list of each snapshot.
    async fn rewrite_lists(
        &self,
        lists: Vec<(Reference, Option<Box<ManifestList>>)>,
        run: &Run<'_>,
    ) -> Result<Vec<(i64, String)>, TableCopyError> {
        /// A list to rewrite: as kept by the first read, or read again.
        enum ToRewrite {
            Kept(Box<ManifestList>),
            Read(Bytes),
        }
        // Step 1 is done with them: taken, not copied.
        let lengths = run.manifest_lengths.lock().map(|mut l| std::mem::take(&mut *l)).unwrap_or_default();
        let map = run.map.clone();
        let inputs = futures::stream::iter(lists)
            .map(|(reference, kept)| async move {
                let list = match kept {
                    Some(list) => ToRewrite::Kept(list),
                    None => ToRewrite::Read(self.storage().read(&reference.source, MANIFEST_LIMIT).await?),
                };
                Ok((reference, list))
            })
            .buffer_unordered(self.manifest_parallelism);
        let rewrite = move |(reference, list): (Reference, ToRewrite)| {
            let source = &reference.source;
            let out = match list {
                ToRewrite::Kept(list) => list.rewrite(source, &map, &lengths)?,
                ToRewrite::Read(bytes) => ManifestList::read(&bytes, source)?.rewrite(source, &map, &lengths)?,
            };
            Ok((reference, out))
        };
        cpu::map(inputs, self.cpu_threads(), rewrite)
            .map(|rewritten| async move {
                let (reference, out) = rewritten?;
                let outcome = self.put_rewritten_avro(&reference.source, &reference.target, out).await?;
                run.count(outcome);
                Ok((reference.snapshot_id.unwrap_or_default(), reference.target))
            })
            .buffer_unordered(self.manifest_parallelism)
            .try_collect()
            .await
    }

    /// Writes a rewritten manifest or manifest list to `target`, unless the
    /// target holds the same header and records already in other bytes.
    ///
    /// Another version of icerelay may have compressed them differently.
    /// Manifest lists on the replica written then record that file's
    /// length; overwriting it would make them wrong for readers that trust
    /// `manifest_length`. So it is kept, and its size used from now on.
    async fn put_rewritten_avro(
        &self,
        source: &str,
        target: &str,
        out: Vec<u8>,
    ) -> Result<CopyOutcome, TableCopyError> {
        let rewritten = Bytes::from(out);
        let same = async |found: &crate::storage::ObjectInfo| {
            if found.size > MANIFEST_LIMIT {
                return false;
            }
            // A target that cannot be read, or read as Avro, is overwritten.
            let Ok(existing) = self.storage().read(target, MANIFEST_LIMIT).await else { return false };
            let (name, rewritten) = (target.to_owned(), rewritten.clone());
            on_cpu(move || Ok(avro::same_contents(&existing, &rewritten, &name).unwrap_or(false)))
                .await
                .unwrap_or(false)
        };
        Ok(self.copier.put_unless_same(source, target, rewritten.clone(), same).await?)
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

    /// Copies one manifest's files, then the rewritten manifest (`ready`
    /// if step 0 rewrote it already; `done`, its size, if step 0 found it
    /// copied before).
    async fn copy_manifest(
        &self,
        source: &str,
        run: &Run<'_>,
        done: Option<u64>,
        ready: Option<Prepared>,
    ) -> Result<(), TableCopyError> {
        let target = run.map.rewrite(source, source)?;
        if let Some(size) = done {
            run.count(CopyOutcome::Skipped { bytes: size });
            if let Ok(mut lengths) = run.manifest_lengths.lock() {
                lengths.insert(source.to_owned(), size as i64);
            }
            return Ok(());
        }
        let (live, pending) = match ready {
            Some(Prepared { live, rewritten }) => (live, Pending::Rewritten(rewritten)),
            None => {
                let bytes = self.storage().read(source, MANIFEST_LIMIT).await?;
                let source = source.to_owned();
                let copy_data_files = self.copy_data_files;
                on_cpu(move || {
                    let parsed = manifest::Manifest::read(&bytes, &source)?;
                    let live =
                        parsed.entries_where(&source, |status, content| is_copied(status, content, copy_data_files))?;
                    Ok((live, Pending::Parsed(Box::new(parsed))))
                })
                .await?
            }
        };
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
            let outcome = self.copier.put(&entry.path, &target, Bytes::from(out)).await?;
            delete_sizes.insert(entry.path.clone(), outcome.bytes() as i64);
            run.count(outcome);
        }

        let out = match pending {
            Pending::Rewritten(out) => out,
            Pending::Parsed(parsed) => {
                let (map, source) = (run.map.clone(), source.to_owned());
                on_cpu(move || parsed.rewrite(&source, &map, &delete_sizes)).await?
            }
        };
        let outcome = self.put_rewritten_avro(source, &target, out).await?;
        run.count(outcome);
        if let Ok(mut lengths) = run.manifest_lengths.lock() {
            lengths.insert(source.to_owned(), outcome.bytes() as i64);
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

/// A manifest step 0 rewrote already.
struct Prepared {
    /// The entries step 1 copies (see [`is_copied`]); none needs rewriting.
    live: Vec<manifest::ManifestEntry>,
    /// The rewritten manifest.
    rewritten: Vec<u8>,
}

/// What step 1 writes for a manifest.
enum Pending {
    /// Bytes rewritten in step 0.
    Rewritten(Vec<u8>),
    /// A decoded manifest, to rewrite once its delete files are.
    Parsed(Box<manifest::Manifest>),
}

/// What the manifest lists of a copy say.
#[derive(Default)]
struct Listed {
    /// The lists still to rewrite, decoded if kept.
    lists: Vec<(Reference, Option<Box<ManifestList>>)>,
    /// The manifests they list.
    manifests: BTreeSet<String>,
    /// Target manifest list of each snapshot whose list was copied before.
    done_lists: BTreeMap<i64, String>,
}

/// The manifests step 0 checked: rewritten already (`prepared`), or copied
/// before (`done`, with their size).
struct Checked {
    prepared: Mutex<HashMap<String, Prepared>>,
    done: HashMap<String, u64>,
}

/// A manifest list of the copy, as its first read found it.
enum ListRead {
    /// Copied before (checkpointed and present at the target).
    Done,
    /// Read, with the manifests it lists.
    Read {
        /// Its manifests' paths.
        manifests: Vec<String>,
        /// The list as decoded, if kept for its rewrite (else it is read again).
        kept: Option<Box<ManifestList>>,
    },
}

/// Whether step 1 copies (or rewrites) the file of an entry.
fn is_copied(status: i64, content: manifest::FileContent, copy_data_files: bool) -> bool {
    status != 2 && (copy_data_files || content == manifest::FileContent::PositionDeletes)
}

/// Step 0 for one manifest: decodes it and checks that every path in it
/// maps; rewrites it if it can be rewritten now (no position-delete file of
/// its needs a new size) and `budget` has room for it.
fn prepare(
    bytes: &[u8],
    path: &str,
    map: &PathMap,
    copy_data_files: bool,
    budget: &AtomicUsize,
) -> Result<Option<Prepared>, RewriteError> {
    let parsed = manifest::Manifest::read(bytes, path)?;
    let live = parsed.entries_where(path, |status, content| is_copied(status, content, copy_data_files))?;
    // What is kept: the rewritten manifest (up to a quarter larger than the
    // original: longer paths, fastest deflate) and `live`.
    let cost = bytes.len() + bytes.len() / 4 + live.iter().map(|e| e.path.len() + e.format.len() + 64).sum::<usize>();
    if !live.iter().any(manifest::ManifestEntry::needs_rewrite) && reserve(budget, cost) {
        // Rewriting maps every path in it: the check is done.
        let mut rewritten = parsed.rewrite(path, map, &HashMap::new())?;
        // Kept until step 1: without the slack the budget does not count.
        rewritten.shrink_to_fit();
        return Ok(Some(Prepared { live, rewritten }));
    }
    for entry in parsed.entries(path)? {
        map.rewrite(&entry.path, path)?;
    }
    Ok(None)
}

/// Takes `cost` bytes out of `budget`, if it has them.
fn reserve(budget: &AtomicUsize, cost: usize) -> bool {
    budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| left.checked_sub(cost)).is_ok()
}

/// Runs parsing and rewriting on the blocking pool: they are CPU-bound, and
/// on the async workers they would rewrite one manifest at a time however
/// many are in flight.
async fn on_cpu<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, RewriteError> + Send + 'static,
) -> Result<T, TableCopyError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| TableCopyError::Task(e.to_string()))?.map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::storage::checkpoint::Journal;
    use crate::storage::copy::CopySettings;

    /// Writes the DuckDB merge-on-read fixture (`tests/fixtures/duckdb_mor_v2`:
    /// manifests, manifest lists, position deletes, metadata; no data files)
    /// under `location`, its paths mapped there; returns its metadata URL.
    fn write_fixture(location: &str) -> String {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/duckdb_mor_v2");
        let index: Value =
            serde_json::from_slice(&std::fs::read(dir.join("index.json")).expect("index")).expect("json");
        let map = PathMap::from_locations(index["location"].as_str().expect("location"), location).expect("map");
        let files = index["files"].as_object().expect("files");
        let of = |role: &'static str| -> Vec<String> {
            files.iter().filter(|(_, r)| *r == role).map(|(p, _)| p.clone()).collect()
        };
        let read = |path: &str| std::fs::read(dir.join(path.rsplit('/').next().expect("name"))).expect("fixture file");
        let write = |path: &str, bytes: &[u8]| {
            let url = map.map(path).expect("mapped");
            let local = Path::new(url.strip_prefix("file://").expect("file URL")).to_owned();
            std::fs::create_dir_all(local.parent().expect("parent")).expect("mkdir");
            std::fs::write(local, bytes).expect("write");
        };
        let mut sizes = HashMap::new();
        for path in of("position-deletes") {
            let out = position_deletes::rewrite(&read(&path), &path, &map).expect("deletes");
            sizes.insert(path.clone(), out.len() as i64);
            write(&path, &out);
        }
        let mut lengths = HashMap::new();
        for path in of("manifest") {
            let out = manifest::rewrite(&read(&path), &path, &map, &sizes).expect("manifest");
            lengths.insert(path.clone(), out.len() as i64);
            write(&path, &out);
        }
        for path in of("manifest-list") {
            write(&path, &manifest_list::rewrite(&read(&path), &path, &map, &lengths).expect("list"));
        }
        let path = index["metadata"].as_str().expect("metadata");
        let value: Value = serde_json::from_slice(&read(path)).expect("json");
        let out = metadata::rewrite_metadata(&value, &map, path, &|_| false).expect("metadata");
        write(path, &serde_json::to_vec(&out.value).expect("json"));
        map.map(path).expect("mapped")
    }

    fn replace(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i..].starts_with(from) {
                out.extend_from_slice(to);
                i += from.len();
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        out
    }

    fn local(url: &str) -> std::path::PathBuf {
        Path::new(url.strip_prefix("file://").expect("file URL")).to_owned()
    }

    #[tokio::test]
    async fn metadata_only_copies_have_exact_lengths_and_sizes_and_resume() {
        let dir = tempfile::tempdir().expect("dir");
        let (source, target, metadata_url) = fixture_in(dir.path());
        let storage = Arc::new(Storage::new(&[crate::config::StorageConfig::local_dir(dir.path())]));
        let journal = Arc::new(Journal::open(&dir.path().join("journal.jsonl")).expect("journal"));
        let copier =
            TableCopier::new(Copier::new(storage, journal.clone(), CopySettings::default()), 3).metadata_only();
        let metadata = copier.read_metadata(&metadata_url).await.expect("metadata");
        let map = PathMap::from_locations(&source, &target).expect("map");
        let snapshots = all_snapshots(&metadata);
        let copied =
            copier.copy_snapshots(&metadata, &metadata_url, &map, &snapshots, &NoProgress).await.expect("copy");
        assert_eq!(copied.manifest_lists.len(), snapshots.len());
        // 6 manifest lists, 7 manifests, 4 position-delete files.
        assert_eq!((copied.report.copied_files, copied.report.skipped_files), (17, 0));

        let mut delete_files = 0;
        for list_url in copied.manifest_lists.values() {
            let bytes = std::fs::read(local(list_url)).expect("list");
            for m in manifest_list::list(&bytes, list_url).expect("manifests") {
                let manifest = std::fs::read(local(&m.path)).expect("manifest");
                assert_eq!(m.length, manifest.len() as i64, "manifest_length of {}", m.path);
                for e in manifest::list(&manifest, &m.path).expect("entries") {
                    assert!(e.path.starts_with(&target), "{}", e.path);
                    if e.needs_rewrite() && e.is_live() {
                        delete_files += 1;
                        let real = std::fs::metadata(local(&e.path)).expect("delete file").len();
                        assert_eq!(e.size as u64, real, "file_size_in_bytes of {}", e.path);
                    }
                }
            }
        }
        assert!(delete_files > 0);

        // A rerun finds everything checkpointed and writes nothing.
        let again =
            copier.copy_snapshots(&metadata, &metadata_url, &map, &snapshots, &NoProgress).await.expect("rerun");
        assert_eq!(again.report.copied_files, 0);
        assert_eq!(again.manifest_lists, copied.manifest_lists);

        // Without checkpoints, and one manifest at a time, a copy to another
        // prefix of the same length writes the same bytes but for the prefix.
        let other = format!("file://{}/ds2/db/t", dir.path().display());
        let other_map = PathMap::from_locations(&source, &other).expect("map");
        let plain = uncheckpointed(dir.path(), 1);
        let second =
            plain.copy_snapshots(&metadata, &metadata_url, &other_map, &snapshots, &NoProgress).await.expect("copy");
        for (id, list_url) in &second.manifest_lists {
            let first = std::fs::read(local(&copied.manifest_lists[id])).expect("first");
            let bytes = std::fs::read(local(list_url)).expect("second");
            assert_eq!(replace(&first, target.as_bytes(), other.as_bytes()), bytes, "{list_url}");
            for m in manifest_list::list(&bytes, list_url).expect("manifests") {
                let second = std::fs::read(local(&m.path)).expect("manifest");
                let first = std::fs::read(local(&m.path.replace(&other, &target))).expect("manifest");
                assert_eq!(replace(&first, target.as_bytes(), other.as_bytes()), second, "{}", m.path);
            }
        }
    }

    #[tokio::test]
    async fn a_target_with_the_same_records_in_other_bytes_is_kept_and_its_length_used() {
        let dir = tempfile::tempdir().expect("dir");
        let (source, target, metadata_url) = fixture_in(dir.path());
        let copier = uncheckpointed(dir.path(), 2);
        let metadata = copier.read_metadata(&metadata_url).await.expect("metadata");
        let map = PathMap::from_locations(&source, &target).expect("map");
        let snapshots = all_snapshots(&metadata);
        let first = copier.copy_snapshots(&metadata, &metadata_url, &map, &snapshots, &NoProgress).await.expect("copy");
        let (id, list_url) = first.manifest_lists.iter().next_back().expect("a list");
        let listed = manifest_list::list(&std::fs::read(local(list_url)).expect("list"), list_url).expect("manifests");
        let entries =
            |path: &str| manifest::list(&std::fs::read(local(path)).expect("manifest"), path).expect("entries");
        // One with several records, so that they can be cut into other blocks.
        let kept = listed.iter().find(|m| entries(&m.path).len() > 1).expect("a manifest of several entries");
        let replaced = listed.iter().find(|m| m.path != kept.path).expect("another manifest");

        // As another version would have written one (other blocks, same
        // records); the other is garbage, as no version writes.
        let written = std::fs::read(local(&kept.path)).expect("manifest");
        let other_bytes = avro::one_record_per_block(&written, &kept.path);
        assert_ne!(other_bytes.len(), written.len());
        assert!(avro::same_contents(&other_bytes, &written, &kept.path).expect("compare"));
        std::fs::write(local(&kept.path), &other_bytes).expect("write");
        std::fs::write(local(&replaced.path), b"not avro").expect("write");
        // The lists are new: a later snapshot's list references earlier manifests.
        for list in first.manifest_lists.values() {
            std::fs::remove_file(local(list)).expect("remove list");
        }

        let again = copier.copy_snapshots(&metadata, &metadata_url, &map, &snapshots, &NoProgress).await.expect("copy");
        assert!(std::fs::read(local(&kept.path)).expect("kept") == other_bytes, "the same records are not overwritten");
        let relisted = manifest_list::list(&std::fs::read(local(&again.manifest_lists[id])).expect("list"), list_url)
            .expect("list");
        let length = |path: &str| relisted.iter().find(|m| m.path == path).map(|m| m.length).expect("listed");
        assert_eq!(length(&kept.path), other_bytes.len() as i64, "the list records the kept file's length");
        let rewritten = std::fs::read(local(&replaced.path)).expect("replaced");
        assert!(rewritten != b"not avro", "a target with other contents is overwritten");
        assert_eq!(length(&replaced.path), rewritten.len() as i64);
    }

    fn all_snapshots(metadata: &Value) -> BTreeSet<i64> {
        metadata["snapshots"].as_array().expect("snapshots").iter().filter_map(|s| s["snapshot-id"].as_i64()).collect()
    }

    /// The fixture table written under `dir`: its location, a target
    /// location beside it, and its metadata file.
    fn fixture_in(dir: &Path) -> (String, String, String) {
        let source = format!("file://{}/src/db/t", dir.display());
        let target = format!("file://{}/dst/db/t", dir.display());
        let metadata_url = write_fixture(&source);
        (source, target, metadata_url)
    }

    /// A metadata-only copier without checkpoints.
    fn uncheckpointed(dir: &Path, manifest_parallelism: usize) -> TableCopier {
        let checkpoints = Arc::new(crate::storage::checkpoint::NoCheckpoints);
        let storage = Storage::new(&[crate::config::StorageConfig::local_dir(dir)]);
        let copier = Copier::new(Arc::new(storage), checkpoints, CopySettings::default());
        TableCopier::new(copier, manifest_parallelism).metadata_only()
    }

    #[tokio::test]
    async fn an_unmapped_path_stops_the_copy_before_anything_is_written() {
        let dir = tempfile::tempdir().expect("dir");
        let (source, _, metadata_url) = fixture_in(dir.path());
        let copier = uncheckpointed(dir.path(), 2);
        let metadata = copier.read_metadata(&metadata_url).await.expect("metadata");
        // Maps the metadata directory only: the data and delete files are unmapped.
        let mut map = PathMap::new();
        map.add(&format!("{source}/metadata"), &format!("file://{}/dst/metadata", dir.path().display())).expect("map");
        let snapshots = all_snapshots(&metadata);
        let e =
            copier.copy_snapshots(&metadata, &metadata_url, &map, &snapshots, &NoProgress).await.expect_err("unmapped");
        assert!(matches!(e, TableCopyError::Rewrite(RewriteError::UnmappedPath { .. })), "{e}");
        assert!(!dir.path().join("dst").exists(), "nothing was written");
    }
}
