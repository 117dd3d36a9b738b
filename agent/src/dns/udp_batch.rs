//! Many datagrams per system call (recvmmsg / sendmmsg): under load a UDP worker
//! reads up to [`BATCH`] questions at once and sends the answers it has at hand
//! (those from the encoded-answer cache) together, instead of two calls per query.

use std::io::{IoSlice, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd as _;

use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg,
};

/// Datagrams per call.
pub const BATCH: usize = 32;
/// Largest question read (larger ones are truncated and fail to parse).
const MAX_QUESTION: usize = 4096;

/// One datagram read: its length, sender and arrival interface (if known).
#[derive(Clone, Copy, Debug)]
pub struct Received {
    pub len: usize,
    pub src: SocketAddr,
    pub interface: Option<u32>,
}

/// Buffers for one worker.
pub struct Batch {
    /// Datagrams read by the last [`Batch::receive`].
    pub buffers: Vec<Vec<u8>>,
    pub received: Vec<Received>,
    /// Answers queued for [`Batch::send`].
    pub answers: Vec<(Vec<u8>, SocketAddr)>,
    queued: usize,
    recv_headers: MultiHeaders<SockaddrStorage>,
    send_headers: MultiHeaders<SockaddrStorage>,
}

impl Batch {
    /// Buffers for [`BATCH`] datagrams each way.
    pub fn new() -> Self {
        Self {
            buffers: vec![vec![0u8; MAX_QUESTION]; BATCH],
            received: Vec::with_capacity(BATCH),
            answers: (0..BATCH)
                .map(|_| (Vec::with_capacity(512), SocketAddr::from(([0, 0, 0, 0], 0))))
                .collect(),
            queued: 0,
            recv_headers: MultiHeaders::preallocate(
                BATCH,
                Some(nix::cmsg_space!(libc::in6_pktinfo)),
            ),
            send_headers: MultiHeaders::preallocate(BATCH, None),
        }
    }

    /// Blocks (up to the socket's read timeout) for at least one datagram, then
    /// takes whatever else is queued, up to [`BATCH`]; see [`Batch::received`].
    pub fn receive(&mut self, socket: &UdpSocket) -> std::io::Result<usize> {
        self.received.clear();
        let mut slices: Vec<[IoSliceMut<'_>; 1]> = self
            .buffers
            .iter_mut()
            .map(|b| [IoSliceMut::new(b)])
            .collect();
        let results = recvmmsg(
            socket.as_raw_fd(),
            &mut self.recv_headers,
            slices.iter_mut(),
            MsgFlags::MSG_WAITFORONE,
            None,
        )
        .map_err(std::io::Error::from)?;
        for msg in results {
            let Some(src) = msg.address.and_then(|a| socket_addr(&a)) else {
                continue;
            };
            let mut interface = None;
            if let Ok(cmsgs) = msg.cmsgs() {
                for cmsg in cmsgs {
                    match cmsg {
                        ControlMessageOwned::Ipv4PacketInfo(i) => {
                            interface = Some(i.ipi_ifindex as u32)
                        }
                        ControlMessageOwned::Ipv6PacketInfo(i) => interface = Some(i.ipi6_ifindex),
                        _ => {}
                    }
                }
            }
            self.received.push(Received {
                len: msg.bytes,
                src,
                interface,
            });
        }
        Ok(self.received.len())
    }

    /// Whether [`Batch::queue`] has no room left.
    pub fn is_full(&self) -> bool {
        self.queued >= self.answers.len()
    }

    /// A buffer for one more answer to `dst`, sent by the next [`Batch::send`]
    /// (`None` when the batch is full: send it directly).
    pub fn queue(&mut self, dst: SocketAddr) -> Option<&mut Vec<u8>> {
        let (buf, to) = self.answers.get_mut(self.queued)?;
        self.queued += 1;
        *to = dst;
        buf.clear();
        Some(buf)
    }

    /// Sends the queued answers.
    pub fn send(&mut self, socket: &UdpSocket) {
        let queued = std::mem::take(&mut self.queued);
        if queued == 0 {
            return;
        }
        let slices: Vec<[IoSlice<'_>; 1]> = self.answers[..queued]
            .iter()
            .map(|(b, _)| [IoSlice::new(b)])
            .collect();
        let addrs: Vec<Option<SockaddrStorage>> = self.answers[..queued]
            .iter()
            .map(|(_, to)| Some(storage(*to)))
            .collect();
        // A refused send loses answers the client will ask again for; nothing to do.
        let _ = sendmmsg(
            socket.as_raw_fd(),
            &mut self.send_headers,
            slices.iter(),
            &addrs,
            [],
            MsgFlags::empty(),
        );
    }
}

fn socket_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    a.as_sockaddr_in()
        .map(|v4| SocketAddr::from((v4.ip(), v4.port())))
        .or_else(|| {
            a.as_sockaddr_in6()
                .map(|v6| SocketAddr::from((v6.ip(), v6.port())))
        })
}

fn storage(addr: SocketAddr) -> SockaddrStorage {
    match addr {
        SocketAddr::V4(v4) => SockaddrStorage::from(v4),
        SocketAddr::V6(v6) => SockaddrStorage::from(v6),
    }
}
