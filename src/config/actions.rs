//! `[[actions]]`: commands the agent runs for matching domain events
//! (what matches, what runs, how long and how often), and their
//! validation. Matching and placeholder substitution themselves live with
//! the action sink (`sinks::actions::rule`); this file only checks that a
//! configured rule can be applied.
//!
//! Invariants:
//! - names are unique and usable in a journal cursor name
//!   (`action:<name>`) and a metrics label;
//! - `command[0]` is an absolute path to an executable file or a name
//!   found on `PATH` when the configuration is loaded; the command never
//!   goes through a shell;
//! - every `{placeholder}` in `command` is one the runner knows, every
//!   `on` symbol is an `EventType`/`Detail`/`Origin` symbol;
//! - `concurrency ≥ 1` and `timeout > 0`; errors name the full key
//!   (`actions[0].command`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{key_err, ConfigError, Dur};
use crate::model::{Detail, EventType, Origin};

/// The placeholders a command argument may contain.
pub const PLACEHOLDERS: &[&str] = &[
    "event", "detail", "name", "uuid", "state", "origin", "event_id", "host_id", "seq",
];

/// One `[[actions]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ActionConfig {
    /// Unique; the journal cursor is `action:<name>`, the metrics label
    /// `action="<name>"`.
    pub name: String,
    /// Which events run the command (every domain event when empty).
    #[serde(default)]
    pub on: ActionMatch,
    /// Program and arguments, run without a shell.
    pub command: Vec<String>,
    /// How long one attempt may run before its process group is killed.
    #[serde(default = "d_timeout")]
    pub timeout: Dur,
    /// Commands of this action running at once (across domains).
    #[serde(default = "d_concurrency")]
    pub concurrency: usize,
    /// Attempts after the first one failed (1 s backoff, doubling, at most
    /// 60 s).
    #[serde(default = "d_retries")]
    pub retries: u32,
    /// Where a new action (no cursor yet: just added or renamed) starts:
    /// `now`, the journal's head (events from its first start on), or
    /// `oldest`, every event the journal still holds.
    #[serde(default)]
    pub start: ActionStart,
}

/// [`ActionConfig::start`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ActionStart {
    #[default]
    Now,
    Oldest,
}

/// `on`: every key given must match (AND); a list matches any of its
/// symbols (OR).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ActionMatch {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub event: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub detail: Vec<String>,
    /// A glob on the domain name: `*` any run of characters, `?` one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub origin: Vec<String>,
}

fn d_timeout() -> Dur {
    Dur(Duration::from_secs(30))
}
fn d_concurrency() -> usize {
    1
}
fn d_retries() -> u32 {
    3
}

/// The `{name}` placeholders of one argument, in order, or the reason it
/// is malformed. A `{` not followed by `[a-z_]+}` is literal text.
pub fn placeholders_in(arg: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = arg;
    while let Some(i) = rest.find('{') {
        let after = &rest[i + 1..];
        match after.find('}') {
            Some(j)
                if j > 0
                    && after[..j]
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b == b'_') =>
            {
                out.push(&after[..j]);
                rest = &after[j + 1..];
            }
            _ => rest = after,
        }
    }
    out
}

/// Validates every `[[actions]]` entry; `path` is the `PATH` searched for
/// a bare command name.
pub(super) fn validate(actions: &[ActionConfig], path: Option<&str>) -> Result<(), ConfigError> {
    for (i, a) in actions.iter().enumerate() {
        let key = |k: &str| format!("actions[{i}].{k}");
        if a.name.is_empty()
            || !a
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(key_err(
                &key("name"),
                format!(
                    "`{}` must be non-empty letters, digits, `-`, `_` or `.`",
                    a.name
                ),
            ));
        }
        if actions[..i].iter().any(|b| b.name == a.name) {
            return Err(key_err(
                &key("name"),
                format!("`{}` is used by an earlier action", a.name),
            ));
        }
        let Some(program) = a.command.first() else {
            return Err(key_err(&key("command"), "must name a program"));
        };
        if let Err(why) = find_program(program, path) {
            return Err(key_err(&key("command"), why));
        }
        for arg in &a.command {
            for p in placeholders_in(arg) {
                if !PLACEHOLDERS.contains(&p) {
                    return Err(key_err(
                        &key("command"),
                        format!(
                            "unknown placeholder `{{{p}}}` in `{arg}`; known: {}",
                            PLACEHOLDERS.join(", ")
                        ),
                    ));
                }
            }
        }
        symbols(&a.on.event, &key("on.event"), |s| {
            EventType::parse(s).is_some()
        })?;
        symbols(&a.on.detail, &key("on.detail"), |s| {
            Detail::parse(s).is_some()
        })?;
        symbols(&a.on.origin, &key("on.origin"), |s| {
            Origin::parse(s).is_some()
        })?;
        if a.on.domain.as_deref() == Some("") {
            return Err(key_err(&key("on.domain"), "an empty glob matches nothing"));
        }
        if a.concurrency == 0 {
            return Err(key_err(&key("concurrency"), "must be at least 1"));
        }
        if a.timeout.0.is_zero() {
            return Err(key_err(&key("timeout"), "must be longer than 0"));
        }
    }
    Ok(())
}

fn symbols(list: &[String], key: &str, known: impl Fn(&str) -> bool) -> Result<(), ConfigError> {
    match list.iter().find(|s| !known(s)) {
        Some(s) => Err(key_err(key, format!("`{s}` is not a known symbol"))),
        None => Ok(()),
    }
}

/// The executable `program` names: an absolute path, or a bare name
/// found on `path`.
pub fn find_program(program: &str, path: Option<&str>) -> Result<PathBuf, String> {
    let executable = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if program.starts_with('/') {
        return if executable(Path::new(program)) {
            Ok(PathBuf::from(program))
        } else {
            Err(format!("`{program}` is not an executable file"))
        };
    }
    if program.is_empty() || program.contains('/') {
        return Err(format!(
            "`{program}` must be an absolute path or a program name found on PATH"
        ));
    }
    path.unwrap_or_default()
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|p| executable(p))
        .ok_or_else(|| format!("`{program}` is not an executable found on PATH"))
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{parse, SAMPLE};
    use super::*;

    fn with(action: &str) -> Result<super::super::Config, ConfigError> {
        parse(&format!("{SAMPLE}\n[[actions]]\n{action}\n"), &[])
    }

    #[test]
    fn the_documented_example_parses() {
        let c = with(
            r#"name = "crash-notify"
on = { event = ["STOPPED", "CRASHED"], detail = ["FAILED", "CRASHED"], domain = "web-*", origin = ["LIBVIRT", "RECONCILE"] }
command = ["/bin/sh", "{event}", "{name}"]
timeout = "30s"
concurrency = 4
retries = 3"#,
        )
        .unwrap();
        let a = &c.actions[0];
        assert_eq!(a.name, "crash-notify");
        assert_eq!(a.concurrency, 4);
        assert_eq!(a.on.domain.as_deref(), Some("web-*"));
        assert_eq!(a.timeout.0, Duration::from_secs(30));
        let d = with("name = \"a\"\ncommand = [\"sh\"]").unwrap();
        assert_eq!(d.actions[0].concurrency, 1);
        assert_eq!(d.actions[0].retries, 3);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (
                "name = \"a\"\ncommand = []",
                "actions[0].command",
                "program",
            ),
            (
                "name = \"a\"\ncommand = [\"/nonexistent/x\"]",
                "actions[0].command",
                "not an executable",
            ),
            (
                "name = \"a\"\ncommand = [\"no-such-program-anywhere\"]",
                "actions[0].command",
                "PATH",
            ),
            (
                "name = \"a\"\ncommand = [\"./x\"]",
                "actions[0].command",
                "absolute",
            ),
            (
                "name = \"a\"\ncommand = [\"/bin/sh\", \"--x={nmae}\"]",
                "actions[0].command",
                "{nmae}",
            ),
            (
                "name = \"a\"\ncommand = [\"/bin/sh\"]\non = { event = [\"CRASH\"] }",
                "actions[0].on.event",
                "CRASH",
            ),
            (
                "name = \"a\"\ncommand = [\"/bin/sh\"]\non = { detail = [\"BOOT\"] }",
                "actions[0].on.detail",
                "BOOT",
            ),
            (
                "name = \"a\"\ncommand = [\"/bin/sh\"]\non = { origin = [\"USER\"] }",
                "actions[0].on.origin",
                "USER",
            ),
            (
                "name = \"a\"\ncommand = [\"/bin/sh\"]\nconcurrency = 0",
                "actions[0].concurrency",
                "at least 1",
            ),
            (
                "name = \"a\"\ncommand = [\"/bin/sh\"]\ntimeout = \"0s\"",
                "actions[0].timeout",
                "longer than 0",
            ),
            (
                "name = \"a b\"\ncommand = [\"/bin/sh\"]",
                "actions[0].name",
                "letters",
            ),
            (
                "name = \"a\"\ncommand = [\"/bin/sh\"]\nwhen = 1",
                "actions[0].when",
                "unknown field",
            ),
        ];
        for (text, key, reason) in cases {
            let err = with(text).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(reason), "{text}: {err}");
        }
        let err = with("name = \"a\"\ncommand = [\"/bin/sh\"]\n[[actions]]\nname = \"a\"\ncommand = [\"/bin/sh\"]")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("actions[1].name") && err.contains("earlier"),
            "{err}"
        );
    }

    #[test]
    fn placeholders_are_whole_words_in_braces() {
        assert_eq!(placeholders_in("{name}"), ["name"]);
        assert_eq!(placeholders_in("--vm={name}.{uuid}"), ["name", "uuid"]);
        assert!(placeholders_in("{\"a\": 1}").is_empty());
        assert!(placeholders_in("{}").is_empty());
        assert!(placeholders_in("{Name}").is_empty());
        assert_eq!(placeholders_in("{{seq}"), ["seq"]);
    }

    #[test]
    fn a_file_that_is_not_executable_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("script");
        std::fs::write(&f, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = with(&format!("name = \"a\"\ncommand = [\"{}\"]", f.display()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("actions[0].command") && err.contains("not an executable"),
            "{err}"
        );
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
        with(&format!("name = \"a\"\ncommand = [\"{}\"]", f.display())).unwrap();
    }

    #[test]
    fn a_bare_name_is_searched_on_path() {
        assert_eq!(
            find_program("sh", Some("/nonexistent:/bin")).unwrap(),
            PathBuf::from("/bin/sh")
        );
        assert!(find_program("sh", Some("/nonexistent")).is_err());
    }
}
