//! Server-sent events of the Messages and Responses endpoints: one named
//! frame, an event-stream answer fed by a task whose head waits for the
//! first event, and [`feed`], which turns a generation's steps into
//! frames; also the error that resets a streamed connection.

use std::io::ErrorKind;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::generation::{Generation, Step};
use super::reply::respond;

/// One `event: <name>\ndata: <json>\n\n` frame.
pub(crate) fn sse(name: &str, data: &[u8]) -> Bytes {
    Bytes::from([b"event: ", name.as_bytes(), b"\ndata: ", data, b"\n\n"].concat())
}

/// The body error that resets the connection.
pub(crate) fn connection_reset() -> std::io::Error {
    std::io::Error::new(ErrorKind::ConnectionReset, "simulated connection reset")
}

/// Sender side of an event stream.
pub(crate) type Events = mpsc::Sender<std::io::Result<Bytes>>;

/// What an endpoint frames while [`feed`] runs a generation.
pub(crate) enum Moment {
    /// Before the first token, or the end of an empty answer.
    Open,
    /// One token.
    Token(String),
    /// The answer is complete.
    Done,
}

/// Runs `turn` into `tx`, each moment framed by `frames`: a reset resets
/// the connection, a lost mid-stream error just ends the stream, and a
/// client that went away stops it.
pub(crate) async fn feed(
    tx: Events,
    mut turn: Generation,
    mut frames: impl FnMut(Moment, &Generation) -> Vec<Bytes>,
) {
    let mut opened = false;
    loop {
        let (moment, last) = match turn.next().await {
            Step::Token(t) => (Moment::Token(t), false),
            Step::Done => (Moment::Done, true),
            Step::Lost => return,
            Step::Reset => {
                let _ = tx.send(Err(connection_reset())).await;
                return;
            }
        };
        let mut out = Vec::new();
        if !std::mem::replace(&mut opened, true) {
            out.extend(frames(Moment::Open, &turn));
        }
        out.extend(frames(moment, &turn));
        for frame in out {
            if tx.send(Ok(frame)).await.is_err() {
                return;
            }
        }
        if last {
            return;
        }
    }
}

/// An SSE answer fed by `produce`, which runs as its own task: the head is
/// sent with the first event (nothing before the first token), and a client
/// that goes away stops the task at its next event.
pub(crate) async fn event_stream<F, Fut>(produce: F) -> Response
where
    F: FnOnce(Events) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel(16);
    tokio::spawn(produce(tx));
    let first = rx.recv().await;
    let rest = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let body = futures_util::stream::iter(first).chain(rest);
    let mut response = respond(StatusCode::OK, "text/event-stream", Body::from_stream(body));
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
