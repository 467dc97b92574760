//! Stopping on a signal: Ctrl-C (SIGINT), a batch scheduler's or service manager's SIGTERM, a
//! closed terminal's SIGHUP. The first asks the work to stop at its next safe point (a run saves
//! a checkpoint at the end of its step; a sweep waits for its run in progress, then writes its
//! report); a second ends the process at once. Either way the process exits with 128 + the
//! first signal's number, as shells expect of a process a signal stopped.
//!
//! A sweep passes the signals it receives on to its run in progress, which shares its process
//! group (so that Ctrl-Z and a terminal's Ctrl-C reach both). A Ctrl-C at the terminal, or a
//! service manager's SIGTERM to every process of the job, thus reaches the run twice at once:
//! directly and from the sweep. The same signal again within [`DUPLICATE_WINDOW`] therefore
//! counts once; a person who means "quit now" sends it after seeing the notice.

use std::io::Write as _;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use signal_hook::consts::signal::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// The signals that stop a run or a sweep after its next safe point.
pub const STOP_SIGNALS: [i32; 3] = [SIGINT, SIGTERM, SIGHUP];

/// How soon after the first signal the same signal counts as a copy of it, not as a second.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(1);

/// What the signals asked so far, shared between the thread that receives them and the work.
#[derive(Debug, Default)]
pub struct Interrupt {
    /// Set by the first signal: the trainer reads it at each step boundary, a sweep before each
    /// run.
    stop: Arc<AtomicBool>,
    /// The first signal's number; 0 until one arrives.
    signal: AtomicI32,
    /// When the first signal arrived.
    first_at: Mutex<Option<Instant>>,
    /// The child process the signals are passed on to (a sweep's run in progress). A mutex, not
    /// an atomic: a child is started and recorded under it, so that a signal arriving meanwhile
    /// either stops the start or reaches the child, never neither.
    child: Mutex<Option<u32>>,
}

/// What a signal did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// The first: the work stops at its next safe point.
    First,
    /// The first signal again within [`DUPLICATE_WINDOW`]: a copy of it, ignored.
    Copy,
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
    /// passes it on to the child in progress and exits. When the handlers cannot be installed,
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
                        Received::Copy => {}
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

    /// Records `signal`, arrived now, and passes it on to the child in progress, if any (a copy
    /// of the first signal is neither counted nor passed on).
    pub fn receive(&self, signal: i32) -> Received {
        self.receive_at(signal, Instant::now())
    }

    fn receive_at(&self, signal: i32, now: Instant) -> Received {
        let child = self.child_slot();
        let mut first_at = self.first_at.lock().unwrap_or_else(|p| p.into_inner());
        let first = first_at.is_none();
        if first {
            *first_at = Some(now);
            self.signal.store(signal, Ordering::SeqCst);
            self.stop.store(true, Ordering::SeqCst);
        } else if self.signal() == Some(signal)
            && first_at.is_some_and(|at| now.saturating_duration_since(at) < DUPLICATE_WINDOW)
        {
            return Received::Copy;
        }
        if let Some(pid) = *child {
            // The pid is that of a child not yet reaped (it is cleared before), so it names no
            // other process. A failure means the child has just exited: nothing to stop.
            if let Ok(pid) = libc::pid_t::try_from(pid) {
                // SAFETY: kill has no memory effects; any pid and signal are valid arguments.
                unsafe { libc::kill(pid, signal) };
            }
        }
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

    /// Starts `command` as the child that signals are passed on to, unless a signal has already
    /// asked the work to stop (`Ok(None)`). Call [`Interrupt::forget_child`] before reaping it.
    pub(crate) fn spawn_child(&self, command: &mut Command) -> std::io::Result<Option<Child>> {
        let mut slot = self.child_slot();
        if self.stopped() {
            return Ok(None);
        }
        let child = command.spawn()?;
        *slot = Some(child.id());
        Ok(Some(child))
    }

    /// Stops passing signals on to the child: called once its pipes closed (it is exiting) and
    /// before it is reaped, after which its pid may name another process.
    pub(crate) fn forget_child(&self) {
        *self.child_slot() = None;
    }

    fn child_slot(&self) -> MutexGuard<'_, Option<u32>> {
        // A panic while holding the lock leaves only a pid behind: still valid to read.
        self.child
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
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

    #[test]
    fn the_same_signal_within_the_window_is_a_copy_of_the_first() {
        let interrupt = Interrupt::new();
        let t0 = Instant::now();
        assert_eq!(interrupt.receive_at(SIGINT, t0), Received::First);
        let soon = t0 + DUPLICATE_WINDOW / 2;
        assert_eq!(interrupt.receive_at(SIGINT, soon), Received::Copy);
        // Another signal is no copy, however soon.
        assert_eq!(interrupt.receive_at(SIGTERM, soon), Received::Again(130));
        let later = t0 + DUPLICATE_WINDOW;
        assert_eq!(interrupt.receive_at(SIGINT, later), Received::Again(130));
        assert_eq!(interrupt.signal(), Some(SIGINT));
    }

    #[test]
    fn no_child_starts_after_a_signal() {
        let interrupt = Interrupt::new();
        let mut child = interrupt
            .spawn_child(&mut Command::new("true"))
            .unwrap()
            .expect("no signal yet: the child starts");
        assert_eq!(*interrupt.child_slot(), Some(child.id()));
        interrupt.forget_child();
        child.wait().unwrap();
        assert_eq!(*interrupt.child_slot(), None);
        interrupt.receive(SIGHUP);
        assert!(
            interrupt
                .spawn_child(&mut Command::new("true"))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_signal_reaches_the_child_in_progress() {
        let interrupt = Interrupt::new();
        let mut command = Command::new("sleep");
        command.arg("30");
        let mut child = interrupt.spawn_child(&mut command).unwrap().unwrap();
        interrupt.receive(SIGTERM);
        interrupt.forget_child();
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(status.signal(), Some(SIGTERM), "{status}");
    }
}
