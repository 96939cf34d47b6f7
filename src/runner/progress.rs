//! Terminal progress: one spinner line per running stage with its row count, cleared when it ends. Off
//! when stderr is not a terminal (cron, Airflow, CI), where the logs say the same. Each step's time is
//! logged at debug level (`-v`), which is where a slow stage shows what it spends its time on.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The progress display of one run, or nothing.
#[derive(Clone)]
pub(super) struct Progress {
    bars: Option<MultiProgress>,
}

impl Progress {
    pub(super) fn new(enabled: bool) -> Progress {
        Progress {
            bars: enabled.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
        }
    }

    /// A spinner for `stage`, shown until the returned handle is dropped.
    pub(super) fn stage(&self, stage: &str) -> StageProgress {
        let bar = self.bars.as_ref().map(|bars| {
            let bar = bars.add(ProgressBar::new_spinner());
            let style = ProgressStyle::with_template("{spinner} {prefix:<28} {elapsed:>4} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner());
            bar.set_style(style);
            bar.set_prefix(stage.to_string());
            bar.set_message("running");
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        StageProgress {
            bar,
            step: Mutex::new(("starting".to_string(), Instant::now())),
        }
    }
}

pub(super) struct StageProgress {
    bar: Option<ProgressBar>,
    /// The step under way and when it began.
    step: Mutex<(String, Instant)>,
}

impl StageProgress {
    /// Shows `rows` processed so far, with what they are (`landed`, `read`).
    pub(super) fn rows(&self, what: &str, rows: u64) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!("{rows} rows {what}"));
        }
    }

    /// Starts the step `message`, ending the one before.
    pub(super) fn message(&self, message: &str) {
        self.end_step(Some(message));
        if let Some(bar) = &self.bar {
            bar.set_message(message.to_string());
        }
    }

    fn end_step(&self, next: Option<&str>) {
        // A poisoned lock only means a panic elsewhere held it; the timing is still usable.
        let mut step = self.step.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = step.1.elapsed();
        tracing::debug!(step = %step.0, elapsed_ms = elapsed.as_millis() as u64, "step done");
        if let Some(next) = next {
            *step = (next.to_string(), Instant::now());
        }
    }
}

impl Drop for StageProgress {
    fn drop(&mut self) {
        self.end_step(None);
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
