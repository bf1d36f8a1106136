//! A Confluent-compatible schema registry client: exactly the REST calls
//! the agent and the consumer tools use (Confluent's documented API, which
//! Karapace, Apicurio's ccompat endpoint and Redpanda also serve):
//!
//! - `GET /config/{subject}?defaultToGlobal=true`, then `GET /config` when
//!   the subject has no level of its own: the compatibility level (for the
//!   log only);
//! - `POST /compatibility/subjects/{subject}/versions/latest?verbose=true`:
//!   would the registry accept this schema (404 = nothing to check
//!   against yet);
//! - `POST /subjects/{subject}/versions`: register (idempotent: the same
//!   schema gets its existing id);
//! - `POST /subjects/{subject}`: the id of a schema already registered
//!   (looked up first, so a schema registered once is never checked again);
//! - `GET /schemas/ids/{id}`: a schema by id.
//!
//! Invariants:
//! - an error names the registry URL and the call; a reply the registry
//!   sent (HTTP status, its `error_code` and `message`) is kept verbatim;
//! - a 404 means "no such subject, version or schema" only with a 404xx
//!   `error_code`; a bare 404 is a URL that does not serve this API;
//! - [`RegistryError::is_fatal`] is true only for answers retrying cannot
//!   change (the registry refused the schema, the credentials, or the
//!   client configuration); an unreachable registry or a 5xx is retried;
//! - credentials never appear in errors or logs.

use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use crate::config::SchemaRegistryConfig;

/// Media type of the registry's API.
const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("schema registry client configuration: {0}")]
    Config(String),
    #[error("schema registry at {url} cannot be reached ({call}): {message}")]
    Unreachable {
        url: String,
        call: String,
        message: String,
    },
    #[error("schema registry at {url} answered {status} to {call} (error code {code}): {message}")]
    Refused {
        url: String,
        call: String,
        status: u16,
        code: i64,
        message: String,
    },
    #[error("schema registry at {url} rejects schema {schema} under subject {subject}: {reasons}")]
    Incompatible {
        url: String,
        subject: String,
        schema: String,
        reasons: String,
    },
    #[error("journal entry {host_seq} cannot be published in the schema registry's framing: {reason}; it stays in the journal (run a build that ships its schema, or remove [schema_registry])")]
    Unframable { host_seq: u64, reason: String },
    #[error("schema registry at {url}: unexpected reply to {call}: {detail}")]
    BadReply {
        url: String,
        call: String,
        detail: String,
    },
}

impl RegistryError {
    /// Errors that retrying cannot fix.
    pub fn is_fatal(&self) -> bool {
        match self {
            RegistryError::Config(_)
            | RegistryError::Incompatible { .. }
            | RegistryError::Unframable { .. } => true,
            // 408 and 429 are "try later"; other 4xx are the registry's
            // answer (bad credentials, invalid or incompatible schema).
            RegistryError::Refused { status, .. } => {
                (400..500).contains(status) && *status != 408 && *status != 429
            }
            RegistryError::Unreachable { .. } | RegistryError::BadReply { .. } => false,
        }
    }
}

/// The registry's error body.
#[derive(Deserialize, Default)]
struct ErrorBody {
    #[serde(default)]
    error_code: i64,
    #[serde(default)]
    message: String,
}

#[derive(Clone)]
pub struct RegistryClient {
    http: reqwest::Client,
    base: String,
    user: Option<String>,
    password: Option<String>,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// Percent-encodes a subject for a path segment.
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl RegistryClient {
    pub fn new(cfg: &SchemaRegistryConfig) -> Result<Self, RegistryError> {
        let read = |key: &str, p: &std::path::Path| {
            std::fs::read(p).map_err(|e| {
                RegistryError::Config(format!("schema_registry.{key} {}: {e}", p.display()))
            })
        };
        let mut b = reqwest::Client::builder()
            .timeout(cfg.timeout.0)
            .connect_timeout(cfg.timeout.0.min(Duration::from_secs(5)))
            .user_agent(concat!("virtstream/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &cfg.tls_ca_file {
            let pem = read("tls_ca_file", ca)?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| RegistryError::Config(format!("schema_registry.tls_ca_file: {e}")))?
            {
                b = b.add_root_certificate(cert);
            }
        }
        if let (Some(cert), Some(key)) = (&cfg.tls_cert_file, &cfg.tls_key_file) {
            let mut pem = read("tls_cert_file", cert)?;
            pem.push(b'\n');
            pem.extend(read("tls_key_file", key)?);
            let id = reqwest::Identity::from_pem(&pem).map_err(|e| {
                RegistryError::Config(format!("schema_registry.tls_cert_file/tls_key_file: {e}"))
            })?;
            b = b.identity(id);
        }
        let http = b
            .build()
            .map_err(|e| RegistryError::Config(e.to_string()))?;
        let password = cfg
            .password()
            .map_err(|e| RegistryError::Config(format!("schema_registry.password_file: {e}")))?;
        Ok(RegistryClient {
            http,
            base: cfg.url.trim_end_matches('/').to_string(),
            user: cfg.username.clone(),
            password,
        })
    }

    /// The registry's base URL (for messages).
    pub fn url(&self) -> &str {
        &self.base
    }

    /// One call: `Ok(None)` for a 404, the JSON body for a 2xx.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Option<serde_json::Value>, RegistryError> {
        let call = format!("{method} {}", path.split('?').next().unwrap_or(path));
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header(reqwest::header::ACCEPT, CONTENT_TYPE);
        if let Some(u) = &self.user {
            req = req.basic_auth(u, self.password.as_deref());
        }
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
                .body(b.to_string());
        }
        let resp = req.send().await.map_err(|e| RegistryError::Unreachable {
            url: self.base.clone(),
            call: call.clone(),
            // reqwest's Display hides the cause; the chain says why.
            message: error_chain(&e),
        })?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| RegistryError::Unreachable {
            url: self.base.clone(),
            call: call.clone(),
            message: error_chain(&e),
        })?;
        if !status.is_success() {
            let e: ErrorBody = serde_json::from_str(&text).unwrap_or_default();
            // "No such subject/version/schema" carries a 404xx code; a bare
            // 404 is a URL that does not serve the registry API (a wrong
            // base path or proxy prefix), which retrying cannot fix.
            if status == reqwest::StatusCode::NOT_FOUND && (40400..40500).contains(&e.error_code) {
                return Ok(None);
            }
            let message = if e.message.is_empty() {
                text.chars().take(200).collect()
            } else {
                e.message
            };
            let message = if status == reqwest::StatusCode::NOT_FOUND {
                format!("{message} (is {} the registry's base URL?)", self.base)
            } else {
                message
            };
            return Err(RegistryError::Refused {
                url: self.base.clone(),
                call,
                status: status.as_u16(),
                code: e.error_code,
                message,
            });
        }
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| RegistryError::BadReply {
                url: self.base.clone(),
                call,
                detail: format!("not JSON: {e}"),
            })
    }

    fn bad(&self, call: &str, detail: impl Into<String>) -> RegistryError {
        RegistryError::BadReply {
            url: self.base.clone(),
            call: call.to_string(),
            detail: detail.into(),
        }
    }

    /// The compatibility level that applies to `subject`: its own, else
    /// the registry's global one.
    pub async fn compatibility(&self, subject: &str) -> Result<String, RegistryError> {
        let level = |v: &serde_json::Value| {
            v.get("compatibilityLevel")
                .or_else(|| v.get("compatibility"))
                .and_then(|l| l.as_str())
                .map(str::to_string)
        };
        let path = format!("/config/{}?defaultToGlobal=true", segment(subject));
        if let Some(v) = self.call(reqwest::Method::GET, &path, None).await? {
            return level(&v).ok_or_else(|| self.bad("GET /config/{subject}", v.to_string()));
        }
        match self.call(reqwest::Method::GET, "/config", None).await? {
            Some(v) => level(&v).ok_or_else(|| self.bad("GET /config", v.to_string())),
            None => Err(self.bad("GET /config", "404: no global compatibility level")),
        }
    }

    /// Whether the registry would accept `schema` under `subject`:
    /// `Ok(None)` when it would (or the subject is new), else its reasons.
    pub async fn incompatibility(
        &self,
        subject: &str,
        schema: &str,
    ) -> Result<Option<String>, RegistryError> {
        let path = format!(
            "/compatibility/subjects/{}/versions/latest?verbose=true",
            segment(subject)
        );
        let Some(v) = self
            .call(
                reqwest::Method::POST,
                &path,
                Some(json!({ "schema": schema })),
            )
            .await?
        else {
            return Ok(None);
        };
        match v.get("is_compatible").and_then(|b| b.as_bool()) {
            Some(true) => Ok(None),
            Some(false) => {
                let reasons = v
                    .get("messages")
                    .and_then(|m| m.as_array())
                    .map(|m| {
                        m.iter()
                            .map(|s| s.as_str().map_or_else(|| s.to_string(), str::to_string))
                            .collect::<Vec<_>>()
                            .join("; ")
                    })
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "not compatible with the latest version".to_string());
                Ok(Some(reasons))
            }
            None => Err(self.bad("POST /compatibility", v.to_string())),
        }
    }

    /// Registers `schema` under `subject` (idempotent) and returns its id.
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let path = format!("/subjects/{}/versions", segment(subject));
        let v = self
            .call(
                reqwest::Method::POST,
                &path,
                Some(json!({ "schema": schema })),
            )
            .await?
            .ok_or_else(|| self.bad("POST /subjects/{subject}/versions", "404"))?;
        id_of(&v).ok_or_else(|| self.bad("POST /subjects/{subject}/versions", v.to_string()))
    }

    /// The id of `schema` if it is registered under `subject`.
    pub async fn lookup(&self, subject: &str, schema: &str) -> Result<Option<u32>, RegistryError> {
        let path = format!("/subjects/{}", segment(subject));
        match self
            .call(
                reqwest::Method::POST,
                &path,
                Some(json!({ "schema": schema })),
            )
            .await?
        {
            None => Ok(None),
            Some(v) => id_of(&v)
                .map(Some)
                .ok_or_else(|| self.bad("POST /subjects/{subject}", v.to_string())),
        }
    }

    /// The schema registered under `id` (its text).
    pub async fn schema(&self, id: u32) -> Result<String, RegistryError> {
        let call = "GET /schemas/ids/{id}";
        let v = self
            .call(reqwest::Method::GET, &format!("/schemas/ids/{id}"), None)
            .await?
            .ok_or_else(|| self.bad(call, format!("no schema with id {id}")))?;
        if let Some(t) = v.get("schemaType").and_then(|t| t.as_str()) {
            if t != "AVRO" {
                return Err(self.bad(call, format!("schema {id} is {t}, not AVRO")));
            }
        }
        v.get("schema")
            .and_then(|s| s.as_str())
            .map(str::to_string)
            .ok_or_else(|| self.bad(call, v.to_string()))
    }
}

fn id_of(v: &serde_json::Value) -> Option<u32> {
    v.get("id")
        .and_then(|i| i.as_u64())
        .and_then(|i| u32::try_from(i).ok())
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_path_safe() {
        assert_eq!(
            segment("virt.domain.events.v1-value"),
            "virt.domain.events.v1-value"
        );
        assert_eq!(segment("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn only_answers_retrying_cannot_change_are_fatal() {
        let refused = |status| RegistryError::Refused {
            url: "u".into(),
            call: "c".into(),
            status,
            code: 0,
            message: "m".into(),
        };
        assert!(refused(401).is_fatal());
        assert!(refused(409).is_fatal());
        assert!(refused(422).is_fatal());
        assert!(!refused(408).is_fatal());
        assert!(!refused(429).is_fatal());
        assert!(!refused(500).is_fatal());
        assert!(!refused(503).is_fatal());
        let down = RegistryError::Unreachable {
            url: "u".into(),
            call: "c".into(),
            message: "refused".into(),
        };
        assert!(!down.is_fatal());
    }
}
