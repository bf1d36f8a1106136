//! What an action matches and what its command and environment become
//! for one event: pure functions over a decoded [`DomainEvent`].
//!
//! Invariants:
//! - `on` keys are ANDed, the symbols of one key ORed, an absent key
//!   matches anything; a `GAP` marker matches only a rule that lists
//!   `GAP` in `on.event` (it is not an event of a domain);
//! - placeholders are replaced inside an argument and the argument stays
//!   one argument whatever the value holds (spaces, quotes, `;`): nothing
//!   goes through a shell; text in braces that is not a placeholder
//!   (`{"a": 1}`) is left as it is, and values are not substituted again;
//! - the domain glob knows `*` (any run of characters, also none) and `?`
//!   (one character); everything else is literal.

use crate::config::{placeholders_in, ActionMatch};
use crate::model::{Detail, DomainEvent, EventType, Origin};

/// A parsed `on` table (the configuration was validated: unknown symbols
/// cannot occur).
#[derive(Debug, Clone)]
pub struct Rule {
    event: Vec<EventType>,
    detail: Vec<Detail>,
    origin: Vec<Origin>,
    domain: Option<String>,
}

impl Rule {
    pub fn new(on: &ActionMatch) -> Rule {
        Rule {
            event: on
                .event
                .iter()
                .filter_map(|s| EventType::parse(s))
                .collect(),
            detail: on.detail.iter().filter_map(|s| Detail::parse(s)).collect(),
            origin: on.origin.iter().filter_map(|s| Origin::parse(s)).collect(),
            domain: on.domain.clone(),
        }
    }

    /// Whether the action runs for `e`.
    pub fn matches(&self, e: &DomainEvent) -> bool {
        if e.event == EventType::GAP && !self.event.contains(&EventType::GAP) {
            return false;
        }
        (self.event.is_empty() || self.event.contains(&e.event))
            && (self.detail.is_empty() || self.detail.contains(&e.detail))
            && (self.origin.is_empty() || self.origin.contains(&e.origin))
            && self
                .domain
                .as_deref()
                .is_none_or(|g| glob(g, &e.domain.name))
    }
}

/// Whether `name` matches `pattern` (`*`, `?`, the rest literal).
pub fn glob(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // Iterative wildcard matching with one backtrack point.
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < n.len() {
        if i < p.len() && (p[i] == '?' || p[i] == n[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some((i, j));
            i += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|c| *c == '*')
}

/// The value of a placeholder for `e` (`None` for an unknown name).
pub fn value(name: &str, e: &DomainEvent) -> Option<String> {
    Some(match name {
        "event" => e.event.as_str().to_string(),
        "detail" => e.detail.as_str().to_string(),
        "name" => e.domain.name.clone(),
        "uuid" => e.domain.uuid.clone(),
        "state" => e.state_after.state.as_str().to_string(),
        "origin" => e.origin.as_str().to_string(),
        "event_id" => e.event_id.clone(),
        "host_id" => e.host_id.clone(),
        "seq" => e.seq.to_string(),
        _ => return None,
    })
}

/// `arg` with its placeholders replaced by their values for `e`.
pub fn substitute(arg: &str, e: &DomainEvent) -> String {
    let names = placeholders_in(arg);
    if names.is_empty() {
        return arg.to_string();
    }
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    for name in names {
        let token = format!("{{{name}}}");
        let Some(at) = rest.find(&token) else { break };
        out.push_str(&rest[..at]);
        match value(name, e) {
            Some(v) => out.push_str(&v),
            None => out.push_str(&token),
        }
        rest = &rest[at + token.len()..];
    }
    out.push_str(rest);
    out
}

/// The environment a command gets for `e`.
pub fn environment(e: &DomainEvent) -> Vec<(&'static str, String)> {
    vec![
        ("VIRTSTREAM_EVENT_ID", e.event_id.clone()),
        ("VIRTSTREAM_DOMAIN_UUID", e.domain.uuid.clone()),
        ("VIRTSTREAM_DOMAIN_NAME", e.domain.name.clone()),
        ("VIRTSTREAM_EVENT", e.event.as_str().to_string()),
        ("VIRTSTREAM_DETAIL", e.detail.as_str().to_string()),
        ("VIRTSTREAM_STATE", e.state_after.state.as_str().to_string()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DomainRef, DomainState, StateReason};

    fn event(name: &str, ev: EventType, detail: Detail, origin: Origin) -> DomainEvent {
        DomainEvent {
            event_id: "h:e:7".into(),
            host_id: "h".into(),
            epoch: "e".into(),
            host_seq: 7,
            seq: 3,
            domain: DomainRef {
                uuid: "u-1".into(),
                name: name.into(),
                id: None,
            },
            event: ev,
            libvirt_event_id: 0,
            event_code: 5,
            detail,
            detail_code: 0,
            origin,
            state_after: StateReason::from_codes(DomainState::SHUTOFF.index() as i32, 0),
            persistent: true,
            autostart: None,
            vcpus: None,
            memory_kib: None,
            config_hash: None,
            observed_at: 0,
            xml: None,
            hook: None,
        }
    }

    fn rule(event: &[&str], detail: &[&str], domain: Option<&str>, origin: &[&str]) -> Rule {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        Rule::new(&ActionMatch {
            event: strings(event),
            detail: strings(detail),
            domain: domain.map(str::to_string),
            origin: strings(origin),
        })
    }

    #[test]
    fn keys_are_anded_and_lists_ored() {
        let r = rule(
            &["STOPPED", "CRASHED"],
            &["FAILED", "CRASHED"],
            Some("web-*"),
            &["LIBVIRT", "RECONCILE"],
        );
        use {Detail as D, EventType as E, Origin as O};
        assert!(r.matches(&event("web-1", E::STOPPED, D::FAILED, O::LIBVIRT)));
        assert!(r.matches(&event("web-1", E::CRASHED, D::CRASHED, O::RECONCILE)));
        assert!(!r.matches(&event("db-1", E::STOPPED, D::FAILED, O::LIBVIRT)));
        assert!(!r.matches(&event("web-1", E::STOPPED, D::DESTROYED, O::LIBVIRT)));
        assert!(!r.matches(&event("web-1", E::STARTED, D::FAILED, O::LIBVIRT)));
        assert!(!r.matches(&event("web-1", E::STOPPED, D::FAILED, O::HOOK)));
        let any = rule(&[], &[], None, &[]);
        assert!(any.matches(&event("x", E::STARTED, D::BOOTED, O::LIBVIRT)));
        assert!(!any.matches(&event("", E::GAP, D::QUEUE_OVERFLOW, O::AGENT)));
        assert!(rule(&["GAP"], &[], None, &[]).matches(&event(
            "",
            E::GAP,
            D::QUEUE_OVERFLOW,
            O::AGENT
        )));
    }

    #[test]
    fn globs() {
        assert!(glob("web-*", "web-1"));
        assert!(glob("web-*", "web-"));
        assert!(!glob("web-*", "db-web-1"));
        assert!(glob("*-db-?", "eu-db-1"));
        assert!(!glob("*-db-?", "eu-db-12"));
        assert!(glob("*", ""));
        assert!(glob("a*b*c", "aXXbYYbc"));
        assert!(!glob("a*b*c", "aXXbYYb"));
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exactly"));
    }

    #[test]
    fn placeholders_stay_one_argument() {
        use {Detail as D, EventType as E, Origin as O};
        let e = event("my vm; rm -rf /", E::STOPPED, D::FAILED, O::LIBVIRT);
        assert_eq!(substitute("{name}", &e), "my vm; rm -rf /");
        assert_eq!(substitute("--vm={name}", &e), "--vm=my vm; rm -rf /");
        assert_eq!(
            substitute(
                "{event}/{detail}/{state}/{origin}/{seq}/{uuid}/{event_id}/{host_id}",
                &e
            ),
            "STOPPED/FAILED/SHUTOFF/LIBVIRT/3/u-1/h:e:7/h"
        );
        assert_eq!(substitute("{\"a\": 1}", &e), "{\"a\": 1}");
        assert_eq!(substitute("plain", &e), "plain");
        // A value that looks like a placeholder is not substituted again.
        let tricky = event("{uuid}", E::STOPPED, D::FAILED, O::LIBVIRT);
        assert_eq!(substitute("{name}-{seq}", &tricky), "{uuid}-3");
        let env = environment(&e);
        assert!(env.contains(&("VIRTSTREAM_DOMAIN_NAME", "my vm; rm -rf /".into())));
        assert!(env.contains(&("VIRTSTREAM_STATE", "SHUTOFF".into())));
    }
}
