//! The tenant of a domain, from the domain XML some messages carry
//! (`[libvirt] xml = "on-change"` or `"always"` on the agent): a
//! [`TenantRule`] finds it under `<metadata>` (`[usage.tenant]`), and
//! [`Tenants`] remembers the latest one per (host, domain) for `usage`.
//!
//! The rule: under the domain's `<metadata>`, the first child element in
//! one of the configured namespaces (tried in order); from there the
//! element path, each step a child element of that local name in the same
//! namespace; the value is the named attribute, else the element's text,
//! trimmed. An empty value is no tenant.
//!
//! Invariants:
//! - XML is parsed by an XML parser (namespaces by URI, never by prefix),
//!   with DTDs refused: bad, hostile or truncated XML gives no tenant,
//!   never a panic;
//! - the tenant of a (host, domain) is the one of the record with the
//!   newest XML (newest epoch by stream position, then highest
//!   `host_seq`), whatever order records were read in; a record without
//!   XML changes nothing, one whose XML lacks the element clears it.

use std::collections::HashMap;

use crate::config::TenantConfig;

/// Where the tenant id is in a domain's XML (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantRule {
    namespaces: Vec<String>,
    path: Vec<String>,
    attribute: Option<String>,
}

/// Most XML nodes parsed per document: a domain's XML has a few hundred;
/// anything far beyond is not a domain and is not worth the memory.
const NODES_LIMIT: u32 = 200_000;

impl TenantRule {
    pub fn new(cfg: &TenantConfig) -> TenantRule {
        TenantRule {
            namespaces: cfg.namespace.0.clone(),
            path: cfg.path().into_iter().map(str::to_owned).collect(),
            attribute: cfg.attribute.clone(),
        }
    }

    /// The tenant id in domain XML `xml`, if the rule finds a non-empty
    /// one.
    pub fn extract(&self, xml: &str) -> Option<String> {
        let opts = roxmltree::ParsingOptions {
            allow_dtd: false,
            nodes_limit: NODES_LIMIT,
            ..roxmltree::ParsingOptions::default()
        };
        let doc = roxmltree::Document::parse_with_options(xml, opts).ok()?;
        let domain = doc.root_element();
        if domain.tag_name().name() != "domain" || domain.tag_name().namespace().is_some() {
            return None;
        }
        let metadata = domain
            .children()
            .find(|n| n.is_element() && n.has_tag_name("metadata"))?;
        self.namespaces.iter().find_map(|ns| {
            let ns = ns.as_str();
            let in_ns = |n: &roxmltree::Node, name: Option<&str>| {
                n.is_element()
                    && n.tag_name().namespace() == Some(ns)
                    && name.is_none_or(|want| n.tag_name().name() == want)
            };
            let mut node = metadata.children().find(|n| in_ns(n, None))?;
            for step in &self.path {
                node = node.children().find(|n| in_ns(n, Some(step)))?;
            }
            let value = match &self.attribute {
                Some(a) => node.attribute(a.as_str())?.to_owned(),
                None => node
                    .children()
                    .filter(|c| c.is_text())
                    .filter_map(|c| c.text())
                    .collect(),
            };
            let value = value.trim();
            (!value.is_empty()).then(|| value.to_owned())
        })
    }
}

/// (host, epoch, domain uuid) → (host_seq of the record, its tenant).
type Latest = HashMap<(String, String, String), (u64, Option<String>)>;

/// The latest XML-derived tenant of every (host, domain), from the
/// records read (see the module doc).
#[derive(Debug, Clone)]
pub struct Tenants {
    rule: TenantRule,
    latest: Latest,
}

impl Tenants {
    pub fn new(rule: TenantRule) -> Tenants {
        Tenants {
            rule,
            latest: HashMap::new(),
        }
    }

    /// Notes a domain record (event or snapshot) of `host`'s `epoch` at
    /// `host_seq`; only records carrying XML say anything.
    pub fn note(&mut self, host: &str, epoch: &str, uuid: &str, host_seq: u64, xml: Option<&str>) {
        let Some(xml) = xml else {
            return;
        };
        let key = (host.to_owned(), epoch.to_owned(), uuid.to_owned());
        if self.latest.get(&key).is_some_and(|(hs, _)| *hs >= host_seq) {
            return;
        }
        let tenant = self.rule.extract(xml);
        self.latest.insert(key, (host_seq, tenant));
    }

    /// The tenant of `uuid` on `host`: from the newest of `epochs` (the
    /// host's epochs, newest first) that has a record with XML.
    pub fn of(&self, host: &str, uuid: &str, epochs: &[&str]) -> Option<String> {
        epochs.iter().find_map(|e| {
            self.latest
                .get(&(host.to_owned(), (*e).to_owned(), uuid.to_owned()))
                .map(|(_, t)| t.clone())
        })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Namespaces;

    const NOVA_NS: &str = "http://openstack.org/xmlns/libvirt/nova/1.1";
    const PROJECT: &str = "8b6a1a3c-58cc-4372-a567-0e02b2c3d479";

    fn nova_rule() -> TenantRule {
        TenantRule::new(&TenantConfig {
            namespace: Namespaces(vec![
                NOVA_NS.into(),
                "http://openstack.org/xmlns/libvirt/nova/1.0".into(),
            ]),
            element: "owner/project".into(),
            attribute: Some("uuid".into()),
        })
    }

    /// A domain whose `<metadata>` holds `inner`.
    fn domain(inner: &str) -> String {
        format!(
            "<domain type='kvm'><name>instance-0000000e</name>\
             <uuid>ff91d2dc-69a1-43ef-abde-c9e4e9a0305b</uuid>\
             <metadata>{inner}</metadata><memory>8192</memory></domain>"
        )
    }

    /// Nova's layout (nova/virt/libvirt/config.py, LibvirtConfigGuestMetaNova*).
    fn nova(ns: &str, project: &str) -> String {
        domain(&format!(
            "<nova:instance xmlns:nova=\"{ns}\">\
               <nova:package version=\"25.1.0\"/><nova:name>web-1</nova:name>\
               <nova:flavor name=\"m1.small\"><nova:memory>2048</nova:memory></nova:flavor>\
               <nova:owner>\
                 <nova:user uuid=\"u-1\">alice</nova:user>\
                 <nova:project uuid=\"{project}\">  acme  </nova:project>\
               </nova:owner>\
             </nova:instance>"
        ))
    }

    #[test]
    fn the_nova_project_uuid_is_found() {
        assert_eq!(
            nova_rule().extract(&nova(NOVA_NS, PROJECT)).as_deref(),
            Some(PROJECT)
        );
        // The older namespace, tried second.
        let old = nova("http://openstack.org/xmlns/libvirt/nova/1.0", "p-old");
        assert_eq!(nova_rule().extract(&old).as_deref(), Some("p-old"));
        // Another prefix, same namespace: the prefix does not matter.
        let xml = nova(NOVA_NS, PROJECT)
            .replace("nova:", "n:")
            .replace("xmlns:nova", "xmlns:n");
        assert_eq!(nova_rule().extract(&xml).as_deref(), Some(PROJECT));
        // The element's text when no attribute is named.
        let text = TenantRule {
            attribute: None,
            ..nova_rule()
        };
        assert_eq!(
            text.extract(&nova(NOVA_NS, PROJECT)).as_deref(),
            Some("acme")
        );
    }

    #[test]
    fn absent_metadata_or_element_gives_none() {
        let rule = nova_rule();
        assert_eq!(rule.extract(&domain("")), None);
        assert_eq!(
            rule.extract("<domain type='test'><name>a</name></domain>"),
            None
        );
        // The owner without a project, and a project without the attribute.
        let no_project = nova(NOVA_NS, PROJECT).replace(
            &format!("<nova:project uuid=\"{PROJECT}\">  acme  </nova:project>"),
            "",
        );
        assert_eq!(rule.extract(&no_project), None);
        let no_attr = nova(NOVA_NS, PROJECT).replace(&format!(" uuid=\"{PROJECT}\""), "");
        assert_eq!(rule.extract(&no_attr), None);
        // An empty value is no tenant.
        assert_eq!(rule.extract(&nova(NOVA_NS, "  ")), None);
    }

    #[test]
    fn another_namespace_is_not_the_tenant() {
        let rule = nova_rule();
        let other = nova("http://example.com/other/1.0", PROJECT);
        assert_eq!(rule.extract(&other), None);
        // The right names without a namespace, or path steps outside it.
        let bare = domain(&format!(
            "<instance><owner><project uuid=\"{PROJECT}\"/></owner></instance>"
        ));
        assert_eq!(rule.extract(&bare), None);
        let mixed = domain(&format!(
            "<nova:instance xmlns:nova=\"{NOVA_NS}\" xmlns:x=\"urn:x\">\
             <x:owner><nova:project uuid=\"{PROJECT}\"/></x:owner></nova:instance>"
        ));
        assert_eq!(rule.extract(&mixed), None);
        // Metadata of another application before Nova's is skipped.
        let two = domain(&format!(
            "<app:meta xmlns:app=\"urn:app\"><app:owner><app:project uuid=\"no\"/></app:owner></app:meta>\
             <nova:instance xmlns:nova=\"{NOVA_NS}\"><nova:owner>\
             <nova:project uuid=\"{PROJECT}\"/></nova:owner></nova:instance>"
        ));
        assert_eq!(rule.extract(&two).as_deref(), Some(PROJECT));
    }

    #[test]
    fn malformed_or_hostile_xml_gives_none() {
        let rule = nova_rule();
        let good = nova(NOVA_NS, PROJECT);
        for bad in [
            "",
            "not xml",
            &good[..good.len() / 2],
            "<domain><metadata><nova:instance></metadata></domain>",
            "<?xml version=\"1.0\"?><!DOCTYPE d [<!ENTITY a \"aaaa\"><!ENTITY b \"&a;&a;&a;\">]><domain/>",
            "<domain>\u{0}</domain>",
            "<notadomain><metadata/></notadomain>",
        ] {
            assert_eq!(rule.extract(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_newest_xml_wins_in_any_order() {
        let with = nova(NOVA_NS, "p-1");
        let other = nova(NOVA_NS, "p-2");
        let without = domain("");
        let records: [(&str, u64, Option<&str>); 5] = [
            ("e1", 3, Some(&with)),
            ("e1", 7, Some(&other)),
            ("e1", 9, None),
            ("e0", 20, Some(&without)),
            ("e1", 5, Some(&without)),
        ];
        for order in [[0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 4, 0, 3, 1]] {
            let mut t = Tenants::new(nova_rule());
            for i in order {
                let (epoch, hs, xml) = records[i];
                t.note("h", epoch, "u", hs, xml);
            }
            // e1 is the newer epoch: its seq 7 has the newest XML.
            assert_eq!(t.of("h", "u", &["e1", "e0"]).as_deref(), Some("p-2"));
            // Only e0: its XML has no tenant.
            assert_eq!(t.of("h", "u", &["e0"]), None);
            assert_eq!(t.of("h", "other", &["e1", "e0"]), None);
            assert_eq!(t.of("other", "u", &["e1"]), None);
        }
    }
}
