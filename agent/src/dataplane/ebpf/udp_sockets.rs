//! Connected UDP sockets whose backend stopped serving. The socket hooks translate
//! a connected UDP socket once, at `connect()`, so it keeps sending to that backend
//! after the backend is gone, where iptables mode would move the flow by deleting
//! its conntrack entry. After each sync (and every full one, the first after a
//! restart included) Ferry terminates such sockets, with the same rule and the same
//! frontends as the conntrack reconcile ([`UdpFrontends`]): the owner's pending and
//! next calls fail with ECONNABORTED, and a client that reconnects gets a serving
//! backend, as Cilium does.
//!
//! How: sock_diag's SOCK_DESTROY (`CONFIG_INET_DIAG_DESTROY`, the kernel's
//! interface for `ss -K`, Linux 4.5+) rather than `bpf_sock_destroy` from a socket
//! iterator (Linux 6.5+, Cilium's way), because aya 0.14 cannot relocate kfunc
//! calls; SOCK_DESTROY also works on every kernel eBPF mode supports. sock_diag
//! answers per network namespace, so every namespace holding a process of the
//! attached cgroup is visited; a socket is terminated only if the reverse map says
//! the hooks translated it (its cookie and its peer), so sockets connected to a
//! pod IP directly are never touched.

mod sock_diag;

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, MapData};
use ferry_common::{FAMILY_V4, FAMILY_V6, ReverseKey, ReverseValue, maps};
use netlink_packet_sock_diag::constants::AF_INET;
use tracing::{debug, info, warn};

use self::sock_diag::{FAMILIES, SockDiag, UdpSocket};
use super::kernel::open;
use super::layout::{addr_words, words_addr};
use super::state::MapError;
use crate::dataplane::udp_frontends::UdpFrontends;
use crate::model::{Endpoint, NodePlan, PlanDiff};

/// At most this many cgroups are walked per reconcile (a bound on the work a
/// runaway cgroup tree can cause; a node has a few hundred).
const MAX_CGROUPS: usize = 65_536;

/// Terminates the connected UDP sockets of stale translations.
pub struct UdpSocketReaper {
    cgroup: PathBuf,
    reverse: HashMap<MapData, ReverseKey, ReverseValue>,
    /// The kernel lacks SOCK_DESTROY (said once; nothing is tried again).
    unsupported: bool,
}

impl UdpSocketReaper {
    /// Opens the pinned reverse map the hooks record translations in.
    pub fn open(cgroup: &Path, pin_dir: &Path) -> Result<Self, MapError> {
        Ok(Self {
            cgroup: cgroup.to_path_buf(),
            reverse: open(pin_dir, &maps::REVERSE)?,
            unsupported: false,
        })
    }

    /// Terminates the sockets a sync of `diff` (all of `plan` when `full`) left
    /// stale; returns how many. Failures are logged, never fatal: a stale socket
    /// only keeps a client on a dead backend until it reconnects by itself.
    pub fn reconcile(&mut self, plan: &NodePlan, diff: &PlanDiff, full: bool) -> u64 {
        let frontends = UdpFrontends::of(plan, diff, full);
        if frontends.is_empty() || self.unsupported {
            return 0;
        }
        let mut terminated = 0;
        let namespaces = namespaces(&self.cgroup);
        for netns in &namespaces {
            match self.reconcile_namespace(netns, &frontends) {
                Ok(n) => terminated += n,
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    warn!(
                        "this kernel cannot destroy sockets (CONFIG_INET_DIAG_DESTROY): connected UDP sockets stay on removed backends until their owners reconnect"
                    );
                    self.unsupported = true;
                    break;
                }
                // The process went away between listing and opening.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    warn!(netns = %netns.display(), error = %e, "cannot reconcile connected UDP sockets")
                }
            }
        }
        if terminated > 0 {
            info!(
                terminated,
                namespaces = namespaces.len(),
                "connected UDP sockets to backends that stopped serving terminated"
            );
        } else {
            debug!(
                namespaces = namespaces.len(),
                "connected UDP sockets reconciled"
            );
        }
        terminated
    }

    fn reconcile_namespace(&self, netns: &Path, frontends: &UdpFrontends) -> io::Result<u64> {
        let mut diag = SockDiag::open_in(netns)?;
        let mut terminated = 0;
        for family in FAMILIES {
            for socket in diag.connected_udp(family)? {
                let translated = self.reverse.get(&reverse_key(&socket), 0);
                if let Ok(service) = translated
                    && is_stale(&socket, &service, frontends)
                {
                    diag.destroy(&socket)?;
                    terminated += 1;
                }
            }
        }
        Ok(terminated)
    }
}

/// The reverse-map key the hooks wrote for this socket (its cookie and the peer
/// they translated it to, in the socket's own family).
fn reverse_key(socket: &UdpSocket) -> ReverseKey {
    let peer = socket.peer();
    let (addr, _) = addr_words(peer.ip());
    ReverseKey {
        cookie: socket.cookie(),
        addr,
        port: peer.port().to_be(),
        family: if socket.family == AF_INET {
            FAMILY_V4
        } else {
            FAMILY_V6
        },
        _pad: [0; 5],
    }
}

/// Whether a socket the hooks translated from `service` to its peer is stale.
fn is_stale(socket: &UdpSocket, service: &ReverseValue, frontends: &UdpFrontends) -> bool {
    let ip = words_addr(service.addr, service.family).to_canonical();
    let peer = socket.peer();
    let backend = Endpoint {
        ip: peer.ip().to_canonical(),
        port: peer.port(),
    };
    frontends.is_stale_translation(ip, u16::from_be(service.port), &backend)
}

/// One `/proc/PID/ns/net` per network namespace holding a process of `cgroup` or
/// of a cgroup below it.
fn namespaces(cgroup: &Path) -> Vec<PathBuf> {
    let mut seen = HashSet::new();
    let mut found = Vec::new();
    let mut dirs = vec![cgroup.to_path_buf()];
    let mut walked = 0;
    while let Some(dir) = dirs.pop() {
        walked += 1;
        if walked > MAX_CGROUPS {
            warn!(cgroup = %cgroup.display(), "more than {MAX_CGROUPS} cgroups; the rest are not looked at for stale UDP sockets");
            break;
        }
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines() {
            let netns = PathBuf::from(format!("/proc/{pid}/ns/net"));
            if let Ok(meta) = std::fs::metadata(&netns)
                && seen.insert((meta.dev(), meta.ino()))
            {
                found.push(netns);
            }
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let children = entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()));
        dirs.extend(children.map(|e| e.path()));
    }
    found
}

#[cfg(test)]
mod tests {
    use netlink_packet_sock_diag::constants::AF_INET6;
    use netlink_packet_sock_diag::inet::SocketId;

    use super::*;
    use crate::dataplane::ebpf::layout::frontend_key;
    use crate::dataplane::udp_frontends::test_support::{all, node_plan, plan};
    use crate::model::Protocol;

    fn connected(family: u8, peer: &str, port: u16) -> UdpSocket {
        let mut id = if family == AF_INET {
            SocketId::new_v4()
        } else {
            SocketId::new_v6()
        };
        id.destination_address = peer.parse().unwrap();
        id.destination_port = port;
        id.cookie = [1, 0, 0, 0, 2, 0, 0, 0];
        UdpSocket { family, id }
    }

    /// The service address as the hooks record it.
    fn service(ip: &str, port: u16) -> ReverseValue {
        let key = frontend_key(ip.parse().unwrap(), port, 17);
        ReverseValue {
            addr: key.addr,
            port: key.port,
            family: key.family,
            _pad: 0,
        }
    }

    #[test]
    fn the_key_is_the_one_the_hooks_write() {
        let socket = connected(AF_INET, "10.0.0.2", 5353);
        let key = reverse_key(&socket);
        let backend = frontend_key("10.0.0.2".parse().unwrap(), 5353, 17);
        assert_eq!(key.cookie, 2 << 32 | 1, "low half first");
        assert_eq!(
            (key.addr, key.port, key.family),
            (backend.addr, backend.port, FAMILY_V4)
        );
        let mapped = reverse_key(&connected(AF_INET6, "::ffff:10.0.0.2", 5353));
        assert_eq!(
            mapped.family, FAMILY_V6,
            "a dual-stack socket keeps its family"
        );
    }

    #[test]
    fn sockets_on_backends_that_stopped_serving_are_stale() {
        let node = node_plan(vec![plan(Protocol::Udp, &["10.0.0.2"])]);
        let f = all(&node);
        let dns = service("10.96.0.10", 53);
        assert!(is_stale(&connected(AF_INET, "10.0.0.1", 5353), &dns, &f));
        assert!(!is_stale(&connected(AF_INET, "10.0.0.2", 5353), &dns, &f));
        let mapped = service("::ffff:10.96.0.10", 53);
        assert!(
            is_stale(&connected(AF_INET6, "::ffff:10.0.0.1", 5353), &mapped, &f),
            "IPv4 service through a mapped address"
        );
        assert!(!is_stale(
            &connected(AF_INET6, "::ffff:10.0.0.2", 5353),
            &mapped,
            &f
        ));
        let other = service("10.96.0.99", 53);
        assert!(
            !is_stale(&connected(AF_INET, "10.0.0.1", 5353), &other, &f),
            "not reconciled"
        );
    }
}
