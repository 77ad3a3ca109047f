//! The listening socket, and serving one accepted connection.
//!
//! The socket is bound with the largest backlog the system allows: a storm
//! of thousands of clients connecting at once otherwise overflows the
//! accept queue, and each client whose SYN was dropped waits a second for
//! its retransmission.
//!
//! A client that opens with HTTP/2's
//! preface (h2c, as `examples/fairbench.rs` does) goes to hyper-util's auto
//! builder; every other one straight to hyper's HTTP/1 server.
//!
//! Why not the auto builder for all: it reads the first 24 bytes to tell
//! the versions apart and replays them to hyper as a first read of 24
//! bytes, after which hyper's next read grows the connection's 8 KiB read
//! buffer to 16 KiB — for every connection, including each of thousands of
//! requests parked in the queue. Peeking at the socket instead leaves the
//! bytes where they are.

use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};

/// The backlog asked for when the system's maximum cannot be read; the
/// kernel caps it at that maximum anyway.
const FALLBACK_BACKLOG: i32 = 65_535;

/// Binds `addr` for the proxy, with the system's maximum listen backlog.
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // As tokio's own bind: a restarted proxy rebinds while old connections linger.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(max_backlog())?;
    TcpListener::from_std(socket.into())
}

/// `net.core.somaxconn`, the largest backlog the kernel grants.
fn max_backlog() -> i32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|&n: &i32| n > 0)
        .unwrap_or(FALLBACK_BACKLOG)
}

/// HTTP/2's connection preface (RFC 9113, 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the first bytes of a connection say.
#[derive(Debug, PartialEq)]
pub enum Opening {
    /// Not HTTP/2's preface (or nothing at all): HTTP/1.
    Http1,
    /// The preface, or a prefix of it so far: left to the auto builder.
    MaybeHttp2,
}

/// Waits for the client's first bytes and looks at them without reading.
pub async fn opening(stream: &TcpStream) -> Opening {
    let mut buf = [0u8; 24];
    match stream.peek(&mut buf).await {
        Ok(n) => classify(&buf[..n]),
        // Let hyper meet the error.
        Err(_) => Opening::Http1,
    }
}

fn classify(first: &[u8]) -> Opening {
    if !first.is_empty() && H2_PREFACE.starts_with(first) {
        Opening::MaybeHttp2
    } else {
        Opening::Http1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_prefix_of_the_preface_is_maybe_http2() {
        assert_eq!(classify(b"POST /api/generate HTTP/1.1\r\n"), Opening::Http1);
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Opening::Http1);
        assert_eq!(classify(b"PRI * HTTP/1.1\r\n"), Opening::Http1);
        assert_eq!(classify(b""), Opening::Http1);
        // One byte at a time, "P" could still be either.
        assert_eq!(classify(b"P"), Opening::MaybeHttp2);
        assert_eq!(classify(b"PRI * HTTP/2"), Opening::MaybeHttp2);
        assert_eq!(classify(H2_PREFACE), Opening::MaybeHttp2);
    }
}
