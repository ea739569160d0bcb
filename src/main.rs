//! The `icerelay` command: parses flags, sets up logging, and runs a subcommand.

// Data from the network, files and configuration is handled as errors with
// context; outside tests nothing may unwrap it.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::path::PathBuf;
use std::process::ExitCode;

mod commands;

use clap::{Parser, Subcommand};
use icerelay::config::{self, Overrides, ProcessEnv};
use icerelay::logging::{self, LogFormat};
use icerelay::serve::{Server, shutdown_signal};

// Decoding manifests allocates millions of small values; mimalloc makes
// rewrites about 30% faster than the system allocator (benches/rewrite.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Transparent huge pages off for this process. mimalloc asks for them, and
/// the short-lived buffers of manifest rewrites then fault in (and zero)
/// whole 2 MiB pages, again after every purge: on a copy of a table with a
/// million manifest entries that doubled the peak resident memory (243 MiB
/// against 132) and tripled the system time (4.0 s against 0.8-1.4). Applies
/// to the whole process, before anything is allocated in earnest.
#[cfg(target_os = "linux")]
fn disable_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and touches no
    // memory of this program; failing (an old kernel) only leaves THP on.
    let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}

#[cfg(not(target_os = "linux"))]
fn disable_transparent_huge_pages() {}

/// Exit code for an invalid configuration given to `serve` (EX_USAGE).
const EXIT_USAGE: u8 = 64;

/// icerelay: an Iceberg REST catalog proxy that replicates tables on commit.
///
/// Point your engines' catalog `uri` at icerelay instead of the primary
/// catalog. Every request is forwarded unchanged; successful commits are
/// replayed onto the replica catalogs named in the configuration.
#[derive(Debug, Parser)]
#[command(name = "icerelay", version, propagate_version = true)]
struct Cli {
    /// Log format: `text` (human-readable) or `json` (one object per line).
    /// The level comes from RUST_LOG (default `info`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy (and the admin listener).
    ///
    /// Examples:
    ///   icerelay serve --config icerelay.toml
    ///   icerelay serve --upstream http://127.0.0.1:8181 --listen 127.0.0.1:9181
    ///
    /// Flags override the file; with --upstream no file is needed.
    #[command(verbatim_doc_comment)]
    Serve {
        /// Configuration file (TOML). See README.md for every key.
        #[arg(long, short, env = "ICERELAY_CONFIG")]
        config: Option<PathBuf>,
        /// Proxy address, e.g. 127.0.0.1:9181 (overrides `listen`).
        #[arg(long)]
        listen: Option<String>,
        /// Admin address for /healthz, /readyz, /metrics (overrides `admin_listen`).
        #[arg(long)]
        admin_listen: Option<String>,
        /// The primary catalog's base URI, e.g. http://127.0.0.1:8181 (overrides `[primary] uri`).
        #[arg(long)]
        upstream: Option<String>,
        /// The URL clients use to reach icerelay (overrides `public_url`).
        #[arg(long)]
        public_url: Option<String>,
    },
    /// Copy a table to another location, rewriting every path, copying every file.
    ///
    /// Copies the data, delete and metadata files of the selected snapshots
    /// (default: all, so time travel works on the copy), rewrites every path
    /// (manifest lists, manifests, position-delete files, deletion vectors,
    /// metadata.json) and writes the new metadata.json last. Rerun the same
    /// command after an interruption: finished files are skipped.
    ///
    /// Example:
    ///   icerelay copy-table --config icerelay.toml \
    ///     --source-metadata s3://warehouse/db/events/metadata/v8.metadata.json \
    ///     --target-location s3://backup/db/events
    #[command(verbatim_doc_comment)]
    CopyTable(commands::copy_table::Args),
    /// Show the replication status of a running icerelay, one line per table and destination.
    ///
    /// Reads the admin listener's /v1/replication/status. Exits 0 when no lane
    /// failed, 1 when one did, 2 when the admin API cannot be read.
    ///
    /// Examples:
    ///   icerelay status
    ///   icerelay status --admin http://127.0.0.1:9182 sales.orders
    #[command(verbatim_doc_comment)]
    Status(commands::status::Args),
    /// Promote replicas (failover): each becomes a writable table of its own.
    ///
    /// Asks the admin API of the icerelay that replicates the tables. By
    /// default it first replicates what the source still serves (and waits up
    /// to --timeout); with --now it takes the replicas as they are. Prints each
    /// replica's metadata location, recovery point and missed snapshots.
    /// Exits 0 when all were promoted, 1 when one was not, 2 when the admin
    /// API cannot be asked.
    ///
    /// Examples:
    ///   icerelay promote --destination dr --table sales.orders
    ///   icerelay promote --destination dr --namespace sales --now
    ///   icerelay promote --destination dr --now
    #[command(verbatim_doc_comment)]
    Promote(commands::promote::Args),
    /// Fail back onto an old primary that has snapshots the new one never received.
    ///
    /// Its lane stops and names them; this keeps them on a new branch (or
    /// leaves them unreferenced) and follows the new primary from the newest
    /// snapshot both sides have.
    ///
    /// Examples:
    ///   icerelay failback --destination old --table sales.orders --keep-unreplicated-as-branch before_failover
    ///   icerelay failback --destination old --table sales.orders --continue-from-common-ancestor
    #[command(verbatim_doc_comment)]
    Failback(commands::failback::Args),
    /// Validate a configuration file and print every problem found.
    ///
    /// Exits 0 when the file is valid, 1 otherwise.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    disable_transparent_huge_pages();
    let cli = Cli::parse();
    logging::init(cli.log_format);
    match cli.command {
        Command::Serve { config, listen, admin_listen, upstream, public_url } => {
            let overrides = Overrides { listen, admin_listen, upstream, public_url };
            let config = match config::load(config.as_deref(), &overrides, &ProcessEnv) {
                Ok(c) => c,
                Err(errors) => {
                    eprintln!("icerelay: invalid configuration:\n{errors}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            serve(config)
        }
        Command::CopyTable(args) => run_to_exit_code(commands::copy_table::run(args)),
        Command::Status(args) => run_to_exit_code(commands::status::run(args)),
        Command::Promote(args) => run_to_exit_code(commands::promote::run(args)),
        Command::Failback(args) => run_to_exit_code(commands::failback::run(args)),
        Command::CheckConfig { file } => match config::load(Some(&file), &Overrides::default(), &ProcessEnv) {
            Ok(c) => {
                println!(
                    "{}: ok (primary {}, {} storage, {} destinations, {} rules)",
                    file.display(),
                    c.primary.uri,
                    c.storage.len(),
                    c.destinations.len(),
                    c.rules.len()
                );
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{}: {} problem(s):", file.display(), errors.0.len());
                for e in &errors.0 {
                    eprintln!("  {e}");
                }
                ExitCode::FAILURE
            }
        },
    }
}

fn serve(config: config::Config) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("icerelay: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let server = Server::bind(config).await?;
        server.run(shutdown_signal()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "icerelay stopped");
            eprintln!("icerelay: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a command that answers its exit code on a runtime of its own.
fn run_to_exit_code(command: impl std::future::Future<Output = u8>) -> ExitCode {
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => ExitCode::from(runtime.block_on(command)),
        Err(e) => {
            eprintln!("icerelay: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}
