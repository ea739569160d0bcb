//! The copy engine: streaming, parallel, idempotent, verified, resumable.
//!
//! - **Streaming, bounded memory.** A file up to `part_size` is read whole;
//!   a larger one is copied as a multipart upload, at most `part_concurrency`
//!   parts in flight, so memory stays near `parallelism × part_size ×
//!   (part_concurrency + 1)` whatever the file sizes.
//! - **Idempotent.** A target that already exists with the source's size (and
//!   the same MD5 entity tag, when both stores give one) is not copied again;
//!   a rewritten file whose target holds its bytes is not written again
//!   ([`Copier::put`]).
//! - **Verified.** After writing, the target's size is checked, and its entity
//!   tag against the MD5 computed while streaming (plain MD5 for a single PUT,
//!   the MD5 of the part MD5s with `-N` for a multipart upload) when the store
//!   returns S3-style tags.
//! - **Resumable.** Each verified copy is recorded in a [`CopyCheckpoints`];
//!   after a crash a rerun skips what is recorded and still present.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::stream::FuturesUnordered;
use futures::{StreamExt, TryStreamExt};
use md5::{Digest, Md5};
use object_store::{ObjectStoreExt, PutPayload};

use super::checkpoint::{CheckpointError, CopyCheckpoints};
use super::{Location, ObjectInfo, Storage, StorageError, head};
use crate::state::CopiedFile;

/// Tuning of the copy engine.
#[derive(Debug, Clone)]
pub struct CopySettings {
    /// Files copied at once.
    pub parallelism: usize,
    /// Size of a multipart part, and the largest file read whole.
    pub part_size: usize,
    /// Parts of one file in flight at once.
    pub part_concurrency: usize,
    /// Keep a rewritten file's existing target whatever its bytes (see [`Copier::put`]).
    pub keep_existing_rewrites: bool,
}

impl Default for CopySettings {
    fn default() -> Self {
        Self { parallelism: 8, part_size: 8 * 1024 * 1024, part_concurrency: 2, keep_existing_rewrites: false }
    }
}

/// Errors of the copy engine.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// Reading, writing or verifying failed.
    #[error("copying {source_url} to {target}: {error}")]
    Storage {
        /// The source URL.
        source_url: String,
        /// The target URL.
        target: String,
        /// Cause.
        #[source]
        error: StorageError,
    },
    /// Recording the copy failed (the file itself was copied).
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

impl CopyError {
    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Storage { error, .. } => error.is_retryable(),
            Self::Checkpoint(_) => true,
        }
    }
}

/// One file to copy byte for byte.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CopyTask {
    /// Source URL.
    pub source: String,
    /// Target URL.
    pub target: String,
}

/// What happened to one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyOutcome {
    /// Copied and verified.
    Copied {
        /// Bytes written.
        bytes: u64,
    },
    /// Already at the target.
    Skipped {
        /// Size of the file.
        bytes: u64,
    },
}

impl CopyOutcome {
    /// The size of the file at the target.
    pub fn bytes(self) -> u64 {
        match self {
            Self::Copied { bytes } | Self::Skipped { bytes } => bytes,
        }
    }
}

/// Totals of a copy run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CopyReport {
    /// Files copied.
    pub copied_files: u64,
    /// Bytes copied.
    pub copied_bytes: u64,
    /// Files found already copied.
    pub skipped_files: u64,
    /// Bytes of those.
    pub skipped_bytes: u64,
}

impl CopyReport {
    /// Adds one outcome.
    pub fn add(&mut self, outcome: CopyOutcome) {
        match outcome {
            CopyOutcome::Copied { bytes } => {
                self.copied_files += 1;
                self.copied_bytes += bytes;
            }
            CopyOutcome::Skipped { bytes } => {
                self.skipped_files += 1;
                self.skipped_bytes += bytes;
            }
        }
    }
}

/// Copies files between the configured stores.
#[derive(Clone)]
pub struct Copier {
    storage: Arc<Storage>,
    checkpoints: Arc<dyn CopyCheckpoints>,
    settings: CopySettings,
}

impl Copier {
    /// A copier over `storage`, recording into `checkpoints`.
    pub fn new(storage: Arc<Storage>, checkpoints: Arc<dyn CopyCheckpoints>, settings: CopySettings) -> Self {
        Self { storage, checkpoints, settings }
    }

    /// The stores.
    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    /// Where verified copies are recorded.
    pub fn checkpoints(&self) -> &Arc<dyn CopyCheckpoints> {
        &self.checkpoints
    }

    /// Copies every task, `parallelism` at a time; stops at the first error.
    /// `on_done` is called after each file (for progress reporting).
    pub async fn copy_all(
        &self,
        tasks: Vec<CopyTask>,
        on_done: &(dyn Fn(&CopyTask, CopyOutcome) + Send + Sync),
    ) -> Result<CopyReport, CopyError> {
        let mut report = CopyReport::default();
        let mut results = futures::stream::iter(tasks)
            .map(|task| async move {
                let outcome = self.copy(&task).await?;
                Ok::<_, CopyError>((task, outcome))
            })
            .buffer_unordered(self.settings.parallelism.max(1));
        while let Some((task, outcome)) = results.try_next().await? {
            on_done(&task, outcome);
            report.add(outcome);
        }
        Ok(report)
    }

    /// Copies one file unless it is already at the target.
    pub async fn copy(&self, task: &CopyTask) -> Result<CopyOutcome, CopyError> {
        let fail = |error| CopyError::Storage { source_url: task.source.clone(), target: task.target.clone(), error };
        let source = self.storage.resolve(&task.source).map_err(fail)?;
        let target = self.storage.resolve(&task.target).map_err(fail)?;
        let existing = head(&target).await.map_err(fail)?;

        if let (Some(done), Some(found)) = (self.checkpoints.get(&task.source).await?, &existing)
            && done.target == task.target
            && done.size == found.size
        {
            return Ok(CopyOutcome::Skipped { bytes: found.size });
        }
        let source_info = head(&source)
            .await
            .map_err(fail)?
            .ok_or_else(|| fail(StorageError::NotFound { url: task.source.clone() }))?;
        if let Some(found) = &existing
            && found.size == source_info.size
            && tags_agree(source_info.e_tag.as_deref(), found.e_tag.as_deref())
        {
            self.record(task, found, None).await?;
            return Ok(CopyOutcome::Skipped { bytes: found.size });
        }
        let (written, md5) = self.stream(&source, &target, source_info.size).await.map_err(fail)?;
        self.record(task, &written, Some(md5)).await?;
        Ok(CopyOutcome::Copied { bytes: written.size })
    }

    /// Writes rewritten contents (a manifest, a manifest list, a delete
    /// file) unless the target already holds exactly these bytes; records it
    /// under `source`. The outcome's size is the size of what is at the
    /// target, which the caller records (a manifest's length in its list, a
    /// delete file's size in its manifest).
    ///
    /// With `keep_existing_rewrites` an existing target is kept whatever its
    /// bytes: on a table that existed before replication (the old primary
    /// after a failover) it is the very original this source was copied from,
    /// and overwriting it would change the size older manifests there record.
    ///
    /// The MD5 is computed only for stores that give S3-style entity tags to
    /// compare it with; a local file has none, so its checkpoint records no
    /// checksum (as for any store that gives none).
    pub async fn put(&self, source: &str, target: &str, bytes: Bytes) -> Result<CopyOutcome, CopyError> {
        self.put_unless_same(source, target, bytes, async |_| false).await
    }

    /// [`Copier::put`], where an existing target of another size or checksum
    /// is also kept if `same` says it holds the same contents in other
    /// bytes (a rewrite by another version of icerelay, say).
    pub async fn put_unless_same(
        &self,
        source: &str,
        target: &str,
        bytes: Bytes,
        same: impl AsyncFnOnce(&ObjectInfo) -> bool,
    ) -> Result<CopyOutcome, CopyError> {
        let fail = |error| CopyError::Storage { source_url: source.to_owned(), target: target.to_owned(), error };
        let location = self.storage.resolve(target).map_err(fail)?;
        let md5 = (!is_local(&location)).then(|| md5_hex(&bytes));
        let size = bytes.len() as u64;
        if let Some(found) = head(&location).await.map_err(fail)?
            && (self.settings.keep_existing_rewrites
                || found.size == size
                    && tags_agree(md5.as_ref().map(|m| format!("\"{m}\"")).as_deref(), found.e_tag.as_deref())
                || same(&found).await)
        {
            let checksum = found.e_tag.as_deref().map(|t| t.trim_matches('"').to_owned());
            self.checkpoints.put(source, CopiedFile { target: target.to_owned(), size: found.size, checksum }).await?;
            return Ok(CopyOutcome::Skipped { bytes: found.size });
        }
        let result = location
            .store
            .put_opts(&location.path, PutPayload::from_bytes(bytes), location.put_options())
            .await
            .map_err(|e| fail(StorageError::store("write", target, e)))?;
        let expected = md5.clone().map_or(ExpectedTag::Unknown, ExpectedTag::Single);
        let written = verify_written(&location, size, result.e_tag.as_deref(), &expected).await.map_err(fail)?;
        self.checkpoints
            .put(source, CopiedFile { target: target.to_owned(), size: written.size, checksum: md5 })
            .await?;
        Ok(CopyOutcome::Copied { bytes: size })
    }

    async fn record(&self, task: &CopyTask, info: &ObjectInfo, md5: Option<String>) -> Result<(), CheckpointError> {
        let checksum = md5.or_else(|| info.e_tag.as_deref().map(|t| t.trim_matches('"').to_owned()));
        self.checkpoints.put(&task.source, CopiedFile { target: task.target.clone(), size: info.size, checksum }).await
    }

    /// Streams `source` to `target`; returns what was written and its MD5.
    async fn stream(
        &self,
        source: &Location,
        target: &Location,
        size: u64,
    ) -> Result<(ObjectInfo, String), StorageError> {
        let get = source.store.get(&source.path).await.map_err(|e| StorageError::store("read", &source.url, e))?;
        let mut chunks = get.into_stream();
        let part_size = self.settings.part_size.max(5 * 1024 * 1024);
        let mut whole = Md5::new();

        if size <= part_size as u64 {
            let mut buf = BytesMut::with_capacity(usize::try_from(size).unwrap_or(0));
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk.map_err(|e| StorageError::store("read", &source.url, e))?;
                buf.extend_from_slice(&chunk);
            }
            if buf.len() as u64 != size {
                return Err(StorageError::Verification {
                    url: source.url.clone(),
                    detail: format!("read {} bytes of a {size}-byte object", buf.len()),
                });
            }
            whole.update(&buf);
            let md5 = hex(&whole.finalize());
            let result = target
                .store
                .put_opts(&target.path, PutPayload::from_bytes(buf.freeze()), target.put_options())
                .await
                .map_err(|e| StorageError::store("write", &target.url, e))?;
            let info = verify_written(target, size, result.e_tag.as_deref(), &ExpectedTag::Single(md5.clone())).await?;
            return Ok((info, md5));
        }

        let mut upload = target
            .store
            .put_multipart_opts(&target.path, target.multipart_options())
            .await
            .map_err(|e| StorageError::store("write", &target.url, e))?;
        // (entity tag of the completed upload, MD5 of each part, bytes read)
        type Uploaded = (Option<String>, Vec<[u8; 16]>, u64);
        let outcome: Result<Uploaded, StorageError> = async {
            let mut buf = BytesMut::with_capacity(part_size);
            let mut in_flight = FuturesUnordered::new();
            let mut part_digests = Vec::new();
            let mut total = 0u64;
            let limit = self.settings.part_concurrency.max(1);
            loop {
                let chunk = chunks.next().await.transpose().map_err(|e| StorageError::store("read", &source.url, e))?;
                let done = chunk.is_none();
                if let Some(chunk) = chunk {
                    whole.update(&chunk);
                    total += chunk.len() as u64;
                    buf.extend_from_slice(&chunk);
                }
                while buf.len() >= part_size || (done && !buf.is_empty()) {
                    let take = buf.len().min(part_size);
                    let part = buf.split_to(take).freeze();
                    part_digests.push(<[u8; 16]>::from(Md5::digest(&part)));
                    in_flight.push(upload.put_part(PutPayload::from_bytes(part)));
                    while in_flight.len() >= limit {
                        if let Some(r) = in_flight.next().await {
                            r.map_err(|e| StorageError::store("write", &target.url, e))?;
                        }
                    }
                }
                if done {
                    break;
                }
            }
            while let Some(r) = in_flight.next().await {
                r.map_err(|e| StorageError::store("write", &target.url, e))?;
            }
            let result = upload.complete().await.map_err(|e| StorageError::store("write", &target.url, e))?;
            Ok((result.e_tag, part_digests, total))
        }
        .await;
        let (e_tag, part_digests, total) = match outcome {
            Ok(v) => v,
            Err(e) => {
                // Leaves nothing behind: an incomplete multipart upload is not an object.
                let _ = upload.abort().await;
                return Err(e);
            }
        };
        if total != size {
            return Err(StorageError::Verification {
                url: source.url.clone(),
                detail: format!("read {total} bytes of a {size}-byte object"),
            });
        }
        let expected =
            ExpectedTag::Multipart { digest: hex(&Md5::digest(part_digests.concat())), parts: part_digests.len() };
        let info = verify_written(target, size, e_tag.as_deref(), &expected).await?;
        Ok((info, hex(&whole.finalize())))
    }
}

/// The entity tag a correct upload should have, in S3's convention.
pub(crate) enum ExpectedTag {
    /// Not computed (the store gives no MD5 tags to compare with).
    Unknown,
    /// A single PUT: the MD5 of the content.
    Single(String),
    /// A multipart upload: the MD5 of the parts' MD5s, and the part count.
    Multipart {
        /// Hex MD5 of the concatenated part digests.
        digest: String,
        /// Number of parts.
        parts: usize,
    },
}

/// Checks the written object's size, and its entity tag when it looks like an S3 MD5 tag.
///
/// A local file is not read back: the local store writes the whole payload
/// to a staging file and renames it into place, or fails, so a `HEAD` after a
/// successful put could only repeat the size written.
pub(crate) async fn verify_written(
    target: &Location,
    size: u64,
    put_tag: Option<&str>,
    expected: &ExpectedTag,
) -> Result<ObjectInfo, StorageError> {
    if is_local(target) {
        return Ok(ObjectInfo { size, e_tag: put_tag.map(str::to_owned) });
    }
    let info = head(target).await?.ok_or_else(|| StorageError::Verification {
        url: target.url.clone(),
        detail: "the object is missing after writing".into(),
    })?;
    if info.size != size {
        return Err(StorageError::Verification {
            url: target.url.clone(),
            detail: format!("wrote {size} bytes, the store holds {}", info.size),
        });
    }
    let tag = put_tag.or(info.e_tag.as_deref()).map(|t| t.trim_matches('"').to_owned());
    if let Some(tag) = tag {
        let mismatch = match expected {
            ExpectedTag::Unknown => false,
            ExpectedTag::Single(md5) => is_md5(&tag) && tag != *md5,
            ExpectedTag::Multipart { digest, parts } => match tag.split_once('-') {
                Some((d, n)) if is_md5(d) => d != digest || n.parse::<usize>().ok() != Some(*parts),
                _ => false,
            },
        };
        if mismatch {
            return Err(StorageError::Verification {
                url: target.url.clone(),
                detail: format!("the store's checksum {tag} does not match the content written"),
            });
        }
    }
    Ok(info)
}

/// Whether `location` is a local file (`file://`), which has no MD5 entity tags.
fn is_local(location: &Location) -> bool {
    super::local_path(&super::normalize_file_url(&location.url)).is_some()
}

/// Whether two entity tags agree, as far as they can be compared: plain MD5
/// tags must be equal; others (multipart, local files) are not comparable.
fn tags_agree(a: Option<&str>, b: Option<&str>) -> bool {
    match (a.map(|t| t.trim_matches('"')), b.map(|t| t.trim_matches('"'))) {
        (Some(a), Some(b)) if is_md5(a) && is_md5(b) => a == b,
        _ => true,
    }
}

fn is_md5(tag: &str) -> bool {
    tag.len() == 32 && tag.bytes().all(|b| b.is_ascii_hexdigit())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lower-case hex MD5 of `bytes`.
pub fn md5_hex(bytes: &[u8]) -> String {
    hex(&Md5::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::checkpoint::Journal;

    fn local(dir: &std::path::Path, name: &str) -> String {
        format!("file://{}/{name}", dir.display())
    }

    #[tokio::test]
    async fn copies_once_then_skips_and_detects_partial_targets() {
        let dir = tempfile::tempdir().expect("dir");
        let storage = Arc::new(Storage::new(&[crate::config::StorageConfig::local_dir(dir.path())]));
        let big: Vec<u8> = (0..(12 * 1024 * 1024 + 7)).map(|i| (i % 251) as u8).collect();
        storage.write(&local(dir.path(), "src/big.bin"), Bytes::from(big.clone())).await.expect("seed");
        storage.write(&local(dir.path(), "src/small.bin"), Bytes::from_static(b"small")).await.expect("seed");
        let journal = Arc::new(Journal::open(&dir.path().join("journal.jsonl")).expect("journal"));
        let settings = CopySettings { parallelism: 2, part_size: 5 * 1024 * 1024, ..CopySettings::default() };
        let copier = Copier::new(storage.clone(), journal.clone(), settings);
        let tasks: Vec<CopyTask> = ["big.bin", "small.bin"]
            .iter()
            .map(|n| CopyTask {
                source: local(dir.path(), &format!("src/{n}")),
                target: local(dir.path(), &format!("dst/{n}")),
            })
            .collect();
        let report = copier.copy_all(tasks.clone(), &|_, _| {}).await.expect("copy");
        assert_eq!((report.copied_files, report.copied_bytes), (2, big.len() as u64 + 5));
        assert_eq!(storage.read(&tasks[0].target, u64::MAX).await.expect("read"), Bytes::from(big.clone()));
        assert_eq!(journal.len(), 2);

        let again = copier.copy_all(tasks.clone(), &|_, _| {}).await.expect("rerun");
        assert_eq!((again.copied_files, again.skipped_files), (0, 2));

        // A truncated target (wrong size) is copied again, even with a checkpoint.
        storage.write(&tasks[1].target, Bytes::from_static(b"sm")).await.expect("truncate");
        let third = copier.copy_all(tasks.clone(), &|_, _| {}).await.expect("repair");
        assert_eq!((third.copied_files, third.skipped_files), (1, 1));
        assert_eq!(storage.read(&tasks[1].target, 100).await.expect("read"), Bytes::from_static(b"small"));
    }

    #[tokio::test]
    async fn a_missing_source_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("dir");
        let copier = Copier::new(
            Arc::new(Storage::new(&[crate::config::StorageConfig::local_dir(dir.path())])),
            Arc::new(super::super::checkpoint::NoCheckpoints),
            CopySettings::default(),
        );
        let task = CopyTask { source: local(dir.path(), "nope"), target: local(dir.path(), "out") };
        let e = copier.copy(&task).await.expect_err("missing");
        assert!(e.to_string().contains("nope") && e.to_string().contains("does not exist"), "{e}");
        assert!(!e.is_retryable());
    }

    #[test]
    fn entity_tags_compare_only_when_comparable() {
        let a = "\"0123456789abcdef0123456789abcdef\"";
        assert!(tags_agree(Some(a), Some(a)));
        assert!(!tags_agree(Some(a), Some("\"ffffffffffffffffffffffffffffffff\"")));
        assert!(tags_agree(Some(a), Some("\"abc-3\"")));
        assert!(tags_agree(None, Some(a)));
    }
}
