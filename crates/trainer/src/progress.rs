//! What a run tells the person watching it: log lines and a progress bar, both on stderr.
//!
//! The bar shows only when stderr is a terminal; `quiet` silences both.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The run's voice on stderr.
pub struct Progress {
    bar: ProgressBar,
    quiet: bool,
}

impl Progress {
    /// A bar over `total_steps` optimizer steps.
    pub fn new(total_steps: u64, quiet: bool) -> Self {
        let visible = !quiet && std::io::stderr().is_terminal();
        let bar = if visible {
            ProgressBar::with_draw_target(Some(total_steps), ProgressDrawTarget::stderr())
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:28.cyan/blue}] {pos}/{len} steps · {msg} · ETA {eta}",
            )
            .expect("the template is valid")
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(250));
        Self { bar, quiet }
    }

    /// A line above the bar (or on stderr when there is no bar).
    pub fn log(&self, line: impl AsRef<str>) {
        if self.quiet {
            return;
        }
        if self.bar.is_hidden() {
            eprintln!("{}", line.as_ref());
        } else {
            self.bar.println(line.as_ref());
        }
    }

    /// Moves the bar to `steps` done (a resumed run).
    pub fn advance(&self, steps: u64) {
        self.bar.set_position(steps);
        self.bar.reset_eta();
    }

    pub fn set_epoch(&self, epoch: u64, epochs: u64) {
        self.bar.set_prefix(format!("epoch {epoch}/{epochs}"));
    }

    pub fn step(&self, loss: f32, samples: u64, samples_per_second: f64) {
        self.bar.inc(1);
        self.bar.set_message(format!(
            "loss {loss:.4} · {samples} samples · {} samples/s",
            thousands(samples_per_second)
        ));
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// `12345.6` as `12,346`.
pub fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn thousands_groups_digits() {
        assert_eq!(super::thousands(1234567.4), "1,234,567");
        assert_eq!(super::thousands(999.0), "999");
    }
}
