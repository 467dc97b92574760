//! `training.threads = "auto"`: a short measurement picks the thread count, and whether the
//! pieces of a step (micro-batches x shards) run concurrently or one after the other.
//!
//! Neither choice changes a result: every piece computes the same gradients at any thread count
//! and they are summed in the same order. The calibration only times forward and backward passes
//! on a throwaway copy of the model; the run's weights, data order and generator are untouched.

use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// A way to spend the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub threads: usize,
    /// The step's pieces at once, one per thread (else one after the other).
    pub concurrent: bool,
}

impl Candidate {
    pub fn describe(&self) -> String {
        format!(
            "{} thread{}{}",
            self.threads,
            if self.threads == 1 { "" } else { "s" },
            if self.concurrent {
                ", pieces concurrent"
            } else {
                ""
            }
        )
    }
}

/// What the calibration measured and chose.
#[derive(Debug, Clone)]
pub struct Calibration {
    pub chosen: Candidate,
    /// Each candidate's median seconds per step, in the order tried.
    pub timings: Vec<(Candidate, f64)>,
    /// The calibration's own wall time.
    pub seconds: f64,
    /// `Some((timed, all))` when each timed call ran only the first `timed` of a step's `all`
    /// micro-batches ([`micro_batches_to_time`]); its timings are then of that part.
    pub part_of_step: Option<(usize, usize)>,
}

impl Calibration {
    /// One line for the run's log.
    pub fn describe(&self) -> String {
        let timings: Vec<String> = self
            .timings
            .iter()
            .map(|(c, s)| format!("{}: {:.1} ms", c.describe(), s * 1e3))
            .collect();
        let part = self.part_of_step.map_or(String::new(), |(timed, all)| {
            format!(" on {timed} of a step's {all} micro-batches")
        });
        format!(
            "threads = \"auto\": calibrated{part} in {:.1} s ({}); chose {}",
            self.seconds,
            timings.join(", "),
            self.chosen.describe()
        )
    }
}

/// How many of a step's `all` micro-batches (each cut into `shards` pieces) the calibration
/// times: enough pieces for two on each of `threads` threads, never more than the step has.
/// The pieces of a step cost the same whether it has few or many, so a part of the step ranks
/// the candidates as the whole does; timing whole steps of heavy accumulation overran the
/// calibration's budget several times over.
pub fn micro_batches_to_time(all: usize, shards: usize, threads: usize) -> usize {
    (2 * threads).div_ceil(shards.max(1)).clamp(1, all.max(1))
}

/// Thread counts worth trying on a machine with `available` threads: powers of two, and all of
/// them; concurrent pieces only where a step has several and there is more than one thread.
pub fn candidates(available: usize, pieces_per_step: usize) -> Vec<Candidate> {
    let mut counts: Vec<usize> = std::iter::successors(Some(1usize), |n| n.checked_mul(2))
        .take_while(|&n| n < available)
        .collect();
    counts.push(available.max(1));
    let mut all = Vec::new();
    for threads in counts {
        all.push(Candidate {
            threads,
            concurrent: false,
        });
        if threads > 1 && pieces_per_step > 1 {
            all.push(Candidate {
                threads,
                concurrent: true,
            });
        }
    }
    all
}

/// How long each candidate runs untimed first. A fresh pool's other cores can take a few
/// milliseconds to come up to speed on a VM: after a single warm-up step, the MLP's 2-thread
/// steps were timed well above the run's own and 1 thread was sometimes chosen; after this
/// long, 2 threads were chosen every time (`docs/performance.md`).
const WARM_UP: Duration = Duration::from_millis(50);

/// Runs `step` under each candidate (in a pool of its thread count): warm-up calls for
/// `WARM_UP` (at least one), then timed calls until the candidate's share of `budget` is spent
/// (at least one, at most `MAX_TIMED`), and picks the fastest median. Ties go to fewer threads.
pub fn calibrate(
    candidates: &[Candidate],
    budget: Duration,
    step: impl Fn(Candidate) + Sync,
) -> Result<Calibration> {
    const MAX_TIMED: usize = 5;
    let started = Instant::now();
    let share = budget / candidates.len().max(1) as u32;
    let mut timings = Vec::with_capacity(candidates.len());
    for &candidate in candidates {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(candidate.threads)
            .thread_name(|i| format!("allcores-calibrate-{i}"))
            .build()
            .map_err(|e| Error::setting("training.threads", format!("cannot start a pool: {e}")))?;
        let mut seconds = pool.install(|| {
            let warming = Instant::now();
            step(candidate);
            while warming.elapsed() < WARM_UP {
                step(candidate);
            }
            let began = Instant::now();
            let mut times = Vec::new();
            while times.is_empty() || (began.elapsed() < share && times.len() < MAX_TIMED) {
                let timer = Instant::now();
                step(candidate);
                times.push(timer.elapsed().as_secs_f64());
            }
            times
        });
        seconds.sort_by(f64::total_cmp);
        timings.push((candidate, seconds[seconds.len() / 2]));
    }
    let chosen = timings
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.threads.cmp(&b.0.threads)))
        .map(|(c, _)| *c)
        .ok_or_else(|| Error::setting("training.threads", "no thread count to try"))?;
    Ok(Calibration {
        chosen,
        timings,
        seconds: started.elapsed().as_secs_f64(),
        part_of_step: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_are_powers_of_two_and_every_thread() {
        let threads = |c: Vec<Candidate>| -> Vec<(usize, bool)> {
            c.iter().map(|c| (c.threads, c.concurrent)).collect()
        };
        assert_eq!(threads(candidates(1, 4)), [(1, false)]);
        assert_eq!(
            threads(candidates(6, 1)),
            [(1, false), (2, false), (4, false), (6, false)]
        );
        assert_eq!(
            threads(candidates(2, 4)),
            [(1, false), (2, false), (2, true)]
        );
    }

    #[test]
    fn a_step_of_many_micro_batches_is_timed_in_part() {
        // Two pieces for each thread, at least one micro-batch, at most the step's.
        assert_eq!(micro_batches_to_time(500, 1, 2), 4);
        assert_eq!(micro_batches_to_time(500, 4, 16), 8);
        assert_eq!(micro_batches_to_time(500, 3, 2), 2);
        assert_eq!(micro_batches_to_time(500, 64, 2), 1);
        assert_eq!(micro_batches_to_time(2, 1, 16), 2);
        assert_eq!(micro_batches_to_time(1, 1, 2), 1);
        let calibration = Calibration {
            chosen: Candidate {
                threads: 2,
                concurrent: true,
            },
            timings: vec![],
            seconds: 0.5,
            part_of_step: Some((4, 500)),
        };
        assert_eq!(
            calibration.describe(),
            "threads = \"auto\": calibrated on 4 of a step's 500 micro-batches in 0.5 s (); \
             chose 2 threads, pieces concurrent"
        );
    }

    #[test]
    fn picks_the_fastest_and_stays_within_budget() {
        // A step that is fastest with 2 threads, concurrent.
        let step = |c: Candidate| {
            let ms = match (c.threads, c.concurrent) {
                (2, true) => 1,
                _ => 4,
            };
            std::thread::sleep(Duration::from_millis(ms));
        };
        let all = candidates(2, 2);
        let calibration = calibrate(&all, Duration::from_millis(60), step).unwrap();
        assert_eq!(
            calibration.chosen,
            Candidate {
                threads: 2,
                concurrent: true
            }
        );
        assert_eq!(calibration.timings.len(), 3);
        // Warm-up plus at most five timed steps of at most 4 ms each, per candidate.
        assert!(calibration.seconds < 1.0, "{}", calibration.seconds);
        // Each candidate warmed up for WARM_UP before its steps were timed.
        let warm_ups = 3.0 * WARM_UP.as_secs_f64();
        assert!(calibration.seconds >= warm_ups, "{}", calibration.seconds);
        assert!(
            calibration
                .describe()
                .contains("chose 2 threads, pieces concurrent")
        );
    }
}
