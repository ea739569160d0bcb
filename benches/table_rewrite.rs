//! Rewriting a large table's metadata: `icerelay copy-table --metadata-only`
//! against Iceberg's own `RewriteTablePath` (the Spark action), on the same
//! table, in the same run.
//!
//! The table is written by Iceberg's Java library as a Spark job's commits
//! write it (`support/java/BigTable.java`: fast appends of data files with
//! full column metrics, deflate Avro), on a local `file:/` warehouse. Both
//! sides rewrite every manifest list, manifest and metadata file of every
//! snapshot to a new location; neither touches data files. Reported: wall
//! time per round, icerelay's peak resident memory, and the ratio of the
//! fastest rounds (Spark's first round includes its JIT warming up).
//!
//! ```text
//! cargo bench --bench table_rewrite [-- --commits 1024 --files 1000 --rounds 3 --spark-rounds 2]
//! ```
//!
//! Needs `scripts/setup-test-env.sh` (Spark and Iceberg's runtime) and a JDK
//! (`javac`: Debian's `openjdk-17-jdk-headless`).

#[path = "support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn main() {
    let Some(args) = support::BenchArgs::from_env("table_rewrite") else { return };
    let commits: usize = args.get("--commits", 1024);
    let files: usize = args.get("--files", 1000);
    let rounds: usize = args.get("--rounds", 3);
    let spark_rounds: usize = args.get("--spark-rounds", 2);

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let teststack = std::env::var_os("ICERELAY_TESTSTACK").map_or_else(|| root.join(".teststack"), PathBuf::from);
    let classpath = spark_classpath(&teststack);
    let work = tempfile::tempdir().expect("temp dir");
    let location = format!("file:{}/source/t", work.path().display());

    let started = Instant::now();
    let metadata = write_table(&root, work.path(), &classpath, &location, commits, files);
    let (manifests, lists) = metadata_sizes(&work.path().join("source/t/metadata"));
    println!(
        "table: {commits} commits of {files} data files ({} entries), manifests {:.1} MiB, manifest lists {:.1} MiB, written in {:.0} s",
        commits * files,
        mib(manifests),
        mib(lists),
        started.elapsed().as_secs_f64()
    );

    let config = work.path().join("icerelay.toml");
    std::fs::write(&config, format!("[[storage]]\nprefix = \"file://{}/\"\n", work.path().display())).expect("config");
    let mut icerelay = Vec::new();
    for round in 0..rounds {
        let target = work.path().join(format!("icerelay-{round}"));
        let (took, peak) = copy_table(&config, &metadata, &target);
        println!("icerelay copy-table --metadata-only: {:.2} s, peak RSS {peak:.0} MiB", took.as_secs_f64());
        icerelay.push((took, peak));
        // Each round's copy (about 90 MiB) stays until the temporary
        // directory goes: on this machine's ext4, a file created within
        // minutes of a mass delete first scans the recently freed inodes
        // (`recently_deleted` in the inode allocator), which took 16% of the
        // samples of a round run just after the previous round's deletion.
    }
    let spark = rewrite_table_path(&root, &teststack, &classpath, &location, work.path(), spark_rounds);
    for took in &spark {
        println!("RewriteTablePath (Spark action): {:.2} s", took.as_secs_f64());
    }

    let ours = fastest(icerelay.iter().map(|(t, _)| *t).collect());
    let theirs = fastest(spark.clone());
    let peak = icerelay.iter().map(|(_, p)| *p).fold(0.0, f64::max);
    println!(
        "\nfastest: icerelay {:.2} s (peak RSS {peak:.0} MiB), RewriteTablePath {:.2} s: icerelay {:.1}x faster",
        ours.as_secs_f64(),
        theirs.as_secs_f64(),
        theirs.as_secs_f64() / ours.as_secs_f64()
    );
}

/// Iceberg's Spark runtime and pyspark's own jars (Hadoop, Jackson, ...).
fn spark_classpath(teststack: &Path) -> String {
    let runtime = std::fs::read_to_string(teststack.join("spark/classpath"))
        .expect("no Spark class path: run scripts/setup-test-env.sh first");
    let lib = teststack.join("venv/lib");
    let site = std::fs::read_dir(&lib)
        .expect("the test venv")
        .filter_map(Result::ok)
        .map(|e| e.path().join("site-packages/pyspark/jars"))
        .find(|p| p.is_dir())
        .expect("pyspark's jars in the test venv");
    let mut jars: Vec<String> = std::fs::read_dir(site)
        .expect("pyspark jars")
        .filter_map(Result::ok)
        .map(|e| e.path().display().to_string())
        .filter(|p| p.ends_with(".jar"))
        .collect();
    jars.sort();
    format!("{}:{}", runtime.trim(), jars.join(":"))
}

/// Compiles and runs `BigTable.java`; returns the table's metadata.json.
fn write_table(root: &Path, work: &Path, classpath: &str, location: &str, commits: usize, files: usize) -> String {
    let classes = work.join("classes");
    std::fs::create_dir_all(&classes).expect("classes dir");
    let source = root.join("benches/support/java/BigTable.java");
    let status = Command::new("javac")
        .args(["-d", &classes.display().to_string(), "-cp", classpath, &source.display().to_string()])
        .status()
        .expect("javac (install a JDK: openjdk-17-jdk-headless)");
    assert!(status.success(), "javac failed");
    let output = Command::new("java")
        .args(["-Xmx3g", "-cp", &format!("{classpath}:{}", classes.display())])
        .args(["BigTable", location, &commits.to_string(), &files.to_string()])
        .stderr(Stdio::null())
        .output()
        .expect("java");
    assert!(output.status.success(), "BigTable failed");
    String::from_utf8_lossy(&output.stdout).lines().last().expect("the metadata location").trim().to_owned()
}

/// Bytes of manifests and of manifest lists under `dir`.
fn metadata_sizes(dir: &Path) -> (u64, u64) {
    let mut sizes = (0, 0);
    for entry in std::fs::read_dir(dir).expect("metadata dir").filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let size = entry.metadata().map_or(0, |m| m.len());
        if name.starts_with("snap-") {
            sizes.1 += size;
        } else if name.ends_with(".avro") {
            sizes.0 += size;
        }
    }
    sizes
}

/// One `icerelay copy-table --metadata-only`: its wall time and peak RSS
/// (MiB, from the high-water mark the kernel keeps, read while it runs).
fn copy_table(config: &Path, metadata: &str, target: &Path) -> (Duration, f64) {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_icerelay"))
        .args(["copy-table", "--metadata-only", "--config", &config.display().to_string()])
        .args(["--source-metadata", metadata, "--target-location", &format!("file://{}/t", target.display())])
        .args(["--checkpoint-dir", &target.join("journal").display().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("icerelay");
    let mut peak = 0.0f64;
    let status = loop {
        // NaN once the process is gone: max keeps the last reading.
        peak = peak.max(support::services::peak_rss_mib(child.id()));
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(status.success(), "copy-table failed");
    (started.elapsed(), peak)
}

fn rewrite_table_path(
    root: &Path,
    teststack: &Path,
    classpath: &str,
    location: &str,
    work: &Path,
    rounds: usize,
) -> Vec<Duration> {
    let output = Command::new(teststack.join("venv/bin/python"))
        .arg(root.join("benches/support/rewrite_table_path.py"))
        .args([classpath, location, &format!("file:{}/spark/t", work.display())])
        .arg(format!("file:{}/spark-staging/", work.display()))
        .arg(rounds.to_string())
        .stderr(Stdio::null())
        .output()
        .expect("python");
    assert!(output.status.success(), "RewriteTablePath failed");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("rewrite_table_path "))
        .filter_map(|s| s.trim().parse::<f64>().ok())
        .map(Duration::from_secs_f64)
        .collect()
}

fn fastest(values: Vec<Duration>) -> Duration {
    values.into_iter().min().unwrap_or_default()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
