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
    SchemaCompatibility::can_read(&with_reader_enum_defaults(new, old), old)
        .map_err(|e| format!("old cannot read new data: {e}"))?;
    Ok(())
}

/// `writer` as `reader` sees it under the specification's enum rule
/// (Avro 1.9+): a writer symbol the reader's enum lacks resolves to the
/// reader's `default`, so for a reader enum with a default the writer's
/// extra symbols are dropped before apache-avro's check (which does not
/// know that rule). A reader enum without a default keeps the strict check.
fn with_reader_enum_defaults(writer: &Schema, reader: &Schema) -> Schema {
    fn enums(v: &serde_json::Value, out: &mut BTreeMap<String, (Vec<String>, bool)>) {
        match v {
            serde_json::Value::Object(m) => {
                if m.get("type").and_then(|t| t.as_str()) == Some("enum") {
                    let name = m["name"].as_str().unwrap().to_string();
                    let symbols = m["symbols"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|s| s.as_str().unwrap().to_string())
                        .collect();
                    let has_default = m
                        .get("default")
                        .and_then(|d| d.as_str())
                        .is_some_and(|d| m["symbols"].as_array().unwrap().iter().any(|s| s == d));
                    out.insert(name, (symbols, has_default));
                }
                m.values().for_each(|v| enums(v, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| enums(v, out)),
            _ => {}
        }
    }
    fn restrict(v: &mut serde_json::Value, reader: &BTreeMap<String, (Vec<String>, bool)>) {
        match v {
            serde_json::Value::Object(m) => {
                if m.get("type").and_then(|t| t.as_str()) == Some("enum") {
                    let name = m["name"].as_str().unwrap().to_string();
                    if let Some((symbols, true)) = reader.get(&name) {
                        m["symbols"]
                            .as_array_mut()
                            .unwrap()
                            .retain(|s| symbols.iter().any(|r| r == s));
                    }
                }
                m.values_mut().for_each(|v| restrict(v, reader));
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(|v| restrict(v, reader)),
            _ => {}
        }
    }
    let mut r = BTreeMap::new();
    enums(&serde_json::to_value(reader).unwrap(), &mut r);
    let mut w: serde_json::Value = serde_json::to_value(writer).unwrap();
    restrict(&mut w, &r);
    Schema::parse(&w).unwrap()
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
    // Breaking: a symbol appended to an enum without a default (old
    // readers could not resolve it); fine with one.
    let mut j3: serde_json::Value = serde_json::from_str(v1).unwrap();
    for f in j3["fields"].as_array_mut().unwrap() {
        if f["name"] == "origin" {
            f["type"]["symbols"]
                .as_array_mut()
                .unwrap()
                .push("PLUGIN".into());
        }
    }
    assert!(check_pair(&old, &Schema::parse_str(&j3.to_string()).unwrap()).is_ok());
    for f in j3["fields"].as_array_mut().unwrap() {
        if f["name"] == "origin" {
            f["type"].as_object_mut().unwrap().remove("default");
        }
    }
    let old_no_default = {
        let mut j: serde_json::Value = serde_json::from_str(v1).unwrap();
        for f in j["fields"].as_array_mut().unwrap() {
            if f["name"] == "origin" {
                f["type"].as_object_mut().unwrap().remove("default");
            }
        }
        Schema::parse_str(&j.to_string()).unwrap()
    };
    assert!(check_pair(
        &old_no_default,
        &Schema::parse_str(&j3.to_string()).unwrap()
    )
    .is_err());
}

/// A v1 reader that is not ours (fastavro, given only DomainEvent.v1)
/// reads the v2 HOOK record this build writes: the new symbols resolve to
/// the enums' default UNKNOWN and the `hook` field is skipped.
#[test]
fn a_v1_reader_reads_v2_hook_records_as_unknown() {
    use virtstream::model::{
        Detail, DomainEvent, DomainRef, DomainState, EventType, HookCall, Origin, StateReason,
    };
    let e = DomainEvent {
        event_id: "h:e:5".into(),
        host_id: "h".into(),
        epoch: "e".into(),
        host_seq: 5,
        seq: 2,
        domain: DomainRef {
            uuid: "b9906489-6d5b-40f8-a742-ca71b2b84277".into(),
            name: "vm".into(),
            id: None,
        },
        event: EventType::HOOK,
        libvirt_event_id: -1,
        event_code: -1,
        detail: Detail::HOOK_PREPARE,
        detail_code: -1,
        origin: Origin::HOOK,
        state_after: StateReason::named(DomainState::SHUTOFF, "UNKNOWN"),
        persistent: true,
        autostart: None,
        vcpus: None,
        memory_kib: None,
        config_hash: None,
        observed_at: 1,
        xml: None,
        hook: Some(HookCall {
            operation: "prepare".into(),
            sub_operation: "begin".into(),
            extra: "-".into(),
        }),
    };
    let bytes = virtstream::codec::encode_event(&e);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    let script = r#"
import io, json, sys, fastavro
w = fastavro.parse_schema(json.load(open(sys.argv[1])))
r = fastavro.parse_schema(json.load(open(sys.argv[2])))
body = sys.stdin.buffer.read()[10:]
rec = fastavro.schemaless_reader(io.BytesIO(body), w, r)
print(json.dumps({"event": rec["event"], "detail": rec["detail"], "origin": rec["origin"], "hook": "hook" in rec}))
"#;
    let v2 = dir.join("DomainEvent.v2.avsc").display().to_string();
    let v1 = dir.join("DomainEvent.v1.avsc").display().to_string();
    let out = run_python("fastavro v1 reader", script, &[&v2, &v1], &bytes);
    let got: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        got,
        serde_json::json!({"event": "UNKNOWN", "detail": "UNKNOWN", "origin": "HOOK", "hook": false})
    );
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
