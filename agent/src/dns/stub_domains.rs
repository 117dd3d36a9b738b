//! Per-zone forwarding: stub domains (`--dns-stub-domain ZONE=IP[:PORT],...`) and
//! the kube-dns ConfigMap's `stubDomains` / `upstreamNameservers`, read the way
//! NodeLocal DNSCache reads them: the ConfigMap mounted as a directory (one file per
//! key, JSON values), re-read when it changes. A name goes to the stub servers of the
//! longest zone that contains it, label by label; everything else to the upstreams.

use std::net::SocketAddr;
use std::path::Path;

use tracing::warn;

/// One stub domain: a zone (lower case, no trailing dot) and its servers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StubDomain {
    pub zone: String,
    pub servers: Vec<SocketAddr>,
}

/// Where outside names go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routes {
    /// Longest zone first.
    stubs: Vec<StubDomain>,
    /// Replaces the default upstreams when set (`upstreamNameservers`).
    pub upstreams: Option<Vec<SocketAddr>>,
}

impl Routes {
    /// Routes from stub domains (later ones win for the same zone) and optional
    /// upstreams.
    pub fn new(mut stubs: Vec<StubDomain>, upstreams: Option<Vec<SocketAddr>>) -> Self {
        stubs.reverse();
        let mut seen = std::collections::HashSet::new();
        stubs.retain(|s| seen.insert(s.zone.clone()));
        stubs.sort_by_key(|s| std::cmp::Reverse(s.zone.split('.').count()));
        Self { stubs, upstreams }
    }

    /// The stub servers for `qname` (presentation form, any case, trailing dot or
    /// not), if a stub zone contains it.
    pub fn stub_for(&self, qname: &str) -> Option<&[SocketAddr]> {
        let name = qname.trim_end_matches('.').to_ascii_lowercase();
        self.stubs
            .iter()
            .find(|s| in_zone(&name, &s.zone))
            .map(|s| s.servers.as_slice())
    }

    /// Every stub domain's servers.
    pub fn stub_servers(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.stubs.iter().flat_map(|s| s.servers.iter().copied())
    }

    /// Whether there is nothing but the defaults.
    pub fn is_empty(&self) -> bool {
        self.stubs.is_empty() && self.upstreams.is_none()
    }
}

/// Whether `name` is `zone` or below it, compared label by label (so
/// `xacme.local` is not in `acme.local`, nor `a\.acme.local`, one label `a.acme`
/// under `local`). Both in presentation form, lower case, with or without the
/// trailing dot (the same for both).
pub fn in_zone(name: &str, zone: &str) -> bool {
    name == zone
        || name
            .strip_suffix(zone)
            .and_then(|head| head.strip_suffix('.'))
            .is_some_and(|label| {
                // The dot ends a label unless it is escaped (an odd number of
                // backslashes before it), as in `a\.acme.local`, one label "a.acme".
                label.bytes().rev().take_while(|&b| b == b'\\').count() % 2 == 0
            })
}

/// Parses one `--dns-stub-domain` value: `ZONE=IP[:PORT],IP[:PORT]...`.
pub fn parse_flag(value: &str) -> Result<StubDomain, String> {
    let (zone, servers) = value
        .split_once('=')
        .ok_or_else(|| format!("{value:?} is not ZONE=IP[:PORT],..."))?;
    let servers = servers
        .split(',')
        .map(|s| super::parse_upstream(s.trim()))
        .collect::<Result<Vec<_>, _>>()?;
    stub(zone, servers)
}

fn stub(zone: &str, servers: Vec<SocketAddr>) -> Result<StubDomain, String> {
    let zone = zone.trim().trim_end_matches('.').to_ascii_lowercase();
    if zone.is_empty() || servers.is_empty() {
        return Err(format!("stub domain {zone:?} needs a zone and servers"));
    }
    Ok(StubDomain { zone, servers })
}

/// The kube-dns ConfigMap as mounted in `dir` (files `stubDomains`,
/// `upstreamNameservers`); missing files are empty, bad ones are logged and skipped.
pub fn read_kube_dns_config(dir: &Path) -> (Vec<StubDomain>, Option<Vec<SocketAddr>>) {
    let read = |key: &str| std::fs::read_to_string(dir.join(key)).ok();
    let stubs = read("stubDomains")
        .map(|text| parse_stub_domains(&text))
        .transpose()
        .unwrap_or_else(|e| {
            warn!(dir = %dir.display(), error = e, "kube-dns ConfigMap: stubDomains ignored");
            None
        })
        .unwrap_or_default();
    let upstreams = read("upstreamNameservers")
        .map(|text| parse_servers(&text))
        .transpose()
        .unwrap_or_else(|e| {
            warn!(dir = %dir.display(), error = e, "kube-dns ConfigMap: upstreamNameservers ignored");
            None
        })
        .filter(|u| !u.is_empty());
    (stubs, upstreams)
}

/// `stubDomains`: `{"acme.local": ["1.2.3.4"], ...}`.
fn parse_stub_domains(text: &str) -> Result<Vec<StubDomain>, String> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let map: std::collections::BTreeMap<String, Vec<String>> =
        serde_json::from_str(text).map_err(|e| e.to_string())?;
    map.into_iter()
        .map(|(zone, servers)| {
            let servers = servers
                .iter()
                .map(|s| super::parse_upstream(s.trim()))
                .collect::<Result<Vec<_>, _>>()?;
            stub(&zone, servers)
        })
        .collect()
}

/// `upstreamNameservers`: `["8.8.8.8", "8.8.4.4:53"]`.
fn parse_servers(text: &str) -> Result<Vec<SocketAddr>, String> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let list: Vec<String> = serde_json::from_str(text).map_err(|e| e.to_string())?;
    list.iter()
        .map(|s| super::parse_upstream(s.trim()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn longest_zone_wins_label_by_label() {
        let routes = Routes::new(
            vec![
                parse_flag("acme.local=10.0.0.1").unwrap(),
                parse_flag("Corp.Acme.Local.=10.0.0.2:5353,10.0.0.3").unwrap(),
            ],
            None,
        );
        assert_eq!(
            routes.stub_for("db.acme.local."),
            Some(&[addr("10.0.0.1:53")][..])
        );
        assert_eq!(
            routes.stub_for("X.CORP.acme.local"),
            Some(&[addr("10.0.0.2:5353"), addr("10.0.0.3:53")][..])
        );
        assert_eq!(
            routes.stub_for("acme.local"),
            Some(&[addr("10.0.0.1:53")][..])
        );
        assert_eq!(routes.stub_for("xacme.local."), None, "labels, not strings");
        assert_eq!(routes.stub_for("a\\.acme.local."), None, "one label a.acme");
        assert_eq!(
            routes.stub_for("a\\\\.acme.local."),
            Some(&[addr("10.0.0.1:53")][..]),
            "an escaped backslash, then a label break"
        );
        assert_eq!(routes.stub_for("example.com."), None);
    }

    #[test]
    fn the_last_definition_of_a_zone_wins() {
        let routes = Routes::new(
            vec![
                parse_flag("acme.local=10.0.0.1").unwrap(),
                parse_flag("acme.local=10.0.0.9").unwrap(),
            ],
            None,
        );
        assert_eq!(
            routes.stub_for("acme.local"),
            Some(&[addr("10.0.0.9:53")][..])
        );
    }

    #[test]
    fn flag_syntax() {
        assert!(parse_flag("acme.local").is_err());
        assert!(parse_flag("=10.0.0.1").is_err());
        assert!(parse_flag("acme.local=nope").is_err());
    }

    #[test]
    fn kube_dns_configmap_as_mounted() {
        let dir = std::env::temp_dir().join(format!("ferry-kube-dns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("stubDomains"),
            r#"{"acme.local": ["1.2.3.4", "1.2.3.5:5353"]}"#,
        )
        .unwrap();
        std::fs::write(dir.join("upstreamNameservers"), r#"["8.8.8.8"]"#).unwrap();
        let (stubs, upstreams) = read_kube_dns_config(&dir);
        assert_eq!(
            stubs,
            [StubDomain {
                zone: "acme.local".into(),
                servers: vec![addr("1.2.3.4:53"), addr("1.2.3.5:5353")]
            }]
        );
        assert_eq!(upstreams, Some(vec![addr("8.8.8.8:53")]));
        std::fs::write(dir.join("stubDomains"), "not json").unwrap();
        std::fs::remove_file(dir.join("upstreamNameservers")).unwrap();
        assert_eq!(read_kube_dns_config(&dir), (Vec::new(), None));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            read_kube_dns_config(&dir),
            (Vec::new(), None),
            "no ConfigMap"
        );
    }
}
