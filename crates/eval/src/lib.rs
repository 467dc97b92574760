//! allcores-eval: evaluation of trained runs.
//!
//! [`evaluate_run`] scores a run's final model on the test split of its saved config (or of
//! another, through overrides): loss, accuracy, accuracy per class and the confusion matrix.
//!
//! [`predict`] runs a finished classifier on new rows or images: each sample's class and
//! probabilities, and the accuracy where the file holds labels.
//!
//! [`run_bench`] measures steady-state training throughput of one config at several thread
//! counts, one process each: samples/s, step-time spread, CPU use and peak memory.
//!
//! [`run_sweep`] trains one config at several thread counts and seeds, each run in its own
//! process, and reports whether the thread count changed the result or only the speed
//! ([`build_report`] makes the report and its verdict from the runs' records). It compares the
//! runs on their [`Metric`]: a classifier's test accuracy, or a language model's validation loss.
//!
//! [`Interrupt`] turns Ctrl-C, SIGTERM and SIGHUP into a stop at the next safe point: a run's
//! next step boundary (after a checkpoint), a sweep's run in progress (then its report).

pub mod bench;
mod child;
pub mod diff;
mod evaluate;
mod plot;
pub mod predict;
pub mod report;
pub mod signals;
pub mod sweep;

pub use bench::{BenchReport, BenchRequest, BenchRun, run_bench};
pub use evaluate::{Evaluation, RunEvaluation, TextEvaluation, evaluate_run};
pub use predict::{Prediction, Predictions, predict};
pub use report::{
    Interruption, Metric, Outcome, Report, RunRecord, Verdict, build_report, build_report_on,
};
pub use signals::Interrupt;
pub use sweep::{SweepOutcome, SweepRequest, parse_seeds, parse_threads, run_sweep};

use std::path::{Path, PathBuf};

/// What can stop an evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Trainer(#[from] allcores_trainer::Error),

    /// A command-line argument is malformed.
    #[error("{arg}: {message}")]
    Argument { arg: String, message: String },

    /// The sweep's output folder cannot be used.
    #[error("{path}: {message}")]
    OutDir { path: PathBuf, message: String },

    /// Writing a report file failed.
    #[error("{path}: {message}")]
    Write { path: PathBuf, message: String },

    /// The program that trains each run cannot be found.
    #[error("cannot find the program to run ({program}): {source}")]
    Launch {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A run refused its input before any run finished: every run would.
    #[error("the run at threads {threads}, seed {seed} refused its input: {message}")]
    RunInput {
        threads: usize,
        seed: u64,
        message: String,
    },

    /// A run of `allcores bench` failed: the bench stops (exit 2 when the run refused its input).
    #[error("the run at threads {threads} failed: {message}")]
    BenchRun {
        threads: usize,
        exit_status: Option<i32>,
        message: String,
    },

    /// A signal stopped the sweep; the report holds the runs that ended.
    #[error(
        "the sweep was interrupted by {signal}: {ended} of {total} runs ended, {not_run} did not \
         run; the report is in {dir}"
    )]
    Interrupted {
        signal: String,
        ended: usize,
        total: u64,
        not_run: u64,
        dir: PathBuf,
    },

    /// Some runs of a sweep failed; the report holds the others.
    #[error(
        "{failed} of {total} runs failed (first: threads {threads}, seed {seed}: {message}); \
         the report is in {dir}"
    )]
    RunsFailed {
        failed: usize,
        total: usize,
        threads: usize,
        seed: u64,
        message: String,
        dir: PathBuf,
    },
}

impl EvalError {
    /// True when the user can fix it by changing the input (exit status 2).
    pub fn is_bad_input(&self) -> bool {
        match self {
            EvalError::Trainer(e) => e.is_bad_input(),
            EvalError::Argument { .. } | EvalError::OutDir { .. } | EvalError::RunInput { .. } => {
                true
            }
            EvalError::BenchRun { exit_status, .. } => *exit_status == Some(2),
            EvalError::Write { .. }
            | EvalError::Launch { .. }
            | EvalError::RunsFailed { .. }
            | EvalError::Interrupted { .. } => false,
        }
    }

    pub(crate) fn write(path: &Path, error: impl std::fmt::Display) -> Self {
        EvalError::Write {
            path: path.to_path_buf(),
            message: error.to_string(),
        }
    }
}
