//! The kube-dns ClusterIP answered on the node in iptables mode, NodeLocal
//! DNSCache's way: the DNS server listens on the ClusterIP itself (the address is on
//! the agent's DNS interface), and raw-table NOTRACK rules keep those packets out of
//! conntrack, so kube-proxy-style DNAT (a nat-table rule, which needs conntrack)
//! never sees them. The request rule in PREROUTING carries `-m socket --nowildcard`:
//! only while a socket is bound to ClusterIP:53 do pods' queries stay on the node.
//! When the agent is stopped or killed its sockets close, the rule stops matching,
//! and the queries are DNATed to the Service's endpoints (CoreDNS), decided by the
//! kernel per packet. The node's own processes (OUTPUT) are not steered: a socket
//! match cannot run there, and an unconditional NOTRACK would strand them while the
//! agent is down, so they keep going to the endpoints.

use std::fmt::Write as _;

use super::exec::{ExecError, Runner, SaveSummary};
use crate::dataplane::NodeLocalDns;

/// Chain for pods' queries (jumped to from raw PREROUTING).
pub const PREROUTING_CHAIN: &str = "FERRY-DNS-PREROUTING";
/// Chain for the answers (jumped to from raw OUTPUT).
pub const OUTPUT_CHAIN: &str = "FERRY-DNS-OUTPUT";
const COMMENT: &str = "ferry node-local DNS";

/// The raw-table payload making exactly `frontends` local (all of one family).
pub fn payload(frontends: &[NodeLocalDns], save: &SaveSummary) -> String {
    let mut out = String::from("*raw\n");
    for chain in [PREROUTING_CHAIN, OUTPUT_CHAIN] {
        // Declaring a chain under --noflush empties it: the whole set is rewritten.
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    for f in frontends {
        let (proto, ip, port) = (f.protocol.lower(), f.frontend.ip(), f.frontend.port());
        let _ = writeln!(
            out,
            "-A {PREROUTING_CHAIN} -d {ip} -p {proto} -m {proto} --dport {port} -m socket --nowildcard -m comment --comment \"{COMMENT}\" -j NOTRACK"
        );
        let _ = writeln!(
            out,
            "-A {OUTPUT_CHAIN} -s {ip} -p {proto} -m {proto} --sport {port} -m comment --comment \"{COMMENT}\" -j NOTRACK"
        );
    }
    for (builtin, chain) in [("PREROUTING", PREROUTING_CHAIN), ("OUTPUT", OUTPUT_CHAIN)] {
        if !has_jump(save, builtin, chain) {
            let _ = writeln!(
                out,
                "-I {builtin} 1 -m comment --comment \"{COMMENT}\" -j {chain}"
            );
        }
    }
    out.push_str("COMMIT\n");
    out
}

fn has_jump(save: &SaveSummary, builtin: &str, chain: &str) -> bool {
    save.builtin_rules
        .iter()
        .any(|l| l.starts_with(&format!("-A {builtin} ")) && l.ends_with(&format!("-j {chain}")))
}

/// Programs `frontends` (one family) through `tools`.
pub fn apply<R: Runner>(tools: &R, frontends: &[NodeLocalDns]) -> Result<(), ExecError> {
    let save = tools.save_summary("raw")?;
    if frontends.is_empty() && !save.chains.iter().any(|c| c == PREROUTING_CHAIN) {
        return Ok(());
    }
    let text = payload(frontends, &save);
    tools.restore_with(&|out| out.write_all(text.as_bytes()))
}

/// What removes the chains and jumps again (nothing when there are none).
pub fn cleanup_payload(save: &SaveSummary) -> String {
    let ours = [PREROUTING_CHAIN, OUTPUT_CHAIN];
    if !save.chains.iter().any(|c| ours.contains(&c.as_str())) {
        return String::new();
    }
    let mut out = String::from("*raw\n");
    for line in &save.builtin_rules {
        if ours.iter().any(|c| line.ends_with(&format!("-j {c}"))) {
            let _ = writeln!(out, "-D{}", line.trim_start_matches("-A"));
        }
    }
    for chain in ours.iter().filter(|c| save.chains.iter().any(|s| s == *c)) {
        let _ = writeln!(out, ":{chain} - [0:0]\n-X {chain}");
    }
    out.push_str("COMMIT\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    fn dns(protocol: Protocol) -> NodeLocalDns {
        NodeLocalDns {
            frontend: "10.96.0.10:53".parse().unwrap(),
            protocol,
            listener: "10.96.0.10:53".parse().unwrap(),
        }
    }

    #[test]
    fn queries_stay_local_only_while_a_socket_is_bound() {
        let text = payload(
            &[dns(Protocol::Udp), dns(Protocol::Tcp)],
            &SaveSummary::default(),
        );
        assert!(text.contains(
            "-A FERRY-DNS-PREROUTING -d 10.96.0.10 -p udp -m udp --dport 53 -m socket --nowildcard"
        ), "{text}");
        assert!(
            text.contains("-A FERRY-DNS-OUTPUT -s 10.96.0.10 -p tcp -m tcp --sport 53"),
            "{text}"
        );
        assert!(
            !text.contains("-A FERRY-DNS-OUTPUT -d"),
            "host clients are not steered: {text}"
        );
        assert!(text.contains("-I PREROUTING 1 -m comment --comment \"ferry node-local DNS\" -j FERRY-DNS-PREROUTING"), "{text}");
    }

    #[test]
    fn jumps_are_inserted_once_and_removed_by_cleanup() {
        let save = SaveSummary {
            chains: vec!["PREROUTING".into(), "OUTPUT".into(), PREROUTING_CHAIN.into(), OUTPUT_CHAIN.into()],
            builtin_rules: vec![
                "-A PREROUTING -m comment --comment \"ferry node-local DNS\" -j FERRY-DNS-PREROUTING".into(),
                "-A OUTPUT -m comment --comment \"ferry node-local DNS\" -j FERRY-DNS-OUTPUT".into(),
            ],
        };
        assert!(!payload(&[dns(Protocol::Udp)], &save).contains("-I "));
        let cleanup = cleanup_payload(&save);
        assert!(cleanup.contains("-D PREROUTING -m comment --comment \"ferry node-local DNS\" -j FERRY-DNS-PREROUTING"), "{cleanup}");
        assert!(cleanup.contains("-X FERRY-DNS-OUTPUT"), "{cleanup}");
        assert!(cleanup_payload(&SaveSummary::default()).is_empty());
    }
}
