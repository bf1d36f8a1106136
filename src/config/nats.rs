//! The `[nats]` section: the JetStream sink's server, streams, subjects,
//! flow control, authentication and TLS.
//!
//! Invariants:
//! - the section is optional; when present the sink is enabled;
//! - the URL never carries credentials (URLs are logged), at most one
//!   authentication method is set, and TLS files need TLS on;
//! - stream names differ and subject prefixes do not overlap, so the
//!   event and snapshot streams never capture each other's subjects.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::secrets::{check_secret_file, Secret};
use super::values::{d_encoding, d_one, d_true, Dur, Encoding};
use super::{key_err, ConfigError};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    pub url: String,
    #[serde(default = "d_events_stream")]
    pub events_stream: String,
    #[serde(default = "d_events_prefix")]
    pub events_subject_prefix: String,
    /// Stream of DomainSnapshot and HostSnapshot records (one per subject).
    #[serde(default = "d_snapshots_stream")]
    pub snapshots_stream: String,
    #[serde(default = "d_snapshots_prefix")]
    pub snapshots_subject_prefix: String,
    #[serde(default = "d_hosts_prefix")]
    pub hosts_subject_prefix: String,
    /// Create the stream when missing.
    #[serde(default = "d_true")]
    pub create_streams: bool,
    #[serde(default = "d_max_age")]
    pub max_age: Dur,
    #[serde(default = "d_dup_window")]
    pub duplicate_window: Dur,
    #[serde(default = "d_one")]
    pub replicas: usize,
    /// Publishes awaiting a JetStream ack at once.
    #[serde(default = "d_inflight")]
    pub max_in_flight: usize,
    #[serde(default = "d_ack_timeout")]
    pub ack_timeout: Dur,
    /// Body encoding: avro (single-object) or json.
    #[serde(default = "d_encoding")]
    pub encoding: Encoding,
    /// Token read from this file (never from the command line).
    pub token_file: Option<PathBuf>,
    /// NATS credentials (.creds) file: user JWT + NKey seed.
    pub credentials_file: Option<PathBuf>,
    /// File holding an NKey user seed (`SU...`).
    pub nkey_seed_file: Option<PathBuf>,
    /// User name for user/password authentication.
    pub user: Option<String>,
    /// The password, read from this file.
    pub password_file: Option<PathBuf>,
    /// The password itself; set it through the environment
    /// (`VIRTSTREAM_NATS_PASSWORD`), not in the file.
    pub password: Option<Secret>,
    /// Require TLS (a `tls://` URL requires it too).
    #[serde(default)]
    pub tls: bool,
    /// CA bundle (PEM) the server certificate is verified against. It
    /// replaces the system roots (the NATS client loads those only when no
    /// CA file is given).
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; needs `tls_key_file`.
    pub tls_cert_file: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    pub tls_key_file: Option<PathBuf>,
}

impl NatsConfig {
    /// TLS is required: `nats.tls = true` or a `tls://` URL.
    pub fn tls_required(&self) -> bool {
        self.tls || self.url.starts_with("tls://") || self.url.starts_with("wss://")
    }
}

fn d_events_stream() -> String {
    "VIRT_EVENTS".into()
}
fn d_events_prefix() -> String {
    "virt.events.v1".into()
}
fn d_snapshots_stream() -> String {
    "VIRT_SNAPSHOTS".into()
}
fn d_snapshots_prefix() -> String {
    "virt.snapshots.v1".into()
}
fn d_hosts_prefix() -> String {
    "virt.hosts.v1".into()
}
fn d_max_age() -> Dur {
    Dur(Duration::from_secs(7 * 24 * 3600))
}
fn d_dup_window() -> Dur {
    Dur(Duration::from_secs(120))
}
fn d_inflight() -> usize {
    256
}
fn d_ack_timeout() -> Dur {
    Dur(Duration::from_secs(5))
}

impl NatsConfig {
    /// The URL, stream names and subject prefixes, then authentication and
    /// TLS files.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let n = self;
        if !(n.url.starts_with("nats://")
            || n.url.starts_with("tls://")
            || n.url.starts_with("ws://")
            || n.url.starts_with("wss://")
            || !n.url.contains("://"))
        {
            return Err(key_err(
                "nats.url",
                format!("`{}` is not a NATS URL (nats://host:port)", n.url),
            ));
        }
        if n.url
            .split(',')
            .any(|u| u.split_once("://").map_or(u, |x| x.1).contains('@'))
        {
            return Err(key_err(
                "nats.url",
                "must not carry credentials (user:password@): URLs are logged; \
                 use nats.user with nats.password_file, or nats.token_file",
            ));
        }
        if n.max_in_flight == 0 {
            return Err(key_err("nats.max_in_flight", "must be at least 1"));
        }
        if n.duplicate_window.0.is_zero() {
            return Err(key_err(
                "nats.duplicate_window",
                "must be > 0: JetStream de-duplication by Nats-Msg-Id needs it",
            ));
        }
        if n.events_stream == n.snapshots_stream {
            return Err(key_err(
                "nats.snapshots_stream",
                "must differ from nats.events_stream",
            ));
        }
        for (k, v) in [
            ("nats.events_stream", &n.events_stream),
            ("nats.snapshots_stream", &n.snapshots_stream),
        ] {
            if v.is_empty() || v.contains(['.', '*', '>', ' ']) {
                return Err(key_err(
                    k,
                    format!("`{v}` is not a valid JetStream stream name"),
                ));
            }
        }
        let prefixes = [
            ("nats.events_subject_prefix", &n.events_subject_prefix),
            ("nats.snapshots_subject_prefix", &n.snapshots_subject_prefix),
            ("nats.hosts_subject_prefix", &n.hosts_subject_prefix),
        ];
        for (i, (k, v)) in prefixes.iter().enumerate() {
            let overlaps = |a: &str, b: &str| {
                a == b || a.starts_with(&format!("{b}.")) || b.starts_with(&format!("{a}."))
            };
            if prefixes[..i].iter().any(|(_, o)| overlaps(o, v)) {
                return Err(key_err(k, format!("`{v}` overlaps another subject prefix")));
            }
        }
        for (k, v) in prefixes {
            if v.is_empty() || v.contains(['*', '>', ' ']) || v.ends_with('.') {
                return Err(key_err(k, format!("`{v}` is not a valid subject prefix")));
            }
        }
        validate_nats_security(n)
    }
}

/// NATS authentication (one method at most) and TLS files.
fn validate_nats_security(n: &NatsConfig) -> Result<(), ConfigError> {
    let methods: Vec<&str> = [
        ("nats.token_file", n.token_file.is_some()),
        ("nats.credentials_file", n.credentials_file.is_some()),
        ("nats.nkey_seed_file", n.nkey_seed_file.is_some()),
        ("nats.user", n.user.is_some()),
    ]
    .into_iter()
    .filter_map(|(k, set)| set.then_some(k))
    .collect();
    if methods.len() > 1 {
        return Err(key_err(
            methods[1],
            format!(
                "choose one NATS authentication method; {} is set too",
                methods[0]
            ),
        ));
    }
    match (&n.user, &n.password, &n.password_file) {
        (Some(u), _, _) if u.is_empty() => {
            return Err(key_err("nats.user", "must not be empty"));
        }
        (Some(_), None, None) => {
            return Err(key_err(
                "nats.password_file",
                "is required with nats.user (or set VIRTSTREAM_NATS_PASSWORD)",
            ))
        }
        (Some(_), Some(_), Some(_)) => {
            return Err(key_err(
                "nats.password",
                "set either nats.password or nats.password_file, not both",
            ))
        }
        (None, Some(_), _) => {
            return Err(key_err("nats.password", "is set but nats.user is not"));
        }
        (None, _, Some(_)) => {
            return Err(key_err("nats.password_file", "is set but nats.user is not"));
        }
        _ => {}
    }
    if n.tls_cert_file.is_some() != n.tls_key_file.is_some() {
        return Err(key_err(
            "nats.tls_cert_file",
            "a client certificate needs both nats.tls_cert_file and nats.tls_key_file",
        ));
    }
    for (key, p) in [
        ("nats.token_file", &n.token_file),
        ("nats.credentials_file", &n.credentials_file),
        ("nats.nkey_seed_file", &n.nkey_seed_file),
        ("nats.password_file", &n.password_file),
        ("nats.tls_ca_file", &n.tls_ca_file),
        ("nats.tls_cert_file", &n.tls_cert_file),
        ("nats.tls_key_file", &n.tls_key_file),
    ] {
        if let Some(p) = p {
            if key.starts_with("nats.tls_") && !n.tls_required() {
                return Err(key_err(
                    key,
                    "is set but TLS is off (set nats.tls = true or use a tls:// URL)",
                ));
            }
            check_secret_file(key, p)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::testutil::{parse, SAMPLE};
    use crate::config::Secret;

    #[test]
    fn nats_auth_and_tls_are_checked_and_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, body: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, body).unwrap();
            p.display().to_string()
        };
        let (seed, ca, pass) = (
            file("seed", "SUSECRETSEED"),
            file("ca.pem", "ca"),
            file("pass", "pw-in-file"),
        );
        let with = |extra: &str| SAMPLE.replace("[metrics]", &format!("{extra}\n[metrics]"));
        let err =
            |extra: &str, env: &[(&str, &str)]| parse(&with(extra), env).unwrap_err().to_string();
        // One authentication method.
        let e = err(
            &format!("nkey_seed_file = \"{seed}\"\nuser = \"u\"\npassword_file = \"{pass}\""),
            &[],
        );
        assert!(
            e.contains("nats.user") && e.contains("nats.nkey_seed_file"),
            "{e}"
        );
        // A user needs a password, from a file or the environment.
        let e = err("user = \"u\"", &[]);
        assert!(
            e.contains("nats.password_file") && e.contains("VIRTSTREAM_NATS_PASSWORD"),
            "{e}"
        );
        let c = parse(
            &with("user = \"u\""),
            &[("VIRTSTREAM_NATS_PASSWORD", "1234")],
        )
        .unwrap();
        assert_eq!(
            c.nats
                .as_ref()
                .unwrap()
                .password
                .as_ref()
                .map(Secret::expose),
            Some("1234")
        );
        assert_eq!(
            format!("{:?}", c.nats.as_ref().unwrap().password),
            "Some(<redacted>)"
        );
        let e = err(&format!("password_file = \"{pass}\""), &[]);
        assert!(
            e.contains("nats.password_file") && e.contains("nats.user is not"),
            "{e}"
        );
        // TLS files need TLS on, and a client certificate needs its key.
        let e = err(&format!("tls_ca_file = \"{ca}\""), &[]);
        assert!(
            e.contains("nats.tls_ca_file") && e.contains("TLS is off"),
            "{e}"
        );
        assert!(parse(&with(&format!("tls = true\ntls_ca_file = \"{ca}\"")), &[]).is_ok());
        let tls_url = with(&format!("tls_ca_file = \"{ca}\""))
            .replace("nats://127.0.0.1:4222", "tls://127.0.0.1:4222");
        assert!(parse(&tls_url, &[]).unwrap().nats.unwrap().tls_required());
        let e = err(&format!("tls = true\ntls_cert_file = \"{ca}\""), &[]);
        assert!(
            e.contains("nats.tls_cert_file") && e.contains("tls_key_file"),
            "{e}"
        );
        let e = err("tls = true\ntls_ca_file = \"/nonexistent/ca.pem\"", &[]);
        assert!(
            e.contains("nats.tls_ca_file") && e.contains("/nonexistent/ca.pem"),
            "{e}"
        );
        // Secrets never show in the redacted form.
        let c = parse(&with(&format!("nkey_seed_file = \"{seed}\"")), &[]).unwrap();
        let shown = c.redacted();
        assert!(!shown.contains(&seed), "{shown}");
        let c = parse(
            &with("user = \"u\""),
            &[("VIRTSTREAM_NATS_PASSWORD", "pw-env")],
        )
        .unwrap();
        let shown = c.redacted();
        assert!(
            !shown.contains("pw-env") && shown.contains("user = \"u\""),
            "{shown}"
        );
    }
}
