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
use std::time::{Duration, Instant};

use burn::lr_scheduler::module_lr_scheduler::ModuleLrScheduler;
use burn::module::{ModuleVisitor, Param};
use burn::optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use burn::store::ModuleSnapshot;
use burn::tensor::Bytes;
use rayon::prelude::*;

use crate::calibrate::{Calibration, Candidate, calibrate, candidates, micro_batches_to_time};
use crate::checkpoint::{self, Checkpoint, LoopState, RunShape};
use crate::data::{Dataset, Splits, epoch_order};
use crate::error::{Error, Result};
use crate::kernels;
use crate::lock::FolderLock;
use crate::model::{BuiltinModel, Classifier, RunMemory, ensure_memory_for_run};
use crate::optim::{Optimizer, optimizer, schedule, values_per_parameter};
use crate::polling::Poller;
use crate::precision::{self, Compute, GradientReading, LossScaler, ScalerState, Unscaling};
use crate::progress::{Progress, number, thousands};
use crate::resume::{Resumable, check_resumable};
use crate::run_dir::RunDir;
use crate::score::score;
use crate::settings::{Backend, Execution, Settings, Threads, TrainingSettings};
use crate::summary::{EpochMetrics, StepTime, Summary};
use crate::threads::ThreadPlan;
use crate::usage::{CpuMeter, peak_rss_bytes, polling_time, working_cpu_time};
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

/// How the run's samples fall into steps and epochs.
#[derive(Debug, Clone, Copy)]
struct StepPlan {
    batch_size: usize,
    /// Shards per micro-batch.
    shards: usize,
    /// Samples per optimizer step: `batch_size x accumulation_steps`.
    step_size: usize,
    /// Samples in the training set: a step never holds more.
    samples: usize,
    steps_per_epoch: u64,
    total_steps: u64,
    epochs: u64,
}

impl StepPlan {
    /// Refuses a run whose step count does not fit in 64 bits (`epochs` near `u64::MAX`): in a
    /// release build the product wrapped, and the run stopped after a few steps.
    fn new(samples: usize, training: &TrainingSettings) -> Result<Self> {
        let step_size = training.effective_batch_size();
        let steps_per_epoch = samples.div_ceil(step_size) as u64;
        let all = steps_per_epoch
            .checked_mul(training.epochs)
            .ok_or_else(|| {
                Error::setting(
                    "training.epochs",
                    format!(
                        "{} epochs of {steps_per_epoch} steps are more steps than a run can count",
                        training.epochs
                    ),
                )
            })?;
        let total_steps = training.max_steps.map_or(all, |max| max.min(all));
        Ok(Self {
            batch_size: training.batch_size,
            shards: training.shards,
            step_size,
            samples,
            steps_per_epoch,
            total_steps,
            epochs: total_steps.div_ceil(steps_per_epoch),
        })
    }

    /// The pieces of a step, in the order their gradients are summed: its micro-batches of
    /// `batch_size`, each split into `shards` contiguous shards whose sizes differ by at most one
    /// (a micro-batch shorter than `shards` has fewer, none empty).
    fn pieces<'a>(&self, group: &'a [usize]) -> Vec<&'a [usize]> {
        // No piece is empty: there are at most as many as samples, whatever `shards` says.
        let mut pieces = Vec::with_capacity(group.len());
        for micro in group.chunks(self.batch_size) {
            let (size, longer) = (micro.len() / self.shards, micro.len() % self.shards);
            let mut start = 0;
            for shard in 0..self.shards.min(micro.len()) {
                let end = start + size + usize::from(shard < longer);
                pieces.push(&micro[start..end]);
                start = end;
            }
        }
        pieces
    }

    /// Micro-batches in a full step: fewer than `accumulation_steps` where the training set is
    /// smaller than a step.
    fn micro_batches_per_step(&self) -> usize {
        self.step_size.min(self.samples).div_ceil(self.batch_size)
    }

    /// Pieces in a full step.
    fn pieces_per_step(&self) -> usize {
        self.micro_batches_per_step() * self.shards
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
        let (plan, calibration) = match self.settings.training.threads {
            Threads::Count(_) => (ThreadPlan::new(self.settings.training.threads), None),
            Threads::Auto => {
                let calibration = self.calibrate(&init)?;
                (
                    ThreadPlan::chosen(calibration.chosen.threads),
                    Some(calibration),
                )
            }
        };
        let pool = plan.install()?;
        pool.install(|| self.run(plan, calibration, init))
    }

    /// Times a few steps of a throwaway copy of the model under each way of spending the
    /// machine (`training.execution` restricts the ways), and picks the fastest.
    fn calibrate<M, F>(&self, init: &F) -> Result<Calibration>
    where
        M: Classifier,
        F: Fn(&Device) -> Result<M> + Sync,
    {
        const BUDGET: Duration = Duration::from_secs(2);
        let training = &self.settings.training;
        let available = ThreadPlan::new(Threads::Auto);
        available.fix_matmul_threads();
        let device = device(training.backend);
        let model = seeded_init(&device, training.seed, init)?;
        let train = &self.data.train;
        let plan = StepPlan::new(train.len(), training)?;
        let order = epoch_order(train.len(), training.seed, 1);
        let micro_batches = plan.micro_batches_per_step();
        let timed = micro_batches_to_time(micro_batches, plan.shards, available.threads);
        let group = &order[..(timed * plan.batch_size).min(train.len())];
        let wanted = |c: &Candidate| match training.execution {
            Execution::Auto => true,
            Execution::Concurrent => c.concurrent || c.threads == 1,
            Execution::Sequential => !c.concurrent,
        };
        let candidates: Vec<Candidate> = candidates(available.threads, plan.pieces_per_step())
            .into_iter()
            .filter(wanted)
            .collect();
        let calibration = calibrate(&candidates, BUDGET, |candidate| {
            let pass = Pass {
                data: train,
                plan: &plan,
                device: &device,
                compute: Compute::new(training.precision, training.backend),
                loss_scale: None,
                concurrent: candidate.concurrent,
                poller: Poller::new(training.idle_threads, candidate.threads, available.threads),
            };
            drop(pass.accumulate_gradients(&model, group));
        })?;
        Ok(Calibration {
            part_of_step: (timed < micro_batches).then_some((timed, micro_batches)),
            ..calibration
        })
    }

    /// The run: its start (fresh or resumed) and first log lines, then the loop, one optimizer
    /// step at a time, scoring at each epoch's end and checkpointing as the policy says, then
    /// the final weights and the summary.
    fn run<M, F>(
        &self,
        threads: ThreadPlan,
        calibration: Option<Calibration>,
        init: F,
    ) -> Result<Outcome<M>>
    where
        M: Classifier + ModuleSnapshot,
        F: Fn(&Device) -> Result<M>,
    {
        let mut timing = RunTiming::start();
        let training = &self.settings.training;
        let train = &self.data.train;
        let setup = self.setup(threads, calibration.as_ref())?;
        let plan = setup.plan;
        let device = device(training.backend);
        let model = seeded_init(&device, training.seed, &init)?;
        let mut start = self.start(model, &plan)?;
        // Every check of the input is behind us: only now is the run folder written.
        let run_dir = self.prepare_run_dir(&mut start)?;
        let progress = Progress::new(plan.total_steps, self.options.quiet);
        self.announce(&progress, &setup, &start, calibration.as_ref());
        let Start {
            mut model,
            mut updater,
            mut state,
            ..
        } = start;

        let mut order = EpochOrder::new(train.len(), training.seed, state.epoch);
        let mut epoch_cpu = CpuMeter::start();
        while state.step < plan.total_steps {
            if order.follow(state.epoch) {
                epoch_cpu = CpuMeter::start();
            }
            progress.set_epoch(state.epoch, plan.epochs);
            let group = order.group(state.groups_done, plan.step_size);

            // One optimizer step: the summed gradients of the group's pieces, then the update.
            let clock = StepClock::start(self.options.record_steps);
            let pass = setup.pass(train, &device, &updater);
            let gradients = pass.accumulate_gradients(&model, group);
            let loss = gradients.loss;
            if !loss.is_finite() {
                return Err(Error::Diverged {
                    step: state.step + 1,
                    what: format!("the loss is {loss}"),
                });
            }
            model = updater.apply(model, gradients, &mut state.scaler);
            let seconds = clock.stop(group.len(), &mut timing.steps);

            state.record_step(group.len(), loss, seconds);
            progress.step(
                loss,
                state.samples,
                state.samples as f64 / state.train_seconds,
            );
            let epoch_done = state.groups_done == plan.steps_per_epoch;
            if epoch_done {
                let metrics =
                    self.score_epoch(&model, &device, &state, updater.lr, epoch_cpu, threads);
                self.report_epoch(&metrics, threads, run_dir.as_ref(), &progress)?;
                state.finish_epoch(metrics);
            }
            let stopping = self.stop_requested();
            if let Some(run_dir) = &run_dir
                && (stopping || self.checkpoint_due(&state, epoch_done, &plan))
            {
                // Never replace the last good checkpoint with broken weights.
                ensure_finite(&model, state.step)?;
                let writing = Instant::now();
                save_checkpoint(
                    run_dir,
                    &state,
                    &self.settings,
                    &model,
                    &updater.optimizer.module,
                )?;
                timing.checkpoint_seconds += writing.elapsed().as_secs_f64();
            }
            if stopping {
                progress.finish();
                return Err(Error::Interrupted {
                    step: state.step,
                    run_dir: run_dir.map(|d| d.path().to_path_buf()),
                });
            }
        }
        // A run that ends inside an epoch scores that partial epoch too; its state stays inside
        // the epoch, so that a resume with more steps carries on exactly there.
        let partial_epoch = if state.groups_done > 0 {
            let metrics = self.score_epoch(&model, &device, &state, updater.lr, epoch_cpu, threads);
            self.report_epoch(&metrics, threads, run_dir.as_ref(), &progress)?;
            Some(metrics)
        } else {
            None
        };
        progress.finish();

        let last = partial_epoch
            .or_else(|| state.metrics.last().cloned())
            .expect("a finished run has scored at least one epoch");
        ensure_finite(&model, state.step)?;
        if let Some(run_dir) = &run_dir {
            weights::save(&model.valid(), &run_dir.weights_path())?;
        }
        let summary = Summary {
            run_dir: run_dir.as_ref().map(|d| d.path().display().to_string()),
            ..self.summary(&setup, &state, last, &model, &updater, timing)
        };
        if let Some(run_dir) = &run_dir {
            run_dir.write_summary(&summary)?;
        }
        Ok(Outcome { model, summary })
    }

    /// How this run spends the machine: its step plan, threads and precision, and whether a
    /// step's pieces run at once (as the calibration chose, or as `training.execution` says).
    fn setup(&self, threads: ThreadPlan, calibration: Option<&Calibration>) -> Result<Setup> {
        let training = &self.settings.training;
        let plan = StepPlan::new(self.data.train.len(), training)?;
        let concurrent = match (calibration, training.execution) {
            (Some(calibration), _) => calibration.chosen.concurrent,
            (None, Execution::Concurrent) => true,
            (None, Execution::Sequential) => false,
            (None, Execution::Auto) => threads.threads > 1 && plan.pieces_per_step() > 1,
        };
        Ok(Setup {
            plan,
            threads,
            compute: Compute::new(training.precision, training.backend),
            concurrent,
            poller: Poller::new(training.idle_threads, threads.threads, threads.available),
        })
    }

    /// Where the loop starts: fresh, or from the newest valid checkpoint with `resume`.
    fn start<M: Classifier + ModuleSnapshot>(&self, model: M, plan: &StepPlan) -> Result<Start<M>> {
        let optimizer = optimizer(&self.settings.optimizer);
        let scheduler = schedule(&self.settings.optimizer, plan.total_steps)?;
        let scaling = &self.settings.precision;
        let scales = scaling.scales(self.settings.training.precision);
        let (lock, resumed, notes) = match self.resume_point(plan.total_steps)? {
            Some(r) => (Some(r.lock), r.checkpoint, r.notes),
            None => (None, None, Vec::new()),
        };
        if let Some(checkpoint) = &resumed {
            let shape = RunShape {
                samples: plan.samples as u64,
                step_size: plan.step_size as u64,
                steps_per_epoch: plan.steps_per_epoch,
                total_steps: plan.total_steps,
                scales,
            };
            checkpoint::check_position(&checkpoint.state, &checkpoint.folder, &shape)?;
        }
        let Restored {
            model,
            optimizer: module,
            scheduler,
            state,
            lr,
        } = restore(
            resumed.as_ref(),
            model,
            optimizer.module,
            scheduler,
            || match scales {
                true => LossScaler::new(scaling).state,
                false => ScalerState::default(),
            },
        )?;
        let updater = Updater {
            optimizer: Optimizer {
                module,
                reading: optimizer.reading,
            },
            scheduler,
            scaler: scales.then(|| LossScaler::resume(scaling, state.scaler)),
            lr,
        };
        Ok(Start {
            model,
            updater,
            state,
            resumed,
            notes,
            lock,
        })
    }

    /// The run's first log lines: what trains where and how, in what precision, what the
    /// calibration measured and chose, the checkpoints that failed verification and the one it
    /// resumes from, and a warning when one step takes more samples than there are.
    fn announce<M: Classifier>(
        &self,
        progress: &Progress,
        setup: &Setup,
        start: &Start<M>,
        calibration: Option<&Calibration>,
    ) {
        let training = &self.settings.training;
        progress.log(format!(
            "allcores: training {} ({} parameters) on {} with {}{}{}",
            start.model.name(),
            thousands(start.model.num_params() as f64),
            training.backend,
            setup.threads.describe(training.backend),
            match (setup.threads.threads, setup.poller.polls()) {
                (1, _) => "",
                (_, true) => ", idle threads polling",
                (_, false) => ", idle threads sleeping",
            },
            match (setup.plan.pieces_per_step(), setup.concurrent) {
                (1, _) => String::new(),
                (n, true) => format!("; the {n} pieces of a step run concurrently"),
                (n, false) => format!("; the {n} pieces of a step run one after the other"),
            }
        ));
        if training.precision != crate::settings::Precision::F32 {
            progress.log(format!(
                "precision: {} ({}), f32 master weights{}",
                training.precision,
                setup.compute.mode(),
                start
                    .updater
                    .scaler
                    .as_ref()
                    .map_or(String::new(), |s| format!(
                        ", loss scale {}",
                        number(s.scale())
                    ))
            ));
        }
        if let Some(calibration) = calibration {
            progress.log(calibration.describe());
        }
        for note in &start.notes {
            progress.log(note);
        }
        if let Some(checkpoint) = &start.resumed {
            progress.log(format!(
                "resuming from {} (step {}, epoch {})",
                checkpoint.folder.display(),
                start.state.step,
                start.state.epoch
            ));
            progress.advance(start.state.step);
        }
        if setup.plan.step_size > self.data.train.len() {
            progress.log(format!(
                "warning: the effective batch ({} = training.batch_size x \
                 training.accumulation_steps) is larger than the {} training samples",
                thousands(setup.plan.step_size as f64),
                thousands(self.data.train.len() as f64)
            ));
        }
    }

    /// Whether another thread (a signal handler) asked the run to stop.
    fn stop_requested(&self) -> bool {
        self.options
            .stop
            .as_ref()
            .is_some_and(|stop| stop.load(Ordering::SeqCst))
    }

    /// The summary of a finished run (but for its folder), `last` the metrics of its last (maybe
    /// partial) epoch.
    fn summary<M: Classifier>(
        &self,
        setup: &Setup,
        state: &LoopState,
        last: EpochMetrics,
        model: &M,
        updater: &Updater,
        timing: RunTiming,
    ) -> Summary {
        let training = &self.settings.training;
        let (plan, threads) = (setup.plan, setup.threads);
        Summary {
            test_accuracy: last.test_accuracy,
            test_loss: last.test_loss,
            train_loss: last.train_loss,
            epochs: last.epoch,
            steps: state.step,
            samples: state.samples,
            wall_seconds: timing.started.elapsed().as_secs_f64(),
            train_seconds: state.train_seconds,
            checkpoint_seconds: timing.checkpoint_seconds,
            samples_per_second: state.samples as f64 / state.train_seconds,
            threads: threads.threads,
            threads_available: threads.available,
            execution: match setup.concurrent {
                true => "concurrent".into(),
                false => "sequential".into(),
            },
            shards: training.shards,
            idle_threads: setup.poller.idle_threads().to_string(),
            cpu_utilization: timing.cpu.utilization(threads.threads),
            backend: training.backend.to_string(),
            model: model.name(),
            parameters: model.num_params(),
            batch_size: plan.batch_size,
            accumulation_steps: training.accumulation_steps,
            effective_batch_size: plan.step_size,
            seed: training.seed,
            precision: training.precision.to_string(),
            precision_mode: setup.compute.mode(),
            skipped_steps: state.scaler.skipped_steps,
            loss_scale: updater.scaler.as_ref().map(|s| s.state.scale),
            peak_rss_bytes: peak_rss_bytes(),
            weights_sha256: weights_sha256(model),
            run_dir: None,
            step_times: timing.steps,
        }
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

    /// With `resume`: the run folder's lock and the checkpoint to continue from (checked
    /// against these settings and a run of `total_steps`), with lines about newer checkpoints
    /// that failed verification. Writes nothing.
    fn resume_point(&self, total_steps: u64) -> Result<Option<Resumable>> {
        match (&self.options.run_dir, self.options.resume) {
            (Some(path), true) => check_resumable(path, &self.settings, total_steps).map(Some),
            _ => Ok(None),
        }
    }

    /// The run folder, written from here on: created (and locked) for a new run; for a resume,
    /// reopened under the lock its checks were made under.
    fn prepare_run_dir<M>(&self, start: &mut Start<M>) -> Result<Option<RunDir>> {
        let Some(path) = &self.options.run_dir else {
            return Ok(None);
        };
        let run_dir = match start.lock.take() {
            Some(lock) => RunDir::reopen(path, lock, &start.state.metrics)?,
            None => RunDir::create(path, self.options.numbered_run_dir)?,
        };
        run_dir.write_settings(&self.settings)?;
        Ok(Some(run_dir))
    }
}

impl LoopState {
    /// The state of a run that has not taken a step.
    fn start(scaler: ScalerState) -> Self {
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
            scaler,
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

/// The summed gradients of a step, ready for the optimizer.
struct StepGradients {
    grads: GradientsParams,
    /// Whether they are all finite (checked only with loss scaling: `true` without).
    finite: bool,
    /// The step's loss (mean over its samples).
    loss: f32,
    /// What the optimizer is still to do to them as it reads them.
    reading: GradientReading,
}

/// What the forward and backward passes of a step need.
struct Pass<'a> {
    data: &'a Dataset,
    plan: &'a StepPlan,
    device: &'a Device,
    compute: Compute,
    /// With loss scaling, the scale the loss is multiplied by before backward.
    loss_scale: Option<f32>,
    /// Run the step's pieces at once, one per thread, rather than one after the other.
    concurrent: bool,
    /// Keeps the pool's other threads polling for work through the step.
    poller: Poller,
}

impl Pass<'_> {
    /// Forward and backward over the pieces of one step (micro-batches x shards), on the step's
    /// working copy of `model` (half precision or the f32 master itself): the summed gradients,
    /// checked for overflow under a loss scale, and left to the optimizer to unscale (and,
    /// emulated, round) as it reads them: every optimizer is a fused update
    /// ([`Unscaling::ByOptimizer`]).
    ///
    /// Concurrent or not, every piece computes the same gradients and they are summed in the
    /// pieces' order: the result does not depend on how the threads were spent.
    fn accumulate_gradients<M: Classifier>(&self, model: &M, group: &[usize]) -> StepGradients {
        self.poller.arm();
        let working = self.compute.working_copy(model);
        let pieces = self.plan.pieces(group);
        if let [piece] = &pieces[..] {
            // One piece: its gradients are the step's, made ready for the optimizer in one pass.
            let (grads, loss) = self.piece_gradients(&working, piece, group.len());
            let (grads, finite, reading) = self.compute.gradients_for_optimizer(
                grads,
                model,
                self.loss_scale,
                Unscaling::ByOptimizer,
            );
            return StepGradients {
                grads,
                finite,
                loss,
                reading,
            };
        }
        let mut grads = GradientsAccumulator::new();
        let mut loss_sum = 0.0f32;
        let mut add = |(piece_grads, loss): (GradientsParams, f32)| {
            // Each piece's gradients rounded as its own would be, and in f32 to be summed.
            let (piece_grads, _, _) =
                self.compute
                    .gradients_for_optimizer(piece_grads, model, None, Unscaling::Before);
            grads.accumulate(model, piece_grads);
            loss_sum += loss;
        };
        if self.concurrent && pieces.len() > 1 {
            // Each piece on a fork: its own autodiff graph (clones would share one graph and its
            // lock, and deadlock inside the pool).
            let results: Vec<_> = pieces
                .par_iter()
                .map(|piece| {
                    let fork = working.clone().fork(self.device);
                    self.piece_gradients(&fork, piece, group.len())
                })
                .collect();
            results.into_iter().for_each(&mut add);
        } else {
            for piece in pieces {
                add(self.piece_gradients(&working, piece, group.len()));
            }
        }
        // Scaling and the overflow check apply to the step's summed gradients.
        let mut grads = grads.grads();
        let (finite, reading) = precision::unscale(
            &mut grads,
            model,
            self.loss_scale,
            Unscaling::ByOptimizer,
            None,
        );
        StepGradients {
            grads,
            finite,
            loss: loss_sum,
            reading,
        }
    }

    /// The gradients (in the working copy's precision, keyed by the master's parameter ids) and
    /// the loss of one piece: its samples' losses summed over the step's `step_samples`.
    fn piece_gradients<M: Classifier>(
        &self,
        working: &M,
        piece: &[usize],
        step_samples: usize,
    ) -> (GradientsParams, f32) {
        let (x, y) = self.data.batch(piece, self.device);
        let logits = self.compute.forward(working, x);
        // The piece's part of the step's mean loss: its samples' losses over the step's count.
        let loss = kernels::cross_entropy(logits, y, step_samples as f32);
        let value = loss.clone().into_scalar::<f32>();
        let loss = match self.loss_scale {
            Some(scale) => loss.mul_scalar(scale),
            None => loss,
        };
        (GradientsParams::from_grads(loss.backward(), working), value)
    }
}

/// Stops the run, naming the step, when a weight is inf or NaN.
fn ensure_finite<M: Module>(model: &M, step: u64) -> Result<()> {
    match precision::weights_finite(model) {
        true => Ok(()),
        false => Err(Error::Diverged {
            step,
            what: "a weight is inf or NaN; no checkpoint was written from it".into(),
        }),
    }
}

/// Seeds the device's generator and builds the model, one run at a time: burn's generator is
/// shared by the whole process, so two runs initialising at once would mix their draws. burn
/// initialises parameters lazily, at first use: they are materialised here, under the lock.
fn seeded_init<M, F>(device: &Device, seed: u64, init: &F) -> Result<M>
where
    M: Module,
    F: Fn(&Device) -> Result<M>,
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

/// How a run spends the machine, fixed from its first step to its last.
#[derive(Debug, Clone, Copy)]
struct Setup {
    plan: StepPlan,
    threads: ThreadPlan,
    compute: Compute,
    /// Run a step's pieces at once, one per thread, rather than one after the other.
    concurrent: bool,
    poller: Poller,
}

impl Setup {
    /// The forward and backward passes of the next step, with the updater's loss scale.
    fn pass<'a>(&'a self, data: &'a Dataset, device: &'a Device, updater: &Updater) -> Pass<'a> {
        Pass {
            data,
            plan: &self.plan,
            device,
            compute: self.compute,
            loss_scale: updater.loss_scale(),
            concurrent: self.concurrent,
            poller: self.poller,
        }
    }
}

/// Where the loop starts, fresh or resumed.
struct Start<M> {
    model: M,
    updater: Updater,
    state: LoopState,
    /// The checkpoint the run resumes from.
    resumed: Option<Checkpoint>,
    /// Lines about newer checkpoints that failed verification.
    notes: Vec<String>,
    /// A resumed run's folder lock, taken before its checks.
    lock: Option<FolderLock>,
}

/// What turns a step's gradients into new weights: the optimizer, its learning-rate schedule
/// and, with loss scaling, the scaler that decides whether a step is applied.
struct Updater {
    optimizer: Optimizer,
    scheduler: ModuleLrScheduler,
    scaler: Option<LossScaler>,
    /// The learning rate of the last step taken (0 before the first).
    lr: f64,
}

impl Updater {
    /// The scale the next step's loss is multiplied by before backward, with loss scaling.
    fn loss_scale(&self) -> Option<f32> {
        self.scaler.as_ref().map(LossScaler::scale)
    }

    /// Applies a step's summed gradients to `model`, unless loss scaling found one that is inf
    /// or NaN: the step is then skipped (and counted in `scaler_state`) and the scale shrinks.
    /// The schedule advances on skipped steps too: it is a function of the step.
    fn apply<M: Classifier>(
        &mut self,
        model: M,
        gradients: StepGradients,
        scaler_state: &mut ScalerState,
    ) -> M {
        let apply = match &mut self.scaler {
            Some(scaler) => {
                let apply = scaler.update(gradients.finite);
                *scaler_state = scaler.state;
                apply
            }
            None => true,
        };
        let rate = self.scheduler.step();
        self.lr = rate.base();
        if !apply {
            return model;
        }
        self.optimizer.reading.set(gradients.reading);
        self.optimizer.module.step(rate, model, gradients.grads)
    }
}

/// The seeded sample order of the epoch the loop is in, drawn again when the epoch changes.
struct EpochOrder {
    seed: u64,
    epoch: u64,
    order: Vec<usize>,
}

impl EpochOrder {
    fn new(samples: usize, seed: u64, epoch: u64) -> Self {
        Self {
            seed,
            epoch,
            order: epoch_order(samples, seed, epoch),
        }
    }

    /// Moves to `epoch`, drawing its order: whether it is a new one.
    fn follow(&mut self, epoch: u64) -> bool {
        let new = epoch != self.epoch;
        if new {
            *self = Self::new(self.order.len(), self.seed, epoch);
        }
        new
    }

    /// The samples of the epoch's next step, after `groups_done` steps of `step_size`.
    fn group(&self, groups_done: u64, step_size: usize) -> &[usize] {
        let start = groups_done as usize * step_size;
        &self.order[start..(start + step_size).min(self.order.len())]
    }
}

/// The clocks of a whole run.
struct RunTiming {
    started: Instant,
    cpu: CpuMeter,
    checkpoint_seconds: f64,
    /// Each step's times, when `Options::record_steps` asks for them.
    steps: Vec<StepTime>,
}

impl RunTiming {
    fn start() -> Self {
        Self {
            started: Instant::now(),
            cpu: CpuMeter::start(),
            checkpoint_seconds: 0.0,
            steps: Vec::new(),
        }
    }
}

/// Times one optimizer step: its wall seconds, and its CPU seconds when steps are recorded.
struct StepClock {
    started: Instant,
    /// The working and polling CPU time before the step, when recording.
    cpu: Option<(Duration, Duration)>,
}

impl StepClock {
    fn start(record: bool) -> Self {
        Self {
            started: Instant::now(),
            cpu: record.then(|| (working_cpu_time(), polling_time())),
        }
    }

    /// The step's wall seconds; when recording, its times are pushed onto `steps`.
    fn stop(self, samples: usize, steps: &mut Vec<StepTime>) -> f64 {
        let seconds = self.started.elapsed().as_secs_f64();
        if let Some((cpu_before, polling_before)) = self.cpu {
            steps.push(StepTime {
                samples,
                wall_seconds: seconds,
                cpu_seconds: working_cpu_time().saturating_sub(cpu_before).as_secs_f64(),
                polling_seconds: (polling_time() - polling_before).as_secs_f64(),
            });
        }
        seconds
    }
}

/// The model, optimizer state, schedule and loop state a run starts from.
struct Restored<M> {
    model: M,
    optimizer: ModuleOptimizer,
    scheduler: ModuleLrScheduler,
    state: LoopState,
    /// The learning rate of the last step taken (0 before the first).
    lr: f64,
}

/// The starting point of the loop: fresh, or what `checkpoint` saved.
/// `fresh_scaler` is the loss scaler of a run that starts afresh.
fn restore<M: Classifier + ModuleSnapshot>(
    checkpoint: Option<&Checkpoint>,
    model: M,
    optimizer: ModuleOptimizer,
    mut scheduler: ModuleLrScheduler,
    fresh_scaler: impl FnOnce() -> ScalerState,
) -> Result<Restored<M>> {
    let Some(checkpoint) = checkpoint else {
        return Ok(Restored {
            model,
            optimizer,
            scheduler,
            state: LoopState::start(fresh_scaler()),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(batch_size: usize, accumulation_steps: usize, shards: usize) -> StepPlan {
        StepPlan::new(
            1000,
            &TrainingSettings {
                batch_size,
                accumulation_steps,
                shards,
                ..TrainingSettings::default()
            },
        )
        .unwrap()
    }

    #[test]
    fn pieces_split_micro_batches_into_near_equal_shards_in_order() {
        let group: Vec<usize> = (0..23).collect();
        // Micro-batches of 10, 10 and 3; 3 shards each: 4+3+3, 4+3+3, then 1+1+1.
        let pieces = plan(10, 3, 3).pieces(&group);
        let sizes: Vec<usize> = pieces.iter().map(|p| p.len()).collect();
        assert_eq!(sizes, [4, 3, 3, 4, 3, 3, 1, 1, 1]);
        assert_eq!(pieces.concat(), group, "every sample once, in order");
        // A micro-batch shorter than the shard count gives no empty piece.
        let sizes: Vec<usize> = plan(4, 1, 4)
            .pieces(&group[..2])
            .iter()
            .map(|p| p.len())
            .collect();
        assert_eq!(sizes, [1, 1]);
        assert_eq!(plan(10, 3, 3).pieces_per_step(), 9);
        // A step larger than the 1,000 samples holds them all: 7 micro-batches of 150, not 10.
        assert_eq!(plan(150, 10, 2).micro_batches_per_step(), 7);
        assert_eq!(plan(150, 10, 2).pieces_per_step(), 14);
    }
}
