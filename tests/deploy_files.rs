//! Checks of the deployment files in `deploy/` against the built binary:
//!
//! - the container image's runtime packages are exactly what `ldd` says the
//!   binary needs (`deploy/Containerfile`);
//! - the systemd unit verifies and keeps its sandboxing
//!   (`deploy/systemd/virtstream.service`);
//! - every example configuration passes `virtstream check-config`, prints
//!   its secrets redacted and has exactly the sections its file name says
//!   (`nats`, `kafka`, `schema-registry`) (`deploy/examples/*.toml`).
//!
//! These tests need Debian tools (`ldd`, `dpkg`, `dpkg-query`,
//! `systemd-analyze`); a missing tool fails the test with the package to
//! install, it never skips it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_virtstream");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `cmd args…`; a missing tool fails the test with how to install it.
fn run(cmd: &str, args: &[&str], install: &str) -> Output {
    match Command::new(cmd).args(args).output() {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            panic!("`{cmd}` is not installed; install it with `{install}`")
        }
        Err(e) => panic!("cannot run `{cmd} {}`: {e}", args.join(" ")),
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

// ---------------------------------------------------------------- (a)

/// Base-image packages the binary may link without the runtime stage
/// installing them. `debian:bookworm-slim` has every `Essential: yes` /
/// `Priority: required` package; of those, the binary links these directly
/// (libc.so.6, libm.so.6, ld-linux: libc6; libgcc_s.so.1: libgcc-s1;
/// libz.so.1: zlib1g, a pre-dependency of dpkg). Their dependencies count
/// as present too.
const BASE_IMAGE_PACKAGES: &[&str] = &["libc6", "libgcc-s1", "zlib1g"];

/// Runtime packages that provide no linked library but are needed anyway.
const RUNTIME_EXCEPTIONS: &[(&str, &str)] = &[(
    "ca-certificates",
    "the system trust store for TLS to NATS (rustls-native-certs) and Kafka (OpenSSL)",
)];

/// Dockerfile logical lines: continuations joined, comments and blank
/// lines dropped.
fn logical_lines(dockerfile: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in dockerfile.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(head) => {
                cur.push_str(head);
                cur.push(' ');
            }
            None => {
                cur.push_str(t);
                if !cur.trim().is_empty() {
                    out.push(cur.trim().to_string());
                }
                cur.clear();
            }
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_string());
    }
    out
}

fn instruction(line: &str) -> String {
    line.split_whitespace()
        .next()
        .unwrap_or("")
        .to_ascii_uppercase()
}

/// The runtime stage (after the last `FROM`): its base image and the
/// packages its `apt-get install` commands install.
fn runtime_stage(dockerfile: &str) -> (String, BTreeSet<String>) {
    let lines = logical_lines(dockerfile);
    let from = lines
        .iter()
        .rposition(|l| instruction(l) == "FROM")
        .expect("deploy/Containerfile has no FROM");
    let base = lines[from]
        .split_whitespace()
        .skip(1)
        .find(|w| !w.starts_with("--"))
        .expect("FROM names an image")
        .to_string();
    let mut packages = BTreeSet::new();
    for line in &lines[from + 1..] {
        if instruction(line) != "RUN" {
            continue;
        }
        let command = line[3..].replace("&&", ";").replace("||", ";");
        for part in command.split([';', '|']) {
            let words: Vec<&str> = part.split_whitespace().collect();
            let Some(apt) = words.iter().position(|w| *w == "apt-get" || *w == "apt") else {
                continue;
            };
            let Some(install) = words[apt..].iter().position(|w| *w == "install") else {
                continue;
            };
            packages.extend(
                words[apt + install + 1..]
                    .iter()
                    .filter(|w| !w.starts_with('-'))
                    // `pkg=version` pins name the package too.
                    .map(|w| w.split('=').next().unwrap().to_string()),
            );
        }
    }
    (base, packages)
}

/// Shared libraries `ldd` resolves for `bin` (path by soname).
fn linked_libraries(bin: &str) -> BTreeMap<String, PathBuf> {
    let out = run("ldd", &[bin], "apt-get install libc-bin");
    assert!(
        out.status.success(),
        "ldd {bin} failed: {}",
        text(&out.stderr)
    );
    let mut libs = BTreeMap::new();
    for line in text(&out.stdout).lines() {
        let line = line.trim();
        assert!(
            !line.contains("not found"),
            "the binary needs a library that is not installed here: {line}"
        );
        let (name, rest) = match line.split_once(" => ") {
            Some((n, r)) => (n.trim(), r.trim()),
            None => (line, line),
        };
        let path = rest.split_whitespace().next().unwrap_or("");
        if path.starts_with('/') {
            libs.insert(name.to_string(), PathBuf::from(path));
        }
    }
    assert!(
        libs.len() > 3,
        "ldd found almost nothing:\n{}",
        text(&out.stdout)
    );
    libs
}

/// Sonames the binary itself records as `NEEDED` (not those of its
/// libraries).
fn needed_sonames(bin: &str) -> BTreeSet<String> {
    let out = run("readelf", &["-d", bin], "apt-get install binutils");
    assert!(
        out.status.success(),
        "readelf -d {bin} failed: {}",
        text(&out.stderr)
    );
    // " 0x0000000000000001 (NEEDED)  Shared library: [libvirt.so.0]"
    text(&out.stdout)
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| Some(l.split_once('[')?.1.split_once(']')?.0.to_string()))
        .collect()
}

/// The same file under the other half of the /usr merge.
fn usrmerge_twin(p: &Path) -> Option<PathBuf> {
    let s = p.to_str()?;
    Some(match s.strip_prefix("/usr") {
        Some(rest) if rest.starts_with('/') => PathBuf::from(rest),
        _ => PathBuf::from(format!("/usr{s}")),
    })
}

/// The Debian package shipping each library (trying /lib vs /usr/lib and
/// the symlink's target), with one `dpkg -S` for all of them.
fn packages_of(libs: &BTreeMap<String, PathBuf>) -> BTreeMap<String, Vec<String>> {
    let candidates = |lib: &Path| {
        let mut c = vec![lib.to_path_buf()];
        c.extend(usrmerge_twin(lib));
        if let Ok(real) = std::fs::canonicalize(lib) {
            c.extend(usrmerge_twin(&real));
            c.push(real);
        }
        c
    };
    let all: BTreeSet<PathBuf> = libs.values().flat_map(|l| candidates(l)).collect();
    let args: Vec<&str> = std::iter::once("-S")
        .chain(all.iter().map(|p| p.to_str().unwrap()))
        .collect();
    // Exit status 1 when some candidate is unknown: expected.
    let out = run("dpkg", &args, "apt-get install dpkg");
    // "libc6:amd64: /lib/x86_64-linux-gnu/libc.so.6"
    let mut owner: BTreeMap<PathBuf, String> = BTreeMap::new();
    for line in text(&out.stdout).lines() {
        if line.starts_with("diversion ") {
            continue;
        }
        if let Some((pkgs, path)) = line.split_once(": ") {
            let first = pkgs.split(',').next().unwrap().trim();
            let pkg = first.split(':').next().unwrap().to_string();
            owner.insert(PathBuf::from(path.trim()), pkg);
        }
    }
    let mut by_package: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (soname, lib) in libs {
        let tried = candidates(lib);
        let pkg = tried.iter().find_map(|c| owner.get(c)).unwrap_or_else(|| {
            panic!(
                "no Debian package ships {} (tried {tried:?}); the runtime image cannot \
                     provide it",
                lib.display()
            )
        });
        by_package
            .entry(pkg.clone())
            .or_default()
            .push(soname.clone());
    }
    by_package
}

/// Installed packages: their dependencies (`Pre-Depends` + `Depends`,
/// alternatives kept) and which virtual packages they provide.
struct Installed {
    depends: BTreeMap<String, Vec<Vec<String>>>,
    provided_by: BTreeMap<String, Vec<String>>,
}

fn names(field: &str) -> Vec<Vec<String>> {
    field
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| {
            d.split('|')
                .filter_map(|alt| alt.split_whitespace().next())
                .map(|n| n.split(':').next().unwrap().to_string())
                .collect()
        })
        .collect()
}

fn installed_packages() -> Installed {
    let out = run(
        "dpkg-query",
        &[
            "-W",
            "-f=${Package}\t${db:Status-Abbrev}\t${Pre-Depends}\t${Depends}\t${Provides}\n",
        ],
        "apt-get install dpkg",
    );
    assert!(
        out.status.success(),
        "dpkg-query failed: {}",
        text(&out.stderr)
    );
    let mut depends: BTreeMap<String, Vec<Vec<String>>> = BTreeMap::new();
    let mut provided_by: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text(&out.stdout).lines() {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != 5 || !f[1].starts_with("ii") {
            continue;
        }
        let deps = depends.entry(f[0].to_string()).or_default();
        deps.extend(names(f[2]));
        deps.extend(names(f[3]));
        for p in names(f[4]).into_iter().flatten() {
            provided_by.entry(p).or_default().push(f[0].to_string());
        }
    }
    Installed {
        depends,
        provided_by,
    }
}

impl Installed {
    /// What apt would pick here for a dependency: the first alternative
    /// that is installed, directly or through `Provides`.
    fn resolve(&self, alternatives: &[String]) -> Option<String> {
        alternatives.iter().find_map(|a| {
            if self.depends.contains_key(a) {
                Some(a.clone())
            } else {
                self.provided_by.get(a).and_then(|p| p.first().cloned())
            }
        })
    }

    /// `roots` and everything they depend on, recursively.
    fn closure(&self, roots: &BTreeSet<String>) -> BTreeSet<String> {
        let mut seen: BTreeSet<String> = roots.clone();
        let mut queue: VecDeque<String> = roots.iter().cloned().collect();
        while let Some(p) = queue.pop_front() {
            for dep in self.depends.get(&p).into_iter().flatten() {
                if let Some(d) = self.resolve(dep) {
                    if seen.insert(d.clone()) {
                        queue.push_back(d);
                    }
                }
            }
        }
        seen
    }
}

#[test]
fn container_runtime_packages_cover_the_binary() {
    let file = repo().join("deploy/Containerfile");
    let dockerfile = std::fs::read_to_string(&file).expect("read deploy/Containerfile");
    let (base, listed) = runtime_stage(&dockerfile);
    assert_eq!(
        base, "debian:bookworm-slim",
        "the base-package list in this test assumes the runtime stage is debian:bookworm-slim"
    );
    assert!(
        !listed.is_empty(),
        "no `apt-get install` found in the runtime stage (after the last FROM) of {}",
        file.display()
    );

    // Every library the binary loads, and the package that ships it.
    let lib_packages = packages_of(&linked_libraries(BIN));

    // Libraries the binary links directly come from packages the runtime
    // stage names (or the base image), not from some other package's
    // dependencies that may change.
    let needed = needed_sonames(BIN);
    assert!(
        !needed.is_empty(),
        "readelf found no NEEDED entries in {BIN}"
    );
    for (pkg, sonames) in &lib_packages {
        let direct: Vec<&String> = sonames.iter().filter(|s| needed.contains(*s)).collect();
        assert!(
            direct.is_empty()
                || listed.contains(pkg)
                || BASE_IMAGE_PACKAGES.contains(&pkg.as_str()),
            "the binary links {direct:?} directly, from package `{pkg}`: add `{pkg}` to the \
             runtime stage's `apt-get install` in deploy/Containerfile"
        );
    }

    let installed = installed_packages();
    let exceptions: BTreeSet<&str> = RUNTIME_EXCEPTIONS.iter().map(|(p, _)| *p).collect();
    for p in &listed {
        assert!(
            installed.depends.contains_key(p) || exceptions.contains(p.as_str()),
            "the runtime stage installs `{p}`, which is not installed on this machine, so its \
             dependencies cannot be checked: `apt-get install {p}` (or remove it from \
             deploy/Containerfile)"
        );
    }
    let mut roots: BTreeSet<String> = listed.clone();
    roots.extend(BASE_IMAGE_PACKAGES.iter().map(|p| p.to_string()));
    let present = installed.closure(&roots);

    let missing: Vec<String> = lib_packages
        .iter()
        .filter(|(pkg, _)| !present.contains(*pkg))
        .map(|(pkg, libs)| format!("{pkg} (for {})", libs.join(", ")))
        .collect();
    assert!(
        missing.is_empty(),
        "the container image would lack libraries the binary links: add these packages to \
         the runtime stage's `apt-get install` in deploy/Containerfile: {}\n(installed there: \
         {listed:?}; base image: {BASE_IMAGE_PACKAGES:?})",
        missing.join("; ")
    );

    let unneeded: Vec<&String> = listed
        .iter()
        .filter(|p| !lib_packages.contains_key(*p) && !exceptions.contains(p.as_str()))
        .collect();
    assert!(
        unneeded.is_empty(),
        "the runtime stage of deploy/Containerfile installs {unneeded:?}, but the binary links \
         no library from them (linked: {:?}): remove them, or document them in \
         RUNTIME_EXCEPTIONS in tests/deploy_files.rs",
        lib_packages.keys().collect::<Vec<_>>()
    );
    for (p, why) in RUNTIME_EXCEPTIONS {
        assert!(
            listed.contains(*p),
            "deploy/Containerfile does not install `{p}` ({why})"
        );
    }
}

// ---------------------------------------------------------------- (b)

/// Highest acceptable `systemd-analyze security` exposure for the unit
/// (systemd 252 rates it 1.1 "OK"; 0-10, lower is better).
const MAX_EXPOSURE: f64 = 1.5;

fn systemd_analyze(args: &[&str]) -> Output {
    run("systemd-analyze", args, "apt-get install systemd")
}

/// The unit with `ExecStart=` pointing at the binary under test (verify
/// refuses a unit whose executable does not exist), in a fresh directory.
fn unit_copy(dir: &Path) -> PathBuf {
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/virtstream.service"))
        .expect("read deploy/systemd/virtstream.service");
    assert!(
        unit.lines()
            .any(|l| l
                == "ExecStart=/usr/local/bin/virtstream run --config /etc/virtstream/config.toml"),
        "the unit must run /usr/local/bin/virtstream run --config /etc/virtstream/config.toml"
    );
    assert!(
        !BIN.contains(char::is_whitespace),
        "binary path with spaces: {BIN}"
    );
    let path = dir.join("virtstream.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/virtstream", BIN)).unwrap();
    path
}

#[test]
fn systemd_unit_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_copy(dir.path());
    let unit_arg = unit.to_str().unwrap();

    let out = systemd_analyze(&["verify", "--man=no", unit_arg]);
    // Messages name the copy; point them at the file in the repository
    // (the rewrite keeps line numbers).
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr))
        .replace(unit_arg, "deploy/systemd/virtstream.service");
    let about_unit: Vec<&str> = said.lines().filter(|l| l.contains("virtstream")).collect();
    assert!(
        out.status.success() && about_unit.is_empty(),
        "systemd-analyze verify deploy/systemd/virtstream.service (exit {:?}):\n{said}",
        out.status.code()
    );

    let help = systemd_analyze(&["security", "--help"]);
    assert!(
        text(&help.stdout).contains("--offline"),
        "this systemd-analyze has no `security --offline` (systemd >= 250 needed, e.g. Debian \
         bookworm's systemd 252: apt-get install systemd)"
    );
    let out = systemd_analyze(&["security", "--offline=true", "--no-pager", unit_arg]);
    let report = text(&out.stdout);
    assert!(
        out.status.success(),
        "systemd-analyze security --offline=true failed (exit {:?}):\n{report}{}",
        out.status.code(),
        text(&out.stderr)
    );
    // "→ Overall exposure level for virtstream.service: 1.1 OK 🙂"
    let overall = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{report}"));
    let mut words = overall
        .rsplit_once(": ")
        .expect("level after ': '")
        .1
        .split_whitespace();
    let score: f64 = words
        .next()
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no exposure score in `{overall}`"));
    let rating = words.next().unwrap_or("");
    assert!(
        score <= MAX_EXPOSURE && rating == "OK",
        "the unit's sandboxing got weaker: exposure {score} {rating} (at most {MAX_EXPOSURE} \
         OK expected); report:\n{report}"
    );

    // Stop timeout above the agent's default flush deadline
    // (host.shutdown_timeout = 10s), so SIGKILL never cuts the flush short.
    let unit_text = std::fs::read_to_string(&unit).unwrap();
    let stop = unit_text
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .expect("TimeoutStopSec= is set");
    let secs: u64 = stop
        .trim_end_matches('s')
        .parse()
        .unwrap_or_else(|_| panic!("TimeoutStopSec={stop}: expected seconds like 30s"));
    assert!(secs > 10, "TimeoutStopSec={stop} is not above 10s");
    assert!(
        unit_text.contains("\nKillMode=mixed\n"),
        "KillMode=mixed: SIGTERM reaches the agent only, not its action commands"
    );
    assert!(
        unit_text.contains("\nRestartPreventExitStatus=64\n"),
        "the unit must not restart on exit 64 (configuration error)"
    );
}

// ---------------------------------------------------------------- (c)

/// Keys whose values `check-config` must print as `<redacted>`.
const SECRET_KEYS: &[&str] = &[
    "token_file",
    "credentials_file",
    "nkey_seed_file",
    "password",
    "password_file",
    "sasl_password",
    "sasl_password_file",
    "tls_key_password_file",
];

/// The part of a TOML line before a comment (`#` outside a string).
fn uncommented(line: &str) -> &str {
    let mut in_string = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => in_string = !in_string,
            '#' if !in_string => return &line[..i],
            _ => {}
        }
    }
    line
}

/// `key = "string"` pairs of the (uncommented) lines.
fn string_values(toml: &str) -> Vec<(String, String)> {
    toml.lines()
        .filter_map(|l| {
            let (k, v) = uncommented(l).split_once('=')?;
            let v = v.trim().strip_prefix('"')?.strip_suffix('"')?;
            Some((k.trim().to_string(), v.to_string()))
        })
        .collect()
}

#[test]
fn example_configs_pass_check_config() {
    let dir = repo().join("deploy/examples");
    let mut examples: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("deploy/examples exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    examples.sort();
    let names: Vec<String> = examples
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in ["nats.toml", "kafka.toml", "nats-kafka-tls.toml"] {
        assert!(
            names.iter().any(|n| n == expected),
            "deploy/examples/{expected} is missing (found {names:?})"
        );
    }

    let mut failures = Vec::new();
    for (example, name) in examples.iter().zip(&names) {
        let original = std::fs::read_to_string(example).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_str().unwrap();
        let values = string_values(&original);
        assert!(
            values
                .iter()
                .any(|(k, v)| k == "path" && v.starts_with("/var/lib/virtstream/")),
            "{name}: journal.path should be under /var/lib/virtstream/ (the unit's StateDirectory)"
        );

        // Files under /etc/virtstream/ move into the temp dir, with dummy
        // contents that must never be printed.
        let mut dummies = Vec::new();
        for (key, value) in &values {
            if let Some(rel) = value.strip_prefix("/etc/virtstream/") {
                let file = tmp.path().join("etc/virtstream").join(rel);
                std::fs::create_dir_all(file.parent().unwrap()).unwrap();
                let body = format!("DUMMY-CONTENT-{key}-d41d8cd98f00");
                std::fs::write(&file, &body).unwrap();
                dummies.push(body);
            }
        }
        let config = original
            .replace("\"/etc/virtstream/", &format!("\"{root}/etc/virtstream/"))
            .replace(
                "\"/var/lib/virtstream/",
                &format!("\"{root}/var/lib/virtstream/"),
            );
        let config_path = tmp.path().join("config.toml");
        std::fs::write(&config_path, &config).unwrap();

        let mut cmd = Command::new(BIN);
        cmd.args(["check-config", "--config", config_path.to_str().unwrap()]);
        for (k, _) in std::env::vars() {
            if k.starts_with("VIRTSTREAM_") {
                cmd.env_remove(k);
            }
        }
        let out = cmd.output().expect("run virtstream check-config");
        let shown = text(&out.stdout);
        if !out.status.success() {
            failures.push(format!(
                "{name}: check-config exit {:?}: {}",
                out.status.code(),
                text(&out.stderr).trim()
            ));
            continue;
        }

        for (key, value) in string_values(&config) {
            if !SECRET_KEYS.contains(&key.as_str()) {
                continue;
            }
            assert!(
                shown.contains(&format!("{key} = \"<redacted>\"")),
                "{name}: `{key}` is not printed as <redacted>:\n{shown}"
            );
            assert!(
                !shown.contains(&value),
                "{name}: the value of secret key `{key}` is printed:\n{shown}"
            );
        }
        for body in &dummies {
            assert!(
                !shown.contains(body.as_str()),
                "{name}: a secret file's contents are printed:\n{shown}"
            );
        }
        for (section, wanted) in [
            ("nats", name.contains("nats")),
            ("kafka", name.contains("kafka")),
            ("schema_registry", name.contains("schema-registry")),
        ] {
            assert_eq!(
                shown.lines().any(|l| l == format!("[{section}]")),
                wanted,
                "{name}: [{section}] section {} in the effective config:\n{shown}",
                if wanted { "missing" } else { "unexpected" }
            );
        }
    }
    assert!(
        failures.is_empty(),
        "example configs refused by check-config:\n{}",
        failures.join("\n")
    );
}
