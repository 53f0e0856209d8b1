//! The transport-free DERP server core (Tailscale `derpserver.Server`).
//!
//! INTERFACE CONTRACT (between the core and the HTTP/TLS layer): the HTTP layer calls
//! [`DerpServer::accept`] with the upgraded byte stream (any bytes the client pipelined after the
//! request headers must already be readable from `io`) and a [`ConnInfo`]. Everything after the
//! HTTP upgrade — ServerKey, handshake, frames — happens here. Keep these signatures stable.
//!
//! `accept` runs the handshake ([`crate::core::handshake`]: ServerKey, ClientInfo, admission,
//! registration, ServerInfo), then the reader loop ([`crate::core::reader`]) and the send loop
//! ([`crate::core::writer`]) side by side in the caller's task until either ends or the
//! connection is cancelled (each polled only when it was woken), then unregistration. No read-idle timeout after the handshake. The [`Metrics`] are owned here and
//! handed to each part explicitly.

use std::fmt;
use std::future::{poll_fn, Future};
use std::os::fd::RawFd;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use derpfleet_proto::consts::{HANDSHAKE_TIMEOUT, KEEPALIVE_INTERVAL, KEEPALIVE_JITTER, MESH_WRITE_TIMEOUT};
use derpfleet_proto::frame::{FrameDecoder, Role};
use derpfleet_proto::{MeshKey, NodePrivate, NodePublic};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::core::branch_wake::{bit, branch_waker};
pub use crate::core::handshake::{Admission, AdmissionCheck, AdmissionHook, ConnInfo};
use crate::core::handshake::{Handshake, HandshakeFailure};
use crate::core::metrics::Metrics;
use crate::core::reader::Reader;
use crate::core::reader::SessionError;
use crate::core::recv_limit::SharedRecvRate;
use crate::core::registry::Conn;
use crate::core::registry::Registry;
use crate::core::writer::{self, InFlight, WriteError, WriterConfig};

/// How long a closing connection may take to shut its write side down.
const SHUTDOWN_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often buffered histogram samples are folded into buckets.
const METRICS_UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Settings of the server core.
#[derive(Clone, Debug)]
pub struct DerpServerConfig {
    /// The server's identity key (derper's `-c` file).
    pub private_key: NodePrivate,
    /// The region mesh key, if this server meshes.
    pub mesh_key: Option<MeshKey>,
    /// Per-frame write deadline for regular clients (`-tcp-write-timeout`; None = no deadline).
    pub write_timeout: Option<Duration>,
    /// Per-connection data and disco queue depth (32, or `TS_DEBUG_DERP_PER_CLIENT_SEND_QUEUE_DEPTH`).
    pub queue_depth: usize,
}

impl DerpServerConfig {
    /// derper's defaults for everything but the key.
    pub fn new(private_key: NodePrivate) -> Self {
        Self {
            private_key,
            mesh_key: None,
            write_timeout: crate::defaults::TCP_WRITE_TIMEOUT.non_zero(),
            queue_depth: crate::defaults::SEND_QUEUE_DEPTH,
        }
    }
}

/// Less common settings of the server core, kept apart from [`DerpServerConfig`] so that the
/// contract struct keeps its fields. `Default` is derper's behaviour.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    /// Write deadline for mesh peers (30 s).
    pub mesh_write_timeout: Duration,
    /// Deadline for the ServerKey write and the ClientInfo read (10 s).
    pub handshake_timeout: Duration,
    /// KeepAlive period before jitter (60 s).
    pub keepalive_interval: Duration,
    /// Upper bound (exclusive) of the per-connection KeepAlive jitter (5 s).
    pub keepalive_jitter: Duration,
    /// Admission check for non-mesh clients (None = admit everyone).
    pub admission: Option<AdmissionHook>,
    /// Per-client receive byte rate (`-rate-config`; None = unlimited). Mesh peers are exempt.
    pub recv_rate: Option<Arc<SharedRecvRate>>,
}

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            mesh_write_timeout: MESH_WRITE_TIMEOUT,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            keepalive_interval: KEEPALIVE_INTERVAL,
            keepalive_jitter: KEEPALIVE_JITTER,
            admission: None,
            recv_rate: None,
        }
    }
}

/// The DERP server core, shared by all connections.
pub struct DerpServer {
    config: DerpServerConfig,
    options: CoreConfig,
    public_key: NodePublic,
    registry: Registry,
    metrics: Arc<Metrics>,
    next_conn_id: AtomicU64,
    shutdown: CancellationToken,
    upkeep: Option<tokio::task::AbortHandle>,
}

impl fmt::Debug for DerpServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DerpServer").field("public_key", &self.public_key).finish_non_exhaustive()
    }
}

impl Drop for DerpServer {
    fn drop(&mut self) {
        if let Some(h) = &self.upkeep {
            h.abort();
        }
        self.shutdown.cancel();
    }
}

impl DerpServer {
    /// Creates the core. Inside a Tokio runtime it also starts a small metrics upkeep task.
    pub fn new(config: DerpServerConfig) -> Arc<Self> {
        Self::with_options(config, CoreConfig::default())
    }

    /// [`DerpServer::new`] with non-default [`CoreConfig`].
    pub fn with_options(config: DerpServerConfig, options: CoreConfig) -> Arc<Self> {
        let metrics = Arc::new(Metrics::new());
        let public_key = config.private_key.public();
        let upkeep = tokio::runtime::Handle::try_current().ok().map(|rt| {
            let m = Arc::downgrade(&metrics);
            rt.spawn(async move {
                let mut tick = tokio::time::interval(METRICS_UPKEEP_INTERVAL);
                loop {
                    tick.tick().await;
                    match m.upgrade() {
                        Some(m) => m.run_upkeep(),
                        None => return,
                    }
                }
            })
            .abort_handle()
        });
        Arc::new(Self {
            registry: Registry::new(public_key, metrics.clone()),
            config,
            options,
            public_key,
            metrics,
            next_conn_id: AtomicU64::new(1),
            shutdown: CancellationToken::new(),
            upkeep,
        })
    }

    /// The server's public key.
    pub fn public_key(&self) -> NodePublic {
        self.public_key
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &DerpServerConfig {
        &self.config
    }

    /// The less common settings it runs with.
    pub fn options(&self) -> &CoreConfig {
        &self.options
    }

    /// The server's metrics (the HTTP layer counts `websocket_accepts` here).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Prometheus text of every metric (for `/debug/varz`).
    pub fn render_metrics(&self) -> String {
        self.metrics.render()
    }

    /// The connection table (for the mesh and for tests).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Closes every connection, including those still in the handshake; `accept` calls then
    /// return promptly. Later connections are closed at once.
    pub fn close_all(&self) {
        self.shutdown.cancel();
    }

    /// Serves one upgraded DERP connection until it closes. Never panics on input; errors only
    /// close this connection.
    pub async fn accept<S>(self: &Arc<Self>, io: S, info: ConnInfo)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        self.accept_direct(io, info, None).await
    }

    /// [`DerpServer::accept`] for a plain TCP stream whose socket is `fd`: other connections'
    /// readers may then write packets straight to it (see `core::outbox::DirectSlot`). `fd` must
    /// be the socket `io` writes to, open until `io` is dropped.
    pub(crate) async fn accept_direct<S>(self: &Arc<Self>, io: S, info: ConnInfo, fd: Option<RawFd>)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        self.metrics.accepts.increment(1);
        let start = Instant::now();
        let (mut r, mut w) = tokio::io::split(io);
        let mut buf = BytesMut::new();
        let mut dec = FrameDecoder::new(Role::Server);
        let deadline = start + self.options.handshake_timeout;
        let handshake = Handshake {
            private_key: &self.config.private_key,
            public_key: self.public_key,
            mesh_key: self.config.mesh_key.as_ref(),
            admission: self.options.admission.as_ref(),
            queue_depth: self.config.queue_depth,
            registry: &self.registry,
            metrics: &self.metrics,
        };
        let id = self.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let conn = tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => Err(HandshakeFailure::Shutdown),
            c = handshake.run(&mut r, &mut w, &mut buf, &mut dec, &info, id, self.shutdown.child_token(), deadline) => c,
        };
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                self.metrics.handshake_errors.increment(1);
                tracing::debug!(remote = %info.remote, error = %e, "DERP handshake failed");
                return;
            }
        };
        self.metrics.handshake_seconds.record(start.elapsed().as_secs_f64());
        tracing::debug!(remote = %info.remote, key = %conn.key.short(), id = conn.id, "DERP client connected");
        if info.not_ideal {
            self.metrics.current_notideal_connections.increment(1.0);
        }

        let settings = WriterConfig {
            write_timeout: if conn.can_mesh {
                Some(self.options.mesh_write_timeout)
            } else {
                self.config.write_timeout
            },
            keepalive: self.options.keepalive_interval + jitter(self.options.keepalive_jitter),
        };
        let mut in_flight = InFlight::default();
        let limit = match &self.options.recv_rate {
            Some(rate) if !conn.can_mesh => Some(rate.client()),
            _ => None,
        };
        let mut reader = Reader::new(&conn, &self.registry, &self.metrics).with_recv_limit(limit);
        // Declared after the stream halves, so dropped (the fd withdrawn) before they close it,
        // however this future ends.
        let direct = DirectGuard::new(&conn, fd);
        let (read_result, write_result) = {
            // Pinned here, not moved into the helper: a future moved into an async fn is stored
            // twice in its state (the argument and the pinned local), per connection.
            let reading = pin!(reader.run(&mut r, &mut buf, &mut dec));
            let sender = pin!(writer::run_writer(
                &mut w,
                &conn,
                &self.registry,
                &self.metrics,
                settings,
                &mut in_flight,
            ));
            run_until_cancelled(&conn, reading, sender).await
        };
        // Publishes the reader's last counts (and its home-connection gauge) before unregistering.
        drop(reader);
        // Neither loop finished: the connection was cancelled (ClosePeer, shutdown, the other
        // loop ending). A write cut short counts its packets as `write_error`, as a failed one.
        let read_result = read_result.unwrap_or(Ok(()));
        let write_result = write_result.unwrap_or_else(|| {
            if in_flight.is_empty() {
                Ok(())
            } else {
                in_flight.fail(&self.metrics);
                Err(WriteError::Io(std::io::ErrorKind::ConnectionAborted.into()))
            }
        });
        conn.out.close();
        drop(direct);
        {
            let d = conn.out.direct.lock();
            self.registry.unregister(&conn, &d.seen);
        }
        if info.not_ideal {
            self.metrics.current_notideal_connections.decrement(1.0);
        }
        if write_result.is_ok() {
            // A polite close (TLS close_notify), but never wait on a peer that stopped reading.
            let _ = tokio::time::timeout(SHUTDOWN_WRITE_TIMEOUT, w.shutdown()).await;
        }
        match (read_result, write_result) {
            (Err(e), _) => {
                tracing::debug!(key = %conn.key.short(), id = conn.id, error = %e, "DERP reader closed")
            }
            (_, Err(e)) => {
                tracing::debug!(key = %conn.key.short(), id = conn.id, error = %e, "DERP writer closed")
            }
            _ => tracing::debug!(key = %conn.key.short(), id = conn.id, "DERP client disconnected"),
        }
    }
}

/// Offers a connection's socket for direct writes while alive; withdraws it on drop.
struct DirectGuard<'a>(&'a Conn);

impl<'a> DirectGuard<'a> {
    fn new(conn: &'a Conn, fd: Option<RawFd>) -> Self {
        conn.out.set_direct_fd(fd);
        Self(conn)
    }
}

impl Drop for DirectGuard<'_> {
    fn drop(&mut self) {
        self.0.out.set_direct_fd(None);
    }
}

/// Branches of a connection task (see [`crate::core::branch_wake`]).
const READER: usize = 0;
const SENDER: usize = 1;
const CANCEL: usize = 2;

/// Runs one connection's reader and send loop side by side until either ends or `conn` is
/// cancelled, polling each only when its own waker fired: a packet for the send loop does not
/// re-poll the idle reader, a readable socket does not re-poll the idle send loop, and the
/// cancellation token is looked at only when it fires. The first loop to end cancels the
/// connection (the other is dropped, as cancellation drops both). Returns each loop's result,
/// None for a loop stopped by cancellation.
async fn run_until_cancelled<R, W>(
    conn: &Arc<Conn>,
    mut reader: Pin<&mut R>,
    mut sender: Pin<&mut W>,
) -> (Option<Result<(), SessionError>>, Option<Result<(), WriteError>>)
where
    R: Future<Output = Result<(), SessionError>>,
    W: Future<Output = Result<(), WriteError>>,
{
    let mut cancelled = pin!(conn.cancel.cancelled());
    let wakers = [READER, SENDER, CANCEL].map(|b| branch_waker(conn, b));
    let (mut read_result, mut write_result) = (None, None);
    poll_fn(|cx| {
        let woken = conn.wake.take_woken(cx);
        if woken & bit(CANCEL) != 0
            && cancelled.as_mut().poll(&mut Context::from_waker(&wakers[CANCEL])).is_ready()
        {
            return Poll::Ready(());
        }
        if woken & bit(READER) != 0 {
            if let Poll::Ready(r) = reader.as_mut().poll(&mut Context::from_waker(&wakers[READER])) {
                read_result = Some(r);
                conn.cancel.cancel();
                return Poll::Ready(());
            }
        }
        if woken & bit(SENDER) != 0 {
            if let Poll::Ready(r) = sender.as_mut().poll(&mut Context::from_waker(&wakers[SENDER])) {
                write_result = Some(r);
                conn.cancel.cancel();
                return Poll::Ready(());
            }
        }
        Poll::Pending
    })
    .await;
    (read_result, write_result)
}

/// A per-connection KeepAlive jitter, uniform in `[0, max)`.
pub fn jitter(max: Duration) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    Duration::from_nanos(rand::random::<u64>() % max.as_nanos().min(u64::MAX as u128) as u64)
}
