//! The accept side of a relay: binding the listeners, the accept loops (limits, PROXY headers,
//! socket options) and the path each accepted connection takes (plain, TLS, plain-HTTP port).

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use derpfleet_proto::consts::HANDSHAKE_TIMEOUT;
use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::http::proxy_protocol::ProxyProtocol;
use crate::http::shutdown_watch::ShutdownWatch;
use crate::http::{self, HttpContext};
use crate::ops::ops_metrics::OpsMetrics;
use crate::ops::ratelimit::AcceptLimiter;
use crate::server::config::TcpConfig;

/// Binds with `SO_REUSEADDR` (fast restarts); `[::]` is made dual-stack, or `0.0.0.0` if the host
/// has no IPv6.
pub(super) fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    match bind_one(addr) {
        Ok(l) => Ok(l),
        Err(e) if addr.ip() == IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED) => {
            tracing::debug!("dual-stack bind of {addr} failed ({e}); using IPv4 only");
            bind_one(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), addr.port()))
        }
        Err(e) => Err(e),
    }
}

/// One listening socket on exactly `addr` (dual-stack when it is IPv6).
fn bind_one(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Which listener an accept loop serves: the main port (TLS or plain) or the plain-HTTP port.
pub(super) enum Listener {
    Main(Option<TlsAcceptor>),
    Http80,
}

/// What one accept loop needs.
pub(super) struct AcceptLoop {
    pub(super) ctx: Arc<HttpContext>,
    pub(super) tcp: TcpConfig,
    /// Accept limits (main listener only).
    pub(super) limiter: Option<Arc<AcceptLimiter>>,
    /// PROXY protocol for trusted peers (read before the limits, which then see the client).
    pub(super) proxy: Option<Arc<ProxyProtocol>>,
    pub(super) ops: Arc<OpsMetrics>,
    /// Stops accepting (drain); connections go on.
    pub(super) accept_cancel: CancellationToken,
    /// Stops everything.
    pub(super) cancel: CancellationToken,
    pub(super) tracker: TaskTracker,
}

/// Accepts until the drain or shutdown and serves each connection in a task of its own.
pub(super) async fn accept_loop(listener: TcpListener, kind: Listener, l: AcceptLoop) {
    let AcceptLoop { ctx, tcp, limiter, proxy, ops, accept_cancel, cancel, tracker } = l;
    let kind = Arc::new(kind);
    let is_main = matches!(*kind, Listener::Main(_));
    loop {
        let accepted = tokio::select! {
            _ = accept_cancel.cancelled() => return,
            r = listener.accept() => r,
        };
        let (stream, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if is_main {
            ops.tls_listener_accepted_connections.increment(1);
        }
        // A trusted proxy's connection is limited by the client address its header gives.
        let proxy = proxy.clone().filter(|p| p.trusts(remote.ip()));
        if proxy.is_none() && !within_limits(limiter.as_deref(), &ops, remote) {
            drop(stream);
            continue;
        }
        if let Err(e) = tune(&stream, tcp) {
            tracing::debug!(%remote, "setting socket options: {e}");
        }
        let (ctx, kind, cancel, limiter, ops) =
            (ctx.clone(), kind.clone(), cancel.clone(), limiter.clone(), ops.clone());
        tracker.spawn(async move {
            // Polled until the DERP core owns the connection (it then closes it at shutdown).
            let watch = ShutdownWatch::new();
            let run = std::pin::pin!(async {
                let mut stream = stream;
                let remote = match &proxy {
                    None => remote,
                    // Boxed: inline, the header reader's room would stay in every connection's task.
                    Some(p) => match Box::pin(p.read(&mut stream, remote)).await {
                        Some(client) if within_limits(limiter.as_deref(), &ops, client) => client,
                        _ => return,
                    },
                };
                serve(stream, remote, &kind, ctx, &watch).await
            });
            watch.run(&cancel, run).await;
        });
    }
}

/// The accept limits for a connection from `remote`; over them it is counted and the caller closes
/// it at once (derper: accept, then close; nothing is read).
fn within_limits(limiter: Option<&AcceptLimiter>, ops: &OpsMetrics, remote: SocketAddr) -> bool {
    let Some(limiter) = limiter else { return true };
    match limiter.check(remote.ip()) {
        Ok(()) => true,
        Err(why) => {
            ops.accept_refused(why);
            tracing::debug!(%remote, ?why, "connection over the accept limit closed");
            false
        }
    }
}

/// Serves one accepted connection by its listener's kind.
///
/// Each path is boxed: a future is as large as its largest state, so without the boxes every
/// connection's task would be sized for the TLS path (the handshake and the TLS stream inline) and a
/// plain-HTTP client would carry that for its whole life. Boxed, an idle connection holds only the
/// state of the path it took.
async fn serve(
    stream: TcpStream,
    remote: SocketAddr,
    kind: &Listener,
    ctx: Arc<HttpContext>,
    watch: &ShutdownWatch,
) {
    match kind {
        Listener::Http80 => Box::pin(http::serve_port80_connection(stream, remote, ctx)).await,
        Listener::Main(None) => Box::pin(http::serve_connection(stream, remote, ctx, watch)).await,
        Listener::Main(Some(acceptor)) => Box::pin(serve_tls(stream, remote, acceptor, ctx, watch)).await,
    }
}

/// The TLS handshake (with its deadline), then the connection over TLS.
///
/// The handshake future is boxed, so its room (it holds the TLS connection state inline) is freed
/// when the handshake ends instead of sizing this future for the connection's life. The TLS stream
/// (about 1.2 KB of rustls state) is boxed too and the layers above hold only the pointer: held by
/// value, each layer that takes it (this future, `serve_connection`, the DERP session, the
/// reader/writer split) keeps room for a copy of its own.
async fn serve_tls(
    stream: TcpStream,
    remote: SocketAddr,
    acceptor: &TlsAcceptor,
    ctx: Arc<HttpContext>,
    watch: &ShutdownWatch,
) {
    // The ACME resolver picks an IP certificate by the connection's local address.
    let local_ip = stream.local_addr().ok().map(|a| a.ip());
    let accept = crate::ops::acme::with_local_ip(local_ip, acceptor.accept(stream));
    // The stream is boxed in its own statement, so no temporary of it outlives the handshake.
    let tls = match Box::pin(tokio::time::timeout(HANDSHAKE_TIMEOUT, accept)).await {
        Ok(Ok(tls)) => Box::new(tls),
        Ok(Err(e)) => return tracing::debug!(%remote, "TLS handshake: {e}"),
        Err(_) => return tracing::debug!(%remote, "TLS handshake timed out"),
    };
    http::serve_connection(tls, remote, ctx, watch).await
}

/// TCP keepalive (derper's long idle, to save mobile batteries), `TCP_USER_TIMEOUT` and no Nagle.
fn tune(stream: &TcpStream, tcp: TcpConfig) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let sock = SockRef::from(stream);
    match tcp.keepalive_time {
        Some(idle) => {
            let ka =
                TcpKeepalive::new().with_time(idle).with_interval(Duration::from_secs(15)).with_retries(9);
            sock.set_tcp_keepalive(&ka)?;
        }
        None => sock.set_keepalive(false)?,
    }
    if let Some(t) = tcp.user_timeout {
        sock.set_tcp_user_timeout(Some(t))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_get_keepalive_user_timeout_and_nodelay() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let tcp = TcpConfig {
            keepalive_time: Some(Duration::from_secs(600)),
            user_timeout: Some(Duration::from_secs(15)),
        };
        tune(&accepted, tcp).unwrap();
        let sock = SockRef::from(&accepted);
        assert!(accepted.nodelay().unwrap());
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(600));
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(Duration::from_secs(15)));
        tune(&accepted, TcpConfig { keepalive_time: None, user_timeout: None }).unwrap();
        assert!(!sock.keepalive().unwrap());
    }
}
