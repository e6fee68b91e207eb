//! Connections: a cap on how many are open, timeouts for request heads and idle keep-alive
//! connections, and the drain on shutdown.
//!
//! Each connection is in one of three states. *Idle*: no request in progress and no byte of
//! the next one received; closed after the keep-alive timeout. *Head*: the first bytes of a
//! request arrived but hyper has not parsed its head yet; closed after the header-read timeout
//! (a client that trickles its headers holds nothing for long). *Busy*: a request is being
//! answered; its body reads and its answer have timeouts of their own (see `input` and the
//! request timeout).
//!
//! On shutdown the listener closes at once, requests in progress are answered (the routes
//! answer new ones on open connections with 503 and `Connection: close`), and once none is
//! left every connection is closed, so connections that never sent a request cannot hold the
//! drain. The grace period bounds all of it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::ServiceExt;

use super::memory::MAX_HEADER_BYTES;
use super::metrics::Metrics;
use super::Stopped;

#[derive(Debug, Clone, Copy)]
pub struct ConnectionConfig {
    /// Open connections at most; beyond it new ones wait in the kernel's accept queue.
    pub max_connections: usize,
    /// How long a client may take to send a request's head once it has started.
    pub header_read_timeout: Duration,
    /// How long a connection may sit idle between requests.
    pub keep_alive_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    Head,
    Busy,
}

/// One connection's state, since when it has been in it, and a wake-up for its watchdog (the
/// loop in [`Connection::serve`]) whenever it changes, so that each state's timeout runs from
/// the moment the state began.
struct Activity {
    state: Mutex<(State, Instant)>,
    changed: Notify,
}

impl Activity {
    fn new() -> Self {
        Self { state: Mutex::new((State::Idle, Instant::now())), changed: Notify::new() }
    }

    fn set(&self, state: State) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = (state, Instant::now());
        self.changed.notify_one();
    }

    fn get(&self) -> (State, Instant) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes arrived: on an idle connection, a request has started.
    fn received(&self) {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if guard.0 == State::Idle {
            *guard = (State::Head, Instant::now());
            self.changed.notify_one();
        }
    }
}

/// Requests being answered, server-wide.
#[derive(Default)]
struct InFlight {
    count: AtomicUsize,
    none_left: Notify,
}

impl InFlight {
    async fn wait_until_none(&self) {
        loop {
            let notified = self.none_left.notified();
            if self.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Marks a connection busy and counts the request while it is answered; dropped with the
/// response future, also when the connection goes away first.
struct RequestGuard {
    activity: Arc<Activity>,
    in_flight: Arc<InFlight>,
}

impl RequestGuard {
    fn begin(activity: &Arc<Activity>, in_flight: &Arc<InFlight>) -> Self {
        activity.set(State::Busy);
        in_flight.count.fetch_add(1, Ordering::SeqCst);
        Self { activity: activity.clone(), in_flight: in_flight.clone() }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.activity.set(State::Idle);
        if self.in_flight.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.in_flight.none_left.notify_waiters();
        }
    }
}

/// Accepts and serves connections until `shutdown` resolves, then drains (see the module
/// comment). `on_shutdown` runs when the signal comes, before the drain.
pub async fn run(
    listener: TcpListener,
    router: Router,
    config: ConnectionConfig,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
    on_shutdown: impl FnOnce(),
    grace: Duration,
) -> Stopped {
    let slots = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let in_flight = Arc::new(InFlight::default());
    let (close_tx, close_rx) = watch::channel(());
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            accepted = accept(&listener, &slots) => accepted,
        };
        while connections.try_join_next().is_some() {}
        let Some((stream, slot)) = accepted else { continue };
        let connection = Connection {
            router: router.clone(),
            config,
            in_flight: in_flight.clone(),
            metrics: metrics.clone(),
            close: close_rx.clone(),
            _slot: slot,
        };
        connections.spawn(connection.serve(stream));
    }
    drop(listener);
    on_shutdown();
    let stopped = match tokio::time::timeout(grace, in_flight.wait_until_none()).await {
        Ok(()) => Stopped::Drained,
        Err(_) => Stopped::GraceExpired,
    };
    let _ = close_tx.send(());
    connections.shutdown().await;
    stopped
}

/// Waits for a free connection slot, then for a connection. Errors (e.g. out of file
/// descriptors) are logged and paused on rather than ending the server.
async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> Option<(TcpStream, OwnedSemaphorePermit)> {
    let slot = slots.clone().acquire_owned().await.expect("the semaphore is never closed");
    match listener.accept().await {
        Ok((stream, _)) => {
            let _ = stream.set_nodelay(true);
            Some((stream, slot))
        }
        Err(e) => {
            tracing::warn!(error = %e, "accept failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}

struct Connection {
    router: Router,
    config: ConnectionConfig,
    in_flight: Arc<InFlight>,
    metrics: Arc<Metrics>,
    close: watch::Receiver<()>,
    _slot: OwnedSemaphorePermit,
}

impl Connection {
    async fn serve(mut self, stream: TcpStream) {
        self.metrics.open_connections.inc();
        let activity = Arc::new(Activity::new());
        let io = TokioIo::new(Watched { stream: Some(stream), activity: activity.clone() });
        let (router, in_flight) = (self.router.clone(), self.in_flight.clone());
        let service = hyper::service::service_fn({
            let activity = activity.clone();
            move |request: hyper::Request<hyper::body::Incoming>| {
                let guard = RequestGuard::begin(&activity, &in_flight);
                let response = router.clone().oneshot(request.map(axum::body::Body::new));
                async move {
                    let response = response.await;
                    drop(guard);
                    response
                }
            }
        });
        let mut builder = http1::Builder::new();
        builder.max_buf_size(MAX_HEADER_BYTES);
        let connection = builder.serve_connection(io, service);
        tokio::pin!(connection);
        loop {
            let (state, since) = activity.get();
            let deadline = match state {
                State::Idle => since + self.config.keep_alive_timeout,
                State::Head => since + self.config.header_read_timeout,
                // Looked at again later: the request's own timeouts bound it.
                State::Busy => Instant::now() + self.config.header_read_timeout,
            };
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    break;
                }
                _ = tokio::time::sleep_until(deadline) => match activity.get() {
                    (State::Idle, since) if since + self.config.keep_alive_timeout <= Instant::now() => {
                        connection.as_mut().graceful_shutdown();
                        let _ = connection.as_mut().await;
                        break;
                    }
                    (State::Head, since) if since + self.config.header_read_timeout <= Instant::now() => {
                        self.metrics.header_timeouts.inc();
                        break;
                    }
                    _ => {}
                },
                _ = activity.changed.notified() => {}
                _ = self.close.changed() => break,
            }
        }
        self.metrics.open_connections.dec();
    }
}

/// How long a closed connection keeps reading (and discarding) what its client still sends.
/// Closing a socket with unread data makes the kernel send a reset, which can destroy the
/// response before the client reads it: a client told 413 while uploading a body it was not
/// asked to wait with would see a broken connection instead of the answer (nginx's "lingering
/// close" does the same).
const LINGER: Duration = Duration::from_secs(2);

/// A TCP stream that tells its connection's [`Activity`] when bytes arrive, and lingers when
/// dropped (see [`LINGER`]).
struct Watched {
    stream: Option<TcpStream>,
    activity: Arc<Activity>,
}

impl Watched {
    fn stream(&mut self) -> Pin<&mut TcpStream> {
        Pin::new(self.stream.as_mut().expect("the stream is only taken on drop"))
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        let Some(mut stream) = self.stream.take() else { return };
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = stream.shutdown().await;
            let mut sink = [0u8; 16 * 1024];
            let drain = async { while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {} };
            let _ = tokio::time::timeout(LINGER, drain).await;
        });
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = self.stream().poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.received();
        }
        result
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_shutdown(cx)
    }
}
