//! `icerelay copy-table`: a one-shot copy of a table to another location.
//!
//! Reads the source `metadata.json`, copies and rewrites every file the
//! selected snapshots need (see `icerelay::table_copy`), writes the rewritten
//! metadata last, prints its location and a summary, and optionally
//! registers the copy in a REST catalog. Interrupted, it can be run again with
//! the same arguments: finished files are recorded in a journal and skipped.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use icerelay::catalog::{ClientSettings, Namespace, RestCatalog, TableIdent};
use icerelay::config::{self, AuthConfig, DestinationConfig, Overrides, ProcessEnv, StorageConfig};
use icerelay::rewrite::PathMap;
use icerelay::rewrite::metadata::{current_snapshot_ids, retain_snapshots, snapshot_ids};
use icerelay::storage::Storage;
use icerelay::storage::checkpoint::Journal;
use icerelay::storage::copy::{Copier, CopySettings};
use icerelay::table_copy::{CopyProgress, TableCopier};
use serde_json::{Value, json};

/// Which snapshots to copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Snapshots {
    /// Every snapshot still in the metadata, so time travel works on the copy.
    All,
    /// Only the current snapshot (and those refs point at).
    Current,
}

/// The arguments of `copy-table`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The source table's metadata.json (s3://... or file:///...).
    #[arg(long)]
    pub source_metadata: String,
    /// Where the copy goes: its table location (s3://bucket/ns/table or file:///path).
    #[arg(long)]
    pub target_location: String,
    /// Extra path mapping FROM=TO, for files outside the table location
    /// (write.data.path, object-store layouts). Repeatable; the longest FROM wins.
    #[arg(long = "map", value_name = "FROM=TO")]
    pub maps: Vec<String>,
    /// Configuration file whose [[storage]] sections give endpoints and credentials.
    /// copy-table reads and writes only under their prefixes (and --allow-local).
    #[arg(long, env = "ICERELAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// A local directory copy-table may read and write, as a `[[storage]]`
    /// section with prefix `file:///DIR/` would allow. Repeatable.
    #[arg(long = "allow-local", value_name = "DIR")]
    pub allow_local: Vec<PathBuf>,
    /// `all` (default) or `current`.
    #[arg(long, value_enum, default_value_t = Snapshots::All)]
    pub snapshots: Snapshots,
    /// Print the plan (files, bytes, rewritten paths) as JSON and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Write the rewritten metadata, manifests and delete files, but leave
    /// data files to something else (bucket replication, an earlier copy).
    #[arg(long)]
    pub metadata_only: bool,
    /// Register the copy in this REST catalog (base URI) under --table.
    #[arg(long, requires = "table")]
    pub register: Option<String>,
    /// NAMESPACE.TABLE for --register (the last dot separates the table).
    #[arg(long)]
    pub table: Option<String>,
    /// Warehouse to ask the --register catalog for.
    #[arg(long)]
    pub register_warehouse: Option<String>,
    /// Directory of the copy journal (default: ~/.local/state/icerelay/copy-table).
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Files copied at once.
    #[arg(long, default_value_t = 16)]
    pub parallelism: usize,
}

/// Runs the command; returns the process exit code.
pub async fn run(args: Args) -> u8 {
    match execute(args).await {
        Ok(()) => 0,
        Err(message) => {
            eprintln!("icerelay copy-table: {message}");
            1
        }
    }
}

/// Reads the source, plans, and copies (or prints the plan), then registers.
async fn execute(args: Args) -> Result<(), String> {
    let started = Instant::now();
    let (storage_configs, destinations) = load_config(&args)?;
    let (copier, journal, journal_path) = open_copier(&args, storage_configs)?;

    let mut metadata = copier.read_metadata(&args.source_metadata).await.map_err(|e| e.to_string())?;
    let source_location = metadata
        .get("location")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{} has no `location`", args.source_metadata))?
        .to_owned();
    let mut map = PathMap::from_locations(&source_location, &args.target_location).map_err(|e| e.to_string())?;
    for pair in &args.maps {
        let (from, to) = pair.split_once('=').ok_or_else(|| format!("--map {pair:?}: expected FROM=TO"))?;
        map.add(from, to).map_err(|e| e.to_string())?;
    }
    let snapshots: BTreeSet<i64> = match args.snapshots {
        Snapshots::All => snapshot_ids(&metadata),
        Snapshots::Current => {
            let keep = current_snapshot_ids(&metadata);
            retain_snapshots(&mut metadata, &keep);
            keep
        }
    };
    let target_metadata = map
        .rewrite(&args.source_metadata, "--source-metadata")
        .map_err(|e| format!("{e} (the metadata file is outside the table location; add --map for its directory)"))?;

    if args.dry_run {
        let files = copier
            .plan(&metadata, &args.source_metadata, &map, &snapshots, &target_metadata)
            .await
            .map_err(|e| e.to_string())?;
        let bytes: u64 = files.iter().filter_map(|f| f.size).sum();
        let plan = json!({
            "source_metadata": args.source_metadata,
            "target_metadata": target_metadata,
            "mappings": map.pairs().map(|(f, t)| json!({"from": f, "to": t})).collect::<Vec<_>>(),
            "snapshots": snapshots,
            "totals": {
                "files": files.len(),
                "bytes": bytes,
                "copy": files.iter().filter(|f| f.action == "copy").count(),
                "rewrite": files.iter().filter(|f| f.action == "rewrite").count(),
            },
            "files": files,
        });
        println!("{}", serde_json::to_string_pretty(&plan).unwrap_or_default());
        return Ok(());
    }

    if !journal.is_empty() {
        tracing::info!(journal = %journal_path.display(), records = journal.len(), "resuming: files recorded in the journal are not copied again");
    }
    let progress = Progress::new();
    let copied = copier
        .copy_snapshots(&metadata, &args.source_metadata, &map, &snapshots, &progress)
        .await
        .map_err(|e| format!("{e}\n(rerun the same command to resume; finished files are skipped)"))?;
    copier
        .write_metadata(&metadata, &args.source_metadata, &map, &target_metadata, &|_| false)
        .await
        .map_err(|e| e.to_string())?;
    progress.finish();

    let r = copied.report;
    println!("metadata: {target_metadata}");
    println!(
        "copied {} files ({}), skipped {} already there ({}), {} snapshots, in {:.1} s",
        r.copied_files,
        human_bytes(r.copied_bytes),
        r.skipped_files,
        human_bytes(r.skipped_bytes),
        snapshots.len(),
        started.elapsed().as_secs_f64()
    );

    if let (Some(uri), Some(table)) = (&args.register, &args.table) {
        register(&args, &destinations, uri, table, &target_metadata).await?;
    }
    Ok(())
}

/// The table copier for `args`: the configured stores plus the
/// `--allow-local` directories, and the journal that makes a rerun resume.
fn open_copier(
    args: &Args,
    mut storage_configs: Vec<StorageConfig>,
) -> Result<(TableCopier, Arc<Journal>, PathBuf), String> {
    for dir in &args.allow_local {
        // Canonical, so `..` and links resolve as the URLs under it will.
        let dir = std::fs::canonicalize(dir)
            .or_else(|_| std::path::absolute(dir))
            .map_err(|e| format!("--allow-local {}: {e}", dir.display()))?;
        storage_configs.push(StorageConfig::local_dir(&dir));
    }
    let storage = Arc::new(Storage::new(&storage_configs));
    let checkpoint_dir = args.checkpoint_dir.clone().unwrap_or_else(default_checkpoint_dir);
    let journal_path = checkpoint_dir
        .join(format!("{}.jsonl", journal_name(&args.source_metadata, &args.target_location, args.metadata_only)));
    let journal = Arc::new(Journal::open(&journal_path).map_err(|e| e.to_string())?);
    let settings = CopySettings { parallelism: args.parallelism.max(1), ..CopySettings::default() };
    let mut copier = TableCopier::new(Copier::new(storage, journal.clone(), settings), 4);
    if args.metadata_only {
        copier = copier.metadata_only();
    }
    Ok((copier, journal, journal_path))
}

/// Registers the copy as `table` in the catalog at `uri`; a configured
/// destination at that URI lends its credentials and CA.
async fn register(
    args: &Args,
    destinations: &[DestinationConfig],
    uri: &str,
    table: &str,
    target_metadata: &str,
) -> Result<(), String> {
    let ident = parse_table(table)?;
    let base = reqwest::Url::parse(uri).map_err(|e| format!("--register {uri:?}: {e}"))?;
    let known = destinations.iter().find(|d| d.uri.as_str().trim_end_matches('/') == uri.trim_end_matches('/'));
    let auth = known.map_or(AuthConfig::None, |d| d.auth.clone());
    let settings = ClientSettings {
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(60),
        ca_file: known.and_then(|d| d.ca_file.clone()),
    };
    let catalog = RestCatalog::new("register", base, args.register_warehouse.clone(), &auth, settings)
        .map_err(|e| e.to_string())?;
    catalog.ensure_namespace(&ident.namespace).await.map_err(|e| e.to_string())?;
    let registered = catalog.register_table(&ident, target_metadata).await.map_err(|e| e.to_string())?;
    println!(
        "registered {ident} in {uri}: {}",
        registered.metadata_location.as_deref().unwrap_or("(no metadata location returned)")
    );
    Ok(())
}

fn load_config(args: &Args) -> Result<(Vec<StorageConfig>, Vec<DestinationConfig>), String> {
    let Some(path) = &args.config else { return Ok((Vec::new(), Vec::new())) };
    // Only [[storage]] and [[destinations]] matter here; a placeholder primary
    // lets a storage-only file validate.
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut raw = config::parse(&text, &ProcessEnv).map_err(|e| format!("{}:\n{e}", path.display()))?;
    if raw.primary.is_none() {
        let overrides = Overrides { upstream: Some("http://127.0.0.1:1".into()), ..Overrides::default() };
        raw.primary = Some(config::raw::RawPrimary { uri: overrides.upstream, ..Default::default() });
    }
    let config = config::validate(raw).map_err(|e| format!("{}:\n{e}", path.display()))?;
    Ok((config.storage, config.destinations))
}

fn parse_table(text: &str) -> Result<TableIdent, String> {
    let (ns, name) = text.rsplit_once('.').ok_or_else(|| format!("--table {text:?}: expected NAMESPACE.TABLE"))?;
    if ns.is_empty() || name.is_empty() {
        return Err(format!("--table {text:?}: expected NAMESPACE.TABLE"));
    }
    Ok(TableIdent::new(Namespace::from_dotted(ns), name))
}

fn default_checkpoint_dir() -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("icerelay/copy-table")
}

/// One journal per source, target and mode: a manifest a metadata-only copy
/// wrote does not mean its data files are there, so a full copy keeps its own.
fn journal_name(source: &str, target: &str, metadata_only: bool) -> String {
    let mode = if metadata_only { "\nmetadata-only" } else { "" };
    icerelay::storage::copy::md5_hex(format!("{source}\n{target}{mode}").as_bytes())
}

fn human_bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{value:.1} {}", units[unit]) }
}

/// A progress bar on a terminal, a log line every few seconds otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    files: AtomicU64,
    done: AtomicU64,
    bytes: AtomicU64,
    last_log: std::sync::Mutex<Instant>,
}

impl Progress {
    fn new() -> Self {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} files {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
        Self {
            bar,
            files: AtomicU64::new(0),
            done: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            last_log: std::sync::Mutex::new(Instant::now()),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl CopyProgress for Progress {
    fn discovered(&self, files: u64, _bytes: u64) {
        self.files.fetch_add(files, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.inc_length(files);
        }
    }

    fn done(&self, bytes: u64, _skipped: bool) {
        let done = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        let total_bytes = self.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if let Some(bar) = &self.bar {
            bar.inc(1);
            bar.set_message(human_bytes(total_bytes));
        } else if let Ok(mut last) = self.last_log.lock()
            && last.elapsed() >= Duration::from_secs(5)
        {
            *last = Instant::now();
            tracing::info!(
                files_done = done,
                files_found = self.files.load(Ordering::Relaxed),
                bytes = total_bytes,
                "copying"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_split_at_the_last_dot() {
        let t = parse_table("a.b.events").expect("valid");
        assert_eq!(t.namespace.levels(), ["a", "b"]);
        assert_eq!(t.name, "events");
        assert!(parse_table("events").is_err());
        assert!(parse_table(".x").is_err());
    }

    #[test]
    fn byte_counts_read_well() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(3 * 1024 * 1024), "3.0 MiB");
    }
}
