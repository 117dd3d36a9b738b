//! Synthetic clusters for the benchmarks: N services with E endpoints each, written as
//! manifests with the test harness's builders. Only the measured service points at a
//! real pod; the others point at addresses nobody dials, which is all the data plane
//! cares about.

use std::net::Ipv4Addr;

use ferry_tests::manifests::{Service, docs, ep, port, slice_in};

/// The measured service (always the last one, so rule walks show).
pub const MEASURED: &str = "measured";

/// ClusterIP of service `i`.
pub fn cluster_ip(i: usize) -> Ipv4Addr {
    let n = (10u32 << 24) | (96 << 16) | (i as u32 + 10);
    Ipv4Addr::from(n)
}

/// A fake endpoint address, unique per (service, index).
fn fake_endpoint(n: usize) -> Ipv4Addr {
    Ipv4Addr::from((10u32 << 24) | (128 << 16) | n as u32)
}

/// One service with a TCP (80 -> 8080) and a UDP (53 -> 5353) port, and its slice.
pub fn service(name: &str, ip: Ipv4Addr, endpoints: &[Ipv4Addr]) -> String {
    let svc = Service::new(name)
        .namespace("bench")
        .cluster_ip(&ip.to_string())
        .port(port("http", "TCP", 80))
        .port(port("dns", "UDP", 53));
    let endpoints: Vec<_> = endpoints.iter().map(|ip| ep(&ip.to_string())).collect();
    let slice = slice_in(
        "bench",
        &format!("{name}-1"),
        name,
        "IPv4",
        &[port("http", "TCP", 8080), port("dns", "UDP", 5353)],
        &endpoints,
    );
    docs(&[svc.yaml(), slice])
}

/// Manifest files for `services` services (the last one is [`MEASURED`], backed by
/// `real_backend`) with `per_service` endpoints each: (file name, contents).
pub fn manifests(
    services: usize,
    per_service: usize,
    real_backend: Ipv4Addr,
) -> Vec<(String, String)> {
    let mut files = Vec::new();
    let mut current = String::new();
    let mut in_file = 0;
    for i in 0..services.saturating_sub(1) {
        let eps: Vec<Ipv4Addr> = (0..per_service)
            .map(|j| fake_endpoint(i * per_service + j))
            .collect();
        if !current.is_empty() {
            current.push_str("---\n");
        }
        current.push_str(&service(&format!("svc-{i:05}"), cluster_ip(i), &eps));
        in_file += 1;
        if in_file == 500 {
            files.push((
                format!("bulk-{:03}.yaml", files.len()),
                std::mem::take(&mut current),
            ));
            in_file = 0;
        }
    }
    if !current.is_empty() {
        files.push((format!("bulk-{:03}.yaml", files.len()), current));
    }
    files.push((
        "measured.yaml".into(),
        service(
            MEASURED,
            cluster_ip(services.saturating_sub(1)),
            &[real_backend],
        ),
    ));
    files
}

/// Endpoints of the service the scale test keeps changing.
pub fn churn(per_service: usize, step: usize) -> String {
    let extra = step % 2;
    let eps: Vec<Ipv4Addr> = (0..per_service + extra)
        .map(|j| Ipv4Addr::new(10, 127, (j / 250) as u8, (j % 250 + 1) as u8))
        .collect();
    service("churn", Ipv4Addr::new(10, 97, 0, 1), &eps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_unique_and_measured_is_last() {
        assert_eq!(cluster_ip(0).to_string(), "10.96.0.10");
        assert_eq!(cluster_ip(9999).to_string(), "10.96.39.25");
        let files = manifests(1001, 3, Ipv4Addr::new(10, 244, 0, 10));
        assert_eq!(files.len(), 3);
        assert_eq!(files.last().unwrap().0, "measured.yaml");
        assert!(files.last().unwrap().1.contains("10.96.3.242"));
        assert_eq!(files[0].1.matches("kind: Service").count(), 500);
    }
}
