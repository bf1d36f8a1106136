//! A minimal Confluent-API schema registry for the tests: exactly the
//! documented REST calls the agent, our consumer tools and confluent-kafka's
//! `SchemaRegistryClient` use, on a random port, stopped on drop. No
//! Confluent-API registry (Confluent, Karapace, Apicurio, Redpanda) can be
//! installed from the package registries this project's machines reach;
//! docs/testing.md says so and lists the calls.
//!
//! Calls: `GET /config`, `GET /config/{subject}` (404 40408: no subject
//! has a level of its own, and `defaultToGlobal` is not honoured),
//! `POST /compatibility/subjects/{subject}/versions/latest`,
//! `POST /subjects/{subject}/versions`, `POST /subjects/{subject}`,
//! `GET /subjects/{subject}/versions`, `GET /schemas/ids/{id}`; anything
//! else is a 404 in the registry's error shape (confluent-kafka asks
//! `GET /associations/...` first and falls back to `<topic>-value` on 404).
//!
//! Knobs (`Behaviour`): a required basic-auth user/password, the global
//! compatibility level, a reason to declare every schema incompatible.
//! The registry's own compatibility rules are not implemented: the tests
//! that need a refusal set it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

/// How the registry answers.
#[derive(Debug, Clone, Default)]
pub struct Behaviour {
    /// `Authorization: Basic` user and password every call must carry.
    pub basic_auth: Option<(String, String)>,
    /// The global compatibility level (default BACKWARD).
    pub level: Option<String>,
    /// Declare every schema checked incompatible, with this message.
    pub incompatible: Option<String>,
}

#[derive(Debug, Default)]
pub struct State {
    pub behaviour: Behaviour,
    /// id → schema text.
    pub schemas: BTreeMap<u32, String>,
    /// subject → ids of its versions, in order.
    pub subjects: BTreeMap<String, Vec<u32>>,
    /// Every call: "METHOD /path?query".
    pub calls: Vec<String>,
}

pub struct Registry {
    pub port: u16,
    pub state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl Registry {
    pub fn start(b: Behaviour) -> Registry {
        Self::start_on(super::free_port(), b)
    }

    pub fn start_on(port: u16, behaviour: Behaviour) -> Registry {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("test schema registry cannot listen on {port}: {e}"));
        listener.set_nonblocking(true).unwrap();
        let state = Arc::new(Mutex::new(State {
            behaviour,
            ..Default::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            while !sp.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (st, sp) = (st.clone(), sp.clone());
                        std::thread::spawn(move || serve(conn, &st, &sp));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Registry { port, state, stop }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn calls(&self) -> Vec<String> {
        self.state.lock().unwrap().calls.clone()
    }

    /// The ids registered under `subject`.
    pub fn versions(&self, subject: &str) -> Vec<u32> {
        let s = self.state.lock().unwrap();
        s.subjects.get(subject).cloned().unwrap_or_default()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(conn: TcpStream, state: &Mutex<State>, stop: &AtomicBool) {
    conn.set_read_timeout(Some(Duration::from_millis(200))).ok();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut out = conn;
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {}
            Err(_) if !stop.load(Ordering::Relaxed) => continue,
            Err(_) => return,
        }
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, target) = match (parts.next(), parts.next()) {
            (Some(m), Some(t)) => (m.to_string(), t.to_string()),
            _ => return,
        };
        let (mut length, mut auth, mut close) = (0usize, None, false);
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap_or((h, ""));
            match k.to_ascii_lowercase().as_str() {
                "content-length" => length = v.trim().parse().unwrap_or(0),
                "authorization" => auth = Some(v.trim().to_string()),
                "connection" => close = v.trim().eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let (status, reply) = answer(state, &method, &target, auth.as_deref(), &body);
        let text = reply.to_string();
        let head = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: application/vnd.schemaregistry.v1+json\r\nContent-Length: {}\r\n\r\n",
            if status < 300 { "OK" } else { "Error" },
            text.len()
        );
        if out.write_all(head.as_bytes()).is_err() || out.write_all(text.as_bytes()).is_err() {
            return;
        }
        if close {
            return;
        }
    }
}

fn error(status: u16, code: i64, message: &str) -> (u16, Value) {
    (status, json!({ "error_code": code, "message": message }))
}

fn basic(user: &str, pass: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

fn answer(
    state: &Mutex<State>,
    method: &str,
    target: &str,
    auth: Option<&str>,
    body: &[u8],
) -> (u16, Value) {
    let mut st = state.lock().unwrap();
    st.calls.push(format!("{method} {target}"));
    if let Some((u, p)) = &st.behaviour.basic_auth {
        if auth != Some(basic(u, p).as_str()) {
            return error(401, 40101, "Unauthorized");
        }
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let schema_of = |body: &[u8]| -> Option<String> {
        let v: Value = serde_json::from_slice(body).ok()?;
        let s = v.get("schema")?.as_str()?.to_string();
        // Stored compact, as a registry normalises the JSON it parses.
        let parsed: Value = serde_json::from_str(&s).ok()?;
        Some(parsed.to_string())
    };
    let level = st
        .behaviour
        .level
        .clone()
        .unwrap_or_else(|| "BACKWARD".into());
    match (method, segs.as_slice()) {
        ("GET", ["config"]) => (200, json!({ "compatibilityLevel": level })),
        // No subject has a level of its own, and `defaultToGlobal` is not
        // honoured (as on registries that predate it): the agent must fall
        // back to `GET /config`.
        ("GET", ["config", _subject]) => error(
            404,
            40408,
            "Subject does not have subject-level compatibility configured",
        ),
        ("POST", ["compatibility", "subjects", subject, "versions", "latest"]) => {
            if !st.subjects.contains_key(*subject) {
                return error(404, 40401, &format!("Subject '{subject}' not found."));
            }
            if schema_of(body).is_none() {
                return error(422, 42201, "Invalid schema");
            }
            match &st.behaviour.incompatible {
                // Reasons only when asked for, as Confluent's registry.
                Some(why) if query.contains("verbose=true") => {
                    (200, json!({ "is_compatible": false, "messages": [why] }))
                }
                Some(_) => (200, json!({ "is_compatible": false })),
                None => (200, json!({ "is_compatible": true })),
            }
        }
        ("POST", ["subjects", subject, "versions"]) => {
            let Some(schema) = schema_of(body) else {
                return error(422, 42201, "Invalid schema");
            };
            if let Some(why) = &st.behaviour.incompatible {
                if st.subjects.contains_key(*subject) {
                    return error(409, 409, &format!("Schema being registered is incompatible with an earlier schema for subject \"{subject}\", details: [{why}]"));
                }
            }
            let id = match st.schemas.iter().find(|(_, s)| **s == schema) {
                Some((id, _)) => *id,
                None => {
                    // Ids above 2^16, so a width bug shows end to end.
                    let id = 100_001 + st.schemas.len() as u32;
                    st.schemas.insert(id, schema);
                    id
                }
            };
            let versions = st.subjects.entry(subject.to_string()).or_default();
            if !versions.contains(&id) {
                versions.push(id);
            }
            (200, json!({ "id": id }))
        }
        ("POST", ["subjects", subject]) => {
            let Some(schema) = schema_of(body) else {
                return error(422, 42201, "Invalid schema");
            };
            let Some(versions) = st.subjects.get(*subject) else {
                return error(404, 40401, &format!("Subject '{subject}' not found."));
            };
            match versions
                .iter()
                .position(|id| st.schemas.get(id) == Some(&schema))
            {
                Some(i) => (
                    200,
                    json!({ "subject": subject, "id": versions[i], "version": i + 1, "schema": schema }),
                ),
                None => error(404, 40403, "Schema not found"),
            }
        }
        ("GET", ["subjects", subject, "versions"]) => match st.subjects.get(*subject) {
            Some(v) => (200, json!((1..=v.len()).collect::<Vec<_>>())),
            None => error(404, 40401, &format!("Subject '{subject}' not found.")),
        },
        ("GET", ["schemas", "ids", id]) => {
            match id.parse::<u32>().ok().and_then(|id| st.schemas.get(&id)) {
                Some(s) => (200, json!({ "schema": s })),
                None => error(404, 40403, "Schema not found"),
            }
        }
        _ => error(404, 404, "HTTP 404 Not Found"),
    }
}
