//! The manifest directory under hostile or unlucky conditions: files that are not
//! files, files too big to read, an alias bomb, a file caught mid-write, the whole
//! directory going away. The source is the same in every mode, so these run in the
//! default (eBPF) mode only; each asserts what a client sees.

use std::io::Write as _;
use std::time::Duration;

use ferry_tests::cluster::poll;
use ferry_tests::manifests::{Service, docs, ep, port, slice};
use ferry_tests::{Cluster, From, Mode};

const WAIT: Duration = Duration::from_secs(30);

/// A service `name` on `ip`:80, backed by pod a's 8080.
fn service(c: &Cluster, name: &str, ip: &str) -> String {
    docs(&[
        Service::new(name)
            .cluster_ip(ip)
            .port(port("http", "TCP", 80))
            .yaml(),
        slice(
            &format!("{name}-1"),
            name,
            "IPv4",
            &[port("http", "TCP", 8080)],
            &[ep(&c.pod("a").ip)],
        ),
    ])
}

fn connects(c: &Cluster, ip: &str) -> bool {
    c.tcp(From::Pod("client"), &format!("{ip}:80"), 2)
        .successes()
        == 2
}

/// No connection to `ip`:80 gets through (refused, unreachable or timed out).
fn fails(c: &Cluster, ip: &str) -> bool {
    c.tcp_with(From::Pod("client"), &format!("{ip}:80"), 1, 1000, 0)
        .successes()
        == 0
}

/// The agent's peak resident memory, in MiB.
fn peak_rss_mib(c: &Cluster) -> f64 {
    let pid = c.agent_pid().expect("agent running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmHWM");
    kib / 1024.0
}

/// Ten levels of ten aliases each: 10^10 nodes if expanded.
fn alias_bomb() -> String {
    let mut bomb = String::from(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: bomb\n  annotations:\n    a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n",
    );
    for i in 1..10 {
        let refs = vec![format!("*a{}", i - 1); 10].join(", ");
        bomb.push_str(&format!("    a{i}: &a{i} [{refs}]\n"));
    }
    bomb.push_str("spec: {clusterIP: 10.96.0.79, ports: [{port: 80}]}\n");
    bomb
}

/// FIFOs, devices, symlink loops, a 100 MB file and an alias bomb never block or
/// bloat the watcher: the good services work, later changes still arrive, and the
/// agent's peak RSS stays under 256 MB.
#[test]
fn hostile_files_in_the_manifest_directory_are_skipped() {
    let mut c = Cluster::new(Mode::Ebpf, &["a", "client"]);
    let dir = c.manifest_dir();
    c.write_manifest("good.yaml", &service(&c, "good", "10.96.0.70"));
    let fifo = |name: &str| {
        nix::unistd::mkfifo(&dir.join(name), nix::sys::stat::Mode::S_IRWXU).expect("mkfifo")
    };
    fifo("fifo.yaml");
    std::os::unix::fs::symlink("/dev/zero", dir.join("zero.yaml")).expect("symlink");
    std::os::unix::fs::symlink(dir.join("loop.yaml"), dir.join("loop.yaml")).expect("symlink");
    let mut big = std::fs::File::create(dir.join("big.yaml")).expect("big file");
    let filler = "# filler line of a file far too big to be a manifest\n".repeat(20_000);
    while big.metadata().expect("stat").len() < 100 << 20 {
        big.write_all(filler.as_bytes()).expect("write");
    }
    drop(big);
    c.write_manifest("bomb.yaml", &alias_bomb());
    c.start_agent();
    assert!(
        connects(&c, "10.96.0.70"),
        "a good file next to hostile ones"
    );

    // Events about hostile files must not stall the watcher either.
    fifo("fifo-late.yaml");
    std::os::unix::fs::symlink("/dev/urandom", dir.join("random.yaml")).expect("symlink");
    c.write_manifest("late.yaml", &service(&c, "late", "10.96.0.71"));
    assert!(
        poll(WAIT, || connects(&c, "10.96.0.71")),
        "a change after the hostile files is applied"
    );
    let logged = |name: &str, what: &str| {
        c.agent_log()
            .lines()
            .any(|l| l.contains(name) && l.contains(what))
    };
    assert!(
        logged("bomb.yaml", "skipping invalid document"),
        "the alias bomb is refused as invalid:\n{}",
        c.agent_log()
    );
    // Those there at start at once; the later ones by the next rescan.
    for name in [
        "fifo.yaml",
        "zero.yaml",
        "loop.yaml",
        "big.yaml",
        "fifo-late.yaml",
        "random.yaml",
    ] {
        assert!(
            poll(WAIT, || logged(name, "cannot read manifest file")),
            "{name} is named in a log line:\n{}",
            c.agent_log()
        );
    }
    let rss = peak_rss_mib(&c);
    assert!(rss < 256.0, "peak RSS {rss:.0} MiB");
}

/// A file rewritten slowly in place is read when its writer is done, not while it
/// holds only part of what it defines: nothing the file defines disappears meanwhile.
#[test]
fn a_file_being_written_is_not_applied_half() {
    let mut c = Cluster::new(Mode::Ebpf, &["a", "client"]);
    let both = format!(
        "{}---\n{}",
        service(&c, "first", "10.96.0.72"),
        service(&c, "second", "10.96.0.73")
    );
    c.write_manifest("two.yaml", &both);
    c.start_agent();
    assert!(connects(&c, "10.96.0.72") && connects(&c, "10.96.0.73"));

    // Rewrite it: the first service, a document boundary, then a pause with the
    // file still open and still being appended to (comments only).
    let path = c.manifest_dir().join("two.yaml");
    let mut file = std::fs::File::create(&path).expect("rewrite");
    let first = service(&c, "first", "10.96.0.72");
    file.write_all(format!("{first}---\n").as_bytes())
        .expect("write");
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(300));
        file.write_all(b"# still writing\n").expect("write");
        assert!(
            connects(&c, "10.96.0.73"),
            "the second service stays while the file is being written"
        );
    }
    file.write_all(service(&c, "second", "10.96.0.74").as_bytes())
        .expect("write");
    drop(file);
    assert!(
        poll(WAIT, || connects(&c, "10.96.0.74")),
        "the finished file is applied"
    );
    assert!(connects(&c, "10.96.0.72"));
}

/// The directory going away is a source outage (as an API server outage): what it
/// defined stays programmed; when it is back, its new content applies.
#[test]
fn a_vanished_manifest_directory_keeps_the_last_state() {
    let mut c = Cluster::new(Mode::Ebpf, &["a", "client"]);
    c.write_manifest("web.yaml", &service(&c, "web", "10.96.0.75"));
    c.start_agent();
    assert!(connects(&c, "10.96.0.75"));
    let dir = c.manifest_dir();
    std::fs::remove_dir_all(&dir).expect("remove the directory");
    assert!(
        poll(WAIT, || c
            .agent_log()
            .contains("manifest directory is gone")),
        "the outage is logged"
    );
    assert!(
        connects(&c, "10.96.0.75"),
        "still programmed during the outage"
    );

    std::fs::create_dir_all(&dir).expect("recreate");
    c.write_manifest("web.yaml", &service(&c, "web", "10.96.0.76"));
    assert!(
        poll(WAIT, || connects(&c, "10.96.0.76")),
        "the directory's new content applies"
    );
    assert!(
        poll(WAIT, || fails(&c, "10.96.0.75")),
        "and replaces the old"
    );
    c.write_manifest("more.yaml", &service(&c, "more", "10.96.0.77"));
    assert!(
        poll(WAIT, || connects(&c, "10.96.0.77")),
        "watched again after the outage"
    );
}
