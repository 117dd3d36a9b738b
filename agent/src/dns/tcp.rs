//! DNS over TCP (RFC 7766), served here rather than by hickory-server so that the
//! header is checked before a message is parsed (as over UDP), an accept error never
//! stops the listener (hickory-server 0.26 ends its accept loop on ECONNABORTED,
//! hickory-dns#3725), and connections are bounded in number and in time: a slow or
//! idle client cannot hold the server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tracing::debug;

use super::metrics::{Answered, DnsMetrics, Plugin, Recorder};
use super::request::{self, Parsed};
use super::{Answerer, Reply};
use crate::client_slots::{ClientSlot, ClientSlots};

/// Connections served at once; more are closed as soon as they are accepted.
pub const MAX_CONNECTIONS: usize = 256;
/// Connections one client address may hold at once, so one pod cannot take every
/// slot; more from it are closed as soon as they are accepted.
pub const MAX_PER_CLIENT: usize = 16;
/// How long one connection may live, however busy: a client holding a slot with a
/// question every few seconds gives it back (it reconnects, RFC 7766 allows closing).
const LIFETIME: Duration = Duration::from_secs(120);
/// How long a connection may wait for its next question.
const IDLE: Duration = Duration::from_secs(10);
/// How long reading one question, or writing one answer, may take.
const IO: Duration = Duration::from_secs(5);
/// Pause after a failed accept (e.g. out of file descriptors), so it is not a spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(10);

/// What every connection of one listener shares.
pub struct TcpServer {
    pub answerer: Arc<Answerer>,
    pub metrics: Arc<DnsMetrics>,
    /// The address served (the `server` label).
    pub listen: SocketAddr,
}

impl TcpServer {
    /// Accepts on `listener` until `stop` fires (or is dropped); connections already
    /// open finish on their own (the client closes or goes idle).
    pub async fn serve(self: Arc<Self>, listener: TcpListener, mut stop: oneshot::Receiver<()>) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let clients = ClientSlots::new(MAX_PER_CLIENT);
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => match (clients.take(peer.ip()), slots.clone().try_acquire_owned()) {
                        (Some(client), Ok(slot)) => {
                            let server = self.clone();
                            tokio::spawn(async move {
                                server.connection(stream, peer, (slot, client)).await
                            });
                        }
                        (None, _) => debug!(%peer, "too many DNS TCP connections from this client; closing this one"),
                        (_, Err(_)) => debug!(%peer, "too many DNS TCP connections; closing this one"),
                    },
                    Err(e) => {
                        debug!(error = %e, "DNS TCP accept failed");
                        tokio::time::sleep(ACCEPT_RETRY).await;
                    }
                },
                _ = &mut stop => return,
            }
        }
    }

    /// Questions and answers on one connection, in order, until it closes, idles
    /// or misbehaves.
    async fn connection(
        &self,
        mut stream: TcpStream,
        peer: SocketAddr,
        _slots: (OwnedSemaphorePermit, ClientSlot),
    ) {
        let mut recorder = self.metrics.recorder(self.listen, "tcp");
        let mut out = Vec::with_capacity(1500);
        let end = Instant::now() + LIFETIME;
        loop {
            let mut len = [0u8; 2];
            let wait = IDLE.min(end.saturating_duration_since(Instant::now()));
            if !matches!(
                tokio::time::timeout(wait, stream.read_exact(&mut len)).await,
                Ok(Ok(_))
            ) {
                return;
            }
            let mut packet = vec![0u8; usize::from(u16::from_be_bytes(len))];
            if !matches!(
                tokio::time::timeout(IO, stream.read_exact(&mut packet)).await,
                Ok(Ok(_))
            ) {
                return;
            }
            let started = Instant::now();
            let answered = match request::parse(&packet, &mut out) {
                Parsed::Ignored => return,
                Parsed::Refused => true,
                Parsed::Query { message, edns } => {
                    self.answer(
                        &message,
                        edns.as_ref(),
                        peer,
                        started,
                        &mut recorder,
                        &mut out,
                    )
                    .await
                }
            };
            if !answered || !write(&mut stream, &out).await {
                return;
            }
        }
    }

    /// Encodes the answer to `message` into `out` (no size limit over TCP).
    async fn answer(
        &self,
        message: &hickory_server::proto::op::Message,
        edns: Option<&hickory_server::proto::op::Edns>,
        peer: SocketAddr,
        started: Instant,
        recorder: &mut Recorder,
        out: &mut Vec<u8>,
    ) -> bool {
        let Some(query) = message.queries.first() else {
            return false;
        };
        // An accepted connection completed a handshake: its source is not spoofed.
        let client = self.answerer.client(peer.ip(), None);
        let (records, plugin) = match self.answerer.answer(query, &client) {
            Reply::Now(records) => {
                let plugin = super::plugin_of(&records);
                (records, plugin)
            }
            Reply::Forward => (self.answerer.forward(query).await, Plugin::Forward),
        };
        let encoded = request::encode(&message.metadata, query, edns, &records, u16::MAX, out);
        recorder.record(&Answered {
            client: peer,
            id: message.metadata.id,
            name: query.name(),
            qtype: u16::from(query.query_type()),
            rcode: u16::from(records.rcode),
            plugin,
            size: out.len(),
            started,
        });
        encoded
    }
}

/// Writes one length-prefixed message; `false` if the client does not take it.
async fn write(stream: &mut TcpStream, message: &[u8]) -> bool {
    let Ok(len) = u16::try_from(message.len()) else {
        return false;
    };
    let sent = async {
        stream.write_all(&len.to_be_bytes()).await?;
        stream.write_all(message).await
    };
    matches!(tokio::time::timeout(IO, sent).await, Ok(Ok(())))
}
