//! The pool's other threads poll for work through a step instead of falling asleep between its
//! parallel regions.
//!
//! A training step is some twenty parallel regions (the matrix products, the optimizer's pass)
//! with a little serial work between them (burn's autodiff bookkeeping, the loss). rayon puts a
//! thread that has found no work for a few dozen rounds (some tens of microseconds) to sleep,
//! and the next region then waits for it to wake: a region that follows a serial gap takes
//! markedly longer than one that follows another region, and on a busy host a sleeping core can
//! come back so late that a 2-thread step is slower than a 1-thread one (the figures are in
//! `docs/performance.md`, "Figures moved from the source"). OpenMP (PyTorch's threads) polls for a
//! while before it sleeps; this gives rayon's threads the same habit for the length of a run's
//! steps: at the start of each step (or calibration step) [`Poller::arm`] sends every thread
//! but the one driving the step a job that takes whatever work the pool has, one job after the
//! other, and returns once it has found none for [`PATIENCE`].
//!
//! Scheduling only: which thread runs a piece of work never changes what it computes, so the
//! results are those of sleeping threads (tests check the weights). The time spent polling is
//! counted apart ([`crate::usage::polling_time`]), so the CPU utilisation a run reports stays
//! that of the work.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::settings::IdleThreads;
use crate::usage;

/// How long a polling thread goes on without finding work before it goes back to rayon (and to
/// sleep): longer than the serial gaps inside a step and between two steps, short enough that
/// a run that stops stepping (to score an epoch, to write a checkpoint) frees its cores almost
/// at once.
pub const PATIENCE: Duration = Duration::from_millis(1);

thread_local! {
    /// How many of the polling jobs sent by the thread that drives a pool's steps are still
    /// out. A pool's threads are its own, so this is per pool, whatever poller sent them.
    static OUT: Arc<AtomicUsize> = Arc::new(AtomicUsize::new(0));
}

/// Sends the pool's idle threads polling at the start of each step, as the run's
/// `training.idle_threads` says.
#[derive(Debug, Clone, Copy)]
pub struct Poller {
    polls: bool,
}

impl Poller {
    /// A poller for a pool of `threads` threads on a machine with `available`: none polls with
    /// `idle_threads = "sleep"`, on one thread, or with more threads than cores (a polling thread
    /// would then take its core from one with work to do).
    pub fn new(idle: IdleThreads, threads: usize, available: usize) -> Self {
        Self {
            polls: idle == IdleThreads::Poll && threads > 1 && threads <= available,
        }
    }

    /// Whether this poller sends threads polling at all.
    pub fn polls(&self) -> bool {
        self.polls
    }

    /// What the pool's idle threads do under this poller.
    pub fn idle_threads(&self) -> IdleThreads {
        match self.polls {
            true => IdleThreads::Poll,
            false => IdleThreads::Sleep,
        }
    }

    /// Sends every other thread of the current pool polling, unless they still are. Call it from
    /// the thread that drives the step, inside the pool, between parallel regions (every other
    /// thread is then idle and takes its job before any other: it never runs on top of
    /// unfinished work); outside a pool it does nothing.
    pub fn arm(&self) {
        if !self.polls {
            return;
        }
        let Some(driver) = rayon::current_thread_index() else {
            return;
        };
        let others = rayon::current_num_threads() - 1;
        if others == 0 {
            return;
        }
        // One set of jobs out per pool at a time: none is sent while the last set is still out.
        let all_back = |out: &Arc<AtomicUsize>| {
            let sent = out.compare_exchange(0, others, Ordering::AcqRel, Ordering::Acquire);
            sent.is_ok().then(|| Arc::clone(out))
        };
        let Some(out) = OUT.with(all_back) else {
            return;
        };
        rayon::spawn_broadcast(move |thread| {
            if thread.index() != driver {
                poll();
                // The last one back lets the next step send them out again.
                out.fetch_sub(1, Ordering::AcqRel);
            }
        });
    }
}

/// Runs the pool's jobs as they come until none has come for [`PATIENCE`]; the time spent
/// waiting for them goes to [`usage::add_polling_time`] (see [`Spell`]).
///
/// It looks for work as rayon's own idle rounds do, yielding the core between two looks
/// (`sched_yield`), only for longer. Spinning on the CPU instead (`spin_loop`) was no faster on
/// a quiet machine (0.980x the step with yields, MLP batch 128 at 2 threads, 10 alternating
/// pairs) and slower on a loaded one (with two busy loops beside it on the 2 cores, 1.13x the
/// step of sleeping threads, where yielding threads were 1.01x; 4 alternating pairs each).
fn poll() {
    let mut spell = Spell::start();
    loop {
        let now = Instant::now();
        // Read before the look below, which may run a job.
        let cpu = spell.yielding.map(|_| usage::thread_cpu_time());
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => {
                usage::add_polling_time(spell.spent(now, cpu));
                spell = Spell::start();
            }
            // Between two looks the core goes to any other thread that wants it.
            Some(rayon::Yield::Idle) if now - spell.since < PATIENCE => {
                spell.yields(now);
                std::thread::yield_now()
            }
            Some(rayon::Yield::Idle) | None => {
                usage::add_polling_time(spell.spent(now, cpu));
                return;
            }
        }
    }
}

/// One spell of looking for work, from the start or the last job run to the next job (or to
/// giving up). Its time is counted by the clock until the thread first yields its core, and by
/// the thread's own CPU clock after that: while it has yielded, the core may run another
/// process, and counting that time as this one's polling made a run beside a busy compiler
/// report its threads as nearly idle while they trained far below their quiet speed.
#[derive(Debug, Clone, Copy)]
struct Spell {
    since: Instant,
    /// When the spell first yielded its core, and the thread's CPU clock then.
    yielding: Option<(Instant, Duration)>,
}

impl Spell {
    fn start() -> Self {
        Self {
            since: Instant::now(),
            yielding: None,
        }
    }

    /// Notes the spell's first yield, at `now`.
    fn yields(&mut self, now: Instant) {
        self.yielding
            .get_or_insert_with(|| (now, usage::thread_cpu_time()));
    }

    /// The spell's polling time up to `now`, given the thread's CPU clock `cpu` then (read once
    /// the spell has yielded).
    fn spent(&self, now: Instant, cpu: Option<Duration>) -> Duration {
        match (self.yielding, cpu) {
            (Some((first_yield, cpu_then)), Some(cpu_now)) => {
                (first_yield - self.since) + cpu_now.saturating_sub(cpu_then)
            }
            _ => now - self.since,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    }

    /// Whether polling jobs sent from this thread are out.
    fn out() -> bool {
        OUT.with(|out| out.load(Ordering::Acquire) > 0)
    }

    /// Waits (a bounded time) for the polling jobs sent from this thread to come back.
    fn settled() -> bool {
        let until = Instant::now() + Duration::from_secs(10);
        while out() {
            if Instant::now() > until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    #[test]
    fn polls_only_with_several_threads_within_the_cores() {
        assert!(Poller::new(IdleThreads::Poll, 2, 2).polls());
        assert!(Poller::new(IdleThreads::Poll, 4, 16).polls());
        assert!(!Poller::new(IdleThreads::Poll, 1, 16).polls());
        assert!(!Poller::new(IdleThreads::Poll, 4, 2).polls());
        assert!(!Poller::new(IdleThreads::Sleep, 2, 2).polls());
    }

    /// A polling thread runs the pool's work (every half of the joins below is computed, once),
    /// is counted as polling, and comes back once the work stops.
    #[test]
    fn polling_threads_run_the_work_then_come_back() {
        let polled_before = usage::polling_time();
        let (sums, settled) = pool(3).install(|| {
            let sums = (0..200)
                .map(|round| {
                    // A new poller each time (as the calibration makes them): still one set
                    // of polling jobs out at a time.
                    Poller::new(IdleThreads::Poll, 3, 3).arm();
                    assert!(out());
                    // Nested joins: halves taken by polling threads join halves of their own.
                    let (a, b) = rayon::join(
                        || (0..1000u64).map(|i| i * round).sum::<u64>(),
                        || {
                            let (c, d) = rayon::join(
                                || (1000..2000u64).map(|i| i * round).sum::<u64>(),
                                || (2000..3000u64).map(|i| i * round).sum::<u64>(),
                            );
                            c + d
                        },
                    );
                    a + b
                })
                .collect::<Vec<u64>>();
            (sums, settled())
        });
        let expected: Vec<u64> = (0..200).map(|r| (0..3000u64).sum::<u64>() * r).collect();
        assert_eq!(sums, expected);
        assert!(settled, "the polling threads never came back");
        assert!(usage::polling_time() > polled_before);
    }

    /// A spell counts the clock until it yields, and only the thread's own CPU time after: the
    /// time its core ran something else is not polling.
    #[test]
    fn a_spell_counts_the_clock_until_it_yields_then_its_cpu_time() {
        let since = Instant::now();
        let us = Duration::from_micros;
        let spell = Spell {
            since,
            yielding: None,
        };
        assert_eq!(spell.spent(since + us(7), None), us(7));
        let spell = Spell {
            since,
            // Yielded after 10 us, the thread's CPU clock then at 5 ms.
            yielding: Some((since + us(10), us(5_000))),
        };
        // 1 ms later by the clock, of which the thread ran 20 us after its first yield.
        assert_eq!(spell.spent(since + us(1_000), Some(us(5_020))), us(30));
    }

    /// Outside a pool, and where the threads sleep, nothing is sent out.
    #[test]
    fn arming_outside_a_pool_or_when_sleeping_sends_nothing() {
        Poller::new(IdleThreads::Poll, 2, 2).arm();
        assert!(!out());
        let sent = pool(2).install(|| {
            Poller::new(IdleThreads::Sleep, 2, 2).arm();
            out()
        });
        assert!(!sent);
    }
}
