//! Threads inside a network namespace: a lab's in-process parts (DERP clients, netcheckers, delaying
//! forwarders) open their sockets in the namespace they belong to. `setns` moves only the calling thread,
//! so each runs on a thread of its own with a current-thread Tokio runtime.

use std::future::Future;
use std::os::fd::AsRawFd;

use anyhow::{bail, Context, Result};

/// Moves the calling thread into network namespace `name` (sockets it opens from then on live there).
pub fn enter_netns(name: &str) -> Result<()> {
    let f = std::fs::File::open(format!("/run/netns/{name}")).with_context(|| format!("netns {name}"))?;
    // SAFETY: setns on a valid namespace fd only changes this thread's network namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns({name}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `body` to completion in a thread that lives in namespace `ns`; its result is the call's.
pub fn run_in_netns<F>(ns: String, body: impl FnOnce() -> F + Send + 'static) -> Result<()>
where
    F: Future<Output = Result<()>>,
{
    std::thread::spawn(move || {
        enter_netns(&ns)?;
        tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(body())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
}

/// Runs `f` on a new thread inside namespace `ns` until the guard is dropped (or `f` ends; an error is
/// printed). [`NsThread::spawn`] returns once the thread is in the namespace and `f` has started.
pub struct NsThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NsThread {
    /// Starts `f` in `ns`.
    pub fn spawn<F, Fut>(ns: &str, f: F) -> Result<Self>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<()>>,
    {
        let ns = ns.to_string();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let thread = std::thread::spawn(move || {
            if let Err(e) = enter_netns(&ns) {
                return ready_tx.send(Err(format!("{e:#}"))).unwrap_or(());
            }
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let work = f();
                tokio::pin!(work);
                let _ = ready_tx.send(Ok(()));
                tokio::select! {
                    r = &mut work => if let Err(e) = r { eprintln!("namespace thread in {ns} failed: {e:#}") },
                    _ = stop_rx => {}
                }
            });
        });
        ready_rx.recv().context("namespace thread died")?.map_err(anyhow::Error::msg)?;
        Ok(Self { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for NsThread {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
