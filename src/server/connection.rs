//! Noticing that a client has gone while its request waits on the model.
//!
//! hyper treats a client's FIN as a half-close and keeps the request running until the
//! response is written, and an SSE stream only notices a gone client on its next write. To
//! stop an upstream call within a second of the client leaving, each accepted connection
//! gets a watcher that peeks at the socket and cancels the connection's [`ClientGone`]
//! token when the peer closes it. Requests find the token in their extensions.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, ready},
    time::Duration,
};

use poem::{
    Endpoint, Middleware, Request,
    http::uri::Scheme,
    listener::{Acceptor, TcpAcceptor},
    web::{LocalAddr, RemoteAddr},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_util::sync::CancellationToken;

/// How often the watcher looks again while the socket holds data that hyper has yet to read
/// (a pipelined request).
const RECHECK: Duration = Duration::from_millis(100);

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

type Watched = Arc<Mutex<HashMap<SocketAddr, CancellationToken>>>;

/// poem's TCP acceptor, with a watcher on every connection.
pub struct WatchedAcceptor {
    inner: TcpAcceptor,
    connections: Watched,
}

impl WatchedAcceptor {
    pub fn new(inner: TcpAcceptor) -> Self {
        Self {
            inner,
            connections: Watched::default(),
        }
    }

    /// The middleware that hands each request its connection's token.
    pub fn tokens(&self) -> ConnectionTokens {
        ConnectionTokens(self.connections.clone())
    }
}

impl Acceptor for WatchedAcceptor {
    type Io = WatchedIo;

    fn local_addr(&self) -> Vec<LocalAddr> {
        self.inner.local_addr()
    }

    async fn accept(&mut self) -> io::Result<(WatchedIo, LocalAddr, RemoteAddr, Scheme)> {
        let (stream, local, remote, scheme) = self.inner.accept().await?;
        // Chunks are written as soon as they exist; don't let Nagle hold them back.
        stream.set_nodelay(true)?;
        let stream = Arc::new(stream);
        let gone = CancellationToken::new();
        let closed = CancellationToken::new();
        let peer = remote.as_socket_addr().copied();
        if let Some(peer) = peer {
            lock(&self.connections).insert(peer, gone.clone());
        }
        tokio::spawn(watch(stream.clone(), gone, closed.clone()));
        let io = WatchedIo {
            stream,
            peer,
            closed,
            connections: self.connections.clone(),
        };
        Ok((io, local, remote, scheme))
    }
}

/// Waits for the peer to close the connection, or for the server to be done with it.
async fn watch(stream: Arc<TcpStream>, gone: CancellationToken, closed: CancellationToken) {
    let mut byte = [0u8; 1];
    loop {
        tokio::select! {
            _ = closed.cancelled() => return,
            peeked = stream.peek(&mut byte) => match peeked {
                Ok(0) | Err(_) => {
                    gone.cancel();
                    return;
                }
                Ok(_) => tokio::time::sleep(RECHECK).await,
            },
        }
    }
}

fn lock(
    connections: &Watched,
) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, CancellationToken>> {
    connections
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A TCP connection shared with its watcher.
pub struct WatchedIo {
    stream: Arc<TcpStream>,
    peer: Option<SocketAddr>,
    closed: CancellationToken,
    connections: Watched,
}

impl Drop for WatchedIo {
    fn drop(&mut self) {
        self.closed.cancel();
        if let Some(peer) = self.peer {
            lock(&self.connections).remove(&peer);
        }
    }
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.stream.poll_read_ready(cx))?;
            // Into the unfilled part as it is: zeroing hyper's 8 KiB read buffer first cost a
            // memset per read, 4 % of the instructions of a request (bench/RESULTS.md).
            match self.stream.try_read_buf(buf) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                read => return Poll::Ready(read.map(drop)),
            }
        }
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.stream.poll_write_ready(cx))?;
            match self.stream.try_write(data) {
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
        loop {
            ready!(self.stream.poll_write_ready(cx))?;
            match self.stream.try_write_vectored(data) {
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
            socket2::SockRef::from(self.stream.as_ref()).shutdown(std::net::Shutdown::Write),
        )
    }
}

/// Puts each request's [`ClientGone`] token in its extensions.
pub struct ConnectionTokens(Watched);

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
    connections: Watched,
}

impl<E: Endpoint> Endpoint for ConnectionTokensEndpoint<E> {
    type Output = E::Output;

    async fn call(&self, mut request: Request) -> poem::Result<Self::Output> {
        let token = request
            .remote_addr()
            .as_socket_addr()
            .and_then(|peer| lock(&self.connections).get(peer).cloned())
            .unwrap_or_default();
        request.extensions_mut().insert(ClientGone(token));
        self.inner.call(request).await
    }
}
