//! The DNS server's sockets, per listen address: bound fresh, adopted from the agent
//! that ran before (see [`super::handover`]), or stopped and handed to the next one.
//! Addresses come and go while the server runs (in iptables mode the kube-dns
//! ClusterIP is learned from the cluster).

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;
use tracing::info;

use super::udp::{self, Workers};
use super::{Answerer, tcp};

/// One listen address's sockets: a SO_REUSEPORT UDP socket per worker thread and
/// one TCP listener.
pub struct Sockets {
    pub udp: Vec<UdpSocket>,
    pub tcp: TcpListener,
}

impl Sockets {
    /// Binds `addr` (UDP once per worker, so the kernel spreads queries).
    pub fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(8);
        let udp = (0..workers)
            .map(|_| udp::reuseport_socket(addr))
            .collect::<std::io::Result<_>>()?;
        let tcp = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        tcp.set_reuse_address(true)?;
        tcp.bind(&addr.into())?;
        tcp.listen(1024)?;
        Ok(Self {
            udp,
            tcp: tcp.into(),
        })
    }
}

/// A running listener.
struct Listener {
    udp: Vec<Arc<UdpSocket>>,
    /// A duplicate of the descriptor hickory-server accepts on, kept for a handover.
    tcp: TcpListener,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    tcp_stop: Option<oneshot::Sender<()>>,
}

impl Listener {
    /// Stops reading (every question already read is still answered) and returns the
    /// sockets, still bound and with whatever the kernel has queued on them.
    fn stop(mut self) -> Sockets {
        self.stop.store(true, Ordering::Release);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        if let Some(stop) = self.tcp_stop.take() {
            let _ = stop.send(());
        }
        Sockets {
            udp: self
                .udp
                .into_iter()
                .filter_map(|s| s.try_clone().ok())
                .collect(),
            tcp: self.tcp,
        }
    }
}

/// The DNS server: its listeners and what they answer with.
pub struct DnsServer {
    answerer: Arc<Answerer>,
    metrics: Arc<super::metrics::DnsMetrics>,
    rate_limit: Option<Arc<super::rate_limit::RateLimit>>,
    cache: Arc<super::wire_cache::WireCache>,
    runtime: tokio::runtime::Handle,
    in_flight: Arc<AtomicUsize>,
    active: Mutex<BTreeMap<SocketAddr, Listener>>,
    /// Set once the sockets went to a successor: this server binds nothing again.
    retired: AtomicBool,
    /// Set while this server waits to take a predecessor's sockets.
    taking_over: AtomicBool,
}

impl DnsServer {
    /// A server with no listeners yet.
    pub fn new(
        answerer: Arc<Answerer>,
        runtime: tokio::runtime::Handle,
        metrics: Arc<super::metrics::DnsMetrics>,
        rate_limit: Option<super::rate_limit::RateLimit>,
    ) -> Arc<Self> {
        Arc::new(Self {
            answerer,
            metrics,
            rate_limit: rate_limit.map(Arc::new),
            cache: udp::wire_cache(),
            runtime,
            in_flight: Arc::new(AtomicUsize::new(0)),
            active: Mutex::new(BTreeMap::new()),
            retired: AtomicBool::new(false),
            taking_over: AtomicBool::new(false),
        })
    }

    /// What the server answers with (`ferry inspect dns` asks it too).
    pub fn answerer(&self) -> &Arc<Answerer> {
        &self.answerer
    }

    /// Serves `addr` on freshly bound sockets, unless it is served already (or the
    /// sockets went to a successor).
    pub fn listen(&self, addr: SocketAddr) -> std::io::Result<()> {
        if self.serves(addr) || self.is_retired() {
            return Ok(());
        }
        self.adopt(addr, Sockets::bind(addr)?)
    }

    /// Whether `addr` has a listener.
    pub fn serves(&self, addr: SocketAddr) -> bool {
        self.lock().contains_key(&addr)
    }

    /// The addresses served.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.lock().keys().copied().collect()
    }

    /// Serves `addr` on `sockets` (bound here or handed over by the agent before).
    pub fn adopt(&self, addr: SocketAddr, sockets: Sockets) -> std::io::Result<()> {
        let udp: Vec<Arc<UdpSocket>> = sockets.udp.into_iter().map(Arc::new).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let workers = Workers {
            answerer: self.answerer.clone(),
            cache: self.cache.clone(),
            runtime: self.runtime.clone(),
            stop: stop.clone(),
            in_flight: self.in_flight.clone(),
            metrics: self.metrics.clone(),
            listen: addr,
            rate_limit: self.rate_limit.clone(),
        };
        let threads = udp::spawn_workers(&udp, &workers)?;
        let tcp_stop = self.serve_tcp(addr, sockets.tcp.try_clone()?)?;
        info!(listen = %addr, "serving DNS");
        let listener = Listener {
            udp,
            tcp: sockets.tcp,
            stop,
            threads,
            tcp_stop: Some(tcp_stop),
        };
        if let Some(old) = self.lock().insert(addr, listener) {
            old.stop();
        }
        Ok(())
    }

    /// TCP (see [`tcp::TcpServer`]) until the returned sender fires (or is dropped).
    fn serve_tcp(
        &self,
        addr: SocketAddr,
        listener: TcpListener,
    ) -> std::io::Result<oneshot::Sender<()>> {
        listener.set_nonblocking(true)?;
        let _entered = self.runtime.enter();
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let server = Arc::new(tcp::TcpServer {
            answerer: self.answerer.clone(),
            metrics: self.metrics.clone(),
            listen: addr,
        });
        let (stop, stopped) = oneshot::channel::<()>();
        self.runtime.spawn(server.serve(listener, stopped));
        Ok(stop)
    }

    /// Stops serving `addr` and closes its sockets.
    pub fn close(&self, addr: SocketAddr) {
        let removed = self.lock().remove(&addr);
        if let Some(listener) = removed {
            drop(listener.stop());
            info!(listen = %addr, "stopped serving DNS");
        }
    }

    /// Duplicates of every listener's sockets, for the next agent, while this server
    /// keeps reading them: both processes read the same sockets for a moment (each
    /// datagram reaches one of them, and each answers what it read), so there is no
    /// gap in which the receive queues could overflow. See [`Self::retire`].
    pub fn sockets_for_successor(&self) -> std::io::Result<Vec<(SocketAddr, Sockets)>> {
        self.lock()
            .iter()
            .map(|(addr, l)| {
                let udp = l
                    .udp
                    .iter()
                    .map(|s| s.try_clone())
                    .collect::<std::io::Result<_>>()?;
                Ok((
                    *addr,
                    Sockets {
                        udp,
                        tcp: l.tcp.try_clone()?,
                    },
                ))
            })
            .collect()
    }

    /// The successor has the sockets: stop reading them (answering what was read)
    /// and never bind again.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        let active = std::mem::take(&mut *self.lock());
        for (_, listener) in active {
            drop(listener.stop());
        }
    }

    /// Whether the sockets went to a successor.
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// Marks the wait for a predecessor's sockets (`true`) and its end.
    pub fn set_taking_over(&self, waiting: bool) {
        self.taking_over.store(waiting, Ordering::Release);
    }

    /// Whether the listeners are not this server's to change: it waits for a
    /// predecessor's sockets, or gave its own to a successor.
    pub fn is_settled_elsewhere(&self) -> bool {
        self.is_retired() || self.taking_over.load(Ordering::Acquire)
    }

    /// Questions read but still waiting for an upstream answer.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<SocketAddr, Listener>> {
        self.active.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
