//! A small sock_diag client over rust-netlink's crates: lists the connected UDP
//! sockets of one network namespace and destroys one, as `ss -K` does.

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::path::Path;

use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_UDP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::{SockDiagDestroy, SockDiagMessage};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use nix::sched::{CloneFlags, setns};

use crate::dataplane::netlink_request::RequestSocket;

/// A connected UDP socket as sock_diag reports it.
#[derive(Clone, Debug)]
pub struct UdpSocket {
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
    /// Its identity: addresses, ports, interface and cookie.
    pub id: SocketId,
}

impl UdpSocket {
    /// `bpf_get_socket_cookie()` of the socket (the kernel reports it as two
    /// native-endian 32-bit halves, low first).
    pub fn cookie(&self) -> u64 {
        let c = self.id.cookie;
        let low = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
        let high = u32::from_ne_bytes([c[4], c[5], c[6], c[7]]);
        u64::from(high) << 32 | u64::from(low)
    }

    /// The peer it is connected to.
    pub fn peer(&self) -> SocketAddr {
        SocketAddr::new(self.id.destination_address, self.id.destination_port)
    }
}

/// A NETLINK_SOCK_DIAG socket bound to one network namespace.
pub struct SockDiag {
    socket: RequestSocket,
}

impl SockDiag {
    /// Opens the socket in the namespace `netns` names (a `/proc/PID/ns/net` path).
    /// A thread of its own enters the namespace, so no thread of the agent changes
    /// namespace; the socket stays bound to that namespace after the thread ends.
    pub fn open_in(netns: &Path) -> io::Result<Self> {
        let ns = File::open(netns)?;
        let opened = std::thread::spawn(move || {
            setns(&ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            RequestSocket::open(NETLINK_SOCK_DIAG)
        })
        .join()
        .map_err(|_| io::Error::other("sock_diag opener thread panicked"))??;
        Ok(Self { socket: opened })
    }

    /// The connected UDP sockets of `family` (UDP sockets are "established" once
    /// connected).
    pub fn connected_udp(&mut self, family: u8) -> io::Result<Vec<UdpSocket>> {
        let request = request(family, StateFlags::ESTABLISHED, any_socket(family));
        self.socket.send(NLM_F_REQUEST | NLM_F_DUMP, request)?;
        let mut sockets = Vec::new();
        self.socket.receive(|message: SockDiagMessage| {
            if let SockDiagMessage::InetResponse(response) = message {
                sockets.push(UdpSocket {
                    family: response.header.family,
                    id: response.header.socket_id,
                });
            }
        })?;
        Ok(sockets)
    }

    /// Destroys one socket: its owner's pending and next calls fail with
    /// ECONNABORTED and the socket is disconnected. One already gone is no error;
    /// a kernel without CONFIG_INET_DIAG_DESTROY answers EOPNOTSUPP.
    pub fn destroy(&mut self, socket: &UdpSocket) -> io::Result<()> {
        let request = request(socket.family, StateFlags::all(), socket.id.clone());
        self.socket
            .send(NLM_F_REQUEST | NLM_F_ACK, SockDiagDestroy::new(request))?;
        match self.socket.receive(|_: SockDiagMessage| {}) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            other => other,
        }
    }
}

fn request(family: u8, states: StateFlags, socket_id: SocketId) -> SockDiagMessage {
    SockDiagMessage::InetRequest(InetRequest {
        family,
        protocol: IPPROTO_UDP,
        extensions: ExtensionFlags::empty(),
        states,
        socket_id,
    })
}

/// The wildcard id a dump starts from.
fn any_socket(family: u8) -> SocketId {
    if family == AF_INET6 {
        SocketId::new_v6()
    } else {
        SocketId::new_v4()
    }
}

/// The families sock_diag is asked about: IPv6 sockets may talk to IPv4 services
/// through mapped addresses, so both are always listed.
pub const FAMILIES: [u8; 2] = [AF_INET, AF_INET6];
