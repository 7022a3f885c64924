//! Progress of a training run: an indicatif bar on a terminal, plain log
//! lines otherwise (CI logs, pipes).

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;

/// An indicatif bar on a terminal; plain log lines otherwise.
pub struct Progress {
    bar: Option<ProgressBar>,
    total: i64,
}

impl Progress {
    /// A bar for `total` steps of which `done` are done.
    pub fn new(total: i64, done: i64) -> Self {
        let bar = std::io::stdout().is_terminal().then(|| {
            let bar = ProgressBar::new(total.max(0) as u64);
            bar.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_position(done.max(0) as u64);
            bar
        });
        Progress { bar, total }
    }

    /// Shows the latest step's loss and speed.
    pub fn step(&self, step: i64, loss: f64, ms_per_step: f64, tokens_per_s: f64, eta_s: f64) {
        let msg = format!(
            "loss {loss:.4}, {ms_per_step:.1} ms/step, {tokens_per_s:.0} tokens/s, ETA {}",
            format_secs(eta_s)
        );
        match &self.bar {
            Some(bar) => {
                bar.set_position(step.max(0) as u64);
                bar.set_message(msg);
            }
            None => println!("step {step:>5}/{}: {msg}", self.total),
        }
    }

    /// Prints a line above the bar.
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => println!("{line}"),
        }
    }

    /// Prints a line to stderr (a warning) above the bar.
    pub fn eprintln(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }

    /// Leaves the bar at its last state.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

/// `h:mm:ss`.
pub fn format_secs(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}
