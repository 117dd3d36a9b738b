//! `ferry inspect dns NAME`: what this node's DNS server answers for a name and where
//! the answer comes from (the cluster zone or the forwarding cache), read from the
//! running server at `/dns` on the metrics address. Inspecting never asks upstream
//! and is not counted as a query.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr as _;
use std::time::Instant;

use hickory_server::proto::op::Query;
use hickory_server::proto::rr::{Name, Record, RecordType};
use serde::{Deserialize, Serialize};

use super::zone::Outcome;
use super::{Answerer, Client, Records, Reply, lower_name, qtype_of};

/// Where an answer comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AnswerSource {
    /// The cluster zone (Services, endpoints, pods), built from the model.
    Zone,
    /// The forwarding cache: an upstream's answer, still fresh.
    Cache,
    /// Nothing cached: a pod's question would be forwarded upstream.
    Upstream,
}

/// The answer to one name and type, as `ferry inspect dns` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsInspection {
    pub name: String,
    pub record_type: String,
    pub source: AnswerSource,
    /// The response code as dig names it (none when the answer would come from
    /// upstream).
    pub rcode: Option<String>,
    /// Answer and authority records in zone-file form.
    pub answers: Vec<String>,
    pub authorities: Vec<String>,
    /// Seconds the cached answer stays fresh.
    pub expires_in_s: Option<u64>,
}

impl Answerer {
    /// What a pod asking `name` (`record_type`) would get right now.
    pub fn inspect(&self, name: &str, record_type: &str) -> Result<DnsInspection, String> {
        let rtype = RecordType::from_str(&record_type.to_ascii_uppercase())
            .map_err(|_| format!("{record_type:?} is not a DNS record type"))?;
        let fqdn = match name.ends_with('.') {
            true => name.to_owned(),
            false => format!("{name}."),
        };
        let qname = Name::from_ascii(&fqdn).map_err(|e| format!("{name:?}: {e}"))?;
        let query = Query::query(qname, rtype);
        let mut out = DnsInspection {
            name: fqdn,
            record_type: rtype.to_string(),
            source: AnswerSource::Zone,
            rcode: None,
            answers: Vec::new(),
            authorities: Vec::new(),
            expires_in_s: None,
        };
        let in_zone = !matches!(
            self.cluster.lookup(&lower_name(&query), qtype_of(rtype)),
            Outcome::Elsewhere
        );
        if in_zone {
            // A client that may not forward: the zone's own answer, as it stands.
            let zone_only = Client {
                ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                via_uplink: false,
            };
            if let Reply::Now(records) = self.answer(&query, &zone_only) {
                fill(&mut out, &records);
            }
            return Ok(out);
        }
        match self.forwarder.cached(&query) {
            Some(cached) => {
                out.source = AnswerSource::Cache;
                fill(&mut out, &Self::forwarded(&cached));
                let left = cached.expires().saturating_duration_since(Instant::now());
                out.expires_in_s = Some(left.as_secs());
            }
            None => out.source = AnswerSource::Upstream,
        }
        Ok(out)
    }
}

fn fill(out: &mut DnsInspection, records: &Records) {
    let text = |records: &[Record]| records.iter().map(ToString::to_string).collect();
    // dig's names: NOERROR, NXDOMAIN, SERVFAIL, REFUSED...
    out.rcode = Some(format!("{:?}", records.rcode).to_uppercase());
    out.answers = text(&records.answers);
    out.authorities = text(&records.authorities);
}

/// Asks the agent at `address` (its `--metrics-bind-address`).
pub fn fetch(address: SocketAddr, name: &str, record_type: &str) -> anyhow::Result<DnsInspection> {
    let path = format!("/dns?name={name}&type={record_type}");
    crate::status::get_json(address, &path)
}

/// The inspection for people.
pub fn render(i: &DnsInspection) -> String {
    let mut out = String::new();
    let source = match i.source {
        AnswerSource::Zone => "the cluster zone".to_owned(),
        AnswerSource::Cache => format!(
            "the forwarding cache (fresh for {} s more)",
            i.expires_in_s.unwrap_or_default()
        ),
        AnswerSource::Upstream => {
            "upstream: nothing cached, a pod's question would be forwarded".to_owned()
        }
    };
    let _ = writeln!(out, "{} {}: from {source}", i.name, i.record_type);
    if let Some(rcode) = &i.rcode {
        let _ = writeln!(out, "status: {rcode}");
    }
    for (section, records) in [("answer", &i.answers), ("authority", &i.authorities)] {
        for r in records {
            let _ = writeln!(out, "{section}: {r}");
        }
    }
    out.trim_end().to_owned()
}
