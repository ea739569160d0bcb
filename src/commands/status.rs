//! `icerelay status`: the replication status of a running icerelay, as a table.
//!
//! Reads the admin API (`/v1/replication/status`, or one table's lanes) and
//! prints one line per table and destination, then the errors in full. The
//! exit code says whether anything needs attention: 0 when every lane is
//! completed, pending or paused, 1 when one failed, 2 when the admin API could
//! not be read. `--json` prints the answer as it came.

use serde_json::Value;

use super::admin_client::{AdminArgs, AdminClient, split_table};

/// The arguments of `status`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// How to reach the admin API.
    #[command(flatten)]
    pub admin: AdminArgs,
    /// One source table (`namespace.table`, nested namespaces dotted); default: all.
    pub table: Option<String>,
    /// Print the admin API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs the command; returns the process exit code.
pub async fn run(args: Args) -> u8 {
    let path = match &args.table {
        Some(t) => match split_table(t) {
            Some((ns, name)) => format!("/v1/replication/namespaces/{ns}/tables/{name}"),
            None => {
                eprintln!("icerelay status: {t:?} is not NAMESPACE.TABLE");
                return 2;
            }
        },
        None => "/v1/replication/status".to_owned(),
    };
    let answer = match AdminClient::new(&args.admin) {
        Ok(client) => client.get(&path).await,
        Err(message) => Err(message),
    };
    let answer = match answer {
        Ok(v) => v,
        Err(message) => {
            eprintln!("icerelay status: {message}");
            return 2;
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&answer).unwrap_or_default());
    } else {
        print!("{}", render(&answer));
    }
    let tables: Vec<&Value> = match answer.get("tables").and_then(Value::as_array) {
        Some(all) => all.iter().collect(),
        None => vec![&answer],
    };
    let failed = tables
        .iter()
        .filter_map(|t| t.get("destinations").and_then(Value::as_array))
        .flatten()
        .any(|lane| lane.get("status").and_then(Value::as_str) == Some("failed"));
    u8::from(failed)
}

/// The answer as a table: one row per (table, destination), then the errors.
fn render(answer: &Value) -> String {
    let tables: Vec<&Value> = match answer.get("tables").and_then(Value::as_array) {
        Some(all) => all.iter().collect(),
        None => vec![answer],
    };
    let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("-").to_owned();
    let mut rows = vec![
        ["TABLE", "DESTINATION", "STATUS", "BEHIND", "LAG", "LAST SUCCESS", "REPLICA METADATA"].map(str::to_owned),
    ];
    let mut errors = Vec::new();
    for table in tables {
        let namespace: Vec<&str> = table
            .get("namespace")
            .and_then(Value::as_array)
            .map(|levels| levels.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let name = format!("{}.{}", namespace.join("."), text(table.get("table")));
        for lane in table.get("destinations").and_then(Value::as_array).into_iter().flatten() {
            let destination = text(lane.get("destination"));
            let number = |key: &str| lane.get(key).and_then(Value::as_i64).unwrap_or(0);
            rows.push([
                name.clone(),
                destination.clone(),
                text(lane.get("status")),
                format!("{} snapshots", number("snapshots_behind")),
                format!("{}s", number("seconds_behind")),
                text(lane.get("last_success_at")),
                text(lane.get("replica_metadata_location")),
            ]);
            if let Some(error) = lane.get("last_error").filter(|e| !e.is_null()) {
                let waits = error.get("waits_for_operator").and_then(Value::as_bool).unwrap_or(false);
                errors.push(format!(
                    "{name} -> {destination}: {} (attempt {}, {}{})",
                    text(error.get("message")),
                    error.get("attempts").and_then(Value::as_i64).unwrap_or(0),
                    text(error.get("at")),
                    if waits { "; waits for an operator: fix the cause, then resync" } else { "; retrying" }
                ));
            }
        }
    }
    let mut widths = [0usize; 7];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    if rows.len() == 1 {
        out.push_str("(no replicated tables yet)\n");
    }
    for e in errors {
        out.push('\n');
        out.push_str(&e);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_one_row_per_lane_and_the_errors_in_full() {
        let answer = json!({"tables": [{"namespace": ["a", "b"], "table": "t", "destinations": [
            {"destination": "dr", "status": "completed", "snapshots_behind": 0, "seconds_behind": 0,
             "last_success_at": "2026-12-01T19:31:44.979Z", "replica_metadata_location": "s3://r/a.b/t/metadata/v3.metadata.json",
             "last_error": null},
            {"destination": "eu", "status": "failed", "snapshots_behind": 2, "seconds_behind": 40,
             "last_success_at": null, "replica_metadata_location": null,
             "last_error": {"message": "the replica has diverged", "at": "2026-12-01T19:40:00.000Z", "attempts": 3, "waits_for_operator": true}}]}]});
        let text = render(&answer);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("TABLE") && lines[0].contains("REPLICA METADATA"), "{text}");
        assert!(
            lines[1].starts_with("a.b.t") && lines[1].contains("completed") && lines[1].contains("v3.metadata.json")
        );
        assert!(lines[2].contains("failed") && lines[2].contains("2 snapshots") && lines[2].contains("40s"));
        assert!(text.contains("a.b.t -> eu: the replica has diverged (attempt 3") && text.contains("then resync"));
        assert!(render(&json!({"tables": []})).contains("no replicated tables"));
    }
}
