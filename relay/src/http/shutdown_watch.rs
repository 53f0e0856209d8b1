//! The server-wide shutdown token, watched by a connection task only until its DERP session
//! starts.
//!
//! A connection task runs under `select!(shutdown, serve)`, and `select!` polls every branch
//! each time the task wakes: with the token's branch that is a lock on the token every
//! connection shares plus a lock on its waiter list, for every packet of every connection. Once
//! the connection is a DERP session the DERP core closes it on shutdown itself
//! (`DerpServer::close_all`, which shutdown and drain call with the token), so the task stops
//! polling the token from then on.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use tokio_util::sync::CancellationToken;

/// Per connection task: set once the DERP core owns the connection.
#[derive(Debug, Default)]
pub struct ShutdownWatch {
    derp_owned: AtomicBool,
}

impl ShutdownWatch {
    /// A watch that polls the token until [`ShutdownWatch::hand_to_derp`].
    pub fn new() -> Self {
        Self::default()
    }

    /// From now on the DERP core closes this connection at shutdown.
    pub fn hand_to_derp(&self) {
        self.derp_owned.store(true, Ordering::Relaxed);
    }

    /// Runs `fut` until it ends (Some) or `shutdown` is cancelled before `fut` handed its
    /// connection to the DERP core (None). `fut` is pinned by the caller: moved in here, it
    /// would be stored twice in this future's state.
    pub async fn run<F: Future>(
        &self,
        shutdown: &CancellationToken,
        mut fut: Pin<&mut F>,
    ) -> Option<F::Output> {
        let mut cancelled = pin!(shutdown.cancelled());
        poll_fn(|cx| {
            if let Poll::Ready(v) = fut.as_mut().poll(cx) {
                return Poll::Ready(Some(v));
            }
            if !self.derp_owned.load(Ordering::Relaxed) && cancelled.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn shutdown_stops_the_task_until_handed_to_derp() {
        let token = CancellationToken::new();
        let watch = ShutdownWatch::new();
        let pending = std::future::pending::<()>();
        let stop = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            stop.cancel();
        });
        assert_eq!(watch.run(&token, pin!(pending)).await, None);

        let token = CancellationToken::new();
        token.cancel();
        let watch = ShutdownWatch::new();
        let work = pin!(async {
            watch.hand_to_derp();
            tokio::time::sleep(Duration::from_millis(20)).await;
            7
        });
        let out = watch.run(&token, work).await;
        assert_eq!(out, Some(7), "after the hand-over the token no longer stops the task");
    }
}
