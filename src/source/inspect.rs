//! Reading domains from libvirt: complete listings (bulk where the driver
//! allows) and per-domain lookups for the enricher ([`LibvirtInspector`]),
//! both ending in the [`Facts`] the tracker receives.
//!
//! Invariants:
//! - a domain that vanishes between being listed and being read is skipped
//!   (its events follow), never an error;
//! - a light listing (not `full`, no XML kept) makes no call per domain
//!   where the driver has bulk stats, and leaves `config_hash` unset;
//! - the XML leaves this module only when messages carry it (`keep_xml`,
//!   or asked for by a lookup); the config hash is of the inactive XML;
//! - lookups go through whatever connection is live ([`ConnSlot`]) and say
//!   `Disconnected` when there is none.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use sha2::{Digest, Sha256};
use virt::connect::Connect;
use virt::domain::Domain;

use crate::model::StateReason;
use crate::source::Facts;

use super::enrich::{Inspector, LookupError};
use super::ffi;

/// The live connection, shared with the inspector for lookups.
pub type ConnSlot = Arc<RwLock<Option<Connect>>>;

/// Everything a lookup or listing reports about one domain.
pub fn facts_of(dom: &Domain, want_xml: bool) -> Result<Facts, virt::error::Error> {
    let (state, reason) = ffi::domain_state(dom)?;
    let persistent = dom.is_persistent()?;
    let autostart = if persistent {
        dom.autostart().ok()
    } else {
        Some(false)
    };
    let info = dom.info().ok();
    let xml = if want_xml {
        dom.xml_desc(virt_sys::VIR_DOMAIN_XML_INACTIVE).ok()
    } else {
        None
    };
    let config_hash = xml.as_ref().map(|x| config_hash(x));
    Ok(Facts {
        name: dom.name()?,
        id: dom.id().and_then(|i| i32::try_from(i).ok()),
        state: StateReason::from_codes(state, reason),
        persistent,
        autostart,
        vcpus: info.as_ref().map(|i| i.nr_virt_cpu as i32),
        memory_kib: info.as_ref().map(|i| i.max_mem as i64),
        config_hash,
        xml,
    })
}

fn is_no_domain(e: &virt::error::Error) -> bool {
    matches!(
        e.code(),
        virt::error::ErrorNumberEnum::Known(virt::error::ErrorNumber::NoDomain)
    )
}

/// Every domain on the host with its facts. Domains that vanish between
/// the list and their lookup are skipped (their events follow).
///
/// Bulk where libvirt allows: one list call, one GetAllDomainStats call
/// (state, vCPUs, memory), and one list call each for the persistent and
/// the autostart domains. The XML (for the config hash) costs one call per
/// domain, so it is fetched only for a `full` listing (after connecting or
/// a gap, when config changes may have been missed) or when messages carry
/// it (`keep_xml`); a light listing leaves `config_hash` unset (and the
/// sizes, when the driver's bulk stats lack them) and the tracker keeps
/// what it knows.
pub fn list(
    conn: &Connect,
    keep_xml: bool,
    full: bool,
) -> Result<Vec<(String, Facts)>, virt::error::Error> {
    let doms = conn.list_all_domains(0)?;
    let stats = match ffi::all_domain_stats(conn) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::debug!(error = %e, "bulk domain stats unavailable; asking per domain");
            None
        }
    };
    let uuids = |flags| -> Result<HashSet<String>, virt::error::Error> {
        conn.list_all_domains(flags)?
            .iter()
            .map(|d| d.uuid_string())
            .collect()
    };
    let persistent = uuids(virt_sys::VIR_CONNECT_LIST_DOMAINS_PERSISTENT)?;
    let autostart = uuids(virt_sys::VIR_CONNECT_LIST_DOMAINS_AUTOSTART)?;
    // One domain's facts; Ok(None) when it vanished meanwhile.
    let one = |d: &Domain| -> Result<Option<(String, Facts)>, virt::error::Error> {
        let uuid = d.uuid_string()?;
        let bulk = stats.as_ref().and_then(|s| s.get(&uuid));
        let facts = match bulk {
            Some(b) if b.state >= 0 => {
                let is_persistent = persistent.contains(&uuid);
                let xml = if full || keep_xml {
                    match d.xml_desc(virt_sys::VIR_DOMAIN_XML_INACTIVE) {
                        Ok(x) => Some(x),
                        Err(e) if is_no_domain(&e) => return Ok(None),
                        Err(e) => return Err(e),
                    }
                } else {
                    None
                };
                // Drivers that report only the state (the test driver):
                // sizes from the XML a full listing reads anyway (a light
                // one leaves them to what the tracker knows), else one
                // more call.
                let (mut vcpus, mut memory_kib) = (b.vcpus, b.max_mem_kib);
                if full && (vcpus.is_none() || memory_kib.is_none()) {
                    let (v, m) = xml.as_deref().map(sizes_from_xml).unwrap_or_default();
                    vcpus = vcpus.or(v);
                    memory_kib = memory_kib.or(m);
                }
                if full && (vcpus.is_none() || memory_kib.is_none()) {
                    match d.info() {
                        Ok(i) => {
                            vcpus = vcpus.or(Some(i.nr_virt_cpu as i32));
                            memory_kib = memory_kib.or(Some(i.max_mem as i64));
                        }
                        Err(e) if is_no_domain(&e) => return Ok(None),
                        Err(e) => return Err(e),
                    }
                }
                Ok(Facts {
                    name: d.name()?,
                    id: d.id().and_then(|i| i32::try_from(i).ok()),
                    state: StateReason::from_codes(b.state, b.reason),
                    persistent: is_persistent,
                    autostart: Some(is_persistent && autostart.contains(&uuid)),
                    vcpus,
                    memory_kib,
                    config_hash: xml.as_ref().map(|x| config_hash(x)),
                    xml,
                })
            }
            _ => facts_of(d, full || keep_xml),
        };
        match facts {
            Ok(mut f) => {
                if !keep_xml {
                    f.xml = None;
                }
                Ok(Some((uuid, f)))
            }
            Err(e) if is_no_domain(&e) => Ok(None),
            Err(e) => Err(e),
        }
    };
    // Calls per domain (XML, sizes, or everything without bulk stats) are
    // spread over a few threads: libvirt connections take concurrent calls
    // and the daemon answers them on its worker pool.
    let per_domain_calls = full || keep_xml || stats.is_none();
    let results: Vec<Result<Option<(String, Facts)>, virt::error::Error>> =
        if per_domain_calls && doms.len() >= 256 {
            let chunk = doms.len().div_ceil(LISTING_THREADS);
            std::thread::scope(|scope| {
                let workers: Vec<_> = doms
                    .chunks(chunk)
                    .map(|c| scope.spawn(|| c.iter().map(&one).collect::<Vec<_>>()))
                    .collect();
                workers
                    .into_iter()
                    .flat_map(|w| w.join().expect("listing worker"))
                    .collect()
            })
        } else {
            doms.iter().map(&one).collect()
        };
    let mut out = Vec::with_capacity(results.len());
    for r in results {
        if let Some(x) = r? {
            out.push(x);
        }
    }
    Ok(out)
}

/// vCPUs (the `current` attribute, else the count) and maximum memory in
/// KiB from a domain's XML as libvirt writes it (`<vcpu ...>N</vcpu>`,
/// `<memory unit='KiB'>N</memory>`, the first of each: the domain's own,
/// before any device). `None` where absent or in another form.
pub fn sizes_from_xml(xml: &str) -> (Option<i32>, Option<i64>) {
    // The first element named exactly `name`: its attributes and text.
    fn element<'a>(xml: &'a str, name: &str) -> Option<(&'a str, &'a str)> {
        let open = format!("<{name}");
        let mut rest = xml;
        loop {
            let at = rest.find(&open)?;
            rest = &rest[at + open.len()..];
            let end = rest.find('>')?;
            if rest.starts_with([' ', '>']) && !rest[..end].ends_with('/') {
                let attrs = &rest[..end];
                let text = &rest[end + 1..];
                let text = &text[..text.find('<')?];
                return Some((attrs, text.trim()));
            }
        }
    }
    fn attr<'a>(attrs: &'a str, name: &str) -> Option<&'a str> {
        ["'", "\""].iter().find_map(|q| {
            let key = format!("{name}={q}");
            let at = attrs.find(&key)? + key.len();
            Some(&attrs[at..at + attrs[at..].find(q)?])
        })
    }
    let vcpus = element(xml, "vcpu")
        .and_then(|(attrs, text)| attr(attrs, "current").unwrap_or(text).parse::<i32>().ok());
    let memory_kib = element(xml, "memory").and_then(|(attrs, text)| {
        let n: i64 = text.parse().ok()?;
        match attr(attrs, "unit").unwrap_or("KiB") {
            "KiB" | "k" | "K" => Some(n),
            "MiB" | "M" => n.checked_mul(1 << 10),
            "GiB" | "G" => n.checked_mul(1 << 20),
            _ => None,
        }
    });
    (vcpus, memory_kib)
}

/// Threads of a listing that needs calls per domain: libvirtd serves up
/// to `max_client_requests` (default 5) calls of one client at once.
const LISTING_THREADS: usize = 5;

/// `sha256:<hex>` of a domain's inactive XML.
fn config_hash(xml: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(xml.as_bytes())))
}

/// Lookups through whatever connection is live.
pub struct LibvirtInspector {
    pub conn: ConnSlot,
}

impl LibvirtInspector {
    fn conn(&self) -> Result<Connect, LookupError> {
        self.conn
            .read()
            .expect("connection slot")
            .clone()
            .ok_or(LookupError::Disconnected)
    }
}

fn lookup_error(e: virt::error::Error) -> LookupError {
    if is_no_domain(&e) {
        LookupError::NoDomain
    } else {
        LookupError::Libvirt(e.message().to_string())
    }
}

/// From this many domains on, persistence and autostart come from two
/// list calls (of every domain on the host) instead of two calls per
/// domain.
const LIST_FLAGS_FROM: usize = 64;

impl Inspector for LibvirtInspector {
    fn inspect(&self, uuid: &str, want_xml: bool) -> Result<Facts, LookupError> {
        let conn = self.conn()?;
        let dom = conn
            .lookup_domain_by_uuid_string(uuid)
            .map_err(lookup_error)?;
        facts_of(&dom, want_xml).map_err(lookup_error)
    }

    /// One lookup per domain (a local handle needs it), then state, vCPUs
    /// and memory of all of them in one `virDomainListGetStats` call;
    /// persistence and autostart per domain, or from two list calls for
    /// larger batches; the XML only where wanted.
    fn inspect_many(&self, wanted: &[(String, bool)]) -> Vec<Result<Facts, LookupError>> {
        if wanted.len() == 1 {
            return vec![self.inspect(&wanted[0].0, wanted[0].1)];
        }
        let conn = match self.conn() {
            Ok(c) => c,
            Err(e) => return vec![Err(e); wanted.len()],
        };
        let doms: Vec<Result<Domain, LookupError>> = wanted
            .iter()
            .map(|(u, _)| conn.lookup_domain_by_uuid_string(u).map_err(lookup_error))
            .collect();
        let found: Vec<Domain> = doms
            .iter()
            .filter_map(|d| d.as_ref().ok().cloned())
            .collect();
        let stats = match ffi::domain_list_stats(&found) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "bulk domain stats unavailable; asking per domain");
                return wanted
                    .iter()
                    .zip(doms)
                    .map(|((_, x), d)| facts_of(&d?, *x).map_err(lookup_error))
                    .collect();
            }
        };
        let flags = if wanted.len() >= LIST_FLAGS_FROM {
            let uuids = |flags| -> Result<HashSet<String>, virt::error::Error> {
                conn.list_all_domains(flags)?
                    .iter()
                    .map(|d| d.uuid_string())
                    .collect()
            };
            uuids(virt_sys::VIR_CONNECT_LIST_DOMAINS_PERSISTENT)
                .and_then(|p| Ok((p, uuids(virt_sys::VIR_CONNECT_LIST_DOMAINS_AUTOSTART)?)))
                .ok()
        } else {
            None
        };
        wanted
            .iter()
            .zip(doms)
            .map(|((uuid, want_xml), d)| {
                let d = d?;
                match stats.get(uuid).filter(|b| b.state >= 0) {
                    Some(b) => facts_from_stats(&d, b, flags.as_ref(), *want_xml),
                    None => facts_of(&d, *want_xml),
                }
                .map_err(lookup_error)
            })
            .collect()
    }
}

/// One domain's facts from its bulk stats, with the calls the stats lack.
fn facts_from_stats(
    d: &Domain,
    b: &ffi::BulkStats,
    flags: Option<&(HashSet<String>, HashSet<String>)>,
    want_xml: bool,
) -> Result<Facts, virt::error::Error> {
    let uuid = d.uuid_string()?;
    let persistent = match flags {
        Some((p, _)) => p.contains(&uuid),
        None => d.is_persistent()?,
    };
    let autostart = match flags {
        Some((_, a)) => Some(persistent && a.contains(&uuid)),
        None if persistent => d.autostart().ok(),
        None => Some(false),
    };
    let xml = if want_xml {
        Some(d.xml_desc(virt_sys::VIR_DOMAIN_XML_INACTIVE)?)
    } else {
        None
    };
    let (mut vcpus, mut memory_kib) = (b.vcpus, b.max_mem_kib);
    if vcpus.is_none() || memory_kib.is_none() {
        // Drivers whose bulk stats report only the state (the test
        // driver): from the XML when it was read, else one more call.
        let (v, m) = xml.as_deref().map(sizes_from_xml).unwrap_or_default();
        vcpus = vcpus.or(v);
        memory_kib = memory_kib.or(m);
    }
    if vcpus.is_none() || memory_kib.is_none() {
        let i = d.info()?;
        vcpus = vcpus.or(Some(i.nr_virt_cpu as i32));
        memory_kib = memory_kib.or(Some(i.max_mem as i64));
    }
    Ok(Facts {
        name: d.name()?,
        id: d.id().and_then(|i| i32::try_from(i).ok()),
        state: StateReason::from_codes(b.state, b.reason),
        persistent,
        autostart,
        vcpus,
        memory_kib,
        config_hash: xml.as_ref().map(|x| config_hash(x)),
        xml,
    })
}

#[cfg(test)]
mod tests {
    use super::sizes_from_xml;

    #[test]
    fn sizes_come_from_the_domains_own_elements() {
        let xml = "<domain type='test'><name>a</name><memory unit='KiB'>8192</memory>\
                   <currentMemory unit='KiB'>4096</currentMemory>\
                   <vcpu placement='static' current='2'>4</vcpu>\
                   <memoryBacking/><cpu><numa><cell id='0' cpus='0-3' memory='8192'/></numa></cpu>\
                   <devices><memory model='dimm'><target><size unit='KiB'>1</size></target></memory>\
                   </devices></domain>";
        assert_eq!(sizes_from_xml(xml), (Some(2), Some(8192)));
        let plain = "<domain><memory unit=\"MiB\">32</memory><vcpus><vcpu id='0'/></vcpus><vcpu>1</vcpu></domain>";
        assert_eq!(sizes_from_xml(plain), (Some(1), Some(32 << 10)));
        assert_eq!(sizes_from_xml("<domain/>"), (None, None));
        assert_eq!(
            sizes_from_xml("<domain><memory unit='b'>1024</memory></domain>"),
            (None, None)
        );
    }
}
