//! `icerelay status`: the replication status of a running icerelay, as a table.
//!
//! Reads the admin API (`/v1/replication/status`, or one table's lanes) and
//! prints one line per table and destination, then the errors in full. The
//! exit code says whether anything needs attention: 0 when every lane is
//! completed, pending or paused, 1 when one failed, 2 when the admin API could
//! not be read. `--json` prints the answer as it came.

use serde_json::Value;

/// The arguments of `status`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The admin listener of the icerelay to ask.
    #[arg(long, env = "ICERELAY_ADMIN", default_value = "http://127.0.0.1:9182")]
    pub admin: String,
    /// One source table (`namespace.table`, nested namespaces dotted); default: all.
    pub table: Option<String>,
    /// Print the admin API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The admin API's bearer token (the server's `admin_token`).
    #[arg(long, env = "ICERELAY_ADMIN_TOKEN", hide_env_values = true, conflicts_with = "token_file")]
    pub token: Option<String>,
    /// A file holding the admin API's bearer token.
    #[arg(long)]
    pub token_file: Option<std::path::PathBuf>,
    /// PEM file of the CA that issued an `https` admin listener's certificate
    /// (`admin_tls_cert_file`), trusted besides the system's roots.
    #[arg(long, env = "ICERELAY_ADMIN_CA_FILE")]
    pub ca_file: Option<std::path::PathBuf>,
}

impl Args {
    /// The token to send, from `--token`, `ICERELAY_ADMIN_TOKEN` or `--token-file`.
    fn token(&self) -> Result<Option<String>, String> {
        match (&self.token, &self.token_file) {
            (Some(t), _) => Ok(Some(t.trim().to_owned())),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map(|t| Some(t.trim().to_owned()))
                .map_err(|e| format!("cannot read the token file {}: {e}", path.display())),
            (None, None) => Ok(None),
        }
    }
}

/// Runs the command; returns the process exit code.
pub async fn run(args: Args) -> u8 {
    let base = args.admin.trim_end_matches('/');
    let url = match &args.table {
        Some(t) => match t.rsplit_once('.') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() => {
                format!("{base}/v1/replication/namespaces/{ns}/tables/{name}")
            }
            _ => {
                eprintln!("icerelay status: {t:?} is not NAMESPACE.TABLE");
                return 2;
            }
        },
        None => format!("{base}/v1/replication/status"),
    };
    let token = match args.token() {
        Ok(t) => t,
        Err(message) => {
            eprintln!("icerelay status: {message}");
            return 2;
        }
    };
    let answer = match fetch(&url, token.as_deref(), args.ca_file.as_deref()).await {
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

async fn fetch(url: &str, token: Option<&str>, ca_file: Option<&std::path::Path>) -> Result<Value, String> {
    let roots = icerelay::tls::reqwest_roots(ca_file).map_err(|e| format!("--ca-file: {e}"))?;
    // No redirects: the token must not travel to wherever a redirect points.
    let client = reqwest::Client::builder()
        .tls_certs_merge(roots)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
    let mut request = client.get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .map_err(|e| format!("cannot reach {url}: {}", icerelay::causes::transport(&e.without_url())))?;
    let status = response.status();
    if status.is_redirection() {
        let to = response.headers().get(reqwest::header::LOCATION).and_then(|l| l.to_str().ok()).unwrap_or("?");
        return Err(format!("{url} answered {status} redirecting to {to}; icerelay status does not follow redirects"));
    }
    if status == reqwest::StatusCode::UNAUTHORIZED && token.is_none() {
        return Err(format!("{url} needs the admin token: pass --token, --token-file or set ICERELAY_ADMIN_TOKEN"));
    }
    let body: Value = response.json().await.map_err(|e| format!("{url} did not answer JSON: {}", e.without_url()))?;
    if status.is_success() {
        Ok(body)
    } else {
        let message = body.pointer("/error/message").and_then(Value::as_str).unwrap_or("(no message)");
        Err(format!("{url} answered {status}: {message}"))
    }
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
