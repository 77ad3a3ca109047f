//! corral's own connections to one backend, over hyper's connection-level
//! HTTP/1 client: a request checks a connection out on its own task (the
//! last one returned first, else a new one), and its answer's body puts the
//! connection back once it has been read to the end and hyper says the
//! connection is ready for another request. A body dropped midway takes its
//! connection with it, which closes it: that is how a backend learns that
//! the client left. Idle connections are bounded and expire (looked at on
//! every checkout and return, so at least at every scan, whose probes use
//! the same connections); they go when the backend is forgotten or replaced.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};

use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::failure::FailureKind;

/// Idle connections kept per backend.
const MAX_IDLE: usize = 1024;
/// An idle connection unused this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// TCP keepalive on backend connections.
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);
/// How long a connection whose answer ended may take to become ready again
/// before it is given up (hyper makes it ready in the same turn of its driver).
const READY_GRACE: Duration = Duration::from_secs(1);

type Conn = SendRequest<Full<Bytes>>;

/// The connections of one backend: its address and the idle ones, newest last.
pub struct Conns {
    /// `host:port` to connect to.
    address: String,
    idle: Mutex<Vec<Idle>>,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

impl std::fmt::Debug for Conns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conns")
            .field("address", &self.address)
            .field("idle", &self.idle_count())
            .finish()
    }
}

/// Why a request could not be sent or got no response head.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection within the connect timeout.
    #[error("connect to {address} timed out after {timeout:.0?}")]
    ConnectTimeout { address: String, timeout: Duration },
    /// The TCP connect failed.
    #[error("connect to {address}: {error}")]
    Connect {
        address: String,
        error: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("{}", chain(.0))]
    Http(#[source] hyper::Error),
}

impl SendError {
    /// The failure kind: connect failures, answers that were not HTTP, and
    /// connections that broke.
    pub fn kind(&self) -> FailureKind {
        match self {
            Self::ConnectTimeout { .. } | Self::Connect { .. } => FailureKind::Connect,
            Self::Http(e) if e.is_parse() || e.is_parse_status() || e.is_parse_too_large() => {
                FailureKind::Body
            }
            Self::Http(_) => FailureKind::Reset,
        }
    }
}

/// An error and its sources on one line: the top level of hyper's and
/// hyper-util's errors says little ("connection error", "client error
/// (Connect)"); the sources say what happened.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

impl Conns {
    /// No connections yet to `address` (`host:port`).
    pub fn new(address: String) -> Self {
        Self {
            address,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// How many connections are idle now.
    pub fn idle_count(&self) -> usize {
        self.lock().len()
    }

    /// Closes every idle connection (the backend was forgotten or replaced).
    pub fn close_idle(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `request` (origin-form URI, `Host` set) on an idle connection or
    /// a new one and waits for the response head. A request that an idle
    /// connection could not take (the backend closed it meanwhile) is sent
    /// again on a new connection.
    pub async fn send(
        self: &Arc<Self>,
        mut request: Request<Full<Bytes>>,
        connect_timeout: Duration,
    ) -> Result<Response<BackendBody>, SendError> {
        while let Some(mut conn) = self.checkout() {
            match conn.try_send_request(request).await {
                Ok(response) => return Ok(self.wrap(response, conn)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => request = unsent,
                    None => return Err(SendError::Http(e.into_error())),
                },
            }
        }
        let mut conn = self.connect(connect_timeout).await?;
        let response = conn.send_request(request).await.map_err(SendError::Http)?;
        Ok(self.wrap(response, conn))
    }

    fn wrap(self: &Arc<Self>, response: Response<Incoming>, conn: Conn) -> Response<BackendBody> {
        response.map(|body| BackendBody {
            body,
            conn: Some((conn, Arc::clone(self))),
        })
    }

    /// The newest idle connection that is still ready; expired ones are closed.
    fn checkout(&self) -> Option<Conn> {
        let now = Instant::now();
        let mut idle = self.lock();
        while let Some(Idle { conn, since }) = idle.pop() {
            if now.duration_since(since) >= IDLE_TIMEOUT {
                // The rest are older still.
                idle.clear();
                return None;
            }
            if conn.is_ready() {
                return Some(conn);
            }
        }
        None
    }

    /// A new connection, its driver spawned.
    async fn connect(&self, timeout: Duration) -> Result<Conn, SendError> {
        let address = self.address.clone();
        let stream = tokio::time::timeout(timeout, TcpStream::connect(&self.address))
            .await
            .map_err(|_| SendError::ConnectTimeout {
                address: address.clone(),
                timeout,
            })?
            .map_err(|error| SendError::Connect { address, error })?;
        // Both are best effort: a socket that refuses them still works.
        let _ = stream.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        let (conn, driver) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(SendError::Http)?;
        tokio::spawn(async move {
            if let Err(e) = driver.await {
                tracing::debug!(error = %chain(&e), "backend connection ended");
            }
        });
        Ok(conn)
    }

    /// Keeps `conn` for the next request, newest last; the oldest and the
    /// expired make room.
    fn put_back(&self, conn: Conn) {
        let now = Instant::now();
        let mut idle = self.lock();
        let expired = idle
            .iter()
            .take_while(|i| now.duration_since(i.since) >= IDLE_TIMEOUT)
            .count();
        let over = (idle.len() + 1).saturating_sub(MAX_IDLE);
        idle.drain(..expired.max(over));
        idle.push(Idle { conn, since: now });
    }
}

/// A backend's answer body: hyper's, holding the connection it came on until
/// it has been read to the end.
pub struct BackendBody {
    body: Incoming,
    conn: Option<(Conn, Arc<Conns>)>,
}

impl std::fmt::Debug for BackendBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendBody")
            .field("body", &self.body)
            .field("pooled", &self.conn.is_some())
            .finish()
    }
}

impl BackendBody {
    /// The answer was read to the end: the connection goes back once hyper
    /// says it can take another request.
    fn release(&mut self) {
        let Some((mut conn, home)) = self.conn.take() else {
            return;
        };
        if conn.is_ready() {
            home.put_back(conn);
        } else if !conn.is_closed() {
            // Its driver has not taken the end in yet.
            tokio::spawn(async move {
                if let Ok(Ok(())) = tokio::time::timeout(READY_GRACE, conn.ready()).await {
                    home.put_back(conn);
                }
            });
        }
    }
}

impl Body for BackendBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
        match &frame {
            None => this.release(),
            Some(Ok(_)) if this.body.is_end_stream() => this.release(),
            Some(Ok(_)) => {}
            // A broken connection is not kept.
            Some(Err(_)) => this.conn = None,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for BackendBody {
    fn drop(&mut self) {
        // Read to its last byte without the end-of-stream poll (a
        // `Content-Length` body): as good as ended. Otherwise the connection
        // is dropped with the body, which closes it.
        if self.conn.is_some() && self.body.is_end_stream() {
            self.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A backend that answers every request on a connection with `answer`
    /// (then hangs up when `close`), and counts the connections it accepted.
    async fn backend(
        answer: &'static [u8],
        close: bool,
    ) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    loop {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") => {
                                if socket.write_all(answer).await.is_err() || close {
                                    return;
                                }
                            }
                            Ok(_) => {}
                        }
                    }
                });
            }
        });
        (address, accepted)
    }

    fn get(address: &str) -> Request<Full<Bytes>> {
        Request::get("/api/tags")
            .header(http::header::HOST, address)
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";

    #[tokio::test]
    async fn a_body_read_to_the_end_gives_its_connection_back_for_the_next_request() {
        let (address, accepted) = backend(OK, false).await;
        let conns = Arc::new(Conns::new(address.clone()));
        for _ in 0..3 {
            let response = conns
                .send(get(&address), Duration::from_secs(1))
                .await
                .unwrap();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"hello");
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(conns.idle_count(), 1);
        conns.close_idle();
        assert_eq!(conns.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_body_dropped_midway_does_not_come_back() {
        let long: &'static [u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhello";
        let (address, _) = backend(long, false).await;
        let conns = Arc::new(Conns::new(address.clone()));
        let response = conns
            .send(get(&address), Duration::from_secs(1))
            .await
            .unwrap();
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"hello");
        drop(body);
        assert_eq!(conns.idle_count(), 0);
    }

    #[tokio::test]
    async fn failures_are_classified() {
        // Nothing listens on a port just freed.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        drop(listener);
        let conns = Arc::new(Conns::new(address.clone()));
        let e = conns
            .send(get(&address), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), FailureKind::Connect, "{e}");

        let (address, _) = backend(b"this is not HTTP\r\n\r\n", true).await;
        let conns = Arc::new(Conns::new(address.clone()));
        let e = conns
            .send(get(&address), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), FailureKind::Body, "{e}");

        let (address, _) = backend(b"HTTP/1.1 200 OK\r\ncontent-le", true).await;
        let conns = Arc::new(Conns::new(address.clone()));
        let e = conns
            .send(get(&address), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), FailureKind::Reset, "{e}");
    }
}
