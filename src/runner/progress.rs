//! Terminal progress: one spinner line per running stage with its row count, cleared when it ends. Off
//! when stderr is not a terminal (cron, Airflow, CI), where the logs say the same.

use std::time::Duration;

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
        StageProgress { bar }
    }
}

pub(super) struct StageProgress {
    bar: Option<ProgressBar>,
}

impl StageProgress {
    /// Shows `rows` processed so far, with what they are (`landed`, `read`).
    pub(super) fn rows(&self, what: &str, rows: u64) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!("{rows} rows {what}"));
        }
    }

    pub(super) fn message(&self, message: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(message.to_string());
        }
    }
}

impl Drop for StageProgress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
