//! TLS and authentication against real servers: a TLS-enabled nats-server
//! with a CA made in the test (mutual TLS), the NATS authentication methods
//! (token, NKey, user/password, credentials file in operator/JWT mode),
//! and Kafka over mutual TLS through stunnel in front of tansu. Every case
//! checks that messages reach the broker, that a wrong secret or
//! certificate is refused with a log naming the cause, and that no secret
//! appears in the agent's log.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::tls::{Pki, Stunnel};
use common::*;
use virtstream::model::EventType;

/// A file in `dir` holding `body`.
fn secret_file(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

fn virsh(args: &[&str]) {
    let out = Command::new("virsh")
        .args(["-c", TEST_URI])
        .args(args)
        .output()
        .expect("run virsh");
    assert!(
        out.status.success(),
        "virsh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Polls the agent's events on `url` until one is there, or panics with
/// the agent's log.
fn wait_events(
    agent: &Agent,
    opts: impl Fn() -> async_nats::ConnectOptions,
    url: &str,
    pred: impl Fn(&[Stored]) -> bool,
) -> Vec<Stored> {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let got = fetch_with(opts(), url, "VIRT_EVENTS", &agent.filter());
        if pred(&got) {
            return got;
        }
        assert!(
            Instant::now() < end,
            "no matching events on {url} within 30 s; got {got:?}\n--- agent log ---\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The agent is unready, and both its log and `/readyz` name the cause
/// (any of `cause`, lower-case) within 30 s.
fn assert_refused(agent: &Agent, cause: &[&str]) {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let log = agent.log().to_lowercase();
        let ready = agent.http("/readyz");
        let names = |text: &str| cause.iter().any(|c| text.contains(c));
        let in_log = log
            .lines()
            .any(|l| l.contains("nats not ready") && names(l));
        let in_readyz = matches!(&ready, Some((503, body))
            if body.lines().any(|l| l.contains("nats") && names(&l.to_lowercase())));
        if in_log && in_readyz {
            return;
        }
        assert!(
            !matches!(ready, Some((200, _))),
            "a refused connection must keep the agent unready"
        );
        assert!(
            Instant::now() < end,
            "the refusal ({cause:?}) is not named within 30 s (log: {in_log}, /readyz: {in_readyz}): {ready:?}\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn assert_not_logged(agent: &Agent, secrets: &[&str]) {
    let log = agent.log();
    assert!(!log.is_empty(), "the agent wrote no log");
    for s in secrets {
        assert!(
            !log.contains(s),
            "the agent's log contains a secret ({s}):\n{log}"
        );
    }
}

/// One authentication method end to end: the agent with `auth` (TOML lines
/// of the [nats] section, plus environment) publishes to a server started
/// with `server_args`; the test reads the events back with `reader`; an
/// agent with `wrong` is refused. No secret shows in either log.
struct AuthCase<'a> {
    server_args: Vec<String>,
    auth: String,
    env: Vec<(String, String)>,
    reader: &'a dyn Fn() -> async_nats::ConnectOptions,
    wrong: String,
    wrong_env: Vec<(String, String)>,
    secrets: Vec<String>,
}

fn run_auth_case(case: AuthCase<'_>) {
    let server = NatsServer::start_with(free_port(), case.server_args);
    let url = server.url();
    // The in-process test driver: its default domain gives the agent's
    // first reconcile something to publish.
    let mut agent = Agent::new(
        "test:///default",
        None,
        &format!("[nats]\nurl = \"{url}\"\n{}\n", case.auth),
    );
    agent.env = case.env;
    agent.start();
    agent.wait_ready(Duration::from_secs(30));
    let got = wait_events(&agent, case.reader, &url, |m| !m.is_empty());
    assert!(got.iter().all(|m| m.event.host_id == agent.host_id));
    let mut wrong = Agent::new(
        "test:///default",
        None,
        &format!("[nats]\nurl = \"{url}\"\n{}\n", case.wrong),
    );
    wrong.env = case.wrong_env;
    wrong.start();
    assert_refused(&wrong, &["authorization violation"]);
    let secrets: Vec<&str> = case.secrets.iter().map(String::as_str).collect();
    assert_not_logged(&agent, &secrets);
    assert_not_logged(&wrong, &secrets);
}

fn opts_token(token: &str) -> async_nats::ConnectOptions {
    async_nats::ConnectOptions::with_token(token.to_string())
}

#[test]
fn nats_token_auth() {
    let dir = tempfile::tempdir().unwrap();
    let token = "tok-6a1f0c3e9d";
    let file = secret_file(dir.path(), "token", &format!("{token}\n"));
    let bad = secret_file(dir.path(), "bad", "tok-wrong-77c1");
    run_auth_case(AuthCase {
        server_args: vec!["--auth".into(), token.into()],
        auth: format!("token_file = \"{}\"", file.display()),
        env: Vec::new(),
        reader: &|| opts_token(token),
        wrong: format!("token_file = \"{}\"", bad.display()),
        wrong_env: Vec::new(),
        secrets: vec![token.into(), "tok-wrong-77c1".into()],
    });
}

#[test]
fn nats_nkey_auth() {
    let dir = tempfile::tempdir().unwrap();
    let user = nkeys::KeyPair::new_user();
    let other = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap();
    let conf = secret_file(
        dir.path(),
        "nkey.conf",
        &format!(
            "authorization {{ users = [ {{ nkey: \"{}\" }} ] }}\n",
            user.public_key()
        ),
    );
    let file = secret_file(dir.path(), "seed", &format!("{seed}\n"));
    let bad = secret_file(dir.path(), "bad", &other.seed().unwrap());
    let reader_seed = seed.clone();
    run_auth_case(AuthCase {
        server_args: vec!["-c".into(), conf.display().to_string()],
        auth: format!("nkey_seed_file = \"{}\"", file.display()),
        env: Vec::new(),
        reader: &move || async_nats::ConnectOptions::with_nkey(reader_seed.clone()),
        wrong: format!("nkey_seed_file = \"{}\"", bad.display()),
        wrong_env: Vec::new(),
        secrets: vec![seed, other.seed().unwrap()],
    });
}

#[test]
fn nats_user_password_auth_from_file_and_environment() {
    let dir = tempfile::tempdir().unwrap();
    let password = "pw-9c2e71b4";
    let file = secret_file(dir.path(), "password", &format!("{password}\n"));
    // The agent reads the password from a file; the refused one from the
    // environment (VIRTSTREAM_NATS_PASSWORD), with a wrong value.
    run_auth_case(AuthCase {
        server_args: vec![
            "--user".into(),
            "agent".into(),
            "--pass".into(),
            password.into(),
        ],
        auth: format!("user = \"agent\"\npassword_file = \"{}\"", file.display()),
        env: Vec::new(),
        reader: &|| {
            async_nats::ConnectOptions::with_user_and_password("agent".into(), password.into())
        },
        wrong: "user = \"agent\"".into(),
        wrong_env: vec![("VIRTSTREAM_NATS_PASSWORD".into(), "pw-wrong-31d0".into())],
        secrets: vec![password.into(), "pw-wrong-31d0".into()],
    });
    // The password from the environment is used when right.
    let server = NatsServer::start_with(
        free_port(),
        vec![
            "--user".into(),
            "agent".into(),
            "--pass".into(),
            password.into(),
        ],
    );
    let mut agent = Agent::new(
        "test:///default",
        None,
        &format!("[nats]\nurl = \"{}\"\nuser = \"agent\"\n", server.url()),
    );
    agent.env = vec![("VIRTSTREAM_NATS_PASSWORD".into(), password.into())];
    agent.start();
    agent.wait_ready(Duration::from_secs(30));
    assert_not_logged(&agent, &[password]);
}

// ------------------------------------------------- operator (JWT) mode

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// A NATS JWT (v2) for `subject`, signed by `issuer`.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    let header = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let iat = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "jti": unique("jti"),
        "iat": iat,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let claims = b64(claims.to_string().as_bytes());
    let sig = issuer
        .sign(format!("{header}.{claims}").as_bytes())
        .unwrap();
    format!("{header}.{claims}.{}", b64(&sig))
}

fn creds(user_jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    )
}

#[test]
fn nats_credentials_file_auth_in_operator_mode() {
    let dir = tempfile::tempdir().unwrap();
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    // JetStream in operator mode needs a system account.
    let system = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    // A user of an account the server does not know is refused.
    let stranger_account = nkeys::KeyPair::new_account();
    let stranger = nkeys::KeyPair::new_user();
    let op_jwt = jwt(
        &operator,
        &operator.public_key(),
        "test-operator",
        serde_json::json!({
            "type": "operator", "version": 2,
            "system_account": system.public_key(),
        }),
    );
    let unlimited = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
        "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
    });
    let acct_jwt = jwt(
        &operator,
        &account.public_key(),
        "virtstream",
        serde_json::json!({
            "limits": unlimited,
            "default_permissions": {"pub": {}, "sub": {}},
            "type": "account", "version": 2,
        }),
    );
    let sys_jwt = jwt(
        &operator,
        &system.public_key(),
        "SYS",
        serde_json::json!({"type": "account", "version": 2}),
    );
    let user_claims = serde_json::json!({
        "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
        "type": "user", "version": 2,
    });
    let user_jwt = jwt(&account, &user.public_key(), "agent", user_claims.clone());
    let stranger_jwt = jwt(
        &stranger_account,
        &stranger.public_key(),
        "stranger",
        user_claims,
    );
    let conf = secret_file(
        dir.path(),
        "operator.conf",
        &format!(
            "operator: \"{op_jwt}\"\nsystem_account: {sys}\nresolver: MEMORY\n\
             resolver_preload: {{\n  {acct}: \"{acct_jwt}\"\n  {sys}: \"{sys_jwt}\"\n}}\n",
            acct = account.public_key(),
            sys = system.public_key(),
        ),
    );
    let seed = user.seed().unwrap();
    let good = secret_file(dir.path(), "agent.creds", &creds(&user_jwt, &seed));
    let bad = secret_file(
        dir.path(),
        "stranger.creds",
        &creds(&stranger_jwt, &stranger.seed().unwrap()),
    );
    let reader_creds = std::fs::read_to_string(&good).unwrap();
    run_auth_case(AuthCase {
        server_args: vec!["-c".into(), conf.display().to_string()],
        auth: format!("credentials_file = \"{}\"", good.display()),
        env: Vec::new(),
        reader: &move || async_nats::ConnectOptions::with_credentials(&reader_creds).unwrap(),
        wrong: format!("credentials_file = \"{}\"", bad.display()),
        wrong_env: Vec::new(),
        secrets: vec![seed, user_jwt, stranger.seed().unwrap()],
    });
}

// ---------------------------------------------------------------- TLS

fn tls_server(pki: &Pki) -> NatsServer {
    NatsServer::start_with(
        free_port(),
        vec![
            "--tls".into(),
            "--tlscert".into(),
            pki.server_cert.display().to_string(),
            "--tlskey".into(),
            pki.server_key.display().to_string(),
            "--tlscacert".into(),
            pki.ca.display().to_string(),
            "--tlsverify".into(),
        ],
    )
}

fn tls_section(url: &str, ca: &Path, client: Option<&Pki>) -> String {
    let mut s = format!(
        "[nats]\nurl = \"{url}\"\ntls_ca_file = \"{}\"\n",
        ca.display()
    );
    if let Some(p) = client {
        s.push_str(&format!(
            "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
            p.client_cert.display(),
            p.client_key.display()
        ));
    }
    s
}

#[test]
fn nats_mutual_tls_with_a_ca_made_in_the_test() {
    ensure_libvirtd();
    let _oracle = Oracle::start(TEST_URI);
    let pki = Pki::new("nats");
    let server = tls_server(&pki);
    // The agent requires TLS by `tls = true` on a nats:// URL (what the
    // Helm chart renders); the tools below use a tls:// URL instead.
    let url = format!("nats://127.0.0.1:{}", server.port);
    let section =
        tls_section(&url, &pki.ca, Some(&pki)).replace("[nats]\n", "[nats]\ntls = true\n");
    let mut agent = Agent::new(TEST_URI, None, &section);
    agent.start();
    agent.wait_ready(Duration::from_secs(30));

    let name = unique("tls");
    let uuid = new_uuid();
    let xml = agent.dir.path().join("dom.xml");
    std::fs::write(&xml, test_domain_xml(&name, &uuid)).unwrap();
    virsh(&["define", xml.to_str().unwrap()]);
    virsh(&["start", &name]);

    // An independent client over the same mutual TLS sees the events.
    let reader = || {
        async_nats::ConnectOptions::new()
            .require_tls(true)
            .add_root_certificates(pki.ca.clone())
            .add_client_certificate(pki.client_cert.clone(), pki.client_key.clone())
    };
    let got = wait_events(&agent, reader, &url, |m| {
        m.iter()
            .any(|s| s.event.domain.uuid == uuid && s.event.event == EventType::STARTED)
    });
    assert!(got
        .iter()
        .any(|s| s.event.domain.uuid == uuid && s.event.event == EventType::DEFINED));

    // The consumer tools use the same TLS settings.
    let tool_config = agent.dir.path().join("tools.toml");
    let text = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &tool_config,
        text.replace("tls = true\n", "")
            .replace(&url, &format!("tls://127.0.0.1:{}", server.port)),
    )
    .unwrap();
    let out = Command::new(Agent::bin())
        .args(["state", "--bus", "nats", "--format", "json", "--config"])
        .arg(&tool_config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(&uuid) && text.contains("\"RUNNING\""),
        "state over TLS: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A plaintext client, one without a client certificate, and one that
    // does not trust the server's CA are all refused.
    let plain = rt().block_on(async {
        tokio::time::timeout(
            Duration::from_secs(5),
            async_nats::ConnectOptions::new()
                .connection_timeout(Duration::from_secs(3))
                .connect(format!("nats://127.0.0.1:{}", server.port)),
        )
        .await
    });
    assert!(
        !matches!(plain, Ok(Ok(_))),
        "the TLS server accepted a plaintext client"
    );
    let tls_url = format!("tls://127.0.0.1:{}", server.port);
    let mut no_cert = Agent::new(TEST_URI, None, &tls_section(&tls_url, &pki.ca, None));
    no_cert.start();
    let stranger = Pki::new("stranger");
    let mut wrong_ca = Agent::new(
        TEST_URI,
        None,
        &tls_section(&tls_url, &stranger.ca, Some(&stranger)),
    );
    wrong_ca.start();
    assert_refused(&wrong_ca, &["invalid peer certificate: unknownissuer"]);
    assert_refused(&no_cert, &["badcertificate", "certificaterequired"]);
    virsh(&["destroy", &name]);
    virsh(&["undefine", &name]);
}

#[test]
fn kafka_mutual_tls_through_a_tls_terminator() {
    ensure_libvirtd();
    let _oracle = Oracle::start(TEST_URI);
    let pki = Pki::new("kafka");
    let (plain_port, tls_port) = (free_port(), free_port());
    let broker = KafkaBroker::start_advertised(plain_port, tls_port);
    let _tls = Stunnel::start(&pki, tls_port, broker.port);
    let bootstrap = format!("127.0.0.1:{tls_port}");
    let section = |p: &Pki| {
        format!(
            "{}tls = true\ntls_ca_file = \"{}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
            kafka_section(&bootstrap),
            pki.ca.display(),
            p.client_cert.display(),
            p.client_key.display()
        )
    };
    let mut agent = Agent::new(TEST_URI, None, &section(&pki));
    agent.start();
    agent.wait_ready(Duration::from_secs(60));

    let name = unique("ktls");
    let uuid = new_uuid();
    let xml = agent.dir.path().join("dom.xml");
    std::fs::write(&xml, test_domain_xml(&name, &uuid)).unwrap();
    virsh(&["define", xml.to_str().unwrap()]);
    virsh(&["start", &name]);

    let mut client = rdkafka::ClientConfig::new();
    client
        .set("bootstrap.servers", &bootstrap)
        .set("security.protocol", "ssl")
        .set("ssl.ca.location", pki.ca.display().to_string())
        .set(
            "ssl.certificate.location",
            pki.client_cert.display().to_string(),
        )
        .set("ssl.key.location", pki.client_key.display().to_string());
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let recs = read_topic_with(&client, "virt.domain.events.v1");
        let mine: Vec<_> = recs
            .iter()
            .filter(|r| r.host_id == agent.host_id && r.key == uuid)
            .collect();
        if mine.len() >= 2 {
            break;
        }
        assert!(
            Instant::now() < end,
            "no DEFINED + STARTED records over TLS within 60 s ({} of this host)\n--- agent log ---\n{}",
            recs.iter().filter(|r| r.host_id == agent.host_id).count(),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    // A client certificate from another CA is refused by the terminator.
    let stranger = Pki::new("stranger");
    let mut wrong = Agent::new(TEST_URI, None, &section(&stranger));
    wrong.start();
    // The sink's own error names the TLS cause, not only librdkafka's log.
    let end = Instant::now() + Duration::from_secs(40);
    while !wrong
        .log()
        .to_lowercase()
        .lines()
        .any(|l| l.contains("kafka sink session ended") && l.contains("alert certificate required"))
    {
        assert!(
            Instant::now() < end,
            "the refused agent's error does not name the TLS cause within 40 s:\n{}",
            wrong.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let ready = wrong.http("/readyz");
    assert!(
        matches!(&ready, Some((503, body)) if body.contains("kafka")),
        "an agent with an untrusted certificate must stay unready: {ready:?}"
    );
    virsh(&["destroy", &name]);
    virsh(&["undefine", &name]);
}
