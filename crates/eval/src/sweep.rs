//! `allcores sweep`: train one config at several thread counts and seeds, one process a run,
//! and report whether the thread count changed the result or only the speed.
//!
//! Each run is a fresh `allcores train ... --json --quiet` process, because matrixmultiply
//! reads its thread count once per process. The runs go one after another (parallel runs
//! would spoil the timings) into `DIR/runs/t{threads}-s{seed}`; the report goes into `DIR`.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use allcores_trainer::lock::{FolderLock, claim_new_folder};
use allcores_trainer::settings::MAX_THREADS;
use allcores_trainer::{Layers, Settings, Summary};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::EvalError;
use crate::child::{self, refuse_owned_keys, train_child};
use crate::diff::{Weights, max_abs_diff, read_weights};
use crate::plot;
use crate::report::{
    Interruption, Metric, Report, RunFailure, RunRecord, SweepPlan, Timing, build_report_on,
};
use crate::signals::{Interrupt, signal_name};

/// What `allcores sweep` was asked.
#[derive(Debug, Clone)]
pub struct SweepRequest {
    /// The TOML config file.
    pub config: PathBuf,
    /// The thread counts as typed: `1,2,4`.
    pub threads: String,
    /// Seeds `0..seeds`.
    pub seeds: u64,
    /// `--set key=value` overrides given to every run.
    pub overrides: Vec<String>,
    /// The sweep folder; `None`: `sweeps/<config stem>-<unix seconds>`.
    pub out: Option<PathBuf>,
    /// The `allcores` executable that trains each run; `None`: this process's own.
    pub program: Option<PathBuf>,
    /// Stops the sweep: once it has stopped, no run starts, the run in progress gets the
    /// signals it receives (and saves a checkpoint), and the report covers the runs that
    /// finished. `None`: nothing stops the sweep but its end.
    pub interrupt: Option<Arc<Interrupt>>,
}

/// A finished sweep: its report, written into `dir`.
#[derive(Debug, Clone)]
pub struct SweepOutcome {
    pub report: Report,
    pub dir: PathBuf,
}

/// The most seeds a sweep takes: its seeds run from 0 to N - 1, and the last must be one a run
/// takes (config whole numbers stop at `i64::MAX`).
pub const MAX_SEEDS: u64 = i64::MAX as u64 + 1;

/// Parses the number of seeds given to `--seeds` (checked against [`MAX_SEEDS`] by the sweep).
pub fn parse_seeds(text: &str) -> Result<u64, EvalError> {
    let item = text.trim();
    item.parse().map_err(|_| EvalError::Argument {
        arg: "--seeds".into(),
        message: if !item.is_empty() && item.bytes().all(|b| b.is_ascii_digit()) {
            too_many_seeds(item)
        } else {
            format!("\"{text}\" is not a number of seeds (a whole number, 1 to {MAX_SEEDS})")
        },
    })
}

/// Why `seeds` seeds are refused, `seeds` past [`MAX_SEEDS`].
fn too_many_seeds(seeds: &str) -> String {
    format!(
        "{seeds} is past the limit of {MAX_SEEDS} seeds (the seeds run from 0 to N - 1, and a \
         run's training.seed stops at {})",
        MAX_SEEDS - 1
    )
}

/// Parses a comma-separated list of distinct thread counts, each at least 1; returns them
/// ascending.
pub fn parse_threads(text: &str) -> Result<Vec<usize>, EvalError> {
    let bad = |message: String| EvalError::Argument {
        arg: "--threads".into(),
        message,
    };
    if text.trim().is_empty() {
        return Err(bad(
            "give a comma-separated list of thread counts, e.g. 1,2,4".into(),
        ));
    }
    let mut threads = Vec::new();
    for item in text.split(',') {
        let item = item.trim();
        if item.is_empty() {
            return Err(bad(format!(
                "\"{text}\" has an empty item: give thread counts separated by commas, e.g. 1,2,4"
            )));
        }
        let count: usize = item.parse().map_err(|_| {
            bad(format!(
                "\"{item}\" is not a thread count (a whole number of 1 or more)"
            ))
        })?;
        if count == 0 {
            return Err(bad(
                "0 is not a thread count: each must be at least 1".into()
            ));
        }
        if count > MAX_THREADS {
            return Err(bad(format!(
                "{count} threads is more than the {MAX_THREADS} a run allows"
            )));
        }
        if threads.contains(&count) {
            return Err(bad(format!("{count} appears twice in \"{text}\"")));
        }
        threads.push(count);
    }
    threads.sort_unstable();
    Ok(threads)
}

/// Where a sweep goes when no `--out` is given: `sweeps/<config stem>-<unix seconds>`.
pub fn default_sweep_dir(config: &Path) -> PathBuf {
    let stem = config
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "sweep".into());
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Path::new("sweeps").join(format!("{stem}-{stamp}"))
}

/// The settings that the sweep sets itself, which `--set` must leave alone.
const SWEPT_KEYS: [(&str, &str); 2] = [
    ("training.threads", "--threads"),
    ("training.seed", "--seeds"),
];

/// What the checks of a sweep's input give: its thread counts, its folder (held), and what its
/// runs are compared on.
struct Checked {
    threads: Vec<usize>,
    dir: PathBuf,
    lock: FolderLock,
    metric: Metric,
}

/// Checks everything the user gave before any run starts, and makes the sweep folder (the last
/// check: whether it can be made).
fn check(request: &SweepRequest) -> Result<Checked, EvalError> {
    let threads = parse_threads(&request.threads)?;
    let seeds_error = |message: String| EvalError::Argument {
        arg: "--seeds".into(),
        message,
    };
    if request.seeds == 0 {
        return Err(seeds_error("must be at least 1".into()));
    }
    if request.seeds > MAX_SEEDS {
        return Err(seeds_error(too_many_seeds(&request.seeds.to_string())));
    }
    // The run count must fit a u64: wrapped (a release build), it once made a sweep of "0 runs";
    // a debug build panicked.
    if (threads.len() as u64).checked_mul(request.seeds).is_none() {
        return Err(seeds_error(format!(
            "{} seeds x {} thread counts is {} runs, past the {} a sweep can count",
            request.seeds,
            threads.len(),
            u128::from(request.seeds) * threads.len() as u128,
            u64::MAX
        )));
    }
    refuse_owned_keys(&request.overrides, &SWEPT_KEYS, "sweep")?;
    // The config must load with the user's overrides: a config error stops the sweep here.
    let settings = Settings::load(
        &request.config,
        &Layers {
            overrides: request.overrides.clone(),
            environment: None,
        },
    )?;
    // From the config, not the runs: a sweep whose runs all fail still reports on its metric.
    let metric = Metric::of_settings(&settings);
    // Made now, so that a folder that cannot be made stops the sweep before its first run;
    // locked, so that two sweeps never write into one folder.
    let (dir, lock) = match &request.out {
        Some(out) => claim_new_folder(out, false),
        None => claim_new_folder(&default_sweep_dir(&request.config), true),
    }
    .map_err(|e| match e {
        allcores_trainer::Error::RunDir { path, message } => EvalError::OutDir { path, message },
        other => other.into(),
    })?;
    Ok(Checked {
        threads,
        dir,
        lock,
        metric,
    })
}

/// What became of one run.
enum RunResult {
    Done(Box<Summary>),
    Failed(RunFailure),
    /// The sweep was interrupted before the run could start.
    NotStarted,
}

/// Trains one run in its own process and reads its summary from the last stdout line.
fn run_one(
    program: &Path,
    request: &SweepRequest,
    threads: usize,
    seed: u64,
    run_dir: &Path,
) -> RunResult {
    // The user's overrides first, the swept settings last, so that they win.
    let sets = request.overrides.iter().cloned().chain([
        format!("training.threads={threads}"),
        format!("training.seed={seed}"),
    ]);
    let out = [OsStr::new("--out"), run_dir.as_os_str()];
    let interrupt = request.interrupt.as_deref();
    match train_child(program, &request.config, sets, &out, interrupt) {
        Ok(summary) => RunResult::Done(Box::new(summary)),
        Err(failure) if !failure.started() => RunResult::NotStarted,
        Err(failure) => RunResult::Failed(RunFailure {
            threads,
            seed,
            exit_status: failure.exit_status,
            message: failure.message,
        }),
    }
}

/// The sweep's voice on stderr: a bar over the runs when stderr is a terminal, lines otherwise.
struct SweepProgress {
    bar: ProgressBar,
    /// The sweep's runs in all.
    total: u64,
}

impl SweepProgress {
    fn new(total: u64) -> Self {
        let bar = if std::io::stderr().is_terminal() {
            ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "sweep [{bar:28.cyan/blue}] {pos}/{len} runs · {msg} · {elapsed} · ETA {eta}",
            )
            .expect("the template is valid")
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(250));
        Self { bar, total }
    }

    fn log(&self, line: impl AsRef<str>) {
        if self.bar.is_hidden() {
            eprintln!("{}", line.as_ref());
        } else {
            self.bar.println(line.as_ref());
        }
    }
}

/// Runs the sweep, writes its report, and returns it. Runs that fail are kept in the report
/// (see [`SweepOutcome::status`]); a run that fails on bad input before any run finished stops
/// the sweep, since every other run would fail the same way. A sweep that its interrupt stops
/// writes the report of the runs that finished, and says so in it.
pub fn run_sweep(request: &SweepRequest) -> Result<SweepOutcome, EvalError> {
    let started = Instant::now();
    // The lock is held until the report is written.
    let Checked {
        threads,
        dir,
        lock: _lock,
        metric,
    } = check(request)?;
    let program = child::program(request.program.as_ref())?;
    let available = child::warn_beyond_available(&threads);
    let progress = SweepProgress::new(threads.len() as u64 * request.seeds);
    progress.log(start_line(request, &threads, progress.total, &dir));
    let runs = run_all(&program, request, &threads, metric, &dir, &progress);
    progress.bar.finish_and_clear();
    let Runs {
        mut records,
        failures,
        processes_seconds,
        interrupted,
    } = runs?;

    fill_weight_diffs(&mut records, |line| progress.log(line));
    // A fold from 0.0: an empty f64 sum is -0.0, which an interrupted sweep printed as "-0.00 s".
    let runs_wall_seconds = records.iter().fold(0.0, |sum, r| sum + r.wall_seconds);
    let plan = SweepPlan {
        config: request.config.display().to_string(),
        threads,
        seeds: request.seeds,
        overrides: request.overrides.clone(),
        threads_available: available,
    };
    let mut report = build_report_on(metric, plan, records, failures);
    report.interrupted = interrupted.map(|stopped_run| Interruption {
        signal: signal_name(
            request
                .interrupt
                .as_ref()
                .and_then(|i| i.signal())
                .unwrap_or(libc::SIGINT),
        )
        .into(),
        runs_not_run: report.runs_not_run(),
        stopped_run,
    });
    let sweep_seconds = started.elapsed().as_secs_f64();
    report.timing = Some(Timing {
        sweep_seconds,
        runs_wall_seconds,
        processes_seconds,
        overhead_seconds: sweep_seconds - runs_wall_seconds,
        launcher_seconds: sweep_seconds - processes_seconds,
    });
    write_report(&report, &dir)?;
    Ok(SweepOutcome { report, dir })
}

/// The sweep's first log line: what it runs, how many times, and where.
fn start_line(request: &SweepRequest, threads: &[usize], total: u64, dir: &Path) -> String {
    let threads: Vec<String> = threads.iter().map(|t| t.to_string()).collect();
    format!(
        "allcores: sweeping {} over threads {} x {} seed{}: {total} run{}, one process each, \
         into {}",
        request.config.display(),
        threads.join(", "),
        request.seeds,
        if request.seeds == 1 { "" } else { "s" },
        if total == 1 { "" } else { "s" },
        dir.display()
    )
}

/// What the sweep's runs gave: the finished ones, the failed ones, and the time their processes
/// took from spawn to exit.
struct Runs {
    records: Vec<RunRecord>,
    failures: Vec<RunFailure>,
    processes_seconds: f64,
    /// `Some` when the interrupt stopped the sweep before its last run ended, holding the run it
    /// stopped part-way, if any.
    interrupted: Option<Option<RunFailure>>,
}

/// Runs every (seed, thread count) in turn, seed by seed, logging each as it ends. A run that
/// fails on bad input before any run finished stops the sweep; so does the interrupt, with the
/// runs so far.
fn run_all(
    program: &Path,
    request: &SweepRequest,
    threads: &[usize],
    metric: Metric,
    dir: &Path,
    progress: &SweepProgress,
) -> Result<Runs, EvalError> {
    let total = progress.total;
    let mut runs = Runs {
        records: Vec::new(),
        failures: Vec::new(),
        processes_seconds: 0.0,
        interrupted: None,
    };
    let stopped = || request.interrupt.as_ref().is_some_and(|i| i.stopped());
    let mut done = 0u64;
    for seed in 0..request.seeds {
        for &t in threads {
            if stopped() {
                runs.interrupted = Some(None);
                return Ok(runs);
            }
            done += 1;
            progress
                .bar
                .set_message(format!("threads {t}, seed {seed}"));
            let run_dir = dir.join("runs").join(format!("t{t}-s{seed}"));
            let run_started = Instant::now();
            let result = run_one(program, request, t, seed, &run_dir);
            runs.processes_seconds += run_started.elapsed().as_secs_f64();
            progress.bar.inc(1);
            let at = format!("[{done}/{total}] threads {t}, seed {seed}");
            match result {
                RunResult::Done(summary) => {
                    progress.log(format!(
                        "{at}: {} · {:.2} s · weights {}",
                        metric.run_figures(&summary),
                        summary.wall_seconds,
                        summary.weights_sha256.get(..12).unwrap_or_default()
                    ));
                    let run_dir = run_dir.display().to_string();
                    let record = RunRecord::from_summary(t, seed, &summary, run_dir);
                    runs.records.push(record);
                }
                RunResult::NotStarted => {
                    runs.interrupted = Some(None);
                    return Ok(runs);
                }
                // Stopped by the signal that stops the sweep (not a failure of its own).
                RunResult::Failed(failure) if stopped() && stopped_by_signal(&failure) => {
                    progress.log(format!("{at} stopped: {}", failure.message));
                    runs.interrupted = Some(Some(failure));
                    return Ok(runs);
                }
                RunResult::Failed(failure) => {
                    progress.log(format!("{at} failed: {}", failure.message));
                    if failure.exit_status == Some(2) && runs.records.is_empty() {
                        return Err(EvalError::RunInput {
                            threads: t,
                            seed,
                            message: failure.message,
                        });
                    }
                    runs.failures.push(failure);
                }
            }
        }
    }
    Ok(runs)
}

/// Whether a signal ended the run: it was killed by one, or exited with 128 + its number (as
/// `allcores train` does after saving a checkpoint).
fn stopped_by_signal(failure: &RunFailure) -> bool {
    failure.exit_status.is_none_or(|status| status > 128)
}

/// Sets each run's largest weight difference against the run of the same seed at the smallest
/// thread count: 0 for equal hashes, else read from the two `model.safetensors` files.
fn fill_weight_diffs(records: &mut [RunRecord], warn: impl Fn(String)) {
    let mut by_seed: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (i, r) in records.iter().enumerate() {
        by_seed.entry(r.seed).or_default().push(i);
    }
    for indices in by_seed.values() {
        let Some(&base) = indices.iter().min_by_key(|&&i| records[i].threads) else {
            continue;
        };
        let mut base_weights: Option<Result<Weights, String>> = None;
        for &i in indices {
            if records[i].weights_sha256 == records[base].weights_sha256 {
                records[i].max_weight_diff = Some(0.0);
                continue;
            }
            let weights_of = |i: usize| {
                read_weights(
                    &Path::new(&records[i].run_dir).join(allcores_trainer::run_dir::WEIGHTS_FILE),
                )
            };
            let base_weights = base_weights.get_or_insert_with(|| weights_of(base));
            let diff = base_weights
                .as_ref()
                .map_err(Clone::clone)
                .and_then(|b| max_abs_diff(b, &weights_of(i)?));
            match diff {
                Ok(d) => records[i].max_weight_diff = Some(d),
                Err(e) => warn(format!(
                    "warning: cannot compare the weights of threads {}, seed {} with threads {}: \
                     {e}",
                    records[i].threads, records[i].seed, records[base].threads
                )),
            }
        }
    }
}

/// Writes `report.json`, `report.md`, `report.csv` and the plots into `dir`.
fn write_report(report: &Report, dir: &Path) -> Result<(), EvalError> {
    std::fs::create_dir_all(dir).map_err(|e| EvalError::write(dir, e))?;
    let json = serde_json::to_string_pretty(report).expect("the report serializes");
    for (name, text) in [
        ("report.json", json),
        ("report.md", report.to_markdown()),
        ("report.csv", report.to_csv()),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| EvalError::write(&path, e))?;
    }
    if !report.runs.is_empty() {
        plot::metric_svg(report, &dir.join(report.metric.plot_file()))?;
        plot::throughput_svg(report, &dir.join("throughput.svg"))?;
    }
    Ok(())
}

impl SweepOutcome {
    /// What `allcores sweep` prints: the table, the verdict and where the report is.
    pub fn to_text(&self) -> String {
        let mut out = self.report.runs_table();
        out.push('\n');
        out.push_str(&self.report.baseline_note());
        if let Some(t) = &self.report.timing {
            out.push_str(&format!(
                "\nsweep {:.2} s · runs' own wall time {:.2} s · overhead {:.2} s (of which the \
                 sweep's own work {:.2} s)",
                t.sweep_seconds, t.runs_wall_seconds, t.overhead_seconds, t.launcher_seconds
            ));
        }
        if let Some(note) = self.report.interruption_note() {
            out.push('\n');
            out.push_str(&note);
        }
        out.push_str(&format!(
            "\nreport {}\n{}",
            self.dir.join("report.md").display(),
            self.report.verdict.line
        ));
        out
    }

    /// The report as one line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.report).expect("the report serializes")
    }

    /// `Err` when a signal stopped the sweep (it then exits 128 + the signal's number), or when
    /// some runs failed (exit 1), after its report.
    pub fn status(&self) -> Result<(), EvalError> {
        if let Some(interruption) = &self.report.interrupted {
            return Err(EvalError::Interrupted {
                signal: interruption.signal.clone(),
                ended: self.report.runs.len() + self.report.failures.len(),
                total: self.report.runs_planned(),
                not_run: interruption.runs_not_run,
                dir: self.dir.clone(),
            });
        }
        let Some(first) = self.report.failures.first() else {
            return Ok(());
        };
        Err(EvalError::RunsFailed {
            failed: self.report.failures.len(),
            total: self.report.failures.len() + self.report.runs.len(),
            threads: first.threads,
            seed: first.seed,
            message: first.message.clone(),
            dir: self.dir.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(dir: &Path, threads: usize, seed: u64, hash: &str, weights: &[f32]) -> RunRecord {
        let run_dir = dir.join(format!("t{threads}-s{seed}"));
        std::fs::create_dir_all(&run_dir).unwrap();
        let bytes: Vec<u8> = weights.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::F32,
            vec![weights.len()],
            &bytes,
        )
        .unwrap();
        let file = safetensors::serialize([("w", view)], None).unwrap();
        std::fs::write(run_dir.join("model.safetensors"), file).unwrap();
        RunRecord {
            threads,
            seed,
            test_accuracy: 0.9,
            test_loss: 0.3,
            train_loss: 0.2,
            samples_per_second: 1000.0,
            val_loss: None,
            tokens_per_second: None,
            cpu_utilization: 1.0,
            wall_seconds: 1.0,
            train_seconds: 1.0,
            weights_sha256: hash.into(),
            max_weight_diff: None,
            run_dir: run_dir.display().to_string(),
        }
    }

    #[test]
    fn weight_differences_are_read_against_the_smallest_thread_count() {
        let dir = tempfile::tempdir().unwrap();
        let mut records = vec![
            record(dir.path(), 4, 0, "b", &[1.0, 2.0, 3.25]),
            record(dir.path(), 1, 0, "a", &[1.0, 2.0, 3.0]),
            record(dir.path(), 2, 0, "a", &[1.0, 2.0, 3.0]),
            record(dir.path(), 2, 1, "c", &[0.0]),
            record(dir.path(), 4, 1, "d", &[0.0, 1.0]),
        ];
        let warnings = std::cell::RefCell::new(Vec::new());
        fill_weight_diffs(&mut records, |w| warnings.borrow_mut().push(w));
        let diffs: Vec<Option<f64>> = records.iter().map(|r| r.max_weight_diff).collect();
        assert_eq!(diffs, [Some(0.25), Some(0.0), Some(0.0), Some(0.0), None]);
        let warnings = warnings.into_inner();
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].contains("threads 4, seed 1 with threads 2: tensor w has shape [1]"),
            "{}",
            warnings[0]
        );
    }

    #[test]
    fn thread_lists_parse_sorted() {
        assert_eq!(parse_threads("1,2,4").unwrap(), [1, 2, 4]);
        assert_eq!(parse_threads(" 4, 1 ").unwrap(), [1, 4]);
        assert_eq!(parse_threads("3").unwrap(), [3]);
    }

    #[test]
    fn bad_thread_lists_are_refused_on_one_line() {
        for (text, expected) in [
            ("", "comma-separated list"),
            ("  ", "comma-separated list"),
            ("0", "0 is not a thread count"),
            ("1,0", "0 is not a thread count"),
            ("a,b", "\"a\" is not a thread count"),
            ("-1", "\"-1\" is not a thread count"),
            ("1.5", "\"1.5\" is not a thread count"),
            ("1,,2", "empty item"),
            ("1,2,", "empty item"),
            ("1,1", "1 appears twice"),
            ("2,4,2", "2 appears twice"),
            ("5000", "more than the 1024"),
        ] {
            let err = parse_threads(text).unwrap_err();
            assert!(err.is_bad_input(), "{text}");
            let message = err.to_string();
            assert!(message.starts_with("--threads: "), "{text}: {message}");
            assert!(message.contains(expected), "{text}: {message}");
            assert!(!message.contains('\n'), "{text}: {message}");
        }
    }

    /// A config that loads (its data file need not exist) in `dir`.
    fn minimal_config(dir: &std::path::Path) -> PathBuf {
        let config = dir.join("c.toml");
        std::fs::write(
            &config,
            "[data]\nformat = \"csv\"\ntrain_csv = \"d.csv\"\ntest_fraction = 0.2\n",
        )
        .unwrap();
        config
    }

    fn request(config: PathBuf) -> SweepRequest {
        SweepRequest {
            config,
            threads: "1,2".into(),
            seeds: 1,
            overrides: vec![],
            out: None,
            program: Some("/nonexistent/allcores".into()),
            interrupt: None,
        }
    }

    #[test]
    fn bad_requests_stop_before_any_run() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = request(dir.path().join("missing.toml"));
        r.out = Some(dir.path().join("sweep"));
        let err = run_sweep(&r).unwrap_err();
        assert!(err.is_bad_input());
        assert!(err.to_string().contains("config file not found"), "{err}");
        assert!(!dir.path().join("sweep").exists());

        r.seeds = 0;
        let err = run_sweep(&r).unwrap_err();
        assert_eq!(err.to_string(), "--seeds: must be at least 1");

        // Past the last seed a run takes; then a run count that overflows, which once wrapped
        // into a sweep of "0 runs" (9223372036854775808 x 2 = 2^64).
        r.seeds = MAX_SEEDS + 1;
        let err = run_sweep(&r).unwrap_err();
        assert!(err.is_bad_input());
        assert_eq!(
            err.to_string(),
            "--seeds: 9223372036854775809 is past the limit of 9223372036854775808 seeds (the \
             seeds run from 0 to N - 1, and a run's training.seed stops at 9223372036854775807)"
        );
        r.seeds = MAX_SEEDS;
        let err = run_sweep(&r).unwrap_err();
        assert!(err.is_bad_input());
        assert_eq!(
            err.to_string(),
            "--seeds: 9223372036854775808 seeds x 2 thread counts is 18446744073709551616 runs, \
             past the 18446744073709551615 a sweep can count"
        );
        assert!(!dir.path().join("sweep").exists());

        r.seeds = 1;
        r.overrides = vec!["training.threads=4".into()];
        let err = run_sweep(&r).unwrap_err();
        assert!(err.is_bad_input());
        assert!(err.to_string().contains("use --threads instead"), "{err}");
    }

    #[test]
    fn seed_counts_parse_up_to_the_limit() {
        assert_eq!(parse_seeds(" 3 ").unwrap(), 3);
        assert_eq!(parse_seeds("9223372036854775808").unwrap(), MAX_SEEDS);
        for (text, expected) in [
            ("abc", "\"abc\" is not a number of seeds"),
            ("-1", "\"-1\" is not a number of seeds"),
            ("1.5", "\"1.5\" is not a number of seeds"),
            ("", "\"\" is not a number of seeds"),
            (
                "18446744073709551616",
                "18446744073709551616 is past the limit of",
            ),
        ] {
            let err = parse_seeds(text).unwrap_err();
            assert!(err.is_bad_input());
            let message = err.to_string();
            assert!(message.starts_with("--seeds: "), "{text}: {message}");
            assert!(message.contains(expected), "{text}: {message}");
        }
    }

    #[test]
    fn an_interrupted_sweep_starts_no_run_and_reports_so() {
        let dir = tempfile::tempdir().unwrap();
        let config = minimal_config(dir.path());
        let interrupt = Interrupt::new();
        interrupt.receive(libc::SIGTERM);
        let mut r = request(config);
        r.seeds = 3;
        r.out = Some(dir.path().join("sweep"));
        r.interrupt = Some(interrupt);
        let outcome = run_sweep(&r).unwrap();
        let report = &outcome.report;
        assert!(report.runs.is_empty() && report.failures.is_empty());
        let interrupted = report.interrupted.as_ref().unwrap();
        assert_eq!(interrupted.signal, "SIGTERM");
        assert_eq!(interrupted.runs_not_run, 6);
        assert_eq!(interrupted.stopped_run, None);
        let err = outcome.status().unwrap_err();
        assert!(!err.is_bad_input());
        assert_eq!(
            err.to_string(),
            format!(
                "the sweep was interrupted by SIGTERM: 0 of 6 runs ended, 6 did not run; the \
                 report is in {}",
                dir.path().join("sweep").display()
            )
        );
        let md = std::fs::read_to_string(dir.path().join("sweep/report.md")).unwrap();
        assert!(
            md.contains("the runs' own wall time adds up to 0.00 s"),
            "{md}"
        );
        assert!(
            md.contains(
                "Interrupted by SIGTERM: 6 of 6 planned runs did not run; the report covers the \
                 0 that ended."
            ),
            "{md}"
        );
        // No plot without a run, and none named.
        assert!(!md.contains("accuracy.svg"), "{md}");
        assert!(!dir.path().join("sweep/runs").exists());
        assert!(outcome.to_text().contains("Interrupted by SIGTERM"));
    }

    #[test]
    fn a_sweep_folder_that_holds_files_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let config = minimal_config(dir.path());
        std::fs::write(dir.path().join("x"), "").unwrap();
        let mut r = request(config);
        r.out = Some(dir.path().to_path_buf());
        let err = run_sweep(&r).unwrap_err();
        assert!(err.is_bad_input());
        assert!(err.to_string().contains("not empty"), "{err}");
    }

    /// One process owns a sweep folder at a time: a second sweep is refused, naming the first.
    #[test]
    fn a_sweep_folder_another_process_holds_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let config = minimal_config(dir.path());
        let folder = dir.path().join("sweep");
        let (_, held) = claim_new_folder(&folder, false).unwrap();
        let mut r = request(config);
        r.out = Some(folder.clone());
        let err = run_sweep(&r).unwrap_err();
        assert!(err.is_bad_input());
        let pid = std::process::id();
        assert!(
            err.to_string().contains(&format!(
                "is in use by another allcores process (pid {pid})"
            )),
            "{err}"
        );
        drop(held);
        // Its holder gone, the (still empty) folder is free.
        assert!(run_sweep(&r).is_ok());
    }

    #[test]
    fn a_run_that_cannot_start_is_a_failure_in_the_report() {
        let dir = tempfile::tempdir().unwrap();
        let config = minimal_config(dir.path());
        let mut r = request(config);
        r.out = Some(dir.path().join("sweep"));
        let outcome = run_sweep(&r).unwrap();
        assert_eq!(outcome.report.failures.len(), 2);
        assert_eq!(outcome.report.failures[0].exit_status, None);
        assert!(
            outcome.report.failures[0]
                .message
                .starts_with("cannot start")
        );
        let err = outcome.status().unwrap_err();
        assert!(!err.is_bad_input());
        assert!(err.to_string().starts_with("2 of 2 runs failed"), "{err}");
        assert!(dir.path().join("sweep/report.md").is_file());
        assert!(!dir.path().join("sweep/accuracy.svg").exists());
    }
}
