//! `Server::spawn`: binds the listeners, owns every task, shuts down cleanly.
//!
//! Structured concurrency: every accept loop and connection task is tracked by one
//! [`TaskTracker`] and stopped by one [`CancellationToken`]; [`Server::shutdown`] cancels and waits.
//! Dropping a [`Server`] cancels too, so a forgotten handle leaks nothing but a brief wind-down.

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

use crate::derp_server::{DerpServer, DerpServerConfig};
use crate::http::{self, HomePage, HttpContext};

/// Socket options applied to every accepted TCP connection.
#[derive(Clone, Copy, Debug)]
pub struct TcpTuning {
    /// Idle time before TCP keepalive probes (`-tcp-keepalive-time`, 10 min); None = off.
    pub keepalive_time: Option<Duration>,
    /// `TCP_USER_TIMEOUT` (`-tcp-user-timeout`, 15 s); None = the kernel default.
    pub user_timeout: Option<Duration>,
}

impl Default for TcpTuning {
    fn default() -> Self {
        Self { keepalive_time: Some(Duration::from_secs(600)), user_timeout: Some(Duration::from_secs(15)) }
    }
}

/// Everything needed to run a relay.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Main listen address (`-a`). `[::]` binds dual-stack (falling back to `0.0.0.0`).
    pub listen: SocketAddr,
    /// TLS on the main port, or plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Plain-HTTP port served next to a TLS main port (same IP); ignored without TLS. 0 = ephemeral.
    pub http_port: Option<u16>,
    /// What `/` serves.
    pub home: HomePage,
    /// `-derp=false` serves `/derp` as 404.
    pub derp_enabled: bool,
    /// The DERP core's settings.
    pub derp: DerpServerConfig,
    /// Accepted-socket options.
    pub tcp: TcpTuning,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("listening on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
}

/// A running relay. Dropping it stops it (without waiting); prefer [`Server::shutdown`].
pub struct Server {
    local_addr: SocketAddr,
    http_port_addr: Option<SocketAddr>,
    derp: Arc<DerpServer>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Server {
    /// Binds the listeners and starts serving. Must be called inside a tokio runtime.
    pub async fn spawn(config: ServerConfig) -> Result<Server, SpawnError> {
        let server_public = config.derp.private_key.public();
        let derp = DerpServer::new(config.derp.clone());
        let main = bind(config.listen)?;
        let local_addr =
            main.local_addr().map_err(|source| SpawnError::Bind { addr: config.listen, source })?;
        let port80 = match (&config.tls, config.http_port) {
            (Some(_), Some(port)) => {
                let l = bind(SocketAddr::new(local_addr.ip(), port))?;
                Some(l)
            }
            _ => None,
        };
        let http_port_addr = port80.as_ref().and_then(|l| l.local_addr().ok());
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let ctx = Arc::new(HttpContext {
            derp: derp.clone(),
            server_public,
            home: config.home.clone(),
            derp_enabled: config.derp_enabled,
            tasks: tracker.clone(),
            cancel: cancel.clone(),
        });
        let tls = config.tls.clone().map(TlsAcceptor::from);
        tracker.spawn(accept_loop(
            main,
            Listener::Main(tls),
            ctx.clone(),
            config.tcp,
            cancel.clone(),
            tracker.clone(),
        ));
        if let Some(l) = port80 {
            tracker.spawn(accept_loop(l, Listener::Http80, ctx, config.tcp, cancel.clone(), tracker.clone()));
        }
        tracing::info!(%local_addr, tls = config.tls.is_some(), ?http_port_addr, "relay listening");
        Ok(Server { local_addr, http_port_addr, derp, cancel, tracker })
    }

    /// The bound main address (with the real port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound plain-HTTP port address, if one is served.
    pub fn http_port_addr(&self) -> Option<SocketAddr> {
        self.http_port_addr
    }

    /// The DERP core.
    pub fn derp(&self) -> &Arc<DerpServer> {
        &self.derp
    }

    /// Stops accepting, closes every connection and waits for all tasks to end.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.derp.close_all();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.derp.close_all();
    }
}

/// Binds with `SO_REUSEADDR` (fast restarts); `[::]` is made dual-stack, or `0.0.0.0` if the host
/// has no IPv6.
fn bind(addr: SocketAddr) -> Result<TcpListener, SpawnError> {
    let err = |source| SpawnError::Bind { addr, source };
    match bind_one(addr) {
        Ok(l) => Ok(l),
        Err(e) if addr.ip() == IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED) => {
            tracing::debug!("dual-stack bind of {addr} failed ({e}); using IPv4 only");
            bind_one(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), addr.port())).map_err(err)
        }
        Err(e) => Err(err(e)),
    }
}

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

enum Listener {
    Main(Option<TlsAcceptor>),
    Http80,
}

async fn accept_loop(
    listener: TcpListener,
    kind: Listener,
    ctx: Arc<HttpContext>,
    tcp: TcpTuning,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let kind = Arc::new(kind);
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
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
        if let Err(e) = tune(&stream, tcp) {
            tracing::debug!(%remote, "setting socket options: {e}");
        }
        let (ctx, kind, cancel) = (ctx.clone(), kind.clone(), cancel.clone());
        tracker.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = serve(stream, remote, &kind, ctx) => {}
            }
        });
    }
}

async fn serve(stream: TcpStream, remote: SocketAddr, kind: &Listener, ctx: Arc<HttpContext>) {
    match kind {
        Listener::Http80 => http::serve_port80_connection(stream, remote, ctx).await,
        Listener::Main(None) => http::serve_connection(stream, remote, ctx).await,
        Listener::Main(Some(acceptor)) => {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => http::serve_connection(tls, remote, ctx).await,
                Ok(Err(e)) => tracing::debug!(%remote, "TLS handshake: {e}"),
                Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
            }
        }
    }
}

/// TCP keepalive (derper's long idle, to save mobile batteries), `TCP_USER_TIMEOUT` and no Nagle.
fn tune(stream: &TcpStream, tcp: TcpTuning) -> io::Result<()> {
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
        let tcp = TcpTuning {
            keepalive_time: Some(Duration::from_secs(600)),
            user_timeout: Some(Duration::from_secs(15)),
        };
        tune(&accepted, tcp).unwrap();
        let sock = SockRef::from(&accepted);
        assert!(accepted.nodelay().unwrap());
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(600));
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(Duration::from_secs(15)));
        tune(&accepted, TcpTuning { keepalive_time: None, user_timeout: None }).unwrap();
        assert!(!sock.keepalive().unwrap());
    }
}
