//! Test clients: N attempts to one address, summarized as a [`Report`].

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use serde::Serialize;

/// What a client run observed.
#[derive(Default, Serialize)]
pub struct Report {
    /// Replies by identity ("NAME PORT").
    ok: BTreeMap<String, u32>,
    /// Failures by kind (refused, timeout, unreachable, eperm, ...).
    errors: BTreeMap<String, u32>,
    /// Peer addresses the socket reported (getpeername / recvfrom source).
    peers: BTreeMap<String, u32>,
    /// Source addresses the backends saw (the client's own, or a SNAT address).
    sources: BTreeMap<String, u32>,
    /// Slowest attempt, in milliseconds.
    max_ms: u64,
    /// Result of the held connection check, if asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    held: Option<String>,
}

impl Report {
    fn error(&mut self, e: &std::io::Error) {
        *self.errors.entry(error_kind(e)).or_default() += 1;
    }

    /// Counts a reply (`NAME PORT` or `NAME PORT from IP`) from `peer`.
    fn reply(&mut self, reply: &str, peer: SocketAddr) {
        let (identity, source) = match reply.split_once(" from ") {
            Some((identity, source)) => (identity, Some(source)),
            None => (reply, None),
        };
        *self.ok.entry(identity.to_string()).or_default() += 1;
        *self.peers.entry(peer.to_string()).or_default() += 1;
        if let Some(source) = source {
            *self.sources.entry(source.to_string()).or_default() += 1;
        }
    }
}

/// What the client sends: the server answers it with its identity and the source
/// address it saw.
const REQUEST: &[u8] = b"whoami\n";

pub fn error_kind(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "refused".into(),
        Some(libc::ETIMEDOUT | libc::EAGAIN) => "timeout".into(),
        Some(libc::EHOSTUNREACH) => "unreachable".into(),
        Some(libc::ENETUNREACH) => "netunreach".into(),
        Some(libc::EPERM) => "eperm".into(),
        Some(libc::ECONNRESET) => "reset".into(),
        Some(libc::ECONNABORTED) => "aborted".into(),
        _ if matches!(
            e.kind(),
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
        ) =>
        {
            "timeout".into()
        }
        _ => format!("other:{e}"),
    }
}

pub fn tcp_client(addr: SocketAddr, count: u32, timeout: Duration, hold_ms: u64) -> Report {
    let mut report = Report::default();
    for i in 0..count {
        let started = Instant::now();
        let result = (|| -> std::io::Result<(String, SocketAddr, TcpStream)> {
            let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
            stream.set_read_timeout(Some(timeout))?;
            let peer = stream.peer_addr()?;
            stream.write_all(REQUEST)?;
            let mut reader = BufReader::new(stream.try_clone()?);
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
            }
            Ok((line.trim().to_string(), peer, stream))
        })();
        report.max_ms = report.max_ms.max(started.elapsed().as_millis() as u64);
        match result {
            Ok((reply, peer, stream)) => {
                report.reply(&reply, peer);
                if hold_ms > 0 && i + 1 == count {
                    report.held = Some(hold(stream, hold_ms));
                }
            }
            Err(e) => report.error(&e),
        }
    }
    report
}

/// Keeps a connection open, then checks it still carries data.
fn hold(mut stream: TcpStream, hold_ms: u64) -> String {
    std::thread::sleep(Duration::from_millis(hold_ms));
    if let Err(e) = stream.write_all(b"again\n") {
        return format!("write failed: {}", error_kind(&e));
    }
    let mut buf = [0u8; 256];
    match stream.read(&mut buf) {
        Ok(0) => "closed".into(),
        Ok(n) => String::from_utf8_lossy(&buf[..n]).trim().to_string(),
        Err(e) => format!("read failed: {}", error_kind(&e)),
    }
}

/// How the UDP client sends.
pub struct UdpOptions {
    pub connected: bool,
    pub same_socket: bool,
    pub interval: Duration,
}

pub fn udp_client(addr: SocketAddr, count: u32, timeout: Duration, opts: UdpOptions) -> Report {
    let mut report = Report::default();
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let open = |bind: SocketAddr| -> std::io::Result<UdpSocket> {
        let socket = UdpSocket::bind(bind)?;
        socket.set_read_timeout(Some(timeout))?;
        if opts.connected {
            socket.connect(addr)?;
        }
        Ok(socket)
    };
    let mut shared: Option<UdpSocket> = None;
    // With --same-socket the flow keeps one source port: a socket that failed is
    // replaced by one bound to the same port, as a client that reconnects would.
    let mut fixed = bind;
    for i in 0..count {
        if i > 0 {
            std::thread::sleep(opts.interval);
        }
        let started = Instant::now();
        let result = (|| -> std::io::Result<(String, SocketAddr)> {
            // A fresh socket per attempt is a new flow, as a new client would be.
            let fresh;
            let socket = if opts.same_socket {
                if shared.is_none() {
                    let socket = open(fixed)?;
                    fixed = socket.local_addr()?;
                    shared = Some(socket);
                }
                shared.as_ref().expect("just set")
            } else {
                fresh = open(bind)?;
                &fresh
            };
            let mut buf = [0u8; 2048];
            let (n, from) = if opts.connected {
                socket.send(REQUEST)?;
                let n = socket.recv(&mut buf)?;
                (n, socket.peer_addr()?)
            } else {
                socket.send_to(REQUEST, addr)?;
                socket.recv_from(&mut buf)?
            };
            Ok((String::from_utf8_lossy(&buf[..n]).trim().to_string(), from))
        })();
        report.max_ms = report.max_ms.max(started.elapsed().as_millis() as u64);
        match result {
            Ok((reply, from)) => report.reply(&reply, from),
            Err(e) => {
                report.error(&e);
                if e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::TimedOut
                {
                    shared = None;
                }
            }
        }
    }
    report
}
