//! Progress of one-shot commands (import, synth, eval): a bar redrawn in place when stderr is a
//! terminal, one plain line per item otherwise (logs, CI, pipes).

use std::io::{IsTerminal, Write};
use std::time::Instant;

/// A progress display for `total` items.
pub struct Bar {
    /// What is being done ("importing", "evaluating").
    label: &'static str,
    /// Whether stderr is a terminal.
    tty: bool,
    /// When it started, for the ETA.
    start: Instant,
}

impl Bar {
    /// A bar for work called `label`.
    pub fn new(label: &'static str) -> Self {
        Bar { label, tty: std::io::stderr().is_terminal(), start: Instant::now() }
    }

    /// Whether it draws a bar (stderr is a terminal) rather than plain lines.
    pub fn is_terminal(&self) -> bool {
        self.tty
    }

    /// `done` of `total` finished; `what` names the last item (a case id, or a whole line).
    pub fn update(&mut self, done: usize, total: usize, what: &str) {
        let secs = self.start.elapsed().as_secs_f64();
        let eta = if done > 0 { secs / done as f64 * total.saturating_sub(done) as f64 } else { 0.0 };
        let mut err = std::io::stderr().lock();
        if self.tty {
            let width = 30;
            let filled = (width * done).checked_div(total).unwrap_or(width).min(width);
            let _ = write!(
                err,
                "\r\x1b[2K{} [{}{}] {done}/{total} {what} (eta {eta:.0} s)",
                self.label,
                "#".repeat(filled),
                ".".repeat(width - filled)
            );
            if done >= total {
                let _ = writeln!(err);
            }
        } else {
            let _ = writeln!(err, "{} {done}/{total}: {what}", self.label);
        }
    }
}
