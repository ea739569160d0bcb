//! `icerelay failback`: what becomes of the snapshots only the old side has.
//!
//! After a failover, the old primary configured as a destination of the new
//! one is followed from the newest snapshot both have. If it has snapshots
//! the new primary never received (written after the last replication), its
//! lane stops and names them; this command tells it what to do: keep them on
//! a branch, or leave them unreferenced, and in both cases follow the new
//! primary from the common ancestor. Exit code 0 when the choice was
//! recorded, 1 when the admin API refused it, 2 when it could not be asked.

use serde_json::json;

use super::admin_client::{AdminArgs, AdminClient, failure, split_table};

/// The arguments of `failback`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("choice").required(true).args(["keep_unreplicated_as_branch", "continue_from_common_ancestor"])))]
pub struct Args {
    /// How to reach the admin API.
    #[command(flatten)]
    pub admin: AdminArgs,
    /// The destination (the old primary).
    #[arg(long)]
    pub destination: String,
    /// The source table (`namespace.table`).
    #[arg(long)]
    pub table: String,
    /// Keep the old side's own snapshots on this new branch.
    #[arg(long, value_name = "NAME")]
    pub keep_unreplicated_as_branch: Option<String>,
    /// Leave the old side's own snapshots in the table, unreferenced.
    #[arg(long)]
    pub continue_from_common_ancestor: bool,
}

/// Runs the command; returns the process exit code.
pub async fn run(args: Args) -> u8 {
    let Some((ns, name)) = split_table(&args.table) else {
        eprintln!("icerelay failback: {:?} is not NAMESPACE.TABLE", args.table);
        return 2;
    };
    let destination =
        percent_encoding::utf8_percent_encode(&args.destination, percent_encoding::NON_ALPHANUMERIC).to_string();
    let path = format!("/v1/replication/namespaces/{ns}/tables/{name}/destinations/{destination}/failback");
    let body = match &args.keep_unreplicated_as_branch {
        Some(branch) => json!({"keep_unreplicated_as_branch": branch}),
        None => json!({"continue_from_common_ancestor": true}),
    };
    let answer = match AdminClient::new(&args.admin) {
        Ok(client) => client.post(&path, &body).await,
        Err(message) => Err(message),
    };
    match answer {
        Ok((status, _)) if status.is_success() => {
            let what = match &args.keep_unreplicated_as_branch {
                Some(branch) => format!("its own snapshots go to branch {branch}"),
                None => "its own snapshots stay unreferenced".to_owned(),
            };
            println!(
                "{} on {}: follows the source from the common ancestor; {what} (icerelay status {} shows the progress)",
                args.table, args.destination, args.table
            );
            0
        }
        Ok((status, body)) => {
            eprintln!("icerelay failback: {}", failure(&path, status, &body));
            1
        }
        Err(message) => {
            eprintln!("icerelay failback: {message}");
            2
        }
    }
}
