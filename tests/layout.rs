//! The architecture rules of STYLE.md, checked on the source tree: no file
//! in `src/` a reader must scroll through, no import cycle between files,
//! data flowing one way between stages, `unsafe` confined to the FFI
//! module, and a `//!` header on every file.
//!
//! Imports are read from `crate::…` and `super::…` paths (in `use` lines,
//! `use` groups and expressions). A path resolves to the deepest module
//! file it names; naming one's own ancestor (through which the file is
//! declared) is not an import.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_LINES: usize = 800;

/// Stages and the stages they must never name (later ones in the flow, or
/// the other side of the bus).
const NEVER: &[(&str, &[&str])] = &[
    (
        "source",
        &["tracker", "journal", "sinks", "bus", "consumer", "agent"],
    ),
    ("tracker", &["sinks", "bus", "consumer", "agent"]),
    (
        "journal",
        &["source", "tracker", "sinks", "bus", "consumer", "agent"],
    ),
    ("sinks", &["source", "tracker", "consumer", "agent"]),
    (
        "bus",
        &["source", "tracker", "journal", "sinks", "consumer", "agent"],
    ),
    (
        "consumer",
        &["source", "tracker", "journal", "sinks", "agent", "epoch"],
    ),
    ("epoch", &["consumer", "agent"]),
    ("model", LEAF_NEVER),
    ("codec", LEAF_NEVER),
    ("config", LEAF_NEVER),
    ("clock", LEAF_NEVER),
    ("telemetry", LEAF_NEVER),
];

/// The shared leaves (`model`, `codec`, `config`, `clock`, `telemetry`)
/// import no stage and no wiring.
const LEAF_NEVER: &[&str] = &[
    "source", "tracker", "journal", "sinks", "bus", "consumer", "agent", "epoch",
];

/// The one module allowed `unsafe` code.
const FFI_MODULE: &str = "source/ffi";

type Module = Vec<String>;

struct SrcFile {
    rel: String,
    text: String,
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            walk(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn files() -> Vec<SrcFile> {
    let root = src_dir();
    let mut paths = Vec::new();
    walk(&root, &mut paths);
    paths.sort();
    paths
        .into_iter()
        .map(|p| SrcFile {
            rel: p
                .strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .into_owned(),
            text: std::fs::read_to_string(&p).unwrap(),
        })
        .collect()
}

/// `a/b.rs` and `a/b/mod.rs` are module `a::b`; `lib.rs` is the root.
fn module_of(rel: &str) -> Option<Module> {
    let stem = rel.strip_suffix(".rs")?;
    let mut parts: Vec<String> = stem.split('/').map(str::to_string).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    match parts.as_slice() {
        [one] if one == "main" => None, // the binary: a crate of its own
        [one] if one == "lib" => Some(Vec::new()),
        _ => Some(parts),
    }
}

fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every `crate::…`/`super::…` path in `text`, with `use` groups expanded
/// one level (`use crate::a::{b, c::d}` gives `crate::a::b`, `crate::a::c`).
fn paths(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let starts = |w: &str| {
            text_at(&chars, i, w)
                && (i == 0 || !is_ident(chars[i - 1]))
                && text_at(&chars, i + w.len(), "::")
        };
        if !(starts("crate") || starts("super")) {
            i += 1;
            continue;
        }
        let mut segs = Vec::new();
        let mut j = i;
        loop {
            let s = j;
            while j < chars.len() && is_ident(chars[j]) {
                j += 1;
            }
            segs.push(chars[s..j].iter().collect::<String>());
            if text_at(&chars, j, "::") && j + 2 < chars.len() && is_ident(chars[j + 2]) {
                j += 2;
            } else {
                break;
            }
        }
        if text_at(&chars, j, "::{") {
            let close = (j..chars.len())
                .find(|&k| chars[k] == '}')
                .unwrap_or(chars.len());
            let group: String = chars[j + 3..close].iter().collect();
            for item in group.split(',') {
                let first = item
                    .trim()
                    .trim_start_matches('{')
                    .split("::")
                    .next()
                    .unwrap_or("");
                let first = first.split_whitespace().next().unwrap_or("");
                if !first.is_empty() && first != "self" && first.chars().all(is_ident) {
                    let mut p = segs.clone();
                    p.push(first.to_string());
                    out.push(p);
                }
            }
        }
        out.push(segs);
        i = j.max(i + 1);
    }
    out
}

fn text_at(chars: &[char], at: usize, w: &str) -> bool {
    w.chars()
        .enumerate()
        .all(|(k, c)| chars.get(at + k) == Some(&c))
}

/// The deepest existing module a path names, from module `me`.
fn resolve(me: &Module, path: &[String], modules: &BTreeSet<Module>) -> Option<Module> {
    let mut full: Module = Vec::new();
    let mut rest = path;
    if rest.first().is_some_and(|s| s == "crate") {
        rest = &rest[1..];
    } else {
        full = me.clone();
        while rest.first().is_some_and(|s| s == "super") {
            full.pop();
            rest = &rest[1..];
        }
    }
    full.extend(rest.iter().cloned());
    (0..=full.len())
        .rev()
        .map(|n| full[..n].to_vec())
        .find(|m| modules.contains(m))
}

fn import_graph(files: &[SrcFile]) -> BTreeMap<Module, BTreeSet<Module>> {
    let modules: BTreeSet<Module> = files.iter().filter_map(|f| module_of(&f.rel)).collect();
    let mut graph = BTreeMap::new();
    for f in files {
        let Some(me) = module_of(&f.rel) else {
            continue;
        };
        let mut to = BTreeSet::new();
        for p in paths(&strip_comments(&f.text)) {
            let Some(t) = resolve(&me, &p, &modules) else {
                continue;
            };
            let ancestor = t.len() <= me.len() && me[..t.len()] == t[..];
            if !ancestor {
                to.insert(t);
            }
        }
        graph.insert(me, to);
    }
    graph
}

#[test]
fn no_file_in_src_is_over_800_lines() {
    let long: Vec<String> = files()
        .iter()
        .filter(|f| f.text.lines().count() > MAX_LINES)
        .map(|f| format!("src/{} ({} lines)", f.rel, f.text.lines().count()))
        .collect();
    assert!(long.is_empty(), "split these along a seam: {long:?}");
}

#[test]
fn every_file_in_src_starts_with_a_module_header() {
    let bare: Vec<String> = files()
        .iter()
        .filter(|f| !f.text.trim_start().starts_with("//!"))
        .map(|f| format!("src/{}", f.rel))
        .collect();
    assert!(
        bare.is_empty(),
        "no `//!` header saying what the file owns: {bare:?}"
    );
}

#[test]
fn no_import_cycle_between_files() {
    let graph = import_graph(&files());
    // A cycle exists iff some module reaches itself; report each one once.
    let mut cycles = BTreeSet::new();
    for start in graph.keys() {
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        let mut seen = BTreeSet::new();
        while let Some((m, trail)) = stack.pop() {
            for next in graph.get(&m).into_iter().flatten() {
                if next == start {
                    let mut c: Vec<String> = trail.iter().map(|m| m.join("::")).collect();
                    c.sort();
                    cycles.insert(c.join(" <-> "));
                } else if seen.insert(next.clone()) {
                    let mut t = trail.clone();
                    t.push(next.clone());
                    stack.push((next.clone(), t));
                }
            }
        }
    }
    assert!(
        cycles.is_empty(),
        "import cycles between files of src/: {cycles:#?}"
    );
}

#[test]
fn data_flows_one_way_between_stages() {
    let graph = import_graph(&files());
    let mut wrong = Vec::new();
    for (from, to) in &graph {
        let Some(stage) = from.first() else { continue };
        let Some((_, never)) = NEVER.iter().find(|(s, _)| s == stage) else {
            continue;
        };
        for t in to {
            if t.first().is_some_and(|s| never.contains(&s.as_str())) {
                wrong.push(format!("{} imports {}", from.join("::"), t.join("::")));
            }
        }
    }
    assert!(wrong.is_empty(), "imports against the flow: {wrong:#?}");
    // The reading tools never depend on the publishing code, and both use
    // the bus layer.
    assert!(
        graph.keys().any(|m| m.first().is_some_and(|s| s == "bus")),
        "no bus/ layer"
    );
}

#[test]
fn unsafe_code_only_in_the_ffi_module() {
    let files = files();
    let root = |name: &str| {
        files
            .iter()
            .find(|f| f.rel == name)
            .map(|f| f.text.clone())
            .unwrap()
    };
    for crate_root in ["lib.rs", "main.rs"] {
        assert!(
            root(crate_root).contains("#![deny(unsafe_code)]"),
            "src/{crate_root} lacks #![deny(unsafe_code)]"
        );
    }
    let in_ffi =
        |rel: &str| rel == format!("{FFI_MODULE}.rs") || rel.starts_with(&format!("{FFI_MODULE}/"));
    let mut outside = Vec::new();
    let mut blocks = 0;
    let mut unexplained = Vec::new();
    for f in &files {
        let code = strip_comments(&f.text);
        let uses_unsafe = code.split(|c: char| !is_ident(c)).any(|w| w == "unsafe");
        let allows = code.contains("allow(unsafe_code)");
        if (uses_unsafe || allows) && !in_ffi(&f.rel) {
            outside.push(format!("src/{}", f.rel));
        }
        if !in_ffi(&f.rel) {
            continue;
        }
        // Every unsafe block or impl has a SAFETY comment within the six
        // lines before it (a comment block above the statement), or on its
        // own line.
        let lines: Vec<&str> = f.text.lines().collect();
        for (n, l) in lines.iter().enumerate() {
            let code = l.split("//").next().unwrap_or("");
            let opens = code.contains("unsafe {") || code.contains("unsafe impl");
            if !opens {
                continue;
            }
            blocks += 1;
            let from = n.saturating_sub(6);
            if !lines[from..=n].iter().any(|l| l.contains("SAFETY:")) {
                unexplained.push(format!("src/{}:{}", f.rel, n + 1));
            }
        }
    }
    // The parent module grants the exception, on the FFI module alone.
    let parent = FFI_MODULE
        .rsplit_once('/')
        .map(|(p, _)| format!("{p}/mod.rs"))
        .unwrap();
    let declares = root(&parent);
    let outside: Vec<String> = outside
        .into_iter()
        .filter(|f| *f != format!("src/{parent}"))
        .collect();
    assert!(
        outside.is_empty(),
        "unsafe code outside {FFI_MODULE}: {outside:?}"
    );
    assert!(
        declares.contains("#[allow(unsafe_code)]")
            && declares.matches("allow(unsafe_code)").count() == 1,
        "src/{parent} should allow unsafe code on the FFI module declaration only"
    );
    assert!(
        blocks > 0,
        "no unsafe block found in {FFI_MODULE}: is the path right?"
    );
    assert!(
        unexplained.is_empty(),
        "unsafe without a `// SAFETY:` comment: {unexplained:?}"
    );
}

#[test]
fn the_path_reader_sees_use_groups_and_expressions() {
    let p = paths("use crate::a::{b, c::d};\nlet x = super::e::f(); use crate::{g as h};");
    let s: Vec<String> = p.iter().map(|p| p.join("::")).collect();
    for want in ["crate::a::b", "crate::a::c", "super::e::f", "crate::g"] {
        assert!(s.contains(&want.to_string()), "{want} not in {s:?}");
    }
}
