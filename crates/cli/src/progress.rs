//! The progress bars of `apply --wait`, `scale --wait` and `delete service --wait`: one bar per
//! service on a terminal's stderr; none otherwise (the callers then print a line per change).

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::cmd_services::truncate;

/// Bars drawn together, or none when stderr is not a terminal.
pub(crate) struct Bars {
    multi: Option<MultiProgress>,
    style: ProgressStyle,
}

impl Bars {
    /// `template` is indicatif's, e.g. `"{prefix:.bold} [{bar:30.cyan/blue}] {msg}"`.
    pub fn new(template: &str) -> Bars {
        use std::io::IsTerminal;
        let multi =
            std::io::stderr().is_terminal().then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        let style = ProgressStyle::with_template(template).expect("a valid progress template").progress_chars("=> ");
        Bars { multi, style }
    }

    /// A new bar prefixed with `label` padded to `width`, saying "waiting"; None without a terminal.
    pub fn add(&self, label: &str, width: usize) -> Option<ProgressBar> {
        self.multi.as_ref().map(|m| {
            let b = m.add(ProgressBar::new(0));
            b.set_style(self.style.clone());
            b.set_prefix(format!("{label:<width$}"));
            b.set_message("waiting");
            b
        })
    }

    /// Ends every bar still drawing (a timeout), then clears them all.
    pub fn close<'a>(&self, bars: impl IntoIterator<Item = &'a Option<ProgressBar>>) {
        for b in bars.into_iter().flatten() {
            b.abandon();
        }
        self.clear();
    }

    /// A line above the bars, or on stderr without them.
    pub fn println(&self, msg: &str) {
        match &self.multi {
            Some(m) => {
                let _ = m.println(msg);
            }
            None => eprintln!("{msg}"),
        }
    }

    pub fn clear(&self) {
        if let Some(m) = &self.multi {
            let _ = m.clear();
        }
    }
}

/// Ends a service's bar with how its wait ended: `done` on success, the failure (shortened) else.
pub(crate) fn settle(bar: ProgressBar, outcome: &Result<(), String>, done: impl Into<String>) {
    match outcome {
        Ok(()) => bar.finish_with_message(done.into()),
        Err(m) => bar.abandon_with_message(format!("failed: {}", truncate(m, 60))),
    }
}
