//! Training: the public entry points ([`Trainer`], [`fit_task`], [`train`]) over one loop that
//! serves every task. Read in this order:
//!
//! - `plan`: how the samples fall into steps, pieces and epochs, and their seeded order;
//! - `step`: one optimizer step, top to bottom (pieces' forward and backward, fixed-order sum,
//!   overflow check, clipping, optimizer);
//! - `run`: the loop around it (start or resume, scoring, checkpoints, summary);
//! - [`task`]: what differs between classification and language modelling.
//!
//! One optimizer step takes `batch_size x accumulation_steps` samples of the epoch's seeded
//! order, in micro-batches of `batch_size`. Each piece's summed loss is divided by the step's
//! total loss units (samples, or target tokens) before backward, so the summed gradient is
//! exactly that of one batch of all the step's samples. Everything runs inside a rayon pool of
//! the configured size; no result depends on it.
//!
//! The loop's whole state is a [`LoopState`](crate::checkpoint::LoopState) plus the weights and
//! the optimizer state: that is what a checkpoint saves, and a resumed run continues bit for bit
//! where it stopped.

mod plan;
mod run;
mod step;
pub mod task;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use burn::prelude::*;
use burn::store::ModuleSnapshot;

use crate::data::Splits;
use crate::error::Result;
use crate::language::NextToken;
use crate::model::{BuiltinModel, Classifier, RunMemory, ensure_memory_for_run};
use crate::optim::values_per_parameter;
use crate::settings::{Backend, DataFormat, Settings, Threads};
use crate::summary::Summary;
use crate::threads::ThreadPlan;
use plan::StepPlan;
use run::Run;
use task::{Classification, Task};

/// How a run talks, where it writes, and what can stop it.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// No log lines, no progress bar.
    pub quiet: bool,
    /// The run folder; `None` trains without writing anything.
    pub run_dir: Option<PathBuf>,
    /// Continue the run in `run_dir` from its newest valid checkpoint (fresh if it has none).
    pub resume: bool,
    /// `run_dir` is a default name: where it exists, take the first free `run_dir-2`,
    /// `run_dir-3`... rather than refuse it.
    pub numbered_run_dir: bool,
    /// Set from another thread (a signal handler) to stop at the next step boundary, after
    /// saving a checkpoint.
    pub stop: Option<Arc<AtomicBool>>,
    /// Record each optimizer step's wall and CPU seconds in [`Summary::step_times`].
    pub record_steps: bool,
}

/// The device of a backend, with gradients on.
pub fn device(backend: Backend) -> Device {
    match backend {
        #[allow(deprecated)] // burn-ndarray is deprecated upstream but still the fastest here
        Backend::Ndarray => Device::ndarray(),
        Backend::Flex => Device::flex(),
    }
    .autodiff()
}

/// A trained model and the summary of its run.
#[derive(Debug)]
pub struct Outcome<M> {
    pub model: M,
    pub summary: Summary,
}

/// Trains classifiers on one dataset with one set of settings.
pub struct Trainer {
    settings: Settings,
    data: Splits,
    options: Options,
}

impl Trainer {
    pub fn new(settings: Settings, data: Splits, options: Options) -> Self {
        Self {
            settings,
            data,
            options,
        }
    }

    /// Trains the built-in network that `model.*` describes; refuses, before building it, one
    /// that cannot train in this machine's memory.
    pub fn fit_builtin(&self) -> Result<Outcome<BuiltinModel>> {
        let shape = self.data.train.shape();
        let classes = self.data.classes;
        let model = &self.settings.model;
        let (values_each, values_are) = values_per_parameter(&self.settings.optimizer);
        let training = &self.settings.training;
        let plan = StepPlan::new(self.data.train.len(), training)?;
        // Pieces run at once up to one a thread (`auto` may choose every available thread).
        let threads = match training.threads {
            Threads::Count(n) => n.get(),
            Threads::Auto => ThreadPlan::new(Threads::Auto).threads,
        };
        let piece = plan.batch_size.div_ceil(plan.shards).min(plan.samples);
        let in_flight = plan.pieces_per_step().min(threads).max(1);
        ensure_memory_for_run(RunMemory {
            parameters: BuiltinModel::parameter_count(model, shape, classes)?,
            values_each,
            values_are,
            activations_per_sample: BuiltinModel::activation_count(model, shape, classes)?,
            samples_in_flight: (piece * in_flight) as f64,
        })?;
        self.fit(|device| BuiltinModel::new(model, shape, classes, device))
    }

    /// Trains the model that `init` builds on the run's device (seeded from `training.seed`).
    /// With `threads = "auto"`, `init` is called twice: once for a throwaway copy that the
    /// calibration times.
    pub fn fit<M, F>(&self, init: F) -> Result<Outcome<M>>
    where
        M: Classifier + ModuleSnapshot,
        F: Fn(&Device) -> Result<M> + Send + Sync,
    {
        fit_task(
            &self.settings,
            &self.options,
            &Classification::new(&self.data),
            init,
        )
    }
}

/// Trains `task`'s model, which `init` builds on the run's device (seeded from
/// `training.seed`), in a pool of the configured threads. With `threads = "auto"`, `init` is
/// called twice: once for a throwaway copy that the calibration times.
pub fn fit_task<T, F>(
    settings: &Settings,
    options: &Options,
    task: &T,
    init: F,
) -> Result<Outcome<T::Model>>
where
    T: Task,
    F: Fn(&Device) -> Result<T::Model> + Send + Sync,
{
    let run = Run {
        settings,
        options,
        task,
    };
    let (plan, calibration) = match settings.training.threads {
        Threads::Count(_) => (ThreadPlan::new(settings.training.threads), None),
        Threads::Auto => {
            let calibration = run.calibrate(&init)?;
            (
                ThreadPlan::chosen(calibration.chosen.threads),
                Some(calibration),
            )
        }
    };
    let pool = plan.install()?;
    pool.install(|| run.run(plan, calibration, init))
}

/// Loads the data the settings name and trains the model they describe: the whole `train`
/// command.
pub fn train(settings: &Settings, options: Options) -> Result<Summary> {
    if settings.data.format == DataFormat::Text {
        let task = NextToken::load(settings)?;
        return Ok(task.fit(settings, &options)?.summary);
    }
    let data = Splits::load(&settings.data)?;
    Ok(Trainer::new(settings.clone(), data, options)
        .fit_builtin()?
        .summary)
}

/// Where a run folder goes when none is given: `runs/<config name>-<unix seconds>`.
pub fn default_run_dir(config: &Path) -> PathBuf {
    let stem = config
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "run".into());
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Path::new("runs").join(format!("{stem}-{stamp}"))
}
