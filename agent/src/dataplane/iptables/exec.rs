//! Running the iptables tools of one IP family.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::dataplane::command;
use crate::model::IpFamily;

/// Failure of an iptables tool.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The tool could not be started or waited for (missing binary, no permission).
    #[error("could not run {tool}: {source}")]
    Spawn {
        /// The tool's name.
        tool: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The tool ran and failed, e.g. iptables-restore rejected the payload.
    #[error("{tool} failed ({status}): {stderr}{context}")]
    Failed {
        /// The tool's name.
        tool: &'static str,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
        /// The payload lines around a reported failing line, if any.
        context: String,
    },
}

/// What the data plane needs from the iptables tools of one family. [`Tools`] runs
/// the real binaries; tests use a fake that records payloads, so the sync logic runs
/// without root.
pub trait Runner {
    /// Applies the payload `write` produces, atomically, leaving chains it does not
    /// mention alone (`iptables-restore --noflush`). `write` may run more than once.
    fn restore_with(
        &self,
        write: &dyn Fn(&mut dyn Write) -> std::io::Result<()>,
    ) -> Result<(), ExecError>;

    /// Reads the chains and built-in chain rules of one table.
    fn save_summary(&self, table: &str) -> Result<SaveSummary, ExecError>;

    /// Whether a chain exists in a table.
    fn chain_exists(&self, table: &str, chain: &str) -> bool;

    /// Lets the kernel route packets with loopback addresses (`route_localnet`), which
    /// NodePorts on 127.0.0.1 need. A sysctl rather than an iptables tool, but the
    /// same kind of host write, so tests see it too.
    fn enable_route_localnet(&self) -> std::io::Result<()>;

    /// Applies a payload held in memory.
    fn restore(&self, payload: &str) -> Result<(), ExecError> {
        self.restore_with(&|w| w.write_all(payload.as_bytes()))
    }
}

/// The tool set of one family (`iptables*` or `ip6tables*`).
#[derive(Clone, Copy, Debug)]
pub struct Tools {
    iptables: &'static str,
    save: &'static str,
    restore: &'static str,
}

/// One iptables backend, named explicitly (rather than the host's `iptables`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `iptables-legacy` (the x_tables kernel interface).
    Legacy,
    /// `iptables-nft` (x_tables rules on nf_tables).
    Nft,
}

impl Tools {
    /// The tools of one family and backend.
    pub fn of_backend(family: IpFamily, backend: Backend) -> Self {
        let names = |iptables, save, restore| Self {
            iptables,
            save,
            restore,
        };
        match (family, backend) {
            (IpFamily::V4, Backend::Legacy) => names(
                "iptables-legacy",
                "iptables-legacy-save",
                "iptables-legacy-restore",
            ),
            (IpFamily::V6, Backend::Legacy) => names(
                "ip6tables-legacy",
                "ip6tables-legacy-save",
                "ip6tables-legacy-restore",
            ),
            (IpFamily::V4, Backend::Nft) => {
                names("iptables-nft", "iptables-nft-save", "iptables-nft-restore")
            }
            (IpFamily::V6, Backend::Nft) => names(
                "ip6tables-nft",
                "ip6tables-nft-save",
                "ip6tables-nft-restore",
            ),
        }
    }

    /// The tools of one family.
    pub fn for_family(family: IpFamily) -> Self {
        match family {
            IpFamily::V4 => Self {
                iptables: "iptables",
                save: "iptables-save",
                restore: "iptables-restore",
            },
            IpFamily::V6 => Self {
                iptables: "ip6tables",
                save: "ip6tables-save",
                restore: "ip6tables-restore",
            },
        }
    }
}

/// How long iptables waits for the xtables lock another program holds (kube-proxy's
/// `--wait=5`), instead of forever.
const LOCK_WAIT_SECONDS: &str = "5";

/// The sysctl [`Runner::enable_route_localnet`] sets.
pub const ROUTE_LOCALNET: &str = "/proc/sys/net/ipv4/conf/all/route_localnet";

impl Runner for Tools {
    /// The payload is written straight into iptables-restore's input: a full sync at
    /// scale is ~100 MB of text that never needs to exist in memory. `write` runs a
    /// second time, into memory, only to show the failing lines when iptables-restore
    /// rejects the payload.
    fn restore_with(
        &self,
        write: &dyn Fn(&mut dyn Write) -> std::io::Result<()>,
    ) -> Result<(), ExecError> {
        let spawn_error = |source| ExecError::Spawn {
            tool: self.restore,
            source,
        };
        let output = command::run(
            Command::new(self.restore)
                .args(["-w", LOCK_WAIT_SECONDS, "--noflush"])
                .stdin(Stdio::piped())
                .stdout(Stdio::null()),
            command::WHOLE_TABLE,
            |stdin, _| {
                // A write error shows up as a failed exit status below.
                let _ = command::feed(stdin, write);
            },
        )
        .map_err(spawn_error)?;
        if output.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        let context = failing_line(&stderr)
            .map(|line| {
                let mut payload = Vec::new();
                let _ = write(&mut payload);
                format!(
                    "\n{}",
                    extract_lines(&String::from_utf8_lossy(&payload), line, 3)
                )
            })
            .unwrap_or_default();
        Err(ExecError::Failed {
            tool: self.restore,
            status: output.status,
            stderr,
            context,
        })
    }

    /// Streams `iptables-save` (~100 MB at 10,000 services) instead of buffering it.
    fn save_summary(&self, table: &str) -> Result<SaveSummary, ExecError> {
        let mut summary = SaveSummary::default();
        self.save_lines(table, &mut |line| summary.add_line(line))?;
        Ok(summary)
    }

    /// `iptables -S CHAIN`.
    fn chain_exists(&self, table: &str, chain: &str) -> bool {
        command::run(
            Command::new(self.iptables)
                .args(["-w", LOCK_WAIT_SECONDS, "-t", table, "-S", chain])
                .stdin(Stdio::null())
                .stdout(Stdio::null()),
            command::SMALL,
            |_, _| {},
        )
        .is_ok_and(|f| f.status.success())
    }

    fn enable_route_localnet(&self) -> std::io::Result<()> {
        std::fs::write(ROUTE_LOCALNET, "1")
    }
}

impl Tools {
    /// Hands each line of `iptables-save -t TABLE` to `each` as it is read (the
    /// output is ~100 MB at 10,000 services; it is never held whole).
    pub fn save_lines(&self, table: &str, each: &mut dyn FnMut(String)) -> Result<(), ExecError> {
        use std::io::BufRead as _;
        let output = command::run(
            Command::new(self.save)
                .args(["-t", table])
                .stdin(Stdio::null())
                .stdout(Stdio::piped()),
            command::WHOLE_TABLE,
            |_, stdout| {
                if let Some(stdout) = stdout {
                    for line in std::io::BufReader::new(stdout)
                        .lines()
                        .map_while(Result::ok)
                    {
                        each(line);
                    }
                }
            },
        )
        .map_err(|source| ExecError::Spawn {
            tool: self.save,
            source,
        })?;
        if !output.status.success() {
            return Err(ExecError::Failed {
                tool: self.save,
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
                context: String::new(),
            });
        }
        Ok(())
    }
}

/// What Ferry needs from `iptables-save` of one table.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SaveSummary {
    /// Every chain of the table.
    pub chains: Vec<String>,
    /// Rules of the built-in chains (PREROUTING, OUTPUT...), as `-A ...` lines.
    pub builtin_rules: Vec<String>,
}

impl SaveSummary {
    /// Takes in one line of `iptables-save` output.
    pub fn add_line(&mut self, line: String) {
        if let Some(rest) = line.strip_prefix(':') {
            if let Some(chain) = rest.split_whitespace().next() {
                self.chains.push(chain.to_owned());
            }
        } else if line.strip_prefix("-A ").is_some_and(|rest| {
            rest.split_whitespace()
                .next()
                .is_some_and(|chain| chain.bytes().all(|b| b.is_ascii_uppercase()))
        }) {
            self.builtin_rules.push(line);
        }
    }
}

/// The line number in "iptables-restore: line N failed".
fn failing_line(stderr: &str) -> Option<usize> {
    let rest = &stderr[stderr.find("line ")? + 5..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Lines `line-around ..= line+around` of a payload, numbered, to show in the log what
/// iptables-restore choked on.
fn extract_lines(payload: &str, line: usize, around: usize) -> String {
    payload
        .lines()
        .enumerate()
        .map(|(i, text)| (i + 1, text))
        .filter(|(n, _)| n + around >= line && *n <= line + around)
        .map(|(n, text)| format!("{n:>6}: {text}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_failing_line_and_context() {
        assert_eq!(failing_line("iptables-restore: line 12 failed"), Some(12));
        assert_eq!(failing_line("something else"), None);
        let payload = "a\nb\nc\nd\ne\nf\ng";
        assert_eq!(
            extract_lines(payload, 4, 1),
            "     3: c\n     4: d\n     5: e"
        );
    }

    #[test]
    fn summarizes_save_output() {
        let mut s = SaveSummary::default();
        for line in "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SVC-X - [0:0]\n-A PREROUTING -j KUBE-SVC-X\n-A KUBE-SVC-X -j RETURN\nCOMMIT".lines() {
            s.add_line(line.to_owned());
        }
        assert_eq!(s.chains, ["PREROUTING", "KUBE-SVC-X"]);
        assert_eq!(s.builtin_rules, ["-A PREROUTING -j KUBE-SVC-X"]);
    }
}
