//! Running the iptables tools of one IP family.

use std::io::Write as _;
use std::process::{Command, Stdio};

use crate::model::IpFamily;

/// Failure of an iptables tool.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("could not run {tool}: {source}")]
    Spawn {
        tool: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed ({status}): {stderr}{context}")]
    Failed {
        tool: &'static str,
        status: std::process::ExitStatus,
        stderr: String,
        /// The payload lines around a reported failing line, if any.
        context: String,
    },
}

/// The tool set of one family (`iptables*` or `ip6tables*`).
#[derive(Clone, Copy, Debug)]
pub struct Tools {
    iptables: &'static str,
    save: &'static str,
    restore: &'static str,
}

impl Tools {
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

    /// Applies a payload atomically, leaving chains it does not mention alone.
    pub fn restore(&self, payload: &str) -> Result<(), ExecError> {
        let mut child = Command::new(self.restore)
            .args(["-w", "--noflush"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| ExecError::Spawn {
                tool: self.restore,
                source,
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            // A write error shows up as a failed exit status below.
            let _ = stdin.write_all(payload.as_bytes());
        }
        let output = child
            .wait_with_output()
            .map_err(|source| ExecError::Spawn {
                tool: self.restore,
                source,
            })?;
        if output.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        let context = failing_line(&stderr)
            .map(|line| format!("\n{}", extract_lines(payload, line, 3)))
            .unwrap_or_default();
        Err(ExecError::Failed {
            tool: self.restore,
            status: output.status,
            stderr,
            context,
        })
    }

    /// Dumps one table.
    pub fn save(&self, table: &str) -> Result<String, ExecError> {
        self.run(self.save, &["-t", table])
    }

    /// Whether a chain exists (`iptables -S CHAIN`).
    pub fn chain_exists(&self, table: &str, chain: &str) -> bool {
        Command::new(self.iptables)
            .args(["-w", "-t", table, "-S", chain])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn run(&self, tool: &'static str, args: &[&str]) -> Result<String, ExecError> {
        let output = Command::new(tool)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| ExecError::Spawn { tool, source })?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(ExecError::Failed {
                tool,
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
                context: String::new(),
            })
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

/// Chains of one table in `iptables-save` output.
pub fn chains_in_save(save: &str) -> impl Iterator<Item = &str> {
    save.lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
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
    fn lists_chains() {
        let save = "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SVC-X - [0:0]\n-A PREROUTING -j KUBE-SVC-X\nCOMMIT\n";
        assert_eq!(
            chains_in_save(save).collect::<Vec<_>>(),
            ["PREROUTING", "KUBE-SVC-X"]
        );
    }
}
