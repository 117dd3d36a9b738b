//! Running nft transactions (atomic: all of a script or nothing): in process through
//! [`libnftables`](super::libnftables) where the host has it, else one `nft -f -`
//! each; reads always run the binary.

use std::io::Read as _;
use std::process::{Command, Stdio};

use tracing::info;

use super::libnftables::Libnftables;
use crate::dataplane::command;

/// Failure of `nft`.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// `nft` could not be started or waited for (missing binary, no permission).
    #[error("could not run nft: {0}")]
    Spawn(#[source] std::io::Error),
    /// `nft` ran and refused, e.g. the kernel rejected the transaction.
    #[error("nft failed ({status}): {stderr}")]
    Failed {
        status: std::process::ExitStatus,
        /// What it printed on stderr (the failing line is quoted there).
        stderr: String,
    },
    /// libnftables refused the transaction; its error text.
    #[error("nft refused: {0}")]
    Refused(String),
    /// `nft` printed something that is not UTF-8 or not the JSON it documents.
    #[error("unreadable nft output: {0}")]
    Output(String),
}

/// What the data plane needs from `nft`. [`Nft`] runs the real binary; unit tests use
/// a fake that records transactions.
pub trait Runner {
    /// Applies one transaction (nft script), atomically.
    fn apply(&self, script: &str) -> Result<(), NftError>;

    /// Applies a transaction that rewrites the whole table (a full sync).
    fn replace(&self, script: &str) -> Result<(), NftError> {
        self.apply(script)
    }

    /// Runs a read-only command (`list tables`, `-j list table ip ferry`) and returns
    /// what it printed.
    fn read(&self, args: &[&str]) -> Result<String, NftError>;
}

/// The `nft` binary.
#[derive(Clone, Copy, Debug, Default)]
pub struct Nft;

/// At most this much of `nft`'s stderr goes into an error (it quotes the failing
/// line, which at scale may be long).
const MAX_STDERR: usize = 4096;

fn failed(status: std::process::ExitStatus, stderr: &[u8]) -> NftError {
    let stderr = truncated(String::from_utf8_lossy(stderr).trim().to_owned());
    NftError::Failed { status, stderr }
}

/// `message`, cut to [`MAX_STDERR`].
pub(super) fn truncated(mut message: String) -> String {
    if message.len() > MAX_STDERR {
        let mut cut = MAX_STDERR;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push_str("...");
    }
    message
}

/// The data plane's runner: libnftables when it loads, else the binary.
pub struct Session {
    library: Option<Libnftables>,
}

impl Session {
    /// Opens libnftables, or settles for the binary (logging which).
    pub fn open() -> Self {
        let library = match Libnftables::open() {
            Ok(library) => {
                info!("nftables: transactions run in process through libnftables");
                Some(library)
            }
            Err(error) => {
                info!(%error, "nftables: libnftables not loadable; running nft for each transaction");
                None
            }
        };
        Self { library }
    }
}

impl Runner for Session {
    fn apply(&self, script: &str) -> Result<(), NftError> {
        match &self.library {
            Some(library) => library.apply(script),
            None => Nft.apply(script),
        }
    }

    /// A whole table through the binary: its parse peaks at hundreds of megabytes of
    /// allocations at 100,000 endpoints, which a child process returns to the system
    /// and the agent's heap would keep (measured: agent peak RSS 855 MB, and the
    /// load ~20% slower than `nft -f -`).
    fn replace(&self, script: &str) -> Result<(), NftError> {
        Nft.apply(script)
    }

    fn read(&self, args: &[&str]) -> Result<String, NftError> {
        Nft.read(args)
    }
}

impl Runner for Nft {
    fn apply(&self, script: &str) -> Result<(), NftError> {
        let mut written = None;
        let output = command::run(
            Command::new("nft")
                .args(["-f", "-"])
                .stdin(Stdio::piped())
                .stdout(Stdio::null()),
            command::WHOLE_TABLE,
            |stdin, _| written = command::feed(stdin, |w| w.write_all(script.as_bytes())),
        )
        .map_err(NftError::Spawn)?;
        if !output.status.success() {
            return Err(failed(output.status, &output.stderr));
        }
        // nft read all of its input if it succeeded; a write error means it did not.
        if let Some(e) = written {
            return Err(NftError::Spawn(e));
        }
        Ok(())
    }

    fn read(&self, args: &[&str]) -> Result<String, NftError> {
        let mut stdout = Vec::new();
        let output = command::run(
            Command::new("nft")
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped()),
            command::WHOLE_TABLE,
            |_, out| {
                if let Some(mut out) = out {
                    let _ = out.read_to_end(&mut stdout);
                }
            },
        )
        .map_err(NftError::Spawn)?;
        if !output.status.success() {
            return Err(failed(output.status, &output.stderr));
        }
        String::from_utf8(stdout).map_err(|e| NftError::Output(e.to_string()))
    }
}

/// Whether Ferry's table of `family` (`ip`, `ip6`) exists. Asks for its one small
/// set (`nodeport-ips`): `nft list tables` reads the whole ruleset first, which takes
/// seconds at 10,000 services.
pub fn table_exists<R: Runner>(runner: &R, family: &str) -> Result<bool, NftError> {
    match runner.read(&["list", "set", family, super::render::TABLE, "nodeport-ips"]) {
        Ok(_) => Ok(true),
        Err(NftError::Failed { stderr, .. }) if stderr.contains("No such file or directory") => {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}
