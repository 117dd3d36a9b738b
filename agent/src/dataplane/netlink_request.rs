//! A blocking netlink socket for request/answer exchanges (a dump, or a change with
//! its ACK), shared by Ferry's small typed clients of kernel interfaces that have no
//! async crate of their own: ctnetlink (conntrack entries) and sock_diag (sockets).
//! The messages themselves come from rust-netlink's `netlink-packet-*` crates.

use std::io;

use netlink_packet_core::{
    NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
};
use netlink_sys::{Socket, SocketAddr};

/// Receive buffer: a dump arrives in datagrams of up to a page or so each, and
/// netlink truncates a datagram that does not fit.
const RECEIVE_BUFFER: usize = 1 << 20;

/// A connected netlink socket of one protocol, with its request sequence.
pub struct RequestSocket {
    socket: Socket,
    sequence: u32,
    buffer: Vec<u8>,
}

impl RequestSocket {
    /// Opens and connects a socket of `protocol` (a `netlink_sys::protocols` value)
    /// in the calling thread's network namespace, where it stays.
    pub fn open(protocol: isize) -> io::Result<Self> {
        let mut socket = Socket::new(protocol)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Self {
            socket,
            sequence: 0,
            buffer: Vec::with_capacity(RECEIVE_BUFFER),
        })
    }

    /// Sends one request with `flags` (NLM_F_REQUEST and NLM_F_DUMP or NLM_F_ACK).
    pub fn send<M>(&mut self, flags: u16, request: M) -> io::Result<()>
    where
        M: NetlinkSerializable,
    {
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        self.sequence = self.sequence.wrapping_add(1);
        header.sequence_number = self.sequence;
        let mut message = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(request));
        message.finalize();
        let mut bytes = vec![0; message.buffer_len()];
        message.serialize(&mut bytes);
        self.socket.send(&bytes, 0).map(|_| ())
    }

    /// Reads answers to the last request until its end (a dump's DONE, or the ACK),
    /// handing each message to `each`; a kernel error becomes an io::Error.
    pub fn receive<M>(&mut self, mut each: impl FnMut(M)) -> io::Result<()>
    where
        M: NetlinkDeserializable,
    {
        loop {
            self.buffer.clear();
            let size = self.socket.recv(&mut self.buffer, 0)?;
            let mut offset = 0;
            while offset < size {
                let message = NetlinkMessage::<M>::deserialize(&self.buffer[offset..size])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let length = message.header.length as usize;
                let ours = message.header.sequence_number == self.sequence;
                match message.payload {
                    NetlinkPayload::Done(_) if ours => return Ok(()),
                    NetlinkPayload::Error(e) if ours => {
                        return match e.code {
                            None => Ok(()),
                            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                        };
                    }
                    NetlinkPayload::InnerMessage(m) if ours => each(m),
                    _ => {}
                }
                if length == 0 {
                    break;
                }
                offset += length;
            }
        }
    }
}
