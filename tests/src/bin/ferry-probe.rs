//! `ferry-probe`: the servers and clients the netns tests and the demo run inside pods.
//!
//! `serve` answers every TCP connection and UDP datagram with the pod's identity
//! (`NAME PORT`), and HTTP requests with an HTTP response carrying it, so a test can
//! see which backend a connection reached. `tcp` and `udp` make N attempts to an
//! address and print one JSON summary: identities seen, errors by kind, timings.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde::Serialize;

#[derive(Parser)]
#[command(name = "ferry-probe")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the pod identity on TCP and UDP ports (IPv4 and IPv6 wildcard).
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long, value_delimiter = ',')]
        tcp: Vec<u16>,
        #[arg(long, value_delimiter = ',')]
        udp: Vec<u16>,
    },
    /// Open N TCP connections, one after another, and report who answered.
    Tcp {
        addr: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        /// Keep the last connection open this long after the reply, then check it
        /// still works (used to test that established connections survive).
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
    },
    /// Send N UDP requests and report who answered and from which address.
    Udp {
        addr: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        /// Use connect() + send() instead of sendto().
        #[arg(long)]
        connected: bool,
        /// Send every request from the same socket (one long-lived flow).
        #[arg(long)]
        same_socket: bool,
        /// Pause between requests.
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
    },
}

/// What a client run observed.
#[derive(Default, Serialize)]
struct Report {
    /// Replies by identity ("NAME PORT").
    ok: BTreeMap<String, u32>,
    /// Failures by kind (refused, timeout, unreachable, eperm, ...).
    errors: BTreeMap<String, u32>,
    /// Peer addresses the socket reported (getpeername / recvfrom source).
    peers: BTreeMap<String, u32>,
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
}

fn error_kind(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "refused".into(),
        Some(libc::ETIMEDOUT | libc::EAGAIN) => "timeout".into(),
        Some(libc::EHOSTUNREACH) => "unreachable".into(),
        Some(libc::ENETUNREACH) => "netunreach".into(),
        Some(libc::EPERM) => "eperm".into(),
        Some(libc::ECONNRESET) => "reset".into(),
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

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Serve { name, tcp, udp } => serve(&name, &tcp, &udp),
        Cmd::Tcp {
            addr,
            count,
            timeout_ms,
            hold_ms,
        } => print(tcp_client(
            addr,
            count,
            Duration::from_millis(timeout_ms),
            hold_ms,
        )),
        Cmd::Udp {
            addr,
            count,
            timeout_ms,
            connected,
            same_socket,
            interval_ms,
        } => print(udp_client(
            addr,
            count,
            Duration::from_millis(timeout_ms),
            UdpOptions {
                connected,
                same_socket,
                interval: Duration::from_millis(interval_ms),
            },
        )),
    }
}

fn print(report: Report) {
    match serde_json::to_string(&report) {
        Ok(json) => println!("{json}"),
        Err(e) => eprintln!("cannot encode report: {e}"),
    }
}

fn serve(name: &str, tcp: &[u16], udp: &[u16]) {
    let mut threads = Vec::new();
    for &port in tcp {
        // One IPv6 wildcard socket with IPV6_V6ONLY off serves both families.
        let listener = match TcpListener::bind(("::", port)) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("ferry-probe: cannot listen on tcp {port}: {e}");
                std::process::exit(1);
            }
        };
        let identity = format!("{name} {port}");
        let body = format!("{name}\n");
        threads.push(std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let identity = identity.clone();
                let body = body.clone();
                std::thread::spawn(move || handle_tcp(conn, &identity, &body));
            }
        }));
    }
    for &port in udp {
        let socket = match UdpSocket::bind(("::", port)) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("ferry-probe: cannot listen on udp {port}: {e}");
                std::process::exit(1);
            }
        };
        let identity = format!("{name} {port}\n");
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((_, from)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(identity.as_bytes(), from);
            }
        }));
    }
    // Tell the parent we are listening.
    println!("ready");
    let _ = std::io::stdout().flush();
    for t in threads {
        let _ = t.join();
    }
}

/// Answers one connection: HTTP requests (keep-alive) get an HTTP response with the
/// pod name, anything else gets `NAME PORT` and the connection stays open for more.
fn handle_tcp(conn: TcpStream, identity: &str, body: &str) {
    let Ok(write_half) = conn.try_clone() else {
        return;
    };
    let mut writer = write_half;
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.starts_with("GET ") || line.starts_with("HEAD ") {
            // Skip the headers.
            let mut header = String::new();
            loop {
                header.clear();
                match reader.read_line(&mut header) {
                    Ok(0) | Err(_) => return,
                    Ok(_) if header == "\r\n" || header == "\n" => break,
                    Ok(_) => {}
                }
            }
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            if writer.write_all(response.as_bytes()).is_err() {
                return;
            }
        } else if writer
            .write_all(format!("{identity}\n").as_bytes())
            .is_err()
        {
            return;
        }
    }
}

fn tcp_client(addr: SocketAddr, count: u32, timeout: Duration, hold_ms: u64) -> Report {
    let mut report = Report::default();
    for i in 0..count {
        let started = Instant::now();
        let result = (|| -> std::io::Result<(String, SocketAddr, TcpStream)> {
            let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
            stream.set_read_timeout(Some(timeout))?;
            let peer = stream.peer_addr()?;
            stream.write_all(b"hello\n")?;
            let mut reader = BufReader::new(stream.try_clone()?);
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
            }
            Ok((line.trim().to_string(), peer, stream))
        })();
        report.max_ms = report.max_ms.max(started.elapsed().as_millis() as u64);
        match result {
            Ok((identity, peer, stream)) => {
                *report.ok.entry(identity).or_default() += 1;
                *report.peers.entry(peer.to_string()).or_default() += 1;
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
struct UdpOptions {
    connected: bool,
    same_socket: bool,
    interval: Duration,
}

fn udp_client(addr: SocketAddr, count: u32, timeout: Duration, opts: UdpOptions) -> Report {
    let mut report = Report::default();
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let open = || -> std::io::Result<UdpSocket> {
        let socket = UdpSocket::bind(bind)?;
        socket.set_read_timeout(Some(timeout))?;
        if opts.connected {
            socket.connect(addr)?;
        }
        Ok(socket)
    };
    let mut shared = None;
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
                    shared = Some(open()?);
                }
                shared.as_ref().expect("just set")
            } else {
                fresh = open()?;
                &fresh
            };
            let mut buf = [0u8; 2048];
            let (n, from) = if opts.connected {
                socket.send(b"hello\n")?;
                let n = socket.recv(&mut buf)?;
                (n, socket.peer_addr()?)
            } else {
                socket.send_to(b"hello\n", addr)?;
                socket.recv_from(&mut buf)?
            };
            Ok((String::from_utf8_lossy(&buf[..n]).trim().to_string(), from))
        })();
        report.max_ms = report.max_ms.max(started.elapsed().as_millis() as u64);
        match result {
            Ok((identity, from)) => {
                *report.ok.entry(identity).or_default() += 1;
                *report.peers.entry(from.to_string()).or_default() += 1;
            }
            Err(e) => report.error(&e),
        }
    }
    report
}
