//! The pod server: answers every TCP request line and UDP datagram with the pod's
//! identity (`NAME PORT`), a `whoami` request with the identity and the source
//! address the server saw (`NAME PORT from IP`, so a test can tell SNAT from a
//! preserved client address), and HTTP requests (keep-alive) with an HTTP response
//! whose body is the pod name. Async (one thread), so it is cheap per connection and does
//! not limit the benchmarks more than a real server would.

use std::io::Write as _;
use std::net::SocketAddr;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// Serves until killed. Prints `ready` once every port listens.
pub fn serve(name: &str, tcp: &[u16], udp: &[u16]) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for &port in tcp {
            // One IPv6 wildcard socket serves both families (bindv6only is off).
            let listener = TcpListener::bind(("::", port)).await?;
            let identity = format!("{name} {port}\n");
            let body = format!("{name}\n");
            tasks.push(tokio::spawn(async move {
                loop {
                    let Ok((conn, peer)) = listener.accept().await else {
                        continue;
                    };
                    let _ = conn.set_nodelay(true);
                    tokio::spawn(handle(conn, peer, identity.clone(), body.clone()));
                }
            }));
        }
        for &port in udp {
            let socket = UdpSocket::bind(("::", port)).await?;
            let identity = format!("{name} {port}\n");
            tasks.push(tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                loop {
                    if let Ok((n, from)) = socket.recv_from(&mut buf).await {
                        let reply = if is_whoami(&buf[..n]) {
                            with_source(&identity, from)
                        } else {
                            identity.clone()
                        };
                        let _ = socket.send_to(reply.as_bytes(), from).await;
                    }
                }
            }));
        }
        println!("ready");
        let _ = std::io::stdout().flush();
        for task in tasks {
            let _ = task.await;
        }
        Ok(())
    })
}

/// The request asking for the source address too.
const WHOAMI: &[u8] = b"whoami";

fn is_whoami(request: &[u8]) -> bool {
    request.trim_ascii() == WHOAMI
}

/// `NAME PORT from IP`: the identity and the source address as the server saw it
/// (IPv4 clients of the dual-stack socket shown as plain IPv4).
fn with_source(identity: &str, peer: SocketAddr) -> String {
    format!(
        "{} from {}\n",
        identity.trim_end(),
        peer.ip().to_canonical()
    )
}

async fn handle(conn: TcpStream, peer: SocketAddr, identity: String, body: String) {
    let (read, mut write) = conn.into_split();
    let mut reader = BufReader::new(read);
    let mut line = String::new();
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    loop {
        line.clear();
        match reader.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let whoami;
        let reply = if is_whoami(line.as_bytes()) {
            whoami = with_source(&identity, peer);
            whoami.as_bytes()
        } else if line.starts_with("GET ") || line.starts_with("HEAD ") {
            // Skip the request headers.
            loop {
                line.clear();
                match reader.read_line(&mut line).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) if line == "\r\n" || line == "\n" => break,
                    Ok(_) => {}
                }
            }
            response.as_bytes()
        } else {
            identity.as_bytes()
        };
        if write.write_all(reply).await.is_err() {
            return;
        }
    }
}
