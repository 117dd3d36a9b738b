//! `ferry inspect services` in nftables mode: the frontends and backends of Ferry's
//! tables, read back from the kernel (`nft -j list table`), not from the agent.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

use super::exec::{Nft, NftError, Runner, table_exists};
use super::render::{BALANCER_PREFIX, Collection, TABLE, Words};
use crate::dataplane::ebpf::inspect::{FrontendView, Inspection};
use crate::model::IpFamily;

/// Whether Ferry's table exists in any family (this node runs nftables mode).
pub fn present() -> bool {
    [IpFamily::V4, IpFamily::V6]
        .iter()
        .any(|f| table_exists(&Nft, Words::of(*f).af).unwrap_or(false))
}

/// Reads Ferry's tables of both families.
pub fn inspect() -> Result<Inspection, NftError> {
    let mut frontends = Vec::new();
    for family in [IpFamily::V4, IpFamily::V6] {
        let af = Words::of(family).af;
        if table_exists(&Nft, af)? {
            let json = Nft.read(&["-j", "list", "table", af, TABLE])?;
            frontends.extend(frontends_of(&json)?);
        }
    }
    frontends
        .sort_by(|a, b| (a.kind, &a.address, a.protocol).cmp(&(b.kind, &b.address, b.protocol)));
    let mut backends: Vec<&String> = frontends.iter().flat_map(|f| &f.backends).collect();
    backends.sort();
    backends.dedup();
    Ok(Inspection {
        backends: backends.len(),
        frontends,
        counters: BTreeMap::new(),
    })
}

/// The elements of a set (`nft -j list set`), as written inside `{ }`: what a
/// restarted agent keeps until it decides itself.
pub fn set_elements(json: &str) -> Result<Vec<String>, NftError> {
    let doc: Value = serde_json::from_str(json).map_err(|e| NftError::Output(e.to_string()))?;
    let items = doc["nftables"].as_array().cloned().unwrap_or_default();
    let mut out = Vec::new();
    for set in items.iter().filter_map(|i| i.get("set")) {
        for elem in set["elem"].as_array().into_iter().flatten() {
            out.push(match elem["concat"].as_array() {
                Some(parts) => parts.iter().map(text).collect::<Vec<_>>().join(" . "),
                None => text(elem),
            });
        }
    }
    Ok(out)
}

/// What one chain does, as far as inspection cares.
#[derive(Debug, Default)]
struct ChainView {
    /// DNAT targets in rule order (deduplicated).
    dnat: Vec<String>,
    /// The last `goto`/`jump` to another service chain.
    next: Option<String>,
    /// The affinity set it updates, if any.
    affinity_set: Option<String>,
}

/// The frontends of one table's `nft -j list table` output.
pub fn frontends_of(json: &str) -> Result<Vec<FrontendView>, NftError> {
    let doc: Value = serde_json::from_str(json).map_err(|e| NftError::Output(e.to_string()))?;
    let items = doc["nftables"].as_array().cloned().unwrap_or_default();
    let mut chains: HashMap<String, ChainView> = HashMap::new();
    let mut timeouts: HashMap<String, u32> = HashMap::new();
    let mut maps: HashMap<String, Vec<(Value, Value)>> = HashMap::new();
    for item in &items {
        if let Some(rule) = item.get("rule") {
            let chain = rule["chain"].as_str().unwrap_or_default().to_owned();
            read_rule(chains.entry(chain).or_default(), &rule["expr"]);
        } else if let Some(map) = item.get("map") {
            let name = map["name"].as_str().unwrap_or_default().to_owned();
            maps.insert(name, elements(&map["elem"]));
        } else if let Some(set) = item.get("set") {
            let name = set["name"].as_str().unwrap_or_default().to_owned();
            if let Some(t) = set["timeout"].as_u64() {
                timeouts.insert(name, u32::try_from(t).unwrap_or(u32::MAX));
            }
        }
    }
    let endpoint_lists = EndpointLists::of(&maps);
    let resolve = |verdict: &Value, key: &Value| -> (Vec<String>, Option<u32>) {
        let mut chain = target(verdict);
        if chain
            .as_deref()
            .is_some_and(|c| c.starts_with(BALANCER_PREFIX))
        {
            return (endpoint_lists.of_frontend(key), None);
        }
        // ext-* goes on to svc-*/svl-*: follow at most a few hops.
        for _ in 0..4 {
            let Some(view) = chain.as_ref().and_then(|c| chains.get(c)) else {
                break;
            };
            if !view.dnat.is_empty() {
                let affinity = view.affinity_set.as_ref().and_then(|s| timeouts.get(s));
                return (view.dnat.clone(), affinity.copied());
            }
            chain = view.next.clone();
        }
        (Vec::new(), None)
    };
    let mut out = Vec::new();
    let kinds = [
        (Collection::ServiceIps, "forward"),
        (Collection::ServiceNodeports, "forward"),
        (Collection::NoEndpointServices, ""),
        (Collection::NoEndpointExternal, ""),
        (Collection::NoEndpointNodeports, ""),
    ];
    for (collection, forward) in kinds {
        for (key, verdict) in maps.get(&*collection.name()).into_iter().flatten() {
            let (address, protocol) = frontend_address(key);
            let action = if !forward.is_empty() {
                forward
            } else if verdict.get("drop").is_some() {
                "drop"
            } else {
                "reject"
            };
            let (backends, affinity_timeout_seconds) = resolve(verdict, key);
            let kind = kind_of(collection, verdict);
            out.push(FrontendView {
                address,
                protocol,
                kind,
                action,
                // Balancer chains are shared by services with the same endpoints,
                // so the table does not say whose a frontend is.
                service: None,
                affinity_timeout_seconds,
                backends,
            });
        }
    }
    Ok(out)
}

/// ClusterIP, External (externalIP / LB IP) or NodePort, from the map and the chain
/// kind a forwarding element points to.
fn kind_of(collection: Collection, verdict: &Value) -> &'static str {
    match collection {
        Collection::ServiceNodeports | Collection::NoEndpointNodeports => "NodePort",
        Collection::NoEndpointServices => "ClusterIP",
        Collection::NoEndpointExternal => "External",
        _ => match target(verdict) {
            Some(chain)
                if chain.starts_with("ext-")
                    || chain.starts_with(&format!("{BALANCER_PREFIX}ext-")) =>
            {
                "External"
            }
            _ => "ClusterIP",
        },
    }
}

/// The endpoint maps of the shared `balance-*` chains: each frontend's endpoints in
/// index order.
struct EndpointLists {
    /// Keyed by the frontend key's parts as text (`ip, proto, port` or `proto, port`).
    by_frontend: HashMap<Vec<String>, BTreeMap<u64, String>>,
}

impl EndpointLists {
    fn of(maps: &HashMap<String, Vec<(Value, Value)>>) -> Self {
        let mut by_frontend: HashMap<Vec<String>, BTreeMap<u64, String>> = HashMap::new();
        let lists = maps
            .iter()
            .filter(|(name, _)| name.starts_with(BALANCER_PREFIX));
        let elements = lists.flat_map(|(_, elements)| elements);
        for (key, value) in elements {
            let mut parts = concat_parts(key);
            let Some(index) = parts.pop().and_then(|i| i.parse().ok()) else {
                continue;
            };
            if let [ip, port] = concat_parts(value).as_slice() {
                let backend = host_port(ip, port);
                by_frontend.entry(parts).or_default().insert(index, backend);
            }
        }
        Self { by_frontend }
    }

    /// The endpoints, in index order, of the frontend `key` of a verdict map.
    fn of_frontend(&self, key: &Value) -> Vec<String> {
        let list = self.by_frontend.get(&concat_parts(key));
        list.map(|l| l.values().cloned().collect())
            .unwrap_or_default()
    }
}

/// The parts of a concatenated key or value as text.
fn concat_parts(v: &Value) -> Vec<String> {
    let parts = v["concat"].as_array().cloned().unwrap_or_default();
    parts.iter().map(text).collect()
}

/// A JSON scalar as nft writes it.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `ip:port`, or `[ip]:port` for IPv6.
fn host_port(ip: &str, port: &str) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// The `[key, value]` pairs of a map's `elem` array.
fn elements(elem: &Value) -> Vec<(Value, Value)> {
    let pairs = elem.as_array().cloned().unwrap_or_default();
    pairs
        .into_iter()
        .filter_map(|pair| {
            let pair = pair.as_array()?.clone();
            Some((pair.first()?.clone(), pair.get(1)?.clone()))
        })
        .collect()
}

/// `ip:port` (or `*:port` for a NodePort) and protocol of a frontend key.
fn frontend_address(key: &Value) -> (String, &'static str) {
    let (ip, proto, port) = match concat_parts(key).as_slice() {
        [ip, proto, port] => (ip.clone(), proto.clone(), port.clone()),
        [proto, port] => ("*".to_owned(), proto.clone(), port.clone()),
        _ => ("?".to_owned(), String::new(), String::new()),
    };
    let address = host_port(&ip, &port);
    let protocol = match proto.as_str() {
        "tcp" => "TCP",
        "udp" => "UDP",
        "sctp" => "SCTP",
        _ => "?",
    };
    (address, protocol)
}

/// The chain a `goto`/`jump` verdict names.
fn target(verdict: &Value) -> Option<String> {
    ["goto", "jump"]
        .iter()
        .find_map(|k| verdict.get(*k)?.get("target")?.as_str().map(str::to_owned))
}

/// Records what one rule's expressions do.
fn read_rule(view: &mut ChainView, exprs: &Value) {
    for expr in exprs.as_array().into_iter().flatten() {
        if let Some(dnat) = expr.get("dnat") {
            let addr = dnat["addr"].as_str().unwrap_or("?");
            let backend = host_port(addr, &text(&dnat["port"]));
            if !view.dnat.contains(&backend) {
                view.dnat.push(backend);
            }
        } else if let Some(update) = expr.get("set") {
            // `update @set { ip saddr }` is {"set": {"op": "update", "set": "@name"}}.
            let name = update["set"].as_str().unwrap_or_default();
            view.affinity_set = Some(name.trim_start_matches('@').to_owned());
        } else if let Some(chain) = target(expr)
            && !chain.contains("masquerade")
        {
            view.next = Some(chain);
        }
    }
}

#[cfg(test)]
mod tests;
