//! Copy throughput of icerelay's copy engine against a raw object copy.
//!
//! Two SeaweedFS servers on loopback; a set of objects (many small, a few
//! large enough for multipart) in the first. Each round copies the same bytes
//! to the second twice, to fresh keys: once with `Copier::copy_all` (streaming,
//! multipart, MD5/ETag verification, checkpoints) and once with a raw
//! object_store copy (stream each object through a `BufWriter`, no checks),
//! both with the same file parallelism. Reported as MB/s and the ratio.
//!
//! ```text
//! cargo bench --bench copy [-- --rounds 3 --small 48 --small-mib 4 --large 6 --large-mib 40]
//! ```

#[path = "support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use icerelay::config::{Secret, StorageConfig, StorageKind};
use icerelay::storage::Storage;
use icerelay::storage::checkpoint::NoCheckpoints;
use icerelay::storage::copy::{Copier, CopySettings, CopyTask};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::buffered::BufWriter;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tokio::io::AsyncWriteExt;

const PARALLELISM: usize = 8;

fn main() {
    let Some(args) = support::BenchArgs::from_env("copy") else { return };
    let flag = |flag: &str, default: usize| args.get(flag, default);
    let rounds = flag("--rounds", 3);
    let files: Vec<usize> = std::iter::repeat_n(flag("--small-mib", 4) << 20, flag("--small", 48))
        .chain(std::iter::repeat_n(flag("--large-mib", 40) << 20, flag("--large", 6)))
        .collect();
    let total: usize = files.iter().sum();

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let work = tempfile::tempdir().expect("temp dir");
    let source = Seaweed::start(&root, &work.path().join("source"), free_base());
    let target = Seaweed::start(&root, &work.path().join("target"), free_base());

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(async {
        let src = source.store();
        let names: Vec<String> = (0..files.len()).map(|i| format!("bench/src/data/file-{i:03}.parquet")).collect();
        futures::stream::iter(names.iter().zip(&files))
            .map(|(name, size)| {
                let src = src.clone();
                let body: Vec<u8> = (0..*size).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
                async move { src.put(&ObjectPath::from(name.as_str()), PutPayload::from(body)).await }
            })
            .buffer_unordered(4)
            .try_collect::<Vec<_>>()
            .await
            .expect("upload");
        println!("{} objects, {:.0} MB in the source store", files.len(), total as f64 / 1e6);

        let storage =
            Arc::new(Storage::new(&[source.config("s3://warehouse/bench/"), target.config("s3://warehouse/")]));
        let copier = Copier::new(
            storage,
            Arc::new(NoCheckpoints),
            CopySettings { parallelism: PARALLELISM, ..CopySettings::default() },
        );
        let dst = target.store();
        let mut raw_times = Vec::new();
        let mut icerelay_times = Vec::new();
        for round in 0..rounds {
            let started = Instant::now();
            futures::stream::iter(&names)
                .map(|name| raw_copy(&src, &dst, name, name.replace("bench/src/", &format!("raw{round}/t/"))))
                .buffer_unordered(PARALLELISM)
                .try_collect::<Vec<()>>()
                .await
                .expect("raw copy");
            raw_times.push(started.elapsed());

            let tasks: Vec<CopyTask> = names
                .iter()
                .map(|name| CopyTask {
                    source: format!("s3://warehouse/{name}"),
                    target: format!("s3://warehouse/{}", name.replace("bench/src/", &format!("ice{round}/t/"))),
                })
                .collect();
            let started = Instant::now();
            copier.copy_all(tasks, &|_, _| {}).await.expect("icerelay copy");
            icerelay_times.push(started.elapsed());
            println!(
                "round {round}: raw {:.2} s, icerelay {:.2} s",
                raw_times[round].as_secs_f64(),
                icerelay_times[round].as_secs_f64()
            );
        }
        let median = |times: &mut Vec<Duration>| {
            times.sort();
            times[times.len() / 2].as_secs_f64()
        };
        let (raw, ours) = (median(&mut raw_times), median(&mut icerelay_times));
        println!();
        println!(
            "| copy of {:.0} MB ({} objects), parallelism {PARALLELISM} | median time | MB/s |",
            total as f64 / 1e6,
            files.len()
        );
        println!("|---|---|---|");
        println!("| raw object_store copy | {raw:.2} s | {:.0} |", total as f64 / 1e6 / raw);
        println!("| icerelay Copier (verified) | {ours:.2} s | {:.0} |", total as f64 / 1e6 / ours);
        println!("| ratio | {:.2}x | |", raw / ours);
    });
    source.stop(&root);
    target.stop(&root);
}

/// Streams one object through a buffered writer: multipart above its capacity.
async fn raw_copy(src: &Arc<AmazonS3>, dst: &Arc<AmazonS3>, from: &str, to: String) -> object_store::Result<()> {
    let mut body = src.get(&ObjectPath::from(from)).await?.into_stream();
    let dst: Arc<dyn ObjectStore> = dst.clone();
    let mut writer = BufWriter::with_capacity(dst, ObjectPath::from(to), 8 << 20).with_max_concurrency(2);
    while let Some(chunk) = body.next().await {
        let chunk: Bytes = chunk?;
        writer.write_all(&chunk).await.map_err(|e| object_store::Error::Generic { store: "raw", source: e.into() })?;
    }
    writer.shutdown().await.map_err(|e| object_store::Error::Generic { store: "raw", source: e.into() })
}

/// A base port whose 17 ports (SeaweedFS uses base..=base+16) are all free.
fn free_base() -> u16 {
    let seed = std::process::id() as u16;
    (0..200u16)
        .map(|i| 20_000 + (seed.wrapping_add(i * 97) % 200) * 100)
        .find(|base| (*base..=base + 16).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()))
        .expect("a free port range")
}

struct Seaweed {
    dir: PathBuf,
    endpoint: String,
}

impl Seaweed {
    fn start(root: &std::path::Path, dir: &std::path::Path, base: u16) -> Self {
        let out = Command::new(root.join("scripts/teststack/seaweedfs.sh"))
            .args(["start", "bench", &dir.display().to_string(), &base.to_string()])
            .env("WATCH_PID", std::process::id().to_string())
            .output()
            .expect("seaweedfs.sh");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        let endpoint = text.lines().find_map(|l| l.strip_prefix("S3_ENDPOINT=")).expect("endpoint").to_owned();
        Self { dir: dir.to_owned(), endpoint }
    }

    fn config(&self, prefix: &str) -> StorageConfig {
        StorageConfig {
            prefix: prefix.to_owned(),
            kind: StorageKind::S3 {
                sse: None,
                storage_class: None,
                ca_file: None,
                endpoint: Some(self.endpoint.parse().expect("url")),
                region: "us-east-1".into(),
                path_style: true,
                access_key_id: Some("admin".into()),
                secret_access_key: Some(Secret::new("adminsecret")),
                session_token: None,
            },
        }
    }

    fn store(&self) -> Arc<AmazonS3> {
        Arc::new(
            AmazonS3Builder::new()
                .with_endpoint(&self.endpoint)
                .with_allow_http(true)
                .with_bucket_name("warehouse")
                .with_region("us-east-1")
                .with_virtual_hosted_style_request(false)
                .with_access_key_id("admin")
                .with_secret_access_key("adminsecret")
                .build()
                .expect("store"),
        )
    }

    fn stop(&self, root: &std::path::Path) {
        let _ = Command::new(root.join("scripts/teststack/seaweedfs.sh"))
            .args(["stop", &self.dir.display().to_string()])
            .status();
    }
}
