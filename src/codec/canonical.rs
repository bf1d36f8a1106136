//! The Parsing Canonical Form of an Avro schema, as the Avro specification
//! defines it ("Parsing Canonical Form for Schemas") and as Java's
//! `SchemaNormalization` and fastavro compute it. Its CRC-64-AVRO is the
//! fingerprint in every single-object header we write, so a reader that
//! looks schemas up by fingerprint (Java's `BinaryMessageDecoder`,
//! fastavro) finds ours.
//!
//! The transformations, in the specification's words: PRIMITIVES (a
//! primitive in its simple form, `"string"`, also when it carries a logical
//! type), FULLNAMES (names written in full, namespaces dropped), STRIP
//! (only `type`, `name`, `fields`, `symbols`, `items`, `values`, `size`
//! kept), ORDER (those keys in that order), STRINGS and INTEGERS (plain
//! literals), WHITESPACE (none). A named type already written is written
//! again by its full name only.
//!
//! Invariant: the input is a schema apache-avro accepted (the shipped
//! schemas are parsed before their form is computed); anything else is an
//! error naming the place, never a panic.

use std::collections::HashSet;
use std::fmt::Write as _;

use serde_json::{Map, Value};

const PRIMITIVES: &[&str] = &[
    "null", "boolean", "int", "long", "float", "double", "bytes", "string",
];

/// Why a schema has no canonical form.
#[derive(Debug, thiserror::Error)]
#[error("schema has no Parsing Canonical Form: {0}")]
pub struct CanonicalError(String);

/// The Parsing Canonical Form of the schema in `text` (JSON).
pub fn parsing_canonical_form(text: &str) -> Result<String, CanonicalError> {
    let v: Value =
        serde_json::from_str(text).map_err(|e| CanonicalError(format!("not JSON: {e}")))?;
    let mut out = String::with_capacity(text.len());
    write_schema(&v, "", &mut HashSet::new(), &mut out)?;
    Ok(out)
}

fn quoted(s: &str, out: &mut String) {
    // serde_json writes a string literal with only the escapes JSON needs
    // (quote, backslash, control characters): the STRINGS rule.
    out.push_str(&Value::String(s.to_string()).to_string());
}

fn full_name(name: &str, namespace: &str) -> String {
    if name.contains('.') || namespace.is_empty() {
        name.to_string()
    } else {
        format!("{namespace}.{name}")
    }
}

/// The namespace a name's own dots give, else the explicit `namespace`,
/// else the enclosing one.
fn namespace_of(full: &str) -> &str {
    full.rsplit_once('.').map(|(ns, _)| ns).unwrap_or("")
}

fn write_schema(
    v: &Value,
    namespace: &str,
    seen: &mut HashSet<String>,
    out: &mut String,
) -> Result<(), CanonicalError> {
    match v {
        Value::String(s) if PRIMITIVES.contains(&s.as_str()) => quoted(s, out),
        // A reference to a named type defined before.
        Value::String(s) => quoted(&full_name(s, namespace), out),
        Value::Array(branches) => {
            out.push('[');
            for (i, b) in branches.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_schema(b, namespace, seen, out)?;
            }
            out.push(']');
        }
        Value::Object(o) => write_object(o, namespace, seen, out)?,
        other => return Err(CanonicalError(format!("unexpected {other} as a schema"))),
    }
    Ok(())
}

fn field<'a>(o: &'a Map<String, Value>, key: &str) -> Result<&'a Value, CanonicalError> {
    o.get(key)
        .ok_or_else(|| CanonicalError(format!("missing `{key}` in {}", Value::Object(o.clone()))))
}

fn write_object(
    o: &Map<String, Value>,
    namespace: &str,
    seen: &mut HashSet<String>,
    out: &mut String,
) -> Result<(), CanonicalError> {
    let ty = field(o, "type")?;
    let Value::String(ty) = ty else {
        // {"type": {...}} or {"type": [...]}: the inner schema is the type.
        return write_schema(ty, namespace, seen, out);
    };
    match ty.as_str() {
        // Logical types and any other attribute are stripped.
        t if PRIMITIVES.contains(&t) => quoted(t, out),
        "record" | "error" | "enum" | "fixed" => {
            let name = field(o, "name")?
                .as_str()
                .ok_or_else(|| CanonicalError("a `name` that is not a string".into()))?;
            let ns = o
                .get("namespace")
                .and_then(Value::as_str)
                .unwrap_or(namespace);
            let full = full_name(name, ns);
            if !seen.insert(full.clone()) {
                quoted(&full, out);
                return Ok(());
            }
            out.push_str("{\"name\":");
            quoted(&full, out);
            out.push_str(",\"type\":");
            quoted(ty, out);
            match ty.as_str() {
                "enum" => {
                    out.push_str(",\"symbols\":");
                    let symbols = field(o, "symbols")?;
                    out.push_str(&symbols.to_string());
                }
                "fixed" => {
                    let size = field(o, "size")?;
                    // INTEGERS: a number, never a quoted or padded one.
                    let n = match size {
                        Value::Number(n) => n.as_u64(),
                        Value::String(s) => s.trim().parse().ok(),
                        _ => None,
                    }
                    .ok_or_else(|| CanonicalError(format!("fixed {full}: bad size {size}")))?;
                    write!(out, ",\"size\":{n}").expect("writing to a String");
                }
                _ => {
                    out.push_str(",\"fields\":[");
                    let fields = field(o, "fields")?
                        .as_array()
                        .ok_or_else(|| CanonicalError(format!("{full}: `fields` not a list")))?;
                    let inner = namespace_of(&full);
                    for (i, f) in fields.iter().enumerate() {
                        let f = f.as_object().ok_or_else(|| {
                            CanonicalError(format!("{full}: a field not an object"))
                        })?;
                        if i > 0 {
                            out.push(',');
                        }
                        out.push_str("{\"name\":");
                        let fname = field(f, "name")?.as_str().ok_or_else(|| {
                            CanonicalError(format!("{full}: a field name not a string"))
                        })?;
                        quoted(fname, out);
                        out.push_str(",\"type\":");
                        write_schema(field(f, "type")?, inner, seen, out)?;
                        out.push('}');
                    }
                    out.push(']');
                }
            }
            out.push('}');
        }
        "array" => {
            out.push_str("{\"type\":\"array\",\"items\":");
            write_schema(field(o, "items")?, namespace, seen, out)?;
            out.push('}');
        }
        "map" => {
            out.push_str("{\"type\":\"map\",\"values\":");
            write_schema(field(o, "values")?, namespace, seen, out)?;
            out.push('}');
        }
        // {"type": "SomeNamedType"}: a reference.
        other => quoted(&full_name(other, namespace), out),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pcf(s: &str) -> String {
        parsing_canonical_form(s).unwrap()
    }

    #[test]
    fn primitives_and_logical_types_take_their_simple_form() {
        assert_eq!(pcf(r#"{"type":"int"}"#), r#""int""#);
        assert_eq!(
            pcf(r#"{"type":"string","logicalType":"uuid"}"#),
            r#""string""#
        );
        assert_eq!(
            pcf(r#"{"type":"long","logicalType":"timestamp-micros"}"#),
            r#""long""#
        );
        assert_eq!(
            pcf(r#"["null",{"type":"string","logicalType":"uuid"}]"#),
            r#"["null","string"]"#
        );
    }

    #[test]
    fn names_are_full_attributes_stripped_keys_ordered() {
        let s = r#"{"doc":"d","fields":[{"default":1,"type":"int","name":"a","doc":"x"},
            {"name":"e","type":{"symbols":["A","B"],"type":"enum","name":"E","aliases":["F"]}},
            {"name":"again","type":"E"},
            {"name":"f","type":{"type":"fixed","name":"other.Fx","size":"016"}},
            {"name":"m","type":{"type":"map","values":{"type":"array","items":"E"}}}],
            "namespace":"ns","name":"R","type":"record"}"#;
        assert_eq!(
            pcf(s),
            concat!(
                r#"{"name":"ns.R","type":"record","fields":[{"name":"a","type":"int"},"#,
                r#"{"name":"e","type":{"name":"ns.E","type":"enum","symbols":["A","B"]}},"#,
                r#"{"name":"again","type":"ns.E"},"#,
                r#"{"name":"f","type":{"name":"other.Fx","type":"fixed","size":16}},"#,
                r#"{"name":"m","type":{"type":"map","values":{"type":"array","items":"ns.E"}}}]}"#
            )
        );
    }

    #[test]
    fn the_specifications_null_vector() {
        // The specification's example fingerprint: CRC-64-AVRO of "null".
        assert_eq!(pcf(r#""null""#), r#""null""#);
        assert_eq!(
            super::super::schema::crc64_avro(pcf(r#""null""#).as_bytes()),
            0x63dd_24e7_cc25_8f8a
        );
    }

    #[test]
    fn what_is_not_a_schema_is_an_error() {
        assert!(parsing_canonical_form("{").is_err());
        assert!(parsing_canonical_form(r#"{"type":"record","name":"R"}"#).is_err());
        assert!(parsing_canonical_form("42").is_err());
    }
}
