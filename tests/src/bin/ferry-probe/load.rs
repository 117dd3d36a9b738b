//! Load generator for `cargo xtask bench`: C client threads hammer one address for a
//! fixed time and report the rate and latency percentiles. Blocking sockets on plain
//! threads: the least client overhead per request on a small machine.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

/// What is measured.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Scenario {
    /// A new TCP connection per request (connect, request, reply, close).
    Connect,
    /// Requests over long-lived TCP connections.
    KeepAlive,
    /// UDP request/response, unconnected socket (as DNS clients do).
    Udp,
}

/// The result of one run.
#[derive(Debug, Serialize)]
pub struct LoadReport {
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    pub rate: f64,
    pub p50_us: u64,
    pub p99_us: u64,
}

/// Runs `scenario` against `addr` with `concurrency` threads for `duration`.
pub fn run(
    scenario: Scenario,
    addr: SocketAddr,
    concurrency: usize,
    duration: Duration,
) -> LoadReport {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || worker(scenario, addr, &stop))
        })
        .collect();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let mut errors = 0;
    for w in workers {
        if let Ok((lat, err)) = w.join() {
            latencies.extend(lat);
            errors += err;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let pct = |p: f64| {
        if latencies.is_empty() {
            0
        } else {
            latencies[((latencies.len() - 1) as f64 * p) as usize]
        }
    };
    LoadReport {
        requests: latencies.len() as u64,
        errors,
        seconds,
        rate: latencies.len() as f64 / seconds,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    }
}

/// One client thread: latencies in microseconds, and the error count.
fn worker(scenario: Scenario, addr: SocketAddr, stop: &AtomicBool) -> (Vec<u64>, u64) {
    let mut latencies = Vec::with_capacity(1 << 16);
    let mut errors = 0;
    let timeout = Some(Duration::from_secs(1));
    let mut keepalive: Option<(TcpStream, BufReader<TcpStream>)> = None;
    let bind: SocketAddr = if addr.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let udp = UdpSocket::bind(bind).ok();
    if let Some(u) = &udp {
        let _ = u.set_read_timeout(timeout);
    }
    let mut line = String::new();
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let ok = match scenario {
            Scenario::Connect => (|| -> std::io::Result<()> {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
                s.set_nodelay(true)?;
                s.set_read_timeout(timeout)?;
                s.write_all(b"x\n")?;
                let mut r = BufReader::new(&s);
                line.clear();
                r.read_line(&mut line)?;
                Ok(())
            })()
            .is_ok(),
            Scenario::KeepAlive => (|| -> std::io::Result<()> {
                if keepalive.is_none() {
                    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
                    s.set_nodelay(true)?;
                    s.set_read_timeout(timeout)?;
                    let r = BufReader::new(s.try_clone()?);
                    keepalive = Some((s, r));
                }
                let Some((s, r)) = keepalive.as_mut() else {
                    return Err(std::io::ErrorKind::NotConnected.into());
                };
                s.write_all(b"x\n")?;
                line.clear();
                if r.read_line(&mut line)? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                Ok(())
            })()
            .inspect_err(|_| keepalive = None)
            .is_ok(),
            Scenario::Udp => udp
                .as_ref()
                .is_some_and(|u| u.send_to(b"x\n", addr).is_ok() && u.recv_from(&mut buf).is_ok()),
        };
        if ok {
            latencies.push(t.elapsed().as_micros() as u64);
        } else {
            errors += 1;
        }
    }
    (latencies, errors)
}
