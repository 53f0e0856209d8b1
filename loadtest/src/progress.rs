//! A progress bar on stderr (hidden when stderr is not a terminal), fed by shared counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar with a background ticker; dropping it (or [`Progress::finish`]) clears it.
pub struct Progress {
    bar: ProgressBar,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    /// A bar of `len` steps; every 250 ms `position()` sets the position and `counter` (a count of
    /// `unit`s) is shown as a rate.
    pub fn start(
        len: u64,
        unit: &'static str,
        position: impl Fn() -> u64 + Send + 'static,
        counter: Arc<AtomicU64>,
    ) -> Self {
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        let b = bar.clone();
        let ticker = tokio::spawn(async move {
            let mut last = counter.load(Ordering::Relaxed);
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                let now = counter.load(Ordering::Relaxed);
                b.set_position(position());
                b.set_message(format!("{} {unit}/s", (now - last) * 4));
                last = now;
            }
        });
        Self { bar, ticker: Some(ticker) }
    }

    /// Stops and clears the bar.
    pub fn finish(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(t) = self.ticker.take() {
            t.abort();
        }
        self.bar.finish_and_clear();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop();
    }
}
