//! The training loop.
//!
//! One optimizer step takes `batch_size x accumulation_steps` samples of the epoch's seeded
//! order, in micro-batches of `batch_size`. Each micro-batch's mean loss is weighted by its
//! share of the step's samples before backward, so the summed gradient is exactly that of one
//! batch of all the step's samples (a short last micro-batch weighs what its samples weigh).
//! Everything runs inside a rayon pool of the configured size; no result depends on it.
//!
//! The loop's whole state is a [`LoopState`] plus the weights and the optimizer state: that is
//! what a checkpoint saves, and a resumed run continues bit for bit where it stopped.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use burn::lr_scheduler::module_lr_scheduler::ModuleLrScheduler;
use burn::module::{ModuleVisitor, Param};
use burn::nn::loss::{CrossEntropyLoss, CrossEntropyLossConfig};
use burn::optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use burn::store::ModuleSnapshot;
use burn::tensor::Bytes;

use crate::checkpoint::{self, Checkpoint, LoopState};
use crate::data::{Dataset, Splits, epoch_order};
use crate::error::{Error, Result};
use crate::model::{BuiltinModel, Classifier};
use crate::optim::{optimizer, schedule};
use crate::progress::{Progress, thousands};
use crate::resume::check_resumable;
use crate::run_dir::RunDir;
use crate::score::score;
use crate::settings::{Backend, Settings, TrainingSettings};
use crate::summary::{EpochMetrics, StepTime, Summary};
use crate::threads::ThreadPlan;
use crate::usage::{CpuMeter, peak_rss_bytes, process_cpu_time};
use crate::weights::{self, weights_sha256};

/// How a run talks, where it writes, and what can stop it.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// No log lines, no progress bar.
    pub quiet: bool,
    /// The run folder; `None` trains without writing anything.
    pub run_dir: Option<PathBuf>,
    /// Continue the run in `run_dir` from its newest valid checkpoint (fresh if it has none).
    pub resume: bool,
    /// Set from another thread (a Ctrl-C handler) to stop at the next step boundary, after
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

/// How the run's samples fall into steps and epochs.
#[derive(Debug, Clone, Copy)]
struct StepPlan {
    batch_size: usize,
    /// Samples per optimizer step: `batch_size x accumulation_steps`.
    step_size: usize,
    steps_per_epoch: u64,
    total_steps: u64,
    epochs: u64,
}

impl StepPlan {
    fn new(samples: usize, training: &TrainingSettings) -> Self {
        let step_size = training.effective_batch_size();
        let steps_per_epoch = samples.div_ceil(step_size) as u64;
        let all = steps_per_epoch * training.epochs;
        let total_steps = training.max_steps.map_or(all, |max| max.min(all));
        Self {
            batch_size: training.batch_size,
            step_size,
            steps_per_epoch,
            total_steps,
            epochs: total_steps.div_ceil(steps_per_epoch),
        }
    }
}

/// Trains models on one dataset with one set of settings.
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

    /// Trains the built-in network that `model.*` describes.
    pub fn fit_builtin(&self) -> Result<Outcome<BuiltinModel>> {
        let shape = self.data.train.shape();
        let classes = self.data.classes;
        let model = &self.settings.model;
        self.fit(|device| BuiltinModel::new(model, shape, classes, device))
    }

    /// Trains the model that `init` builds on the run's device (seeded from `training.seed`).
    pub fn fit<M, F>(&self, init: F) -> Result<Outcome<M>>
    where
        M: Classifier + ModuleSnapshot,
        F: FnOnce(&Device) -> Result<M> + Send,
    {
        let plan = ThreadPlan::new(self.settings.training.threads);
        let pool = plan.install()?;
        pool.install(|| self.run(plan, init))
    }

    fn run<M, F>(&self, threads: ThreadPlan, init: F) -> Result<Outcome<M>>
    where
        M: Classifier + ModuleSnapshot,
        F: FnOnce(&Device) -> Result<M>,
    {
        let started = Instant::now();
        let cpu = CpuMeter::start();
        let training = &self.settings.training;
        let train = &self.data.train;
        let plan = StepPlan::new(train.len(), training);
        let device = device(training.backend);
        let model = seeded_init(&device, training.seed, init)?;
        let optimizer = optimizer(&self.settings.optimizer);
        let scheduler = schedule(&self.settings.optimizer, plan.total_steps)?;
        let loss_fn = CrossEntropyLossConfig::new().init(&device);
        let (resume_from, notes) = self.resume_point()?;
        let Restored {
            mut model,
            mut optimizer,
            mut scheduler,
            mut state,
            mut lr,
        } = restore(resume_from.as_ref(), model, optimizer, scheduler)?;
        // Every check of the input is behind us: only now is the run folder written.
        let run_dir = self.prepare_run_dir(&state)?;

        let progress = Progress::new(plan.total_steps, self.options.quiet);
        progress.log(format!(
            "allcores: training {} on {} with {}",
            self.settings.model.kind,
            training.backend,
            threads.describe(training.backend)
        ));
        for note in notes {
            progress.log(note);
        }
        if let Some(checkpoint) = &resume_from {
            progress.log(format!(
                "resuming from {} (step {}, epoch {})",
                checkpoint.folder.display(),
                state.step,
                state.epoch
            ));
            progress.advance(state.step);
        }
        if plan.step_size > train.len() {
            progress.log(format!(
                "warning: the effective batch ({} = training.batch_size x \
                 training.accumulation_steps) is larger than the {} training samples",
                plan.step_size,
                train.len()
            ));
        }

        let mut order = (
            state.epoch,
            epoch_order(train.len(), training.seed, state.epoch),
        );
        let mut epoch_cpu = CpuMeter::start();
        let mut checkpoint_seconds = 0.0;
        let mut step_times = Vec::new();
        while state.step < plan.total_steps {
            if order.0 != state.epoch {
                order = (
                    state.epoch,
                    epoch_order(train.len(), training.seed, state.epoch),
                );
                epoch_cpu = CpuMeter::start();
            }
            progress.set_epoch(state.epoch, plan.epochs);
            let start = state.groups_done as usize * plan.step_size;
            let group = &order.1[start..(start + plan.step_size).min(train.len())];

            // One optimizer step: the summed gradients of the group's micro-batches.
            let step_started = Instant::now();
            let step_cpu = self.options.record_steps.then(process_cpu_time);
            let (grads, loss) =
                accumulate_gradients(&model, train, group, &plan, &loss_fn, &device);
            if !loss.is_finite() {
                return Err(Error::Diverged {
                    step: state.step + 1,
                    loss,
                });
            }
            let rate = scheduler.step();
            lr = rate.base();
            model = optimizer.step(rate, model, grads);
            let seconds = step_started.elapsed().as_secs_f64();
            if let Some(cpu_before) = step_cpu {
                step_times.push(StepTime {
                    samples: group.len(),
                    wall_seconds: seconds,
                    cpu_seconds: (process_cpu_time() - cpu_before).as_secs_f64(),
                });
            }

            state.record_step(group.len(), loss, seconds);
            progress.step(
                loss,
                state.samples,
                state.samples as f64 / state.train_seconds,
            );
            let epoch_done = state.groups_done == plan.steps_per_epoch;
            if epoch_done {
                let metrics = self.score_epoch(&model, &device, &state, lr, epoch_cpu, threads);
                self.report_epoch(&metrics, threads, run_dir.as_ref(), &progress)?;
                state.finish_epoch(metrics);
            }
            let stopping = self
                .options
                .stop
                .as_ref()
                .is_some_and(|stop| stop.load(Ordering::SeqCst));
            if let Some(run_dir) = &run_dir
                && (stopping || self.checkpoint_due(&state, epoch_done, &plan))
            {
                let writing = Instant::now();
                save_checkpoint(run_dir, &state, &self.settings, &model, &optimizer)?;
                checkpoint_seconds += writing.elapsed().as_secs_f64();
            }
            if stopping {
                progress.finish();
                return Err(Error::Interrupted {
                    step: state.step,
                    run_dir: run_dir.map_or_else(PathBuf::new, |d| d.path().to_path_buf()),
                });
            }
        }
        // A run that ends inside an epoch scores that partial epoch too; its state stays inside
        // the epoch, so that a resume with more steps carries on exactly there.
        let partial_epoch = if state.groups_done > 0 {
            let metrics = self.score_epoch(&model, &device, &state, lr, epoch_cpu, threads);
            self.report_epoch(&metrics, threads, run_dir.as_ref(), &progress)?;
            Some(metrics)
        } else {
            None
        };
        progress.finish();

        let last = partial_epoch
            .or_else(|| state.metrics.last().cloned())
            .expect("a finished run has scored at least one epoch");
        if let Some(run_dir) = &run_dir {
            weights::save(&model.valid(), &run_dir.weights_path())?;
        }
        let summary = Summary {
            test_accuracy: last.test_accuracy,
            test_loss: last.test_loss,
            train_loss: last.train_loss,
            epochs: last.epoch,
            steps: state.step,
            samples: state.samples,
            wall_seconds: started.elapsed().as_secs_f64(),
            train_seconds: state.train_seconds,
            checkpoint_seconds,
            samples_per_second: state.samples as f64 / state.train_seconds,
            threads: threads.threads,
            threads_available: threads.available,
            cpu_utilization: cpu.utilization(threads.threads),
            backend: training.backend.to_string(),
            model: self.settings.model.kind.to_string(),
            batch_size: plan.batch_size,
            accumulation_steps: training.accumulation_steps,
            effective_batch_size: plan.step_size,
            seed: training.seed,
            peak_rss_bytes: peak_rss_bytes(),
            weights_sha256: weights_sha256(&model),
            run_dir: run_dir.as_ref().map(|d| d.path().display().to_string()),
            step_times,
        };
        if let Some(run_dir) = &run_dir {
            run_dir.write_summary(&summary)?;
        }
        Ok(Outcome { model, summary })
    }

    /// Scores the model on the test set after an epoch.
    fn score_epoch<M: Classifier>(
        &self,
        model: &M,
        device: &Device,
        state: &LoopState,
        lr: f64,
        cpu: CpuMeter,
        threads: ThreadPlan,
    ) -> EpochMetrics {
        let cpu_utilization = cpu.utilization(threads.threads);
        let test = score(
            model,
            &self.data.test,
            self.data.classes,
            device,
            self.settings.training.batch_size,
        );
        EpochMetrics {
            epoch: state.epoch,
            steps: state.step,
            samples: state.samples,
            train_loss: state.epoch_loss_sum / state.epoch_samples.max(1) as f64,
            test_loss: test.loss,
            test_accuracy: test.accuracy,
            lr,
            samples_per_second: state.epoch_samples as f64 / state.epoch_seconds,
            cpu_utilization,
        }
    }

    /// Logs the epoch and appends it to the metrics file.
    fn report_epoch(
        &self,
        metrics: &EpochMetrics,
        threads: ThreadPlan,
        run_dir: Option<&RunDir>,
        progress: &Progress,
    ) -> Result<()> {
        progress.log(format!(
            "epoch {}: train loss {:.4} · test loss {:.4} · test accuracy {:.2}% · {} \
             samples/s · CPU {:.0}% of {} thread{}",
            metrics.epoch,
            metrics.train_loss,
            metrics.test_loss,
            metrics.test_accuracy * 100.0,
            thousands(metrics.samples_per_second),
            metrics.cpu_utilization * 100.0,
            threads.threads,
            if threads.threads == 1 { "" } else { "s" },
        ));
        match run_dir {
            Some(run_dir) => run_dir.append_metrics(metrics),
            None => Ok(()),
        }
    }

    /// After the step just done: is a checkpoint due? (`epoch_done`: it ended an epoch.)
    fn checkpoint_due(&self, state: &LoopState, epoch_done: bool, plan: &StepPlan) -> bool {
        let policy = &self.settings.checkpoint;
        let by_steps = policy
            .every_steps
            .is_some_and(|n| state.step.is_multiple_of(n));
        let finished_epoch = state.epoch - 1;
        let by_epochs = epoch_done
            && policy.every_epochs > 0
            && finished_epoch.is_multiple_of(policy.every_epochs);
        let last = state.step == plan.total_steps;
        by_steps || by_epochs || (last && (policy.every_steps.is_some() || policy.every_epochs > 0))
    }

    /// With `resume`: the checkpoint to continue from (checked against these settings), and
    /// lines about newer checkpoints that failed verification. Writes nothing.
    fn resume_point(&self) -> Result<(Option<Checkpoint>, Vec<String>)> {
        match (&self.options.run_dir, self.options.resume) {
            (Some(path), true) => check_resumable(path, &self.settings),
            _ => Ok((None, Vec::new())),
        }
    }

    fn prepare_run_dir(&self, state: &LoopState) -> Result<Option<RunDir>> {
        let Some(path) = &self.options.run_dir else {
            return Ok(None);
        };
        let run_dir = if self.options.resume {
            RunDir::reopen(path, &state.metrics)?
        } else {
            RunDir::create(path)?
        };
        run_dir.write_settings(&self.settings)?;
        Ok(Some(run_dir))
    }
}

impl LoopState {
    /// The state of a run that has not taken a step.
    fn start() -> Self {
        Self {
            epoch: 1,
            groups_done: 0,
            step: 0,
            samples: 0,
            epoch_loss_sum: 0.0,
            epoch_samples: 0,
            train_seconds: 0.0,
            epoch_seconds: 0.0,
            metrics: Vec::new(),
        }
    }

    fn record_step(&mut self, samples: usize, loss: f32, seconds: f64) {
        self.groups_done += 1;
        self.step += 1;
        self.samples += samples as u64;
        self.epoch_samples += samples as u64;
        self.epoch_loss_sum += loss as f64 * samples as f64;
        self.train_seconds += seconds;
        self.epoch_seconds += seconds;
    }

    /// Records the epoch's metrics and moves to the start of the next epoch.
    fn finish_epoch(&mut self, metrics: EpochMetrics) {
        self.metrics.push(metrics);
        self.epoch += 1;
        self.groups_done = 0;
        self.epoch_loss_sum = 0.0;
        self.epoch_samples = 0;
        self.epoch_seconds = 0.0;
    }
}

/// Forward and backward over the micro-batches of one step; returns the summed gradients and
/// the step's loss (mean over its samples).
fn accumulate_gradients<M: Classifier>(
    model: &M,
    data: &Dataset,
    group: &[usize],
    plan: &StepPlan,
    loss_fn: &CrossEntropyLoss,
    device: &Device,
) -> (GradientsParams, f32) {
    let mut grads = GradientsAccumulator::new();
    let mut loss_sum = 0.0f32;
    for micro in group.chunks(plan.batch_size) {
        let (x, y) = data.batch(micro, device);
        let share = micro.len() as f32 / group.len() as f32;
        let loss = loss_fn.forward(model.forward(x), y).mul_scalar(share);
        loss_sum += loss.clone().into_scalar::<f32>();
        grads.accumulate(model, GradientsParams::from_grads(loss.backward(), model));
    }
    (grads.grads(), loss_sum)
}

/// Seeds the device's generator and builds the model, one run at a time: burn's generator is
/// shared by the whole process, so two runs initialising at once would mix their draws. burn
/// initialises parameters lazily, at first use: they are materialised here, under the lock.
fn seeded_init<M, F>(device: &Device, seed: u64, init: F) -> Result<M>
where
    M: Module,
    F: FnOnce(&Device) -> Result<M>,
{
    static INIT: Mutex<()> = Mutex::new(());
    let _one_at_a_time = INIT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    device.seed(seed);
    let model = init(device)?;
    struct Touch;
    impl ModuleVisitor for Touch {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let _ = param.val();
        }
    }
    model.visit(&mut Touch);
    Ok(model)
}

/// Where the loop starts.
struct Restored<M> {
    model: M,
    optimizer: ModuleOptimizer,
    scheduler: ModuleLrScheduler,
    state: LoopState,
    /// The learning rate of the last step taken (0 before the first).
    lr: f64,
}

/// The starting point of the loop: fresh, or what `checkpoint` saved.
fn restore<M: Classifier + ModuleSnapshot>(
    checkpoint: Option<&Checkpoint>,
    model: M,
    optimizer: ModuleOptimizer,
    mut scheduler: ModuleLrScheduler,
) -> Result<Restored<M>> {
    let Some(checkpoint) = checkpoint else {
        return Ok(Restored {
            model,
            optimizer,
            scheduler,
            state: LoopState::start(),
            lr: 0.0,
        });
    };
    let model = weights::load(model, &checkpoint.model_path()).map_err(|e| Error::Checkpoint {
        path: checkpoint.model_path(),
        message: format!("does not fit this run's model: {e}"),
    })?;
    let optimizer_path = checkpoint.folder.join("optimizer.bpk");
    let optimizer = optimizer
        .from_bytes(Bytes::from_bytes_vec(checkpoint.optimizer_bytes()?))
        .map_err(|e| Error::Checkpoint {
            path: optimizer_path,
            message: format!("cannot load the optimizer state: {e}"),
        })?;
    // The schedule is a pure function of the step: replay it.
    let mut lr = 0.0;
    for _ in 0..checkpoint.state.step {
        lr = scheduler.step().base();
    }
    Ok(Restored {
        model,
        optimizer,
        scheduler,
        state: checkpoint.state.clone(),
        lr,
    })
}

fn save_checkpoint<M: Classifier + ModuleSnapshot>(
    run_dir: &RunDir,
    state: &LoopState,
    settings: &Settings,
    model: &M,
    optimizer: &ModuleOptimizer,
) -> Result<()> {
    let weights = weights::to_burnpack(&model.valid())?;
    let optimizer = optimizer.into_bytes().map_err(|e| Error::Checkpoint {
        path: run_dir.path().to_path_buf(),
        message: format!("cannot serialize the optimizer state: {e}"),
    })?;
    checkpoint::write(
        run_dir.path(),
        state,
        &settings.to_toml(),
        &weights,
        &optimizer,
        settings.checkpoint.keep,
    )?;
    Ok(())
}

/// Loads the data the settings name and trains the built-in model: the whole `train` command.
pub fn train(settings: &Settings, options: Options) -> Result<Summary> {
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
