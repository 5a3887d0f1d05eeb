//! Client connections: how many the gateway holds, how long an idle one may stay, and
//! noticing that a client has gone while its request waits on the model.
//!
//! Every accepted connection gets a watcher task. It closes the connection when it sits
//! idle too long (`header_read_timeout` while a request head is arriving or before the
//! first one, `keep_alive_timeout` between requests), and it cancels the connection's
//! [`ClientGone`] token when the peer closes its side — hyper treats a FIN as a half-close
//! and keeps a request running until its response is written, and an SSE stream notices a
//! gone client only on its next write, so without the watcher an upstream call would go on
//! for nobody. Requests find the token in their extensions.
//!
//! At `max_connections`, a new connection evicts the connection that has been idle the
//! longest: a client without a key can only hold idle connections (a request without one is
//! answered 401 at once), so it can never lock out a client with one. When every connection
//! has a request in flight, a few more are let in to answer `/healthz` and a 503 to the
//! rest. When the process runs out of descriptors, the accept loop evicts an idle
//! connection and backs off instead of spinning.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use futures_util::{FutureExt, StreamExt};
use poem::{
    Body, Endpoint, IntoResponse, Middleware, Request, Response,
    error::ResponseError,
    http::{HeaderValue, StatusCode, header, uri::Scheme},
    listener::{Acceptor, TcpAcceptor},
    web::{LocalAddr, RemoteAddr},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, Interest, ReadBuf},
    net::TcpStream,
    sync::Notify,
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{config::ConnectionSettings, error::Error};

/// How often the watcher looks again while the socket holds data that hyper has yet to read
/// (a pipelined request).
const RECHECK: Duration = Duration::from_millis(100);
/// Connections let in beyond `max_connections` when all are busy, to answer `/healthz`.
const HEALTH_RESERVE: usize = 16;
/// The route that is answered even when every connection is busy.
const HEALTH_ROUTE: &str = "/healthz";
/// The accept loop's pauses while the process is out of descriptors.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_millis(500);
/// At most one log line per this period about running out of descriptors.
const EXHAUSTION_LOG_PERIOD: Duration = Duration::from_secs(60);
/// Descriptors kept for upstream connections, files and the listener when
/// `max_connections` is derived from the descriptor limit.
const RESERVED_DESCRIPTORS: u64 = 64;

/// Cancelled when the client of a connection has closed it.
#[derive(Clone, Default)]
pub struct ClientGone(CancellationToken);

impl ClientGone {
    /// The token of the request's connection; a token nobody cancels when the request did
    /// not come through a [`WatchedAcceptor`].
    pub fn of(request: &Request) -> CancellationToken {
        request
            .extensions()
            .get::<ClientGone>()
            .map(|gone| gone.0.clone())
            .unwrap_or_default()
    }
}

/// The limits the acceptor enforces, with `max_connections` resolved.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub keep_alive_timeout: Duration,
}

impl ConnectionLimits {
    /// `settings`, with a `max_connections` derived from the descriptor limit when none is
    /// configured: each connection that streams holds two descriptors (the client's and the
    /// upstream's).
    pub fn new(settings: &ConnectionSettings) -> Self {
        let derived = || {
            let (soft, _) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((1024, 1024));
            let usable = soft.saturating_sub(RESERVED_DESCRIPTORS) / 2;
            usize::try_from(usable).unwrap_or(usize::MAX).max(16)
        };
        Self {
            max_connections: settings.max_connections.unwrap_or_else(derived),
            header_read_timeout: settings.header_read_timeout,
            keep_alive_timeout: settings.keep_alive_timeout,
        }
    }
}

/// What the acceptor, the watchers and the middleware know of one connection.
struct Connection {
    stream: Arc<TcpStream>,
    gone: CancellationToken,
    /// Requests being answered, their streamed bodies included.
    in_flight: AtomicUsize,
    /// Became a WebSocket, which has its own idle rules.
    upgraded: AtomicBool,
    /// Let in beyond `max_connections`: answers `/healthz` and a 503 to the rest.
    overflow: bool,
    /// Has had a request (so its idle time is keep-alive, not the wait for a first request).
    served: AtomicBool,
    /// Milliseconds since the acceptor's epoch when the connection was last left idle.
    idle_since: AtomicU64,
    /// Milliseconds since the epoch when bytes of a next request arrived; 0 while none did.
    head_started: AtomicU64,
    /// Evicted or dropped: no longer counted.
    closing: AtomicBool,
    /// Wakes the watcher when the deadline may have moved.
    changed: Notify,
}

impl Connection {
    fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
            && !self.upgraded.load(Ordering::Acquire)
            && !self.closing.load(Ordering::Acquire)
    }

    fn touch(&self) {
        self.changed.notify_one();
    }
}

/// Every connection the acceptor has handed out and not yet seen dropped.
struct Connections {
    table: Mutex<HashMap<SocketAddr, Arc<Connection>>>,
    /// Connections counted against `max_connections`: not evicted, not dropped.
    regular: AtomicUsize,
    /// Connections let in beyond it, likewise.
    overflow: AtomicUsize,
    limits: ConnectionLimits,
    epoch: Instant,
    /// A counted connection went away.
    released: Notify,
}

impl Connections {
    fn now_millis(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn instant_at(&self, millis: u64) -> Instant {
        self.epoch + Duration::from_millis(millis)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Arc<Connection>>> {
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn get(&self, peer: &SocketAddr) -> Option<Arc<Connection>> {
        self.lock().get(peer).cloned()
    }

    fn count(&self, overflow: bool) -> &AtomicUsize {
        if overflow {
            &self.overflow
        } else {
            &self.regular
        }
    }

    /// Stops counting `connection`, once.
    fn release(&self, connection: &Connection) {
        if !connection.closing.swap(true, Ordering::AcqRel) {
            self.count(connection.overflow)
                .fetch_sub(1, Ordering::AcqRel);
            self.released.notify_one();
        }
    }

    /// Stops counting `connection` and closes its socket, so that hyper ends it.
    fn close(&self, connection: &Connection) {
        self.release(connection);
        let _ =
            socket2::SockRef::from(connection.stream.as_ref()).shutdown(std::net::Shutdown::Both);
    }

    /// Closes the connection idle the longest, if any is idle — among those counted against
    /// `max_connections` only, with `regular_only`.
    fn evict_idle(&self, regular_only: bool) -> bool {
        let oldest = self
            .lock()
            .values()
            .filter(|connection| connection.is_idle() && !(regular_only && connection.overflow))
            .min_by_key(|connection| connection.idle_since.load(Ordering::Acquire))
            .cloned();
        match oldest {
            Some(connection) => {
                self.close(&connection);
                true
            }
            None => false,
        }
    }

    /// When an idle connection is to be closed; `None` while it has work.
    fn deadline(&self, connection: &Connection) -> Option<Instant> {
        if !connection.is_idle() {
            return None;
        }
        let head_started = connection.head_started.load(Ordering::Acquire);
        let (since, timeout) = if head_started != 0 {
            (head_started, self.limits.header_read_timeout)
        } else if connection.served.load(Ordering::Acquire) {
            (
                connection.idle_since.load(Ordering::Acquire),
                self.limits.keep_alive_timeout,
            )
        } else {
            (
                connection.idle_since.load(Ordering::Acquire),
                self.limits.header_read_timeout,
            )
        };
        Some(self.instant_at(since) + timeout)
    }
}

/// poem's TCP acceptor, with the limits above and a watcher on every connection.
pub struct WatchedAcceptor {
    inner: TcpAcceptor,
    connections: Arc<Connections>,
    last_exhaustion_log: Option<Instant>,
}

impl WatchedAcceptor {
    pub fn new(inner: TcpAcceptor, limits: ConnectionLimits) -> Self {
        Self {
            inner,
            connections: Arc::new(Connections {
                table: Mutex::default(),
                regular: AtomicUsize::new(0),
                overflow: AtomicUsize::new(0),
                limits,
                epoch: Instant::now(),
                released: Notify::new(),
            }),
            last_exhaustion_log: None,
        }
    }

    /// The middleware that hands each request its connection's token and tracks its work.
    pub fn tokens(&self) -> ConnectionTokens {
        ConnectionTokens(self.connections.clone())
    }

    /// Waits while every slot, the reserve included, is held by a busy connection.
    async fn wait_for_a_slot(&self) {
        let connections = &self.connections;
        loop {
            let released = connections.released.notified();
            if connections.regular.load(Ordering::Acquire) < connections.limits.max_connections
                || connections.overflow.load(Ordering::Acquire) < HEALTH_RESERVE
                || connections.evict_idle(false)
            {
                return;
            }
            released.await;
        }
    }

    /// Registers an accepted connection and starts its watcher.
    fn admit(&self, stream: TcpStream, peer: Option<SocketAddr>) -> io::Result<WatchedIo> {
        // Chunks are written as soon as they exist; don't let Nagle hold them back.
        stream.set_nodelay(true)?;
        let connections = &self.connections;
        let overflow = connections.regular.load(Ordering::Acquire)
            >= connections.limits.max_connections
            && !connections.evict_idle(true);
        let connection = Arc::new(Connection {
            stream: Arc::new(stream),
            gone: CancellationToken::new(),
            in_flight: AtomicUsize::new(0),
            upgraded: AtomicBool::new(false),
            overflow,
            served: AtomicBool::new(false),
            idle_since: AtomicU64::new(connections.now_millis()),
            head_started: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            changed: Notify::new(),
        });
        connections.count(overflow).fetch_add(1, Ordering::AcqRel);
        if let Some(peer) = peer {
            connections.lock().insert(peer, connection.clone());
        }
        let closed = CancellationToken::new();
        tokio::spawn(watch(
            connection.clone(),
            connections.clone(),
            closed.clone(),
        ));
        Ok(WatchedIo {
            connection,
            peer,
            closed,
            connections: connections.clone(),
        })
    }

    fn log_exhaustion(&mut self, err: &io::Error) {
        let now = Instant::now();
        if self
            .last_exhaustion_log
            .is_none_or(|last| now.duration_since(last) >= EXHAUSTION_LOG_PERIOD)
        {
            self.last_exhaustion_log = Some(now);
            tracing::warn!(
                error = %err,
                connections = self.connections.regular.load(Ordering::Acquire),
                "out of file descriptors: closing idle connections and pausing accepts \
                 (raise the descriptor limit or lower `max_connections`); logged at most once a minute"
            );
        }
    }
}

/// Out of descriptors, for the process or the whole system.
fn is_descriptor_exhaustion(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

impl Acceptor for WatchedAcceptor {
    type Io = WatchedIo;

    fn local_addr(&self) -> Vec<LocalAddr> {
        self.inner.local_addr()
    }

    /// Never returns an error: poem's server loop would call again at once, spinning.
    async fn accept(&mut self) -> io::Result<(WatchedIo, LocalAddr, RemoteAddr, Scheme)> {
        let mut backoff = BACKOFF_MIN;
        loop {
            self.wait_for_a_slot().await;
            match self.inner.accept().await {
                Ok((stream, local, remote, scheme)) => {
                    let peer = remote.as_socket_addr().copied();
                    match self.admit(stream, peer) {
                        Ok(io) => return Ok((io, local, remote, scheme)),
                        Err(err) => tracing::debug!(error = %err, "dropped a connection at accept"),
                    }
                }
                Err(err) if is_descriptor_exhaustion(&err) => {
                    self.log_exhaustion(&err);
                    self.connections.evict_idle(false);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                Err(err) => {
                    tracing::debug!(error = %err, "accept failed");
                    tokio::time::sleep(BACKOFF_MIN).await;
                }
            }
        }
    }
}

/// Closes the connection when its idle deadline passes, and cancels its [`ClientGone`]
/// token when the peer closes it; ends when the server is done with the connection.
async fn watch(
    connection: Arc<Connection>,
    connections: Arc<Connections>,
    closed: CancellationToken,
) {
    let mut byte = [0u8; 1];
    loop {
        let changed = connection.changed.notified();
        let deadline = connections.deadline(&connection);
        let expired = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = closed.cancelled() => return,
            _ = changed => {}
            _ = expired => {
                // The deadline may have moved while the timer ran out.
                if connections.deadline(&connection).is_some_and(|at| at <= Instant::now()) {
                    connections.close(&connection);
                    return;
                }
            }
            peeked = connection.stream.peek(&mut byte) => match peeked {
                Ok(0) | Err(_) => {
                    connection.gone.cancel();
                    return;
                }
                // Data waits for hyper (a pipelined request). A FIN behind it cannot be
                // peeked, but the socket reports it as read-closed.
                Ok(_) => {
                    if peer_closed(&connection.stream) {
                        connection.gone.cancel();
                        return;
                    }
                    tokio::time::sleep(RECHECK).await;
                }
            },
        }
    }
}

/// Whether the peer has shut down its side of the connection, even with data still unread.
fn peer_closed(stream: &TcpStream) -> bool {
    matches!(
        stream.ready(Interest::READABLE).now_or_never(),
        Some(Ok(ready)) if ready.is_read_closed()
    )
}

/// A TCP connection shared with its watcher.
pub struct WatchedIo {
    connection: Arc<Connection>,
    peer: Option<SocketAddr>,
    closed: CancellationToken,
    connections: Arc<Connections>,
}

impl Drop for WatchedIo {
    fn drop(&mut self) {
        self.closed.cancel();
        self.connections.release(&self.connection);
        if let Some(peer) = self.peer {
            let mut table = self.connections.lock();
            // The same peer address may already belong to a newer connection.
            if table
                .get(&peer)
                .is_some_and(|known| Arc::ptr_eq(known, &self.connection))
            {
                table.remove(&peer);
            }
        }
    }
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let stream = &self.connection.stream;
        loop {
            ready!(stream.poll_read_ready(cx))?;
            // Into the unfilled part as it is: zeroing hyper's 8 KiB read buffer first cost a
            // memset per read, a measurable share of a request's instructions (bench/RESULTS.md).
            match stream.try_read_buf(buf) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                Ok(read) => {
                    if read > 0 {
                        self.note_head_bytes();
                    }
                    return Poll::Ready(Ok(()));
                }
                Err(err) => return Poll::Ready(Err(err)),
            }
        }
    }
}

impl WatchedIo {
    /// Bytes read while no request is in flight start the next request's head, which then
    /// has `header_read_timeout` to complete.
    fn note_head_bytes(&self) {
        let connection = &self.connection;
        if connection.in_flight.load(Ordering::Acquire) == 0
            && connection
                .head_started
                .compare_exchange(
                    0,
                    self.connections.now_millis().max(1),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
        {
            connection.touch();
        }
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let stream = &self.connection.stream;
        loop {
            ready!(stream.poll_write_ready(cx))?;
            match stream.try_write(data) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                written => return Poll::Ready(written),
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let stream = &self.connection.stream;
        loop {
            ready!(stream.poll_write_ready(cx))?;
            match stream.try_write_vectored(data) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                written => return Poll::Ready(written),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(
            socket2::SockRef::from(self.connection.stream.as_ref())
                .shutdown(std::net::Shutdown::Write),
        )
    }
}

/// Puts each request's [`ClientGone`] token in its extensions, and counts the request as
/// the connection's work until its response — a streamed body included — is written.
pub struct ConnectionTokens(Arc<Connections>);

impl<E: Endpoint> Middleware<E> for ConnectionTokens {
    type Output = ConnectionTokensEndpoint<E>;

    fn transform(&self, endpoint: E) -> Self::Output {
        ConnectionTokensEndpoint {
            inner: endpoint,
            connections: self.0.clone(),
        }
    }
}

pub struct ConnectionTokensEndpoint<E> {
    inner: E,
    connections: Arc<Connections>,
}

impl<E: Endpoint> Endpoint for ConnectionTokensEndpoint<E> {
    type Output = Response;

    async fn call(&self, mut request: Request) -> poem::Result<Response> {
        let connection = request
            .remote_addr()
            .as_socket_addr()
            .and_then(|peer| self.connections.get(peer));
        let Some(connection) = connection else {
            request.extensions_mut().insert(ClientGone::default());
            return self
                .inner
                .call(request)
                .await
                .map(IntoResponse::into_response);
        };
        if connection.overflow && request.uri().path() != HEALTH_ROUTE {
            let mut response =
                Error::Overloaded(self.connections.limits.max_connections).as_response();
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return Ok(response);
        }
        request
            .extensions_mut()
            .insert(ClientGone(connection.gone.clone()));
        let work = Work::begin(connection.clone(), self.connections.clone());
        let mut response = match self.inner.call(request).await {
            Ok(output) => output.into_response(),
            Err(err) => err.into_response(),
        };
        if connection.overflow {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            connection.upgraded.store(true, Ordering::Release);
        } else if is_event_stream(&response) {
            // The stream owns the request's `Work` until the last event is written.
            let body = response.take_body().into_bytes_stream().map(move |piece| {
                let _in_flight = &work;
                piece
            });
            response.set_body(Body::from_bytes_stream(body));
        }
        Ok(response)
    }
}

fn is_event_stream(response: &Response) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("text/event-stream"))
}

/// A request in flight on a connection; the connection is idle again when the last drops.
struct Work {
    connection: Arc<Connection>,
    connections: Arc<Connections>,
}

impl Work {
    fn begin(connection: Arc<Connection>, connections: Arc<Connections>) -> Self {
        connection.in_flight.fetch_add(1, Ordering::AcqRel);
        connection.served.store(true, Ordering::Release);
        connection.head_started.store(0, Ordering::Release);
        connection.touch();
        Self {
            connection,
            connections,
        }
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        let connection = &self.connection;
        connection
            .idle_since
            .store(self.connections.now_millis(), Ordering::Release);
        connection.in_flight.fetch_sub(1, Ordering::AcqRel);
        connection.touch();
    }
}
