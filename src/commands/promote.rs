//! `icerelay promote`: failover. A replica becomes a table of its own.
//!
//! Asks the admin API of the icerelay that replicates the table to promote
//! the replica on one destination (one table, a namespace, or everything
//! replicated there), waits for it, and prints per table the replica's
//! metadata location, the recovery point (the last source snapshot it
//! received) and how many source snapshots it did not receive. Exit code 0
//! when every table was promoted, 1 when one was not, 2 when the admin API
//! could not be asked.

use serde_json::{Value, json};

use super::admin_client::{AdminArgs, AdminClient, failure, split_table};

/// The arguments of `promote`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// How to reach the admin API.
    #[command(flatten)]
    pub admin: AdminArgs,
    /// The destination whose replicas are promoted.
    #[arg(long)]
    pub destination: String,
    /// One source table (`namespace.table`).
    #[arg(long, conflicts_with = "namespace")]
    pub table: Option<String>,
    /// Every replicated table of one source namespace (dotted).
    #[arg(long)]
    pub namespace: Option<String>,
    /// Promote the replicas as they are, without first replicating what the
    /// source still serves (when the source is gone).
    #[arg(long)]
    pub now: bool,
    /// How long to wait for replication to drain and the promotion to finish.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
}

/// Runs the command; returns the process exit code.
pub async fn run(args: Args) -> u8 {
    let client = match AdminClient::new(&args.admin) {
        Ok(c) => c,
        Err(message) => {
            eprintln!("icerelay promote: {message}");
            return 2;
        }
    };
    let mut body = json!({"now": args.now, "timeout_seconds": args.timeout.as_secs().max(1)});
    let destination =
        percent_encoding::utf8_percent_encode(&args.destination, percent_encoding::NON_ALPHANUMERIC).to_string();
    let path = match (&args.table, &args.namespace) {
        (Some(table), _) => match split_table(table) {
            Some((ns, name)) => {
                format!("/v1/replication/namespaces/{ns}/tables/{name}/destinations/{destination}/promote")
            }
            None => {
                eprintln!("icerelay promote: {table:?} is not NAMESPACE.TABLE");
                return 2;
            }
        },
        (None, namespace) => {
            if let (Some(ns), Some(obj)) = (namespace, body.as_object_mut()) {
                obj.insert("namespace".into(), json!(ns.split('.').collect::<Vec<_>>()));
            }
            format!("/v1/replication/destinations/{destination}/promote")
        }
    };
    let (status, answer) = match client.post(&path, &body).await {
        Ok(a) => a,
        Err(message) => {
            eprintln!("icerelay promote: {message}");
            return 2;
        }
    };
    if args.table.is_some() {
        if !status.is_success() {
            eprintln!("icerelay promote: {}", failure(&path, status, &answer));
            return 1;
        }
        print!("{}", render_lane(args.table.as_deref().unwrap_or_default(), &args.destination, &answer));
        return 0;
    }
    let promoted = answer.get("promoted").and_then(Value::as_array).cloned().unwrap_or_default();
    let not_promoted = answer.get("not_promoted").and_then(Value::as_array).cloned().unwrap_or_default();
    if answer.get("promoted").is_none() {
        eprintln!("icerelay promote: {}", failure(&path, status, &answer));
        return 2;
    }
    for entry in &promoted {
        print!("{}", render_lane(&table_name(entry), &args.destination, entry.get("lane").unwrap_or(&Value::Null)));
    }
    for entry in &not_promoted {
        eprintln!(
            "{}: not promoted: {}",
            table_name(entry),
            entry.get("message").and_then(Value::as_str).unwrap_or("(no message)")
        );
    }
    if promoted.is_empty() && not_promoted.is_empty() {
        println!(
            "nothing to promote on destination {} (no replicated tables, or all promoted already)",
            args.destination
        );
    }
    u8::from(!not_promoted.is_empty())
}

fn table_name(entry: &Value) -> String {
    let namespace: Vec<&str> = entry
        .get("namespace")
        .and_then(Value::as_array)
        .map(|levels| levels.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    format!("{}.{}", namespace.join("."), entry.get("table").and_then(Value::as_str).unwrap_or("?"))
}

/// What one promotion did, in a few lines.
fn render_lane(table: &str, destination: &str, lane: &Value) -> String {
    let promotion = lane.get("promotion").unwrap_or(&Value::Null);
    let replica = lane.get("replica").map_or_else(String::new, |r| {
        let ns: Vec<&str> = r
            .get("namespace")
            .and_then(Value::as_array)
            .map(|l| l.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        format!("{}.{}", ns.join("."), r.get("name").and_then(Value::as_str).unwrap_or("?"))
    });
    let metadata = promotion.get("replica_metadata_location").and_then(Value::as_str).unwrap_or("-");
    let point = match promotion.get("recovery_point").filter(|p| !p.is_null()) {
        Some(p) => format!(
            "snapshot {} ({})",
            p.get("snapshot_id").and_then(Value::as_i64).unwrap_or_default(),
            p.get("timestamp").and_then(Value::as_str).unwrap_or("-")
        ),
        None => "none (the replica has no snapshot)".to_owned(),
    };
    let answered = promotion.get("source_answered").and_then(Value::as_bool).unwrap_or(false);
    let missed = match promotion.get("missed_snapshots").and_then(Value::as_i64) {
        Some(0) if answered => "none: the replica had every source snapshot".to_owned(),
        Some(n) if answered => format!("{n} source snapshot(s) not received"),
        Some(n) => format!("{n} source snapshot(s) not received as of the last check (the source did not answer)"),
        None => "unknown (the source did not answer)".to_owned(),
    };
    format!(
        "promoted {replica} on {destination} (replica of {table})\n  metadata:       {metadata}\n  recovery point: {point}\n  missed:         {missed}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_recovery_point_and_what_was_missed() {
        let lane = json!({"replica": {"namespace": ["db"], "name": "t"}, "promotion": {
            "replica_metadata_location": "s3://r/db/t/metadata/00003.metadata.json",
            "recovery_point": {"snapshot_id": 42, "timestamp": "2026-12-04T10:00:00.000Z"},
            "missed_snapshots": 2, "source_answered": false}});
        let text = render_lane("db.t", "dr", &lane);
        assert!(text.starts_with("promoted db.t on dr (replica of db.t)"), "{text}");
        assert!(text.contains("00003.metadata.json") && text.contains("snapshot 42 (2026-12-04T10:00:00.000Z)"));
        assert!(text.contains("2 source snapshot(s) not received as of the last check"), "{text}");
    }
}
