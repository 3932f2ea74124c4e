//! The HTTP side of the CLI's API commands: where the server is, which token to send, and
//! what to tell the user when the server cannot be reached or refuses.
//!
//! Every answer that is not a success becomes one line that says what to do: a missing token
//! names `--token`/`FLYWHEEL_TOKEN`, an unreachable server names its URL, anything else carries
//! the API's own `{code, message}`.

use anyhow::{Context as _, bail};
use reqwest::{Method, StatusCode};
use serde_json::Value;

/// Where the API is and who is calling: the flags every API command takes.
#[derive(clap::Args, Debug, Clone)]
pub struct RemoteArgs {
    /// The flywheel server (`http://host:port`; `host:port` means http).
    #[arg(
        long,
        env = "FLYWHEEL_SERVER",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub server: String,
    /// An API token (`fw_…`); the server's `--auth off` needs none.
    #[arg(long, env = "FLYWHEEL_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Print the server's JSON answer instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// A connection to one flywheel server, with the caller's token.
#[derive(Debug, Clone)]
pub struct Remote {
    base: String,
    http: reqwest::Client,
    has_token: bool,
    /// Whether commands print JSON rather than tables.
    pub json: bool,
}

impl Remote {
    pub fn new(args: &RemoteArgs) -> anyhow::Result<Self> {
        let base = if args.server.contains("://") {
            args.server.clone()
        } else {
            format!("http://{}", args.server)
        };
        let base = base.trim_end_matches('/').to_owned();
        let url = reqwest::Url::parse(&base)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some());
        if url.is_none() {
            bail!(
                "--server {}: give an http(s) URL or host:port, such as http://127.0.0.1:8080",
                args.server
            );
        }
        let mut headers = reqwest::header::HeaderMap::new();
        let token = args
            .token
            .as_deref()
            .map(str::trim)
            .filter(|t| !t.is_empty());
        if let Some(token) = token {
            let value = format!("Bearer {token}")
                .parse()
                .context("--token has characters a header cannot carry")?;
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(std::time::Duration::from_secs(5))
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            base,
            http,
            has_token: token.is_some(),
            json: args.json,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Whether requests carry a token.
    pub fn has_token(&self) -> bool {
        self.has_token
    }

    /// A request to `path` (which starts with `/`), for callers that need more than JSON.
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.base))
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn patch(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.call(Method::PATCH, path, Some(body)).await
    }

    pub async fn put(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.call(Method::PUT, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<Value> {
        self.call(Method::DELETE, path, None).await
    }

    /// Sends a JSON request and returns the JSON answer of a 2xx (`null` for an empty one).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut request = self.request(method, path);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = self.send(request).await?;
        let bytes = response
            .bytes()
            .await
            .context("reading the server's answer")?;
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "the server at {} did not answer with JSON (is it flywheel?)",
                self.base
            )
        })
    }

    /// Sends `request`; a 2xx answer comes back as it is, anything else as an error that says
    /// what to do.
    pub async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> anyhow::Result<reqwest::Response> {
        let response = request.send().await.map_err(|e| self.unreachable(e))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        Err(self.refusal(status, &body))
    }

    fn unreachable(&self, e: reqwest::Error) -> anyhow::Error {
        if e.is_connect() || e.is_timeout() {
            anyhow::anyhow!(
                "could not reach flywheel at {} (is `flywheel serve` running there? set --server or FLYWHEEL_SERVER)",
                self.base
            )
        } else {
            anyhow::Error::new(e).context(format!("talking to flywheel at {}", self.base))
        }
    }

    /// One line for a non-2xx answer: the API's `{code, message}`, and for a missing or
    /// refused token, where a token comes from.
    pub fn refusal(&self, status: StatusCode, body: &Value) -> anyhow::Error {
        let code = body["code"].as_str().unwrap_or("");
        let message = body["message"].as_str().unwrap_or("");
        if code.is_empty() && message.is_empty() {
            return anyhow::anyhow!(
                "the server at {} answered {status} without flywheel's error body (is it flywheel?)",
                self.base
            );
        }
        match status {
            StatusCode::UNAUTHORIZED if !self.has_token => anyhow::anyhow!(
                "the server at {} wants a token: pass --token or set FLYWHEEL_TOKEN (an admin \
                 creates them with `flywheel tokens create`)",
                self.base
            ),
            StatusCode::UNAUTHORIZED => {
                anyhow::anyhow!("{message} — check --token / FLYWHEEL_TOKEN ({code})")
            }
            _ => anyhow::anyhow!("{message} ({code})"),
        }
    }
}

/// `value` as one path segment, or an error for a value that cannot name one.
pub fn segment(what: &str, value: &str) -> anyhow::Result<String> {
    if value.is_empty() || value.contains('/') || value.trim() != value {
        bail!("{what} `{value}`: a name without `/` or surrounding spaces");
    }
    Ok(
        percent_encoding::utf8_percent_encode(value, percent_encoding::NON_ALPHANUMERIC)
            .to_string(),
    )
}
