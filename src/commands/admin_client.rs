//! The admin API as the CLI commands (`status`, `promote`) reach it: the
//! listener's address, the bearer token and the CA of an `https` listener.

use serde_json::Value;

/// How to reach a running icerelay's admin API.
#[derive(Debug, Clone, clap::Args)]
pub struct AdminArgs {
    /// The admin listener of the icerelay to ask.
    #[arg(long, env = "ICERELAY_ADMIN", default_value = "http://127.0.0.1:9182")]
    pub admin: String,
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

/// A client for one admin listener.
pub struct AdminClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl AdminClient {
    /// Builds the client: reads the token file and the CA, if given.
    pub fn new(args: &AdminArgs) -> Result<Self, String> {
        let token = match (&args.token, &args.token_file) {
            (Some(t), _) => Some(t.trim().to_owned()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read the token file {}: {e}", path.display()))?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        let roots = icerelay::tls::reqwest_roots(args.ca_file.as_deref()).map_err(|e| format!("--ca-file: {e}"))?;
        // No redirects: the token must not travel to wherever a redirect points.
        let http = reqwest::Client::builder()
            .tls_certs_merge(roots)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        Ok(Self { base: args.admin.trim_end_matches('/').to_owned(), token, http })
    }

    /// `GET path`: the JSON answer of a 2xx, else an error with the API's message.
    pub async fn get(&self, path: &str) -> Result<Value, String> {
        let (status, body, url) = self.send(self.http.get(format!("{}{path}", self.base)), path).await?;
        if status.is_success() { Ok(body) } else { Err(failure(&url, status, &body)) }
    }

    /// `POST path` with a JSON body: the status and JSON answer, whatever the status.
    pub async fn post(&self, path: &str, body: &Value) -> Result<(reqwest::StatusCode, Value), String> {
        let request = self.http.post(format!("{}{path}", self.base)).json(body);
        let (status, body, _) = self.send(request, path).await?;
        Ok((status, body))
    }

    async fn send(
        &self,
        mut request: reqwest::RequestBuilder,
        path: &str,
    ) -> Result<(reqwest::StatusCode, Value, String), String> {
        let url = format!("{}{path}", self.base);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("cannot reach {url}: {}", icerelay::causes::transport(&e.without_url())))?;
        let status = response.status();
        if status.is_redirection() {
            let to = response.headers().get(reqwest::header::LOCATION).and_then(|l| l.to_str().ok()).unwrap_or("?");
            return Err(format!("{url} answered {status} redirecting to {to}; icerelay does not follow redirects"));
        }
        if status == reqwest::StatusCode::UNAUTHORIZED && self.token.is_none() {
            return Err(format!("{url} needs the admin token: pass --token, --token-file or set ICERELAY_ADMIN_TOKEN"));
        }
        let body: Value =
            response.json().await.map_err(|e| format!("{url} did not answer JSON: {}", e.without_url()))?;
        Ok((status, body, url))
    }
}

/// The admin API's error message, with the URL and status.
pub fn failure(url: &str, status: reqwest::StatusCode, body: &Value) -> String {
    let message = body.pointer("/error/message").and_then(Value::as_str).unwrap_or("(no message)");
    format!("{url} answered {status}: {message}")
}

/// `namespace.table` split at its last dot (nested namespaces are dotted).
pub fn split_table(text: &str) -> Option<(&str, &str)> {
    text.rsplit_once('.').filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
}
