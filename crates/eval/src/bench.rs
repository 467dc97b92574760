//! `allcores bench`: steady-state training throughput of one config at several thread counts,
//! one process a thread count.
//!
//! Each run is a fresh `allcores train` child (see `crate::child`) that writes no run folder
//! (so no checkpoints) and records every optimizer step's wall and CPU seconds. The first
//! `warmup` steps are dropped; the statistics cover the `steps` after them: samples/s, the
//! step time's median and spread, and how busy the threads were. A step covers batch
//! gathering, forward, backward and the optimizer update; the test scoring at epoch ends falls
//! between steps and is not timed.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use allcores_trainer::settings::DataFormat;
use allcores_trainer::{Layers, Settings, StepTime, Summary, thousands};
use serde::{Deserialize, Serialize};

use crate::EvalError;
use crate::child::{self, refuse_owned_keys, train_child};
use crate::sweep::parse_threads;

/// Warm-up steps dropped from each run by default.
pub const DEFAULT_WARMUP: u64 = 20;
/// Timed steps of each run by default.
pub const DEFAULT_STEPS: u64 = 200;
/// At most this many rounds over the thread counts.
pub const MAX_REPEAT: u64 = 100;
/// At most this many steps (warm-up and timed) a run: each step's times travel in the child's
/// summary.
pub const MAX_TOTAL_STEPS: u64 = 100_000;

/// What `allcores bench` was asked.
#[derive(Debug, Clone)]
pub struct BenchRequest {
    /// The TOML config file.
    pub config: PathBuf,
    /// The thread counts as typed: `1,2,4`.
    pub threads: String,
    /// Timed steps per run (at least 1).
    pub steps: u64,
    /// Steps per run before the timed ones, not timed.
    pub warmup: u64,
    /// `--set key=value` overrides given to every run.
    pub overrides: Vec<String>,
    /// The `allcores` executable that runs each thread count; `None`: this process's own.
    pub program: Option<PathBuf>,
    /// After each run at n > 1 threads, also run n one-thread runs at once: what the machine
    /// gives independent work (see [`BenchRun::ceiling`]). Needs 1 among the thread counts.
    pub ceiling: bool,
    /// Rounds over the thread counts (at least 1); each is reported by its median run.
    pub repeat: u64,
}

/// One thread count's measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchRun {
    pub threads: usize,
    /// Timed steps (after the warm-up).
    pub steps: usize,
    /// Samples of the timed steps.
    pub samples: u64,
    /// Wall seconds of the timed steps, summed.
    pub seconds: f64,
    /// `samples / seconds`.
    pub samples_per_second: f64,
    /// A language model's throughput in tokens: samples/s x the context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
    pub step_ms_median: f64,
    pub step_ms_p10: f64,
    pub step_ms_p90: f64,
    pub step_ms_min: f64,
    pub step_ms_max: f64,
    /// `(p90 - p10) / median`: how much the step time wanders.
    pub step_spread: f64,
    /// Working CPU seconds (polling for work not counted) / (wall seconds x threads) over the
    /// timed steps.
    pub cpu_utilization: f64,
    /// Seconds the threads spent polling for work / (wall seconds x threads) over the timed
    /// steps (`training.idle_threads = "poll"`).
    #[serde(default)]
    pub cpu_polling: f64,
    /// Samples/s over that of the smallest thread count.
    pub speedup: f64,
    /// Samples/s over (threads / smallest thread count x its samples/s).
    pub parallel_efficiency: f64,
    /// Samples/s of this thread count's run in each round (`--repeat`), in round order; the
    /// other figures are those of the median run.
    #[serde(default)]
    pub rounds_samples_per_second: Vec<f64>,
    /// Each round's parallel efficiency: this thread count's run against the smallest count's
    /// run of the same round, seconds apart. A paired figure: load that lasts a round weighs on
    /// both of its runs, where the median runs may come from different rounds.
    #[serde(default)]
    pub rounds_parallel_efficiency: Vec<f64>,
    /// With `--ceiling`, at n > 1 threads: the summed samples/s of n one-thread runs at once.
    #[serde(default)]
    pub independent_samples_per_second: Option<f64>,
    /// That over n x the one-thread run's samples/s: the parallel efficiency this machine gave
    /// n independent single-threaded jobs right after this run, a ceiling for any program's
    /// (a shared machine whose cores come and go lowers it; 1.0 on a quiet one).
    #[serde(default)]
    pub ceiling: Option<f64>,
    /// The child process's peak resident memory (data, model, optimizer state).
    pub peak_rss_bytes: u64,
    /// SHA-256 of the final weights: equal across thread counts when the result does not
    /// depend on them.
    pub weights_sha256: String,
}

/// A finished benchmark (`--json`: this object on the last stdout line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    /// The config file, as given.
    pub config: String,
    pub overrides: Vec<String>,
    pub model: String,
    pub backend: String,
    pub batch_size: usize,
    pub effective_batch_size: usize,
    pub warmup_steps: u64,
    pub timed_steps: u64,
    /// Threads this machine allows the process.
    pub threads_available: usize,
    /// One run per thread count, ascending; speed-ups are against the first.
    pub runs: Vec<BenchRun>,
    /// Every run trained the same weights.
    pub identical_weights: bool,
}

/// Parses a whole number of steps given to `arg`.
pub fn parse_count(arg: &str, text: &str) -> Result<u64, EvalError> {
    text.trim().parse().map_err(|_| EvalError::Argument {
        arg: arg.into(),
        message: format!("\"{text}\" is not a number of steps (a whole number of 0 or more)"),
    })
}

/// Parses the number of rounds given to `--repeat` (checked against its range later).
pub fn parse_rounds(text: &str) -> Result<u64, EvalError> {
    text.trim().parse().map_err(|_| EvalError::Argument {
        arg: "--repeat".into(),
        message: format!(
            "\"{text}\" is not a number of rounds (a whole number, 1 to {MAX_REPEAT})"
        ),
    })
}

/// The settings that the bench sets itself, which `--set` must leave alone.
const BENCH_KEYS: [(&str, &str); 3] = [
    ("training.threads", "--threads"),
    ("training.max_steps", "--steps and --warmup"),
    ("training.epochs", "--steps and --warmup"),
];

/// The overrides of a run at `threads`: the user's, then the bench's own (last, so they win).
/// `epochs` as large as the steps, since every epoch has at least one: `max_steps` ends it.
fn run_sets(request: &BenchRequest, threads: usize) -> Vec<String> {
    let total = request.warmup + request.steps;
    let mut sets = request.overrides.clone();
    sets.extend([
        format!("training.threads={threads}"),
        format!("training.max_steps={total}"),
        format!("training.epochs={total}"),
    ]);
    sets
}

/// Checks everything the user gave before any run starts; returns the thread counts and the
/// settings of the runs (at the first thread count).
fn check(request: &BenchRequest) -> Result<(Vec<usize>, Settings), EvalError> {
    let threads = parse_threads(&request.threads)?;
    if request.ceiling && threads[0] != 1 {
        return Err(EvalError::Argument {
            arg: "--ceiling".into(),
            message: format!(
                "compares n one-thread runs with the run at 1 thread: include 1 in --threads \
                 (got {})",
                request.threads
            ),
        });
    }
    if request.steps == 0 {
        return Err(EvalError::Argument {
            arg: "--steps".into(),
            message: "must be at least 1".into(),
        });
    }
    if !(1..=MAX_REPEAT).contains(&request.repeat) {
        return Err(EvalError::Argument {
            arg: "--repeat".into(),
            message: format!("must be 1 to {MAX_REPEAT}, got {}", request.repeat),
        });
    }
    if request.warmup.saturating_add(request.steps) > MAX_TOTAL_STEPS {
        return Err(EvalError::Argument {
            arg: "--steps".into(),
            message: format!(
                "--warmup {} + --steps {} is more than the {} steps a bench run allows",
                request.warmup,
                request.steps,
                thousands(MAX_TOTAL_STEPS as f64)
            ),
        });
    }
    refuse_owned_keys(&request.overrides, &BENCH_KEYS, "bench")?;
    // The config must load with every override a run gets: a config error stops here.
    let settings = Settings::load(
        &request.config,
        &Layers {
            overrides: run_sets(request, threads[0]),
            environment: None,
        },
    )?;
    Ok((threads, settings))
}

/// Step-time statistics, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
struct StepStats {
    median: f64,
    p10: f64,
    p90: f64,
    min: f64,
    max: f64,
}

/// The `q`-quantile (0..=1) of ascending `sorted`, interpolated linearly between neighbours.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let last = sorted.len() - 1;
    let at = q.clamp(0.0, 1.0) * last as f64;
    let (low, high) = (at.floor() as usize, at.ceil() as usize);
    sorted[low] + (sorted[high] - sorted[low]) * (at - low as f64)
}

impl StepStats {
    /// Of `ms`, which must not be empty.
    fn of(ms: &[f64]) -> Self {
        let mut sorted = ms.to_vec();
        sorted.sort_by(f64::total_cmp);
        Self {
            median: quantile(&sorted, 0.5),
            p10: quantile(&sorted, 0.1),
            p90: quantile(&sorted, 0.9),
            min: sorted[0],
            max: sorted[sorted.len() - 1],
        }
    }
}

impl BenchRun {
    /// The measurement of a run at `threads` from its summary, the first `warmup` steps
    /// dropped. Speed-up and efficiency stay 1 until [`relate`] sets them.
    /// `tokens_per_sample`: a language model's context.
    fn from_summary(
        threads: usize,
        warmup: u64,
        summary: &Summary,
        tokens_per_sample: Option<usize>,
    ) -> Result<Self, String> {
        let timed: &[StepTime] = summary
            .step_times
            .get(warmup as usize..)
            .unwrap_or_default();
        if timed.is_empty() {
            return Err(format!(
                "the run recorded {} step times, none after the {warmup} warm-up steps",
                summary.step_times.len()
            ));
        }
        let samples: u64 = timed.iter().map(|s| s.samples as u64).sum();
        let seconds: f64 = timed.iter().map(|s| s.wall_seconds).sum();
        let cpu: f64 = timed.iter().map(|s| s.cpu_seconds).sum();
        let polling: f64 = timed.iter().map(|s| s.polling_seconds).sum();
        let ms: Vec<f64> = timed.iter().map(|s| s.wall_seconds * 1e3).collect();
        let stats = StepStats::of(&ms);
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        Ok(Self {
            threads,
            steps: timed.len(),
            samples,
            seconds,
            samples_per_second: ratio(samples as f64, seconds),
            tokens_per_second: tokens_per_sample
                .map(|t| ratio((samples * t as u64) as f64, seconds)),
            step_ms_median: stats.median,
            step_ms_p10: stats.p10,
            step_ms_p90: stats.p90,
            step_ms_min: stats.min,
            step_ms_max: stats.max,
            step_spread: ratio(stats.p90 - stats.p10, stats.median),
            cpu_utilization: ratio(cpu, seconds * threads as f64),
            cpu_polling: ratio(polling, seconds * threads as f64),
            speedup: 1.0,
            parallel_efficiency: 1.0,
            rounds_samples_per_second: vec![samples as f64 / seconds.max(f64::MIN_POSITIVE)],
            rounds_parallel_efficiency: vec![1.0],
            independent_samples_per_second: None,
            ceiling: None,
            peak_rss_bytes: summary.peak_rss_bytes,
            weights_sha256: summary.weights_sha256.clone(),
        })
    }

    /// The CPU utilisation, and the time spent polling for work where there was any:
    /// `81% + 12% polling`.
    fn cpu_text(&self) -> String {
        let working = format!("{:.0}%", self.cpu_utilization * 100.0);
        match self.cpu_polling >= 0.005 {
            true => format!("{working} + {:.0}% polling", self.cpu_polling * 100.0),
            false => working,
        }
    }
}

/// The run with the median samples/s of one thread count's rounds (the upper one of an even
/// count), carrying every round's samples/s.
fn median_run(mut rounds: Vec<BenchRun>) -> BenchRun {
    let all: Vec<f64> = rounds.iter().map(|r| r.samples_per_second).collect();
    rounds.sort_by(|a, b| a.samples_per_second.total_cmp(&b.samples_per_second));
    let mut median = rounds.swap_remove(rounds.len() / 2);
    median.rounds_samples_per_second = all;
    median
}

/// Runs `n` one-thread children at once (each as a bench run at 1 thread) and returns their
/// summed samples/s.
fn independent_runs(
    program: &Path,
    request: &BenchRequest,
    n: usize,
) -> Result<f64, child::ChildFailure> {
    let no_run_dir = ["--no-save", "--record-steps"];
    let results: Vec<Result<Summary, child::ChildFailure>> = std::thread::scope(|scope| {
        let children: Vec<_> = (0..n)
            .map(|_| {
                scope.spawn(|| {
                    train_child(
                        program,
                        &request.config,
                        run_sets(request, 1),
                        &no_run_dir,
                        None,
                    )
                })
            })
            .collect();
        children
            .into_iter()
            .map(|child| child.join().expect("a child-process thread panicked"))
            .collect()
    });
    let mut total = 0.0;
    for summary in results {
        let run =
            BenchRun::from_summary(1, request.warmup, &summary?, None).map_err(|message| {
                child::ChildFailure {
                    exit_status: Some(0),
                    message,
                }
            })?;
        total += run.samples_per_second;
    }
    Ok(total)
}

/// Sets each run's speed-up and parallel efficiency (of the median runs, and round by round)
/// against the first (smallest) thread count, and its ceiling against the first run (at 1
/// thread when there is a ceiling).
fn relate(runs: &mut [BenchRun]) {
    let Some(base) = runs.first().cloned() else {
        return;
    };
    for run in runs {
        run.speedup = if base.samples_per_second > 0.0 {
            run.samples_per_second / base.samples_per_second
        } else {
            0.0
        };
        let share = base.threads as f64 / run.threads as f64;
        run.parallel_efficiency = run.speedup * share;
        run.rounds_parallel_efficiency = run
            .rounds_samples_per_second
            .iter()
            .zip(&base.rounds_samples_per_second)
            .map(|(&sps, &base_sps)| sps / base_sps.max(f64::MIN_POSITIVE) * share)
            .collect();
        run.ceiling = run.independent_samples_per_second.map(|independent| {
            independent / (run.threads as f64 * base.samples_per_second).max(f64::MIN_POSITIVE)
        });
    }
}

/// Runs the benchmark: one child process per thread count, one after another (side by side
/// they would spoil each other's timings). A run that fails stops the bench.
pub fn run_bench(request: &BenchRequest) -> Result<BenchReport, EvalError> {
    let (threads, settings) = check(request)?;
    let program = child::program(request.program.as_ref())?;
    let threads_available = child::warn_beyond_available(&threads);
    eprintln!("{}", start_line(request, &settings, &threads));
    let tokens_per_sample =
        (settings.data.format == DataFormat::Text).then_some(settings.model.context);
    // Round after round over the thread counts, so that a burst of load on a shared machine
    // falls on one round's run rather than on one thread count.
    let mut rounds: Vec<Vec<BenchRun>> = vec![Vec::new(); threads.len()];
    for round in 1..=request.repeat {
        for (i, &t) in threads.iter().enumerate() {
            let round_label = match request.repeat {
                1 => String::new(),
                n => format!("round {round}/{n} "),
            };
            let at = format!("{round_label}[{}/{}] threads {t}", i + 1, threads.len());
            rounds[i].push(bench_one(&program, request, t, tokens_per_sample, &at)?);
        }
    }
    let identical_weights = rounds
        .iter()
        .flatten()
        .all(|r| r.weights_sha256 == rounds[0][0].weights_sha256);
    let mut runs: Vec<BenchRun> = rounds.into_iter().map(median_run).collect();
    relate(&mut runs);
    Ok(BenchReport {
        config: request.config.display().to_string(),
        overrides: request.overrides.clone(),
        model: settings.model.kind.to_string(),
        backend: settings.training.backend.to_string(),
        batch_size: settings.training.batch_size,
        effective_batch_size: settings.training.effective_batch_size(),
        warmup_steps: request.warmup,
        timed_steps: request.steps,
        threads_available,
        runs,
        identical_weights,
    })
}

/// The bench's first log line: what it measures, at which thread counts, for how many steps.
fn start_line(request: &BenchRequest, settings: &Settings, threads: &[usize]) -> String {
    let threads: Vec<String> = threads.iter().map(|t| t.to_string()).collect();
    format!(
        "allcores: benchmarking {} ({} on {}, batch {}) at threads {}: {} warm-up + {} timed \
         steps, one process each",
        request.config.display(),
        settings.model.kind,
        settings.training.backend,
        settings.training.effective_batch_size(),
        threads.join(", "),
        request.warmup,
        request.steps
    )
}

/// One run at `threads` threads, in a process of its own (with `--ceiling`, then as many
/// one-thread runs at once), logged after `at`, the run's place in the bench.
fn bench_one(
    program: &Path,
    request: &BenchRequest,
    threads: usize,
    tokens_per_sample: Option<usize>,
    at: &str,
) -> Result<BenchRun, EvalError> {
    let failed = |exit_status: Option<i32>, message: String| EvalError::BenchRun {
        threads,
        exit_status,
        message,
    };
    let no_run_dir = ["--no-save", "--record-steps"];
    let sets = run_sets(request, threads);
    let summary = train_child(program, &request.config, sets, &no_run_dir, None)
        .map_err(|f| failed(f.exit_status, f.message))?;
    let mut run = BenchRun::from_summary(threads, request.warmup, &summary, tokens_per_sample)
        .map_err(|message| failed(Some(0), message))?;
    let tokens = run
        .tokens_per_second
        .map_or(String::new(), |t| format!("{} tokens/s · ", thousands(t)));
    eprintln!(
        "{at}: {tokens}{} samples/s · step {:.2} ms median · CPU {}",
        thousands(run.samples_per_second),
        run.step_ms_median,
        run.cpu_text()
    );
    if request.ceiling && threads > 1 {
        let independent = independent_runs(program, request, threads)
            .map_err(|f| failed(f.exit_status, f.message))?;
        eprintln!(
            "      {threads} one-thread runs at once: {} samples/s in all",
            thousands(independent)
        );
        run.independent_samples_per_second = Some(independent);
    }
    Ok(run)
}

/// With several rounds: `threads 2, efficiency round by round: 97% 92% 72% (median 92%)`.
fn rounds_line(run: &BenchRun) -> Option<String> {
    let rounds = &run.rounds_parallel_efficiency;
    if rounds.len() < 2 {
        return None;
    }
    let mut sorted = rounds.clone();
    sorted.sort_by(f64::total_cmp);
    let each: Vec<String> = rounds
        .iter()
        .map(|e| format!("{:.0}%", e * 100.0))
        .collect();
    Some(format!(
        "threads {}, efficiency round by round: {} (median {:.0}%)\n",
        run.threads,
        each.join(" "),
        quantile(&sorted, 0.5) * 100.0
    ))
}

impl BenchReport {
    /// What `allcores bench` prints: a Markdown table, one row per thread count, and a line on
    /// the weights.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "{} on {}, batch {}: {} warm-up + {} timed steps per thread count, {} thread{} \
             available\n\n",
            self.model,
            self.backend,
            self.effective_batch_size,
            self.warmup_steps,
            self.timed_steps,
            self.threads_available,
            if self.threads_available == 1 { "" } else { "s" }
        );
        let ceiling = self.runs.iter().any(|r| r.ceiling.is_some());
        let header = if ceiling {
            "| threads | samples/s | speed-up | parallel efficiency | machine ceiling | step ms \
             median | p10 - p90 | spread | CPU utilisation | peak RSS | weights (SHA-256) |\n\
             |--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|:--|\n"
        } else {
            "| threads | samples/s | speed-up | parallel efficiency | step ms median | \
             p10 - p90 | spread | CPU utilisation | peak RSS | weights (SHA-256) |\n\
             |--:|--:|--:|--:|--:|--:|--:|--:|--:|:--|\n"
        };
        // A language model's table leads with its tokens/s.
        let tokens = self.runs.iter().all(|r| r.tokens_per_second.is_some());
        out.push_str(&match tokens {
            true => header
                .replacen("| threads |", "| threads | tokens/s |", 1)
                .replacen("|--:|", "|--:|--:|", 1),
            false => header.to_string(),
        });
        for r in &self.runs {
            let efficiency = match (ceiling, r.ceiling) {
                (false, _) => format!("{:.0}%", r.parallel_efficiency * 100.0),
                (true, Some(c)) => {
                    format!("{:.0}% | {:.0}%", r.parallel_efficiency * 100.0, c * 100.0)
                }
                (true, None) => format!("{:.0}% | -", r.parallel_efficiency * 100.0),
            };
            let threads = match r.tokens_per_second {
                Some(t) if tokens => format!("{} | {}", r.threads, thousands(t)),
                _ => r.threads.to_string(),
            };
            let _ = writeln!(
                out,
                "| {threads} | {} | {:.2}x | {} | {:.2} | {:.2} - {:.2} | {:.0}% | {} | {:.1} \
                 MiB | `{}` |",
                thousands(r.samples_per_second),
                r.speedup,
                efficiency,
                r.step_ms_median,
                r.step_ms_p10,
                r.step_ms_p90,
                r.step_spread * 100.0,
                r.cpu_text(),
                r.peak_rss_bytes as f64 / f64::from(1 << 20),
                r.weights_sha256.get(..12).unwrap_or_default()
            );
        }
        out.push('\n');
        for r in self.runs.iter().skip(1) {
            if let Some(line) = rounds_line(r) {
                out.push_str(&line);
            }
        }
        out.push_str(if self.runs.len() < 2 {
            "weights: one thread count, nothing to compare"
        } else if self.identical_weights {
            "weights: identical at every thread count"
        } else {
            "weights: DIFFERENT across thread counts (the result depends on the thread count)"
        });
        out
    }

    /// The report as one line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("the report serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(times: &[(usize, f64, f64)]) -> Summary {
        let text = r#"{"test_accuracy":0.9,"test_loss":0.3,"train_loss":0.2,"epochs":1,
            "steps":0,"samples":0,"wall_seconds":1,"train_seconds":1,"checkpoint_seconds":0,
            "samples_per_second":1,"threads":1,"threads_available":2,"cpu_utilization":1,
            "backend":"ndarray","model":"mlp","parameters":100,"batch_size":4,"accumulation_steps":1,
            "effective_batch_size":4,"seed":0,"peak_rss_bytes":1048576,
            "execution":"sequential","shards":1,"precision":"f32","precision_mode":"native",
            "skipped_steps":0,"loss_scale":null,
            "weights_sha256":"ab","run_dir":null}"#;
        let mut summary: Summary = serde_json::from_str(text).unwrap();
        summary.step_times = times
            .iter()
            .map(|&(samples, wall_seconds, cpu_seconds)| StepTime {
                samples,
                wall_seconds,
                cpu_seconds,
                polling_seconds: cpu_seconds / 4.0,
            })
            .collect();
        summary
    }

    #[test]
    fn quantiles_interpolate_between_neighbours() {
        let sorted = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(quantile(&sorted, 0.5), 3.0);
        assert_eq!(quantile(&sorted, 0.0), 1.0);
        assert_eq!(quantile(&sorted, 1.0), 5.0);
        assert!((quantile(&sorted, 0.1) - 1.4).abs() < 1e-12);
        assert!((quantile(&sorted, 0.9) - 4.6).abs() < 1e-12);
        assert_eq!(quantile(&[1.0, 2.0], 0.5), 1.5);
        assert_eq!(quantile(&[7.0], 0.9), 7.0);
        let stats = StepStats::of(&[5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!((stats.min, stats.median, stats.max), (1.0, 3.0, 5.0));
    }

    #[test]
    fn warm_up_steps_are_dropped_and_short_steps_weigh_their_samples() {
        // 2 warm-up steps (slow), then 3 timed: 4 + 4 + 2 samples in 0.01 + 0.03 + 0.01 s.
        let s = summary(&[
            (4, 1.0, 1.0),
            (4, 1.0, 1.0),
            (4, 0.01, 0.02),
            (4, 0.03, 0.03),
            (2, 0.01, 0.01),
        ]);
        let run = BenchRun::from_summary(2, 2, &s, None).unwrap();
        assert_eq!((run.steps, run.samples), (3, 10));
        assert!((run.seconds - 0.05).abs() < 1e-12);
        assert!((run.samples_per_second - 200.0).abs() < 1e-9);
        assert!((run.step_ms_median - 10.0).abs() < 1e-9);
        assert!((run.step_ms_min - 10.0).abs() < 1e-9);
        assert!((run.step_ms_max - 30.0).abs() < 1e-9);
        // p10 = 10, p90 = 10 + 0.8 x 20 = 26: spread (26 - 10) / 10.
        assert!((run.step_ms_p90 - 26.0).abs() < 1e-9);
        assert!((run.step_spread - 1.6).abs() < 1e-9);
        // 0.06 CPU seconds over 0.05 wall seconds x 2 threads.
        assert!((run.cpu_utilization - 0.6).abs() < 1e-9);
        // A quarter of that again polling: 0.015 s over 0.05 x 2.
        assert!((run.cpu_polling - 0.15).abs() < 1e-9);
        assert_eq!(run.cpu_text(), "60% + 15% polling");
        assert_eq!(run.peak_rss_bytes, 1 << 20);
        assert_eq!(run.weights_sha256, "ab");

        let err = BenchRun::from_summary(1, 5, &s, None).unwrap_err();
        assert!(
            err.contains("5 step times, none after the 5 warm-up"),
            "{err}"
        );
    }

    #[test]
    fn speed_ups_and_efficiency_are_against_the_smallest_thread_count() {
        let s = summary(&[(10, 0.01, 0.01)]);
        let mut runs: Vec<BenchRun> = [(1, 0.01), (2, 0.005), (4, 0.004)]
            .iter()
            .map(|&(t, wall)| {
                let mut s = s.clone();
                s.step_times[0].wall_seconds = wall;
                BenchRun::from_summary(t, 0, &s, None).unwrap()
            })
            .collect();
        relate(&mut runs);
        let got: Vec<(f64, f64)> = runs
            .iter()
            .map(|r| (r.speedup, r.parallel_efficiency))
            .collect();
        for ((s, e), (want_s, want_e)) in
            got.into_iter().zip([(1.0, 1.0), (2.0, 1.0), (2.5, 0.625)])
        {
            assert!(
                (s - want_s).abs() < 1e-9 && (e - want_e).abs() < 1e-9,
                "{s} {e}"
            );
        }
        // Against a baseline of 2 threads, 4 threads at twice the speed is 100% efficient.
        runs.remove(0);
        runs[1].samples_per_second = 2.0 * runs[0].samples_per_second;
        relate(&mut runs);
        assert!((runs[1].parallel_efficiency - 1.0).abs() < 1e-9);
    }

    #[test]
    fn step_counts_parse_on_one_line() {
        assert_eq!(parse_count("--steps", "200").unwrap(), 200);
        assert_eq!(parse_count("--warmup", " 0 ").unwrap(), 0);
        for text in ["", "a", "-1", "1.5", "1e3"] {
            let err = parse_count("--steps", text).unwrap_err();
            assert!(err.is_bad_input());
            let message = err.to_string();
            assert!(message.starts_with("--steps: "), "{message}");
            assert!(message.contains("not a number of steps"), "{message}");
        }
    }

    fn request(config: PathBuf) -> BenchRequest {
        BenchRequest {
            config,
            threads: "1,2".into(),
            steps: 5,
            warmup: 1,
            overrides: vec![],
            program: Some("/nonexistent/allcores".into()),
            ceiling: false,
            repeat: 1,
        }
    }

    /// A config naming a CSV file `d.csv` (which the tests never write) in `dir`.
    fn csv_config(dir: &Path) -> PathBuf {
        let config = dir.join("c.toml");
        std::fs::write(
            &config,
            "[data]\nformat = \"csv\"\ntrain_csv = \"d.csv\"\ntest_fraction = 0.2\n",
        )
        .unwrap();
        config
    }

    #[test]
    fn bad_requests_stop_before_any_run() {
        let dir = tempfile::tempdir().unwrap();
        let config = csv_config(dir.path());
        let refused = |r: &BenchRequest, expected: &str| {
            let err = run_bench(r).unwrap_err();
            assert!(err.is_bad_input(), "{err}");
            assert!(err.to_string().contains(expected), "{expected}: {err}");
            assert!(!err.to_string().contains('\n'), "{err}");
        };
        let mut r = request(config.clone());
        r.threads = "0".into();
        refused(&r, "0 is not a thread count");
        r.threads = "".into();
        refused(&r, "comma-separated list");
        r.threads = "1,x".into();
        refused(&r, "\"x\" is not a thread count");

        let mut r = request(config.clone());
        r.steps = 0;
        refused(&r, "--steps: must be at least 1");
        r.steps = MAX_TOTAL_STEPS;
        refused(&r, "more than the 100,000 steps");

        for key in ["training.threads", "training.max_steps", "training.epochs"] {
            let mut r = request(config.clone());
            r.overrides = vec![format!("{key}=3")];
            refused(&r, &format!("the bench sets {key}"));
        }
        let mut r = request(config.clone());
        r.overrides = vec!["training.thread=3".into()];
        refused(&r, "thread");
        refused(
            &request(dir.path().join("missing.toml")),
            "config file not found",
        );
    }

    #[test]
    fn a_run_that_cannot_start_stops_the_bench_naming_its_threads() {
        let dir = tempfile::tempdir().unwrap();
        let config = csv_config(dir.path());
        let err = run_bench(&request(config)).unwrap_err();
        assert!(!err.is_bad_input());
        let message = err.to_string();
        assert!(
            message.starts_with("the run at threads 1 failed: cannot start"),
            "{message}"
        );
    }

    /// A report of an MLP bench (batch 10, one timed step) with these runs.
    fn report_of(runs: Vec<BenchRun>) -> BenchReport {
        BenchReport {
            config: "c.toml".into(),
            overrides: vec![],
            model: "mlp".into(),
            backend: "ndarray".into(),
            batch_size: 10,
            effective_batch_size: 10,
            warmup_steps: 0,
            timed_steps: 1,
            threads_available: 2,
            runs,
            identical_weights: true,
        }
    }

    /// Runs at 1 and 2 threads of one 10-sample step of 10 ms each: 1,000 samples/s.
    fn runs_at_1_and_2_threads() -> Vec<BenchRun> {
        let s = summary(&[(10, 0.01, 0.01)]);
        vec![
            BenchRun::from_summary(1, 0, &s, None).unwrap(),
            BenchRun::from_summary(2, 0, &s, None).unwrap(),
        ]
    }

    #[test]
    fn the_table_has_a_row_per_thread_count() {
        let mut runs = runs_at_1_and_2_threads();
        relate(&mut runs);
        let report = report_of(runs);
        let text = report.to_text();
        assert!(
            text.contains("| 1 | 1,000 | 1.00x | 100% | 10.00 |"),
            "{text}"
        );
        assert!(
            text.contains("| 2 | 1,000 | 1.00x | 50% | 10.00 |"),
            "{text}"
        );
        assert!(
            text.ends_with("weights: identical at every thread count"),
            "{text}"
        );
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(json["runs"][1]["threads"], 2);
        assert_eq!(json["runs"][1]["parallel_efficiency"], 0.5);
        assert!(json["runs"][1]["ceiling"].is_null());
    }

    #[test]
    fn rounds_are_reported_by_their_median_run() {
        let runs: Vec<BenchRun> = [0.02, 0.01, 0.04]
            .iter()
            .map(|&wall| BenchRun::from_summary(1, 0, &summary(&[(10, wall, wall)]), None).unwrap())
            .collect();
        let median = median_run(runs);
        assert_eq!(median.samples_per_second, 500.0);
        assert_eq!(median.rounds_samples_per_second, [500.0, 1000.0, 250.0]);
    }

    /// Round by round, each run meets the first thread count's run of its own round; the
    /// median runs may come from different rounds and say less.
    #[test]
    fn each_round_has_its_own_efficiency() {
        let mut runs = runs_at_1_and_2_threads();
        runs[0].rounds_samples_per_second = vec![1_000.0, 500.0, 800.0];
        runs[1].rounds_samples_per_second = vec![1_800.0, 1_000.0, 1_200.0];
        relate(&mut runs);
        assert_eq!(runs[0].rounds_parallel_efficiency, [1.0, 1.0, 1.0]);
        let got = &runs[1].rounds_parallel_efficiency;
        for (e, want) in got.iter().zip([0.9, 1.0, 0.75]) {
            assert!((e - want).abs() < 1e-12, "{got:?}");
        }
        let text = report_of(runs).to_text();
        assert!(
            text.contains("threads 2, efficiency round by round: 90% 100% 75% (median 90%)\n"),
            "{text}"
        );
        // One round: nothing to list.
        let mut runs = runs_at_1_and_2_threads();
        relate(&mut runs);
        assert!(!report_of(runs).to_text().contains("round by round"));
    }

    /// The ceiling relates n independent one-thread runs to n times the run at 1 thread, and
    /// the table grows a column for it.
    #[test]
    fn the_ceiling_is_independent_work_over_n_single_runs() {
        let mut runs = runs_at_1_and_2_threads();
        // Two one-thread runs at once made 1,800 samples/s in all, against 2 x 1,000 alone.
        runs[1].independent_samples_per_second = Some(1_800.0);
        relate(&mut runs);
        assert_eq!(runs[0].ceiling, None);
        assert!((runs[1].ceiling.unwrap() - 0.9).abs() < 1e-12);
        let report = report_of(runs);
        let text = report.to_text();
        assert!(text.contains("| machine ceiling |"), "{text}");
        assert!(
            text.contains("| 1 | 1,000 | 1.00x | 100% | - | 10.00 |"),
            "{text}"
        );
        assert!(
            text.contains("| 2 | 1,000 | 1.00x | 50% | 90% | 10.00 |"),
            "{text}"
        );
    }
}
