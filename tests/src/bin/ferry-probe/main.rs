//! `ferry-probe`: the servers and clients the netns tests, the demo and the
//! benchmarks run inside pods.
//!
//! - `serve`: the pod's server (see `serve`).
//! - `tcp` / `udp`: N attempts to an address, one JSON summary of who answered,
//!   errors by kind, peer addresses, and the source addresses the backends saw
//!   (see `client`).
//! - `load`: rate and latency under load (see `load`).

mod client;
mod dns_client;
mod load;
mod serve;
mod upstream;

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};

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
    /// A test upstream DNS server (see `upstream`).
    DnsUpstream {
        #[arg(long)]
        listen: SocketAddr,
        /// NAME=IPV4 answers, comma-separated.
        #[arg(long, value_delimiter = ',')]
        answer: Vec<String>,
        #[arg(long, default_value_t = 60)]
        ttl: u32,
        /// Wait this long before answering.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// Append every question received to this file.
        #[arg(long)]
        log: Option<String>,
    },
    /// Ask one name until a stop file appears; report what the answers were.
    DnsQueries {
        #[arg(long)]
        server: SocketAddr,
        #[arg(long)]
        name: String,
        /// The address a right answer holds.
        #[arg(long)]
        expect: std::net::Ipv4Addr,
        #[arg(long, default_value_t = 5)]
        interval_ms: u64,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        #[arg(long)]
        stop_file: std::path::PathBuf,
        #[arg(long, default_value_t = 100_000)]
        max: u32,
    },
    /// Generate load and report rate and latency percentiles.
    Load {
        #[arg(value_enum)]
        scenario: load::Scenario,
        addr: SocketAddr,
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        #[arg(long, default_value_t = 3000)]
        duration_ms: u64,
    },
}

fn print(report: &impl serde::Serialize) {
    match serde_json::to_string(report) {
        Ok(json) => println!("{json}"),
        Err(e) => eprintln!("cannot encode report: {e}"),
    }
}

fn main() {
    match Cli::parse().command {
        Cmd::Serve { name, tcp, udp } => {
            if let Err(e) = serve::serve(&name, &tcp, &udp) {
                eprintln!("ferry-probe serve: {e}");
                std::process::exit(1);
            }
        }
        Cmd::Tcp {
            addr,
            count,
            timeout_ms,
            hold_ms,
        } => print(&client::tcp_client(
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
        } => print(&client::udp_client(
            addr,
            count,
            Duration::from_millis(timeout_ms),
            client::UdpOptions {
                connected,
                same_socket,
                interval: Duration::from_millis(interval_ms),
            },
        )),
        Cmd::DnsUpstream {
            listen,
            answer,
            ttl,
            delay_ms,
            log,
        } => {
            let answers: Vec<(String, std::net::Ipv4Addr)> = answer
                .iter()
                .filter_map(|a| {
                    let (name, ip) = a.split_once('=')?;
                    Some((name.to_owned(), ip.parse().ok()?))
                })
                .collect();
            if let Err(e) = upstream::serve(
                listen,
                &answers,
                ttl,
                Duration::from_millis(delay_ms),
                log.as_deref(),
            ) {
                eprintln!("ferry-probe dns-upstream: {e}");
                std::process::exit(1);
            }
        }
        Cmd::DnsQueries {
            server,
            name,
            expect,
            interval_ms,
            timeout_ms,
            stop_file,
            max,
        } => print(&dns_client::run(
            server,
            &name,
            expect,
            Duration::from_millis(interval_ms),
            Duration::from_millis(timeout_ms),
            &stop_file,
            max,
        )),
        Cmd::Load {
            scenario,
            addr,
            concurrency,
            duration_ms,
        } => print(&load::run(
            scenario,
            addr,
            concurrency,
            Duration::from_millis(duration_ms),
        )),
    }
}
