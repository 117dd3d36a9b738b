//! Handing the DNS sockets to the agent that replaces this one, so a rolling update
//! loses no query. The new agent starts while the old one still serves (a DaemonSet
//! rolled with `maxSurge`), loads its zone, then asks the old agent over a Unix
//! socket; the old one stops reading, answers what it has read, and passes its
//! sockets (`SCM_RIGHTS`). The sockets stay the same kernel objects, so nothing queued
//! on them is lost and no SO_REUSEPORT group ever shrinks.
//!
//! Protocol: the new agent connects and writes `take\n`; the old one replies with
//! one message: a JSON list of `{addr, udp}` (sockets per address) as data and the
//! descriptors as ancillary data, in order (each address's UDP sockets, then its
//! TCP listener).

use std::io::{IoSlice, IoSliceMut, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::listeners::{DnsServer, Sockets};

/// The request a successor sends.
const TAKE: &[u8] = b"take\n";
/// Descriptors one message may carry (the kernel's SCM_MAX_FD).
const MAX_FDS: usize = 253;
/// How long either side waits for the other.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Failure of a handover.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("talking to the previous agent at {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the previous agent's answer is malformed: {0}")]
    Malformed(String),
}

#[derive(Serialize, Deserialize)]
struct Entry {
    addr: SocketAddr,
    udp: usize,
}

/// Whether an agent is serving DNS and accepting handovers at `path`.
pub fn predecessor(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}

/// Takes the DNS sockets of the agent serving at `path`; it stops reading them
/// before it answers.
pub fn take(path: &Path) -> Result<Vec<(SocketAddr, Sockets)>, HandoverError> {
    let io = |source| HandoverError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(io)?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    stream.write_all(TAKE).map_err(io)?;
    let mut data = vec![0u8; 64 * 1024];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(&mut data)];
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| io(e.into()))?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for cmsg in msg.cmsgs().map_err(|e| io(e.into()))? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            // SAFETY: SCM_RIGHTS installed these descriptors in this process for us;
            // each is owned exactly once from here on.
            fds.extend(
                received
                    .into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let len = msg.bytes;
    let entries: Vec<Entry> = serde_json::from_slice(&data[..len])
        .map_err(|e| HandoverError::Malformed(e.to_string()))?;
    split(entries, fds)
}

/// Pairs the descriptors with the addresses they serve.
fn split(
    entries: Vec<Entry>,
    fds: Vec<OwnedFd>,
) -> Result<Vec<(SocketAddr, Sockets)>, HandoverError> {
    let wanted: usize = entries.iter().map(|e| e.udp + 1).sum();
    if wanted != fds.len() {
        return Err(HandoverError::Malformed(format!(
            "{} descriptors for {wanted} sockets",
            fds.len()
        )));
    }
    let mut fds = fds.into_iter();
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let udp: Vec<UdpSocket> = fds.by_ref().take(entry.udp).map(UdpSocket::from).collect();
        let tcp = fds
            .next()
            .map(TcpListener::from)
            .ok_or_else(|| HandoverError::Malformed("too few descriptors".into()))?;
        out.push((entry.addr, Sockets { udp, tcp }));
    }
    Ok(out)
}

/// Accepts successors at `path` (replacing a stale socket file) on a thread of its
/// own; the first that asks gets every socket of `server`, which then stops serving.
pub fn serve(path: PathBuf, server: Arc<DnsServer>) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::thread::Builder::new()
        .name("dns-handover".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                match answer(stream, &server) {
                    Ok(false) => {}
                    Ok(true) => {
                        info!("handed the DNS sockets to the agent replacing this one");
                        return;
                    }
                    Err(e) => warn!(error = %e, "DNS socket handover failed"),
                }
            }
        })?;
    Ok(())
}

/// Serves one connection: `Ok(true)` once the sockets are handed over, `Ok(false)`
/// for a connection that only checked this agent is there.
fn answer(mut stream: UnixStream, server: &DnsServer) -> std::io::Result<bool> {
    stream.set_read_timeout(Some(TIMEOUT))?;
    let mut request = [0u8; TAKE.len()];
    if stream.read_exact(&mut request).is_err() || request != TAKE {
        return Ok(false);
    }
    let handed = server.sockets_for_successor()?;
    let entries: Vec<Entry> = handed
        .iter()
        .map(|(addr, s)| Entry {
            addr: *addr,
            udp: s.udp.len(),
        })
        .collect();
    let fds: Vec<RawFd> = handed
        .iter()
        .flat_map(|(_, s)| {
            s.udp
                .iter()
                .map(|u| u.as_raw_fd())
                .chain(std::iter::once(s.tcp.as_raw_fd()))
        })
        .take(MAX_FDS)
        .collect();
    let data = serde_json::to_vec(&entries).map_err(std::io::Error::other)?;
    sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(&data)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )?;
    // The successor reads the sockets now; this process's duplicates close here, and
    // its own readers stop after answering what they have read.
    drop(handed);
    server.retire();
    Ok(true)
}
