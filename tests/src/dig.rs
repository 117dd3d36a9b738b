//! Runs `dig` (a real DNS client) and parses what it printed.

use std::process::Command;

/// One resource record as dig prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rr {
    pub name: String,
    pub ttl: u32,
    pub rtype: String,
    pub data: String,
}

/// A parsed dig answer.
#[derive(Debug, Default)]
pub struct DigAnswer {
    /// NOERROR, NXDOMAIN, SERVFAIL, REFUSED... ("" if dig got no answer).
    pub status: String,
    pub flags: Vec<String>,
    pub answer: Vec<Rr>,
    pub authority: Vec<Rr>,
    pub additional: Vec<Rr>,
    /// Everything dig printed, for assertion messages.
    pub raw: String,
}

impl DigAnswer {
    /// Data of the answer records of one type, sorted.
    pub fn data(&self, rtype: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .answer
            .iter()
            .filter(|r| r.rtype == rtype)
            .map(|r| r.data.clone())
            .collect();
        out.sort();
        out
    }

    pub fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }
}

/// Parses `dig +noall +comments +answer +authority +additional` output.
pub fn parse(output: &str) -> DigAnswer {
    let mut out = DigAnswer {
        raw: output.to_owned(),
        ..DigAnswer::default()
    };
    let mut section = "";
    for line in output.lines() {
        let line = line.trim();
        if let Some(rest) = line.split("status: ").nth(1) {
            out.status = rest.split(',').next().unwrap_or_default().trim().to_owned();
        } else if let Some(rest) = line.strip_prefix(";; flags:") {
            out.flags = rest
                .split(';')
                .next()
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect();
        } else if line.starts_with(";; ANSWER SECTION") {
            section = "answer";
        } else if line.starts_with(";; AUTHORITY SECTION") {
            section = "authority";
        } else if line.starts_with(";; ADDITIONAL SECTION") {
            section = "additional";
        } else if !line.is_empty() && !line.starts_with(';') {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 5 {
                continue;
            }
            let rr = Rr {
                name: fields[0].to_owned(),
                ttl: fields[1].parse().unwrap_or(0),
                rtype: fields[3].to_owned(),
                data: fields[4..].join(" "),
            };
            match section {
                "answer" => out.answer.push(rr),
                "authority" => out.authority.push(rr),
                "additional" => out.additional.push(rr),
                _ => {}
            }
        }
    }
    out
}

/// Runs dig (already set up to run in the right place) against `server`.
pub fn run(mut cmd: Command, server: &str, name: &str, rtype: &str, extra: &[&str]) -> DigAnswer {
    let out = cmd
        .arg(format!("@{server}"))
        .args([
            "+time=2",
            "+tries=1",
            "+noall",
            "+comments",
            "+answer",
            "+authority",
            "+additional",
        ])
        .args(extra)
        .args([name, rtype])
        .output()
        .expect("run dig (apt package dnsutils)");
    parse(&String::from_utf8_lossy(&out.stdout))
}

/// Starts a test DNS server (`ferry-probe dns-upstream ...`, prepared in `cmd`) and
/// waits until it says it is ready.
pub fn start_upstream(cmd: &mut std::process::Command) -> std::process::Child {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start a test DNS server");
    let mut ready = [0u8; 6];
    if let Some(out) = child.stdout.as_mut() {
        let _ = std::io::Read::read_exact(out, &mut ready);
    }
    assert_eq!(&ready, b"ready\n", "the test DNS server starts");
    child
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dig_output() {
        let text = ";; Got answer:\n;; ->>HEADER<<- opcode: QUERY, status: NXDOMAIN, id: 9\n;; flags: qr aa rd ra; QUERY: 1, ANSWER: 0, AUTHORITY: 1, ADDITIONAL: 1\n\n;; AUTHORITY SECTION:\ncluster.local.\t\t5\tIN\tSOA\tns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 5\n";
        let a = parse(text);
        assert_eq!(a.status, "NXDOMAIN");
        assert!(a.has_flag("aa"));
        assert_eq!(a.authority.len(), 1);
        assert_eq!(a.authority[0].rtype, "SOA");
    }
}
