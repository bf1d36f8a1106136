//! Every schema file parses, is the one the binary embeds, and each new
//! version of a record is compatible both ways with the previous one (new
//! readers read old data, old readers read new data).

use std::collections::BTreeMap;

mod common;
use common::run_python;

use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::Schema;

/// `schemas/<Record>.v<N>.avsc` → record → version → (file, schema text).
fn schema_files() -> BTreeMap<String, BTreeMap<u32, (String, String)>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    let mut out: BTreeMap<String, BTreeMap<u32, (String, String)>> = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_string_lossy().to_string();
        let stem = file
            .strip_suffix(".avsc")
            .unwrap_or_else(|| panic!("schemas/{file}: only .avsc files belong here"));
        let (record, version) = stem
            .rsplit_once(".v")
            .unwrap_or_else(|| panic!("schemas/{file}: name must be <Record>.v<N>.avsc"));
        let version: u32 = version
            .parse()
            .unwrap_or_else(|_| panic!("schemas/{file}: bad version"));
        let text = std::fs::read_to_string(&path).unwrap();
        out.entry(record.to_string())
            .or_default()
            .insert(version, (file, text));
    }
    out
}

fn check_pair(old: &Schema, new: &Schema) -> Result<(), String> {
    SchemaCompatibility::can_read(old, new)
        .map_err(|e| format!("new cannot read old data: {e}"))?;
    SchemaCompatibility::can_read(new, old)
        .map_err(|e| format!("old cannot read new data: {e}"))?;
    Ok(())
}

#[test]
fn every_schema_parses_and_consecutive_versions_are_compatible() {
    let files = schema_files();
    assert!(
        files.contains_key("DomainEvent"),
        "DomainEvent schema missing"
    );
    let mut pairs = 0;
    for (record, versions) in &files {
        let nums: Vec<u32> = versions.keys().copied().collect();
        assert_eq!(
            nums,
            (1..=nums.len() as u32).collect::<Vec<_>>(),
            "{record}: versions must be 1..N"
        );
        let parsed: Vec<(u32, Schema)> = versions
            .iter()
            .map(|(v, (file, text))| {
                let s = Schema::parse_str(text).unwrap_or_else(|e| panic!("schemas/{file}: {e}"));
                match &s {
                    Schema::Record(r) => {
                        assert_eq!(r.name.name, *record, "schemas/{file}: record name")
                    }
                    other => panic!("schemas/{file}: top level must be a record, is {other:?}"),
                }
                (*v, s)
            })
            .collect();
        for w in parsed.windows(2) {
            check_pair(&w[0].1, &w[1].1)
                .unwrap_or_else(|e| panic!("{record} v{} → v{}: {e}", w[0].0, w[1].0));
            pairs += 1;
        }
    }
    // The binary embeds exactly these files.
    let embedded = virtstream::codec::SCHEMA_FILES;
    let on_disk: usize = files.values().map(|v| v.len()).sum();
    assert_eq!(
        embedded.len(),
        on_disk,
        "codec::SCHEMA_FILES must list every schema file"
    );
    for (name, version, text) in embedded {
        let (_, disk) = &files[*name][version];
        assert_eq!(
            disk, text,
            "{name} v{version} differs from the embedded copy"
        );
    }
    eprintln!("checked {pairs} consecutive version pair(s)");
}

#[test]
fn the_compatibility_check_catches_breaking_changes() {
    let files = schema_files();
    let (_, v1) = &files["DomainEvent"][&1];
    let old = Schema::parse_str(v1).unwrap();
    let mut j: serde_json::Value = serde_json::from_str(v1).unwrap();
    // Compatible: a new optional field with a default.
    let mut ok = j.clone();
    ok["fields"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"name": "rack", "type": ["null", "string"], "default": null}));
    assert!(check_pair(&old, &Schema::parse_str(&ok.to_string()).unwrap()).is_ok());
    // Breaking: a new required field without a default.
    j["fields"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"name": "rack", "type": "string"}));
    let bad = Schema::parse_str(&j.to_string()).unwrap();
    assert!(check_pair(&old, &bad).is_err());
    // Breaking: a field changes type.
    let mut j2: serde_json::Value = serde_json::from_str(v1).unwrap();
    for f in j2["fields"].as_array_mut().unwrap() {
        if f["name"] == "host_seq" {
            f["type"] = "string".into();
        }
    }
    assert!(check_pair(&old, &Schema::parse_str(&j2.to_string()).unwrap()).is_err());
}

/// Our Parsing Canonical Form and fingerprint of every schema file equal
/// what fastavro (an implementation we did not write) computes, and the
/// header this build writes carries that fingerprint.
#[test]
fn canonical_forms_and_fingerprints_match_fastavro() {
    let script = r#"
import json, sys, fastavro
from fastavro.schema import to_parsing_canonical_form, fingerprint
out = {}
for path in sys.argv[1:]:
    pcf = to_parsing_canonical_form(fastavro.parse_schema(json.load(open(path))))
    out[path] = [pcf, fingerprint(pcf, "CRC-64-AVRO")]
print(json.dumps(out))
"#;
    let files = schema_files();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    let paths: Vec<String> = files
        .values()
        .flat_map(|v| v.values())
        .map(|(file, _)| dir.join(file).display().to_string())
        .collect();
    let args: Vec<&str> = paths.iter().map(String::as_str).collect();
    let out = run_python("fastavro on schemas/", script, &args, b"");
    let theirs: BTreeMap<String, (String, String)> = serde_json::from_slice(&out).unwrap();
    assert_eq!(theirs.len(), paths.len());
    for (record, versions) in &files {
        for (version, (file, text)) in versions {
            let (pcf, fp) = &theirs[&dir.join(file).display().to_string()];
            assert_eq!(
                &virtstream::codec::parsing_canonical_form(text).unwrap(),
                pcf,
                "{file}: canonical form differs from fastavro's"
            );
            let entry = virtstream::codec::schemas()
                .iter()
                .find(|s| s.name == record && s.version == *version)
                .unwrap_or_else(|| panic!("{file} is not embedded"));
            let ours: String = entry
                .fingerprint
                .to_le_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(&ours, fp, "{file}: fingerprint differs from fastavro's");
            let headers = virtstream::codec::cloudevents_headers(
                "ce.type",
                "h:e:1",
                "h",
                1,
                "subject",
                virtstream::codec::CONTENT_TYPE_AVRO,
                entry,
            );
            let header = headers
                .iter()
                .find(|(k, _)| *k == "virtstream-schema-fingerprint")
                .map(|(_, v)| v.clone());
            assert_eq!(header.as_deref(), Some(fp.as_str()), "{file}: header");
        }
    }
}
