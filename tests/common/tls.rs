//! TLS fixtures: a certificate authority made for one test (server and
//! client certificates signed by it, written as PEM files in a temporary
//! directory), and `stunnel` as a real TLS terminator in front of a
//! plaintext broker (the test Kafka broker has no working TLS listener).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// A test CA with one server certificate (for `localhost` and
/// `127.0.0.1`) and one client certificate, as PEM files.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let write = |file: &str, pem: String| {
            let p = dir.path().join(file);
            std::fs::write(&p, pem).unwrap();
            p
        };
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("virtstream test CA {name}"));
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();

        let leaf = |cn: &str, sans: Vec<String>, usage: ExtendedKeyUsagePurpose| {
            let mut p = CertificateParams::new(sans).unwrap();
            p.distinguished_name.push(DnType::CommonName, cn);
            p.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            p.extended_key_usages = vec![usage];
            let key = KeyPair::generate().unwrap();
            let cert = p.signed_by(&key, &ca_cert, &ca_key).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(
            "localhost",
            vec!["localhost".into(), "127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) = leaf(
            "virtstream-agent",
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        Pki {
            ca: write("ca.pem", ca_cert.pem()),
            server_cert: write("server.pem", server_cert),
            server_key: write("server.key", server_key),
            client_cert: write("client.pem", client_cert),
            client_key: write("client.key", client_key),
            dir,
        }
    }
}

/// `stunnel` accepting TLS on `port` (client certificates signed by the
/// PKI's CA required) and forwarding plaintext to `target`.
pub struct Stunnel {
    pub port: u16,
    _dir: tempfile::TempDir,
    child: Child,
}

impl Stunnel {
    pub fn start(pki: &Pki, port: u16, target: u16) -> Stunnel {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("stunnel.conf");
        std::fs::write(
            &conf,
            format!(
                "foreground = yes\npid =\ndebug = 4\n\
                 [tls]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{target}\n\
                 cert = {}\nkey = {}\nCAfile = {}\nrequireCert = yes\nverifyChain = yes\n",
                pki.server_cert.display(),
                pki.server_key.display(),
                pki.ca.display()
            ),
        )
        .unwrap();
        let log = dir.path().join("stunnel.log");
        let child = Command::new("stunnel")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run stunnel ({e}): install the test environment with \
                     `bash deploy/local-env.sh install` (Debian package stunnel4)"
                )
            });
        assert!(
            super::wait_port(port, Duration::from_secs(10)),
            "stunnel did not listen on 127.0.0.1:{port} within 10 s: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Stunnel {
            port,
            _dir: dir,
            child,
        }
    }
}

impl Drop for Stunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
