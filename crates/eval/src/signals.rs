//! Stopping on a signal: Ctrl-C (SIGINT), a batch scheduler's or service manager's SIGTERM, a
//! closed terminal's SIGHUP. The first asks the work to stop at its next safe point (a run saves
//! a checkpoint at the end of its step); a second ends the process at once. Either way the
//! process exits with 128 + the first signal's number, as shells expect of a process a signal
//! stopped.

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use signal_hook::consts::signal::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// The signals that stop a run or a sweep after its next safe point.
pub const STOP_SIGNALS: [i32; 3] = [SIGINT, SIGTERM, SIGHUP];

/// What the signals asked so far, shared between the thread that receives them and the work.
#[derive(Debug, Default)]
pub struct Interrupt {
    /// Set by the first signal: the trainer reads it at each step boundary.
    stop: Arc<AtomicBool>,
    /// The first signal's number; 0 until one arrives.
    signal: AtomicI32,
}

/// What a signal did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// The first: the work stops at its next safe point.
    First,
    /// Another after the first: the process must exit now, with this status.
    Again(u8),
}

impl Interrupt {
    /// An interrupt that no signal reaches: the work stops only when [`Interrupt::receive`] is
    /// called (by a library's caller with its own handling, or a test).
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Catches [`STOP_SIGNALS`] for the rest of the process, but those it was started ignoring
    /// (`nohup` ignores SIGHUP; a shell, Ctrl-C in its background jobs): they stay ignored. On
    /// the first, prints `<signal>: <first_notice> (<how to quit now>)` on stderr; on a second,
    /// exits. When the handlers cannot be installed,
    /// warns and returns an interrupt that no signal reaches (a signal then ends the process at
    /// once, as by default).
    pub fn catch(first_notice: &'static str) -> Arc<Self> {
        let interrupt = Self::new();
        let caught = STOP_SIGNALS.into_iter().filter(|&signal| !ignored(signal));
        let mut signals = match Signals::new(caught) {
            Ok(signals) => signals,
            Err(e) => {
                warn(&format!(
                    "warning: Ctrl-C, SIGTERM and SIGHUP will end the process without a \
                     checkpoint: {e}"
                ));
                return interrupt;
            }
        };
        let receiver = Arc::clone(&interrupt);
        let spawned = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for signal in signals.forever() {
                    match receiver.receive(signal) {
                        Received::First => warn(&format!(
                            "\n{}: {first_notice} ({} to quit now)",
                            if signal == SIGINT {
                                "interrupt"
                            } else {
                                signal_name(signal)
                            },
                            if signal == SIGINT {
                                "Ctrl-C again".to_string()
                            } else {
                                format!("{} again", signal_name(signal))
                            }
                        )),
                        Received::Again(status) => std::process::exit(status.into()),
                    }
                }
            });
        if let Err(e) = spawned {
            warn(&format!(
                "warning: Ctrl-C, SIGTERM and SIGHUP will not save a checkpoint: {e}"
            ));
        }
        interrupt
    }

    /// Records `signal`: the first stops the work, another means "quit now".
    pub fn receive(&self, signal: i32) -> Received {
        let first = self
            .signal
            .compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        self.stop.store(true, Ordering::SeqCst);
        if first {
            Received::First
        } else {
            Received::Again(self.exit_status())
        }
    }

    /// The flag the trainer reads at each step boundary ([`allcores_trainer::Options::stop`]).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.stop)
    }

    /// Whether a signal asked the work to stop.
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// The first signal received, if any.
    pub fn signal(&self) -> Option<i32> {
        match self.signal.load(Ordering::SeqCst) {
            0 => None,
            signal => Some(signal),
        }
    }

    /// The exit status of a process the first signal stopped: 128 + its number (130 for Ctrl-C,
    /// 143 for SIGTERM, 129 for SIGHUP); 130 when the stop came from no signal.
    pub fn exit_status(&self) -> u8 {
        let signal = self.signal().unwrap_or(SIGINT);
        u8::try_from(128 + signal).unwrap_or(u8::MAX)
    }
}

/// "SIGINT", "SIGTERM", "SIGHUP"; "a signal" for another.
pub fn signal_name(signal: i32) -> &'static str {
    match signal {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

/// Whether `signal` is ignored (`SIG_IGN`), as a process started by `nohup` finds SIGHUP.
fn ignored(signal: i32) -> bool {
    // SAFETY: with no new action, sigaction only writes the current one into `current`, a
    // zeroed sigaction (a valid value of that plain C struct).
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        libc::sigaction(signal, std::ptr::null(), &mut current) == 0
            && current.sa_sigaction == libc::SIG_IGN
    }
}

/// One line on stderr, ignoring a failure: after SIGHUP the terminal may be gone, and a lost
/// notice must not panic the thread that handles the next signal.
fn warn(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_signal_stops_and_sets_the_status_a_second_quits() {
        let interrupt = Interrupt::new();
        assert!(!interrupt.stopped());
        assert_eq!(interrupt.signal(), None);
        assert_eq!(interrupt.exit_status(), 130);
        let stop = interrupt.stop_flag();
        assert_eq!(interrupt.receive(SIGTERM), Received::First);
        assert!(stop.load(Ordering::SeqCst));
        assert_eq!(interrupt.signal(), Some(SIGTERM));
        // The first signal sets the status; a later one of another kind does not change it.
        assert_eq!(interrupt.receive(SIGINT), Received::Again(143));
        assert_eq!(interrupt.signal(), Some(SIGTERM));

        let hangup = Interrupt::new();
        assert_eq!(hangup.receive(SIGHUP), Received::First);
        assert_eq!(hangup.exit_status(), 129);
        let ctrl_c = Interrupt::new();
        assert_eq!(ctrl_c.receive(SIGINT), Received::First);
        assert_eq!(ctrl_c.exit_status(), 130);
    }
}
