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

/// A number as a message shows it: `1e30` and `1e-7`, not thirty-one digits or seven zeros;
/// with an exponent, to six significant digits (an f32 widened to f64 has seventeen).
pub fn number(value: impl Into<f64>) -> String {
    let value = value.into();
    let magnitude = value.abs();
    if value.is_finite() && (magnitude >= 1e9 || (magnitude > 0.0 && magnitude < 1e-4)) {
        let text = format!("{value:.5e}");
        let (mantissa, exponent) = text.split_once('e').unwrap_or((&text, "0"));
        let mantissa = mantissa.trim_end_matches('0').trim_end_matches('.');
        format!("{mantissa}e{exponent}")
    } else {
        format!("{value}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
    }

    #[test]
    fn large_and_tiny_numbers_take_an_exponent() {
        assert_eq!(number(1e30), "1e30");
        assert_eq!(number(1e30f32), "1e30");
        assert_eq!(number(9.313225746154785e20), "9.31323e20");
        assert_eq!(number(65536.0), "65536");
        assert_eq!(number(-1e-7), "-1e-7");
        assert_eq!(number(0.001), "0.001");
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(2.5f32), "2.5");
    }
}
