//! Cluster DNS end to end: the agent serves DNS on the node address; `dig` in a pod
//! (a real resolver client) asks over UDP and TCP; names outside the cluster go to an
//! upstream server the test runs itself on the external client's address.

use std::process::{Child, Stdio};
use std::time::Duration;

use ferry_tests::cluster::{EXT_IP, NODE_IP};
use ferry_tests::dig::{self, DigAnswer};
use ferry_tests::manifests::{Endpoint, Service, docs, ep, port, slice};
use ferry_tests::{Cluster, From, Mode};

const UPSTREAM: &str = "172.18.0.100:53";

/// A node serving DNS, with a test upstream that knows `outside.test`.
struct DnsNode {
    c: Cluster,
    upstream: Child,
    upstream_log: std::path::PathBuf,
}

impl Drop for DnsNode {
    fn drop(&mut self) {
        let _ = self.upstream.kill();
        let _ = self.upstream.wait();
        let _ = std::fs::remove_file(&self.upstream_log);
    }
}

impl DnsNode {
    fn start(manifests: &[(&str, String)], upstream_delay_ms: u64) -> Self {
        let mut c = Cluster::new(Mode::Iptables, &["a", "b", "client"]);
        for (file, yaml) in manifests {
            c.write_manifest(file, yaml);
        }
        let upstream_log = std::env::temp_dir().join(format!(
            "ferry-upstream-{}-{}.log",
            std::process::id(),
            c.id()
        ));
        let upstream = dig::start_upstream(
            c.ext_command(c.bin("ferry-probe"))
                .args([
                    "dns-upstream",
                    "--listen",
                    UPSTREAM,
                    "--answer",
                    "outside.test=192.0.2.80",
                    "--ttl",
                    "60",
                    "--delay-ms",
                    &upstream_delay_ms.to_string(),
                    "--log",
                ])
                .arg(&upstream_log),
        );
        c.start_agent_with(&[
            "--dns-listen",
            &format!("{NODE_IP}:53"),
            "--dns-upstream",
            UPSTREAM,
        ]);
        Self {
            c,
            upstream,
            upstream_log,
        }
    }

    fn dig(&self, name: &str, rtype: &str) -> DigAnswer {
        self.dig_with(name, rtype, &[])
    }

    fn dig_with(&self, name: &str, rtype: &str, extra: &[&str]) -> DigAnswer {
        dig::run(
            self.c.pod_command("client", "dig"),
            NODE_IP,
            name,
            rtype,
            extra,
        )
    }

    fn upstream_queries(&self, name: &str) -> usize {
        std::fs::read_to_string(&self.upstream_log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with(name))
            .count()
    }
}

fn cluster_manifests(c_pods: &[(&str, &str)]) -> Vec<(&'static str, String)> {
    let ports = [port("http", "TCP", 8080), port("", "TCP", 9000)];
    let eps: Vec<Endpoint> = c_pods
        .iter()
        .map(|(host, ip)| {
            let mut e = ep(ip);
            if !host.is_empty() {
                e.hostname = Some((*host).to_owned());
            }
            e
        })
        .collect();
    vec![
        (
            "web.yaml",
            docs(&[Service::new("web")
                .namespace("shop")
                .cluster_ip("10.96.0.10")
                .cluster_ip("fd00:96::10")
                .port(port("http", "TCP", 80))
                .port(port("metrics", "UDP", 9090))
                .yaml()]),
        ),
        (
            "db.yaml",
            docs(&[
                Service::new("db").cluster_ip("None").port(port("pg", "TCP", 5432)).yaml(),
                slice("db-1", "db", "IPv4", &[port("pg", "TCP", 5432)], &eps[..1]),
                slice("db-2", "db", "IPv4", &[port("pg", "TCP", 5432)], &eps[1..]),
            ]),
        ),
        (
            "empty.yaml",
            Service::new("nobody").cluster_ip("None").port(port("x", "TCP", 1)).yaml(),
        ),
        (
            "ext.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: search, namespace: default}\nspec: {type: ExternalName, externalName: search.example.com}\n".into(),
        ),
        (
            "aliases.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: alias-out, namespace: default}\nspec: {type: ExternalName, externalName: outside.test}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: alias-in, namespace: default}\nspec: {type: ExternalName, externalName: web.shop.svc.cluster.local}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: loop-a, namespace: default}\nspec: {type: ExternalName, externalName: loop-b.default.svc.cluster.local}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: loop-b, namespace: default}\nspec: {type: ExternalName, externalName: loop-a.default.svc.cluster.local}\n".into(),
        ),
        (
            "api.yaml",
            docs(&[
                Service::new("api").cluster_ip("10.96.0.30").port(port("http", "TCP", 80)).yaml(),
                slice("api-1", "api", "IPv4", &[port("http", "TCP", 8080)], &[ep("10.244.0.12")]),
            ]),
        ),
        (
            "unnamed.yaml",
            docs(&[
                Service::new("plain").cluster_ip("10.96.0.20").port(port("", "TCP", 9000)).yaml(),
                slice("plain-1", "plain", "IPv4", &ports[1..], &eps[..1]),
            ]),
        ),
    ]
}

fn node() -> DnsNode {
    DnsNode::start(
        &cluster_manifests(&[("db-0", "10.244.0.10"), ("", "10.244.0.11")]),
        0,
    )
}

#[test]
fn cluster_ip_records_over_udp_and_tcp() {
    let n = node();
    for transport in [&[][..], &["+tcp"][..]] {
        let a = n.dig_with("web.shop.svc.cluster.local", "A", transport);
        assert_eq!(a.status, "NOERROR", "{}", a.raw);
        assert!(a.has_flag("aa"), "{}", a.raw);
        assert_eq!(a.data("A"), ["10.96.0.10"], "{}", a.raw);
        assert_eq!(a.answer[0].ttl, 5, "default TTL 5s");
        let aaaa = n.dig_with("web.shop.svc.cluster.local", "AAAA", transport);
        assert_eq!(aaaa.data("AAAA"), ["fd00:96::10"], "{}", aaaa.raw);
    }
    let srv = n.dig("_http._tcp.web.shop.svc.cluster.local", "SRV");
    assert_eq!(
        srv.data("SRV"),
        ["0 100 80 web.shop.svc.cluster.local."],
        "{}",
        srv.raw
    );
    let mut extra: Vec<&str> = srv.additional.iter().map(|r| r.data.as_str()).collect();
    extra.sort();
    assert_eq!(
        extra,
        ["10.96.0.10", "fd00:96::10"],
        "SRV targets' addresses ride along: {}",
        srv.raw
    );
    let udp = n.dig("_metrics._udp.web.shop.svc.cluster.local", "SRV");
    assert_eq!(
        udp.data("SRV"),
        ["0 100 9090 web.shop.svc.cluster.local."],
        "{}",
        udp.raw
    );
    for (ptr, target) in [
        ("10.0.96.10.in-addr.arpa", "web.shop.svc.cluster.local."),
        (
            "0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.6.9.0.0.0.0.d.f.ip6.arpa",
            "web.shop.svc.cluster.local.",
        ),
    ] {
        let a = n.dig(ptr, "PTR");
        assert_eq!(a.data("PTR"), [target], "{}", a.raw);
    }
    let v = n.dig("dns-version.cluster.local", "TXT");
    assert_eq!(v.data("TXT"), ["\"1.1.0\""], "{}", v.raw);
}

#[test]
fn case_insensitive_and_echoes_the_question() {
    let n = node();
    let a = n.dig("WeB.ShOp.SvC.ClUsTeR.LoCaL", "A");
    assert_eq!(a.data("A"), ["10.96.0.10"], "{}", a.raw);
    assert_eq!(a.answer[0].name, "WeB.ShOp.SvC.ClUsTeR.LoCaL.", "{}", a.raw);
}

#[test]
fn nodata_and_nxdomain_carry_the_soa() {
    let n = node();
    let nodata = n.dig("web.shop.svc.cluster.local", "TXT");
    assert_eq!(nodata.status, "NOERROR", "{}", nodata.raw);
    assert!(nodata.answer.is_empty());
    assert_eq!(
        nodata.authority.first().map(|r| r.rtype.as_str()),
        Some("SOA"),
        "{}",
        nodata.raw
    );
    let nx = n.dig("nope.shop.svc.cluster.local", "A");
    assert_eq!(nx.status, "NXDOMAIN", "{}", nx.raw);
    assert_eq!(
        nx.authority.first().map(|r| r.rtype.as_str()),
        Some("SOA"),
        "{}",
        nx.raw
    );
    // Namespaces with services exist (empty non-terminal): NODATA, not NXDOMAIN.
    assert_eq!(n.dig("shop.svc.cluster.local", "A").status, "NOERROR");
    // An unnamed port has no SRV record.
    assert_eq!(
        n.dig("_.tcp.plain.default.svc.cluster.local", "SRV").status,
        "NXDOMAIN"
    );
    let plain = n.dig("plain.default.svc.cluster.local", "SRV");
    assert_eq!(plain.status, "NOERROR");
    assert!(plain.answer.is_empty(), "{}", plain.raw);
}

#[test]
fn headless_services() {
    let n = node();
    let a = n.dig("db.default.svc.cluster.local", "A");
    assert_eq!(
        a.data("A"),
        ["10.244.0.10", "10.244.0.11"],
        "both slices count: {}",
        a.raw
    );
    assert_eq!(
        n.dig("db-0.db.default.svc.cluster.local", "A").data("A"),
        ["10.244.0.10"]
    );
    assert_eq!(
        n.dig("10-244-0-11.db.default.svc.cluster.local", "A")
            .data("A"),
        ["10.244.0.11"]
    );
    let srv = n.dig("_pg._tcp.db.default.svc.cluster.local", "SRV");
    assert_eq!(
        srv.data("SRV"),
        [
            "0 50 5432 10-244-0-11.db.default.svc.cluster.local.",
            "0 50 5432 db-0.db.default.svc.cluster.local."
        ],
        "{}",
        srv.raw
    );
    assert_eq!(srv.additional.len(), 2, "{}", srv.raw);
    let ptr = n.dig("10.0.244.10.in-addr.arpa", "PTR");
    assert_eq!(
        ptr.data("PTR"),
        ["db-0.db.default.svc.cluster.local."],
        "{}",
        ptr.raw
    );
    let none = n.dig("nobody.default.svc.cluster.local", "A");
    assert_eq!(none.status, "NXDOMAIN", "no ready endpoints: {}", none.raw);
}

#[test]
fn external_name_is_a_cname() {
    let n = node();
    let a = n.dig("search.default.svc.cluster.local", "A");
    assert_eq!(a.data("CNAME"), ["search.example.com."], "{}", a.raw);
}

/// A query from a pod's address that arrives through the node's uplink is spoofed:
/// it is not forwarded (nothing is reflected at the pod), while the same question
/// from the pod itself is.
#[test]
fn pod_sources_arriving_from_outside_are_not_forwarded() {
    let n = node();
    let pod_ip = n.c.pod("client").ip.clone();
    let status =
        n.c.ext_command("ip")
            .args(["addr", "add", &format!("{pod_ip}/32"), "dev", "lo"])
            .status()
            .expect("ip addr add");
    assert!(status.success());
    let spoofed = dig::run(
        n.c.ext_command("dig"),
        NODE_IP,
        "spoofed.outside.test",
        "A",
        &["-b", &pod_ip, "+tries=1", "+time=2"],
    );
    assert!(
        spoofed.status.is_empty() || spoofed.status == "REFUSED",
        "{}",
        spoofed.raw
    );
    assert_eq!(
        n.upstream_queries("spoofed.outside.test."),
        0,
        "not forwarded"
    );
    assert_eq!(
        n.dig("spoofed.outside.test", "A").status,
        "NXDOMAIN",
        "the pod itself is"
    );
    assert_eq!(n.upstream_queries("spoofed.outside.test."), 1);
}

/// Over TCP too, a header claiming 65535 questions is refused before the message is
/// parsed (FORMERR at once), and the server keeps answering.
#[test]
fn tcp_questions_are_checked_before_parsing() {
    use std::io::{Read as _, Write as _};
    let n = node();
    let reply = n.c.in_pod("client", || {
        let addr: std::net::SocketAddr = format!("{NODE_IP}:53").parse().expect("address");
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let bomb = [0, 12, 0x12, 0x34, 0x01, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0, 0];
        s.write_all(&bomb).ok()?;
        let mut reply = [0u8; 14];
        s.read_exact(&mut reply).ok()?;
        Some(reply)
    });
    let reply = reply.expect("an answer over TCP");
    assert_eq!(&reply[2..4], &[0x12, 0x34], "the request's id");
    assert_eq!(reply[5] & 0x0f, 1, "FORMERR: {reply:?}");
    let a = n.dig_with("web.shop.svc.cluster.local", "A", &["+tcp"]);
    assert_eq!(a.data("A"), ["10.96.0.10"], "{}", a.raw);
}

/// One pod cannot take every DNS TCP slot: past 16 connections from one address the
/// server closes new ones at once, while another pod is still answered; once the
/// first pod lets go, it is answered again.
#[test]
fn one_client_cannot_hold_every_tcp_slot() {
    use std::io::Read as _;
    let n = node();
    let addr: std::net::SocketAddr = format!("{NODE_IP}:53").parse().expect("address");
    let (held, extra) =
        n.c.in_pod("client", move || {
            let connect = || std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5));
            let held: Vec<_> = (0..16).filter_map(|_| connect().ok()).collect();
            // The 17th is accepted by the kernel, then closed by the server unread.
            let mut extra = connect().ok()?;
            extra.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            // A read timeout (the connection still open) is not a close.
            let closed = match extra.read(&mut [0u8; 1]) {
                Ok(n) => n == 0,
                Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            };
            Some((held, closed))
        })
        .expect("connections from the client pod");
    assert_eq!(held.len(), 16);
    assert!(extra, "a 17th connection from one pod was kept open");
    let other = dig::run(
        n.c.pod_command("b", "dig"),
        NODE_IP,
        "web.shop.svc.cluster.local",
        "A",
        &["+tcp"],
    );
    assert_eq!(other.data("A"), ["10.96.0.10"], "{}", other.raw);
    drop(held);
    n.c.wait_for(
        "the client pod to be answered over TCP again",
        Duration::from_secs(10),
        || {
            n.dig_with("web.shop.svc.cluster.local", "A", &["+tcp"])
                .data("A")
                == ["10.96.0.10"]
        },
    );
}

/// CoreDNS resolves an ExternalName's target into the same answer (DNS spec 2.5):
/// through the zone for a cluster name, upstream for an outside one; a CNAME loop
/// between two ExternalNames ends.
#[test]
fn external_name_targets_are_resolved_in_the_same_answer() {
    let n = node();
    let out = n.dig("alias-out.default.svc.cluster.local", "A");
    assert_eq!(out.data("CNAME"), ["outside.test."], "{}", out.raw);
    assert_eq!(out.data("A"), ["192.0.2.80"], "{}", out.raw);
    let inside = n.dig("alias-in.default.svc.cluster.local", "A");
    assert_eq!(
        inside.data("CNAME"),
        ["web.shop.svc.cluster.local."],
        "{}",
        inside.raw
    );
    assert_eq!(inside.data("A"), ["10.96.0.10"], "{}", inside.raw);
    let looping = n.dig("loop-a.default.svc.cluster.local", "A");
    assert_eq!(looping.status, "NOERROR", "{}", looping.raw);
    assert!(looping.data("A").is_empty() && !looping.data("CNAME").is_empty());
}

/// `pods insecure` (kubeadm's Corefile): the address in the name.
#[test]
fn pod_names_answer_their_address() {
    let n = node();
    assert_eq!(
        n.dig("10-244-0-99.shop.pod.cluster.local", "A").data("A"),
        ["10.244.0.99"]
    );
    assert_eq!(
        n.dig("fd00-244--99.shop.pod.cluster.local", "AAAA")
            .data("AAAA"),
        ["fd00:244::99"]
    );
}

/// A pod's address has a PTR record when it backs any service, as CoreDNS answers.
#[test]
fn endpoints_of_cluster_ip_services_have_ptr_records() {
    let n = node();
    let ptr = n.dig("12.0.244.10.in-addr.arpa", "PTR");
    assert_eq!(
        ptr.data("PTR"),
        ["10-244-0-12.api.default.svc.cluster.local."],
        "{}",
        ptr.raw
    );
}

/// Multi-address answers come in turns (CoreDNS's `loadbalance`), also when they
/// are served from the encoded-answer cache.
#[test]
fn addresses_are_rotated_across_queries() {
    let n = node();
    let firsts: std::collections::BTreeSet<String> = (0..8)
        .filter_map(|_| {
            let a = n.dig("db.default.svc.cluster.local", "A");
            a.answer
                .iter()
                .find(|r| r.rtype == "A")
                .map(|r| r.data.clone())
        })
        .collect();
    assert_eq!(
        firsts.len(),
        2,
        "both endpoints come first in turn: {firsts:?}"
    );
}

/// DNS and the data plane never disagree: a new service's name answers only once its
/// ClusterIP connects, and a deleted service's name is gone before its ClusterIP stops
/// connecting, so a pod never resolves a name it cannot reach.
#[test]
fn a_name_resolves_only_while_its_service_connects() {
    let n = node();
    let name = "fresh.default.svc.cluster.local";
    assert_eq!(n.dig(name, "A").status, "NXDOMAIN");
    let a = n.c.pod("a").ip.clone();
    n.c.write_manifest(
        "fresh.yaml",
        &docs(&[
            Service::new("fresh")
                .cluster_ip("10.96.7.7")
                .port(port("http", "TCP", 80))
                .yaml(),
            slice(
                "fresh-1",
                "fresh",
                "IPv4",
                &[port("http", "TCP", 8080)],
                &[ep(&a)],
            ),
        ]),
    );
    let connects = || {
        n.c.tcp_with(From::Pod("client"), "10.96.7.7:80", 1, 300, 0)
            .successes()
            == 1
    };
    n.c.wait_for("the new name", Duration::from_secs(10), || {
        n.dig(name, "A").data("A") == ["10.96.7.7"]
    });
    assert!(
        connects(),
        "the name answered before its ClusterIP was programmed"
    );
    n.c.remove_manifest("fresh.yaml");
    n.c.wait_for("the ClusterIP gone", Duration::from_secs(10), || {
        !connects()
    });
    assert_eq!(
        n.dig(name, "A").status,
        "NXDOMAIN",
        "the ClusterIP stopped connecting while its name still answered"
    );
}

#[test]
fn large_headless_answers_truncate_over_udp_and_complete_over_tcp() {
    let eps: Vec<Endpoint> = (0..200)
        .map(|i| ep(&format!("10.244.{}.{}", 1 + i / 250, 1 + i % 250)))
        .collect();
    let manifests = vec![(
        "big.yaml",
        docs(&[
            Service::new("big")
                .cluster_ip("None")
                .port(port("p", "TCP", 80))
                .yaml(),
            slice("big-1", "big", "IPv4", &[port("p", "TCP", 80)], &eps),
        ]),
    )];
    let n = DnsNode::start(&manifests, 0);
    let udp = n.dig_with(
        "big.default.svc.cluster.local",
        "A",
        &["+ignore", "+bufsize=1232"],
    );
    assert!(udp.has_flag("tc"), "{}", udp.raw);
    assert!(udp.answer.len() < 200);
    let tcp = n.dig_with("big.default.svc.cluster.local", "A", &["+tcp"]);
    assert_eq!(tcp.answer.len(), 200, "{}", tcp.raw);
    // A client without EDNS gets at most 512 bytes.
    let small = n.dig_with(
        "big.default.svc.cluster.local",
        "A",
        &["+ignore", "+noedns"],
    );
    assert!(
        small.has_flag("tc") && small.answer.len() < 40,
        "{}",
        small.raw
    );
}

#[test]
fn forwards_and_caches_outside_names() {
    let n = node();
    let a = n.dig("outside.test", "A");
    assert_eq!(a.data("A"), ["192.0.2.80"], "{}", a.raw);
    assert!(!a.has_flag("aa"));
    let again = n.dig("OUTSIDE.test", "A");
    assert_eq!(again.data("A"), ["192.0.2.80"], "{}", again.raw);
    assert_eq!(
        n.upstream_queries("outside.test."),
        1,
        "the second answer comes from the cache"
    );
    // Negative answers are cached too (the upstream's SOA allows 30 s).
    assert_eq!(n.dig("missing.test", "A").status, "NXDOMAIN");
    assert_eq!(n.dig("missing.test", "A").status, "NXDOMAIN");
    assert_eq!(n.upstream_queries("missing.test."), 1);
}

#[test]
fn concurrent_identical_questions_reach_upstream_once() {
    let n = DnsNode::start(
        &cluster_manifests(&[("db-0", "10.244.0.10"), ("", "10.244.0.11")]),
        400,
    );
    let digs: Vec<_> = (0..8)
        .map(|_| {
            let mut cmd = n.c.pod_command("client", "dig");
            cmd.args([
                &format!("@{NODE_IP}"),
                // A bound, not a timing assertion: generous for a loaded CI machine.
                "+time=10",
                "+tries=1",
                "+short",
                "outside.test",
                "A",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("dig")
        })
        .collect();
    for d in digs {
        let out = d.wait_with_output().expect("dig");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "192.0.2.80");
    }
    assert_eq!(
        n.upstream_queries("outside.test."),
        1,
        "coalesced into one upstream query"
    );
}

#[test]
fn not_an_open_resolver_and_survives_garbage() {
    let n = node();
    // The external client may ask about the cluster but may not use the forwarder.
    let ext = dig::run(n.c.ext_command("dig"), NODE_IP, "outside.test", "A", &[]);
    assert_eq!(ext.status, "REFUSED", "{}", ext.raw);
    let ext = dig::run(
        n.c.ext_command("dig"),
        NODE_IP,
        "web.shop.svc.cluster.local",
        "A",
        &[],
    );
    assert_eq!(ext.data("A"), ["10.96.0.10"], "{}", ext.raw);
    assert_eq!(n.upstream_queries("outside.test."), 0);

    // Malformed packets: dropped or FORMERR, and the server keeps answering.
    let target: std::net::SocketAddr = format!("{NODE_IP}:53").parse().unwrap();
    n.c.in_pod("client", move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        for garbage in [
            &b"\x00"[..],
            &[0xffu8; 12][..],
            b"not dns at all, really not",
            &[0u8; 600][..],
        ] {
            let _ = s.send_to(garbage, target);
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        n.dig("web.shop.svc.cluster.local", "A").data("A"),
        ["10.96.0.10"]
    );
    let mut c = n;
    assert!(c.c.agent_alive());
    // The upstream is never anything but the test's own server.
    assert_eq!(UPSTREAM.split(':').next(), Some(EXT_IP));
}

/// RFC 6891: a query with an EDNS version other than 0 gets BADVERS (over UDP and
/// TCP), and version 0 is answered as usual.
#[test]
fn edns_version_other_than_0_gets_badvers() {
    let n = node();
    for transport in [&[][..], &["+tcp"][..]] {
        let mut args = vec!["+edns=1", "+noednsnegotiation"];
        args.extend_from_slice(transport);
        let a = n.dig_with("web.shop.svc.cluster.local", "A", &args);
        assert_eq!(a.status, "BADVERS", "{transport:?}: {}", a.raw);
        let mut args = vec!["+edns=0"];
        args.extend_from_slice(transport);
        let a = n.dig_with("web.shop.svc.cluster.local", "A", &args);
        assert_eq!(a.status, "NOERROR", "{transport:?}: {}", a.raw);
    }
}
