//! The loop of a run, one optimizer step at a time: its start (fresh or resumed), the step
//! ([`super::step`]), scoring, checkpoints, and the summary at the end. It serves any [`Task`].

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use burn::lr_scheduler::module_lr_scheduler::ModuleLrScheduler;
use burn::module::{ModuleVisitor, Param};
use burn::optim::ModuleOptimizer;
use burn::prelude::*;
use burn::store::ModuleSnapshot;
use burn::tensor::Bytes;
use std::sync::Mutex;

use super::Options;
use super::Outcome;
use super::device;
use super::plan::{EpochOrder, StepPlan};
use super::step::{Pass, Updater};
use super::task::Task;
use crate::calibrate::{Calibration, Candidate, calibrate, candidates, micro_batches_to_time};
use crate::checkpoint::{self, Checkpoint, LoopState, RunShape};
use crate::data::epoch_order;
use crate::error::{Error, Result};
use crate::lock::FolderLock;
use crate::optim::{Optimizer, optimizer, schedule};
use crate::polling::Poller;
use crate::precision::{self, Compute, LossScaler, ScalerState};
use crate::progress::{Progress, number, thousands};
use crate::resume::{Resumable, check_resumable};
use crate::run_dir::RunDir;
use crate::settings::{Execution, Settings, Threads};
use crate::summary::{EpochMetrics, StepTime, Summary};
use crate::threads::ThreadPlan;
use crate::usage::{CpuMeter, peak_rss_bytes, polling_time, working_cpu_time};
use crate::weights::{self, weights_sha256};

/// One run of a task with one set of settings.
pub(super) struct Run<'a, T> {
    pub settings: &'a Settings,
    pub options: &'a Options,
    pub task: &'a T,
}

impl<T: Task> Run<'_, T> {
    /// Times a few steps of a throwaway copy of the model under each way of spending the
    /// machine (`training.execution` restricts the ways), and picks the fastest.
    pub fn calibrate<F>(&self, init: &F) -> Result<Calibration>
    where
        F: Fn(&Device) -> Result<T::Model> + Sync,
    {
        const BUDGET: Duration = Duration::from_secs(2);
        let training = &self.settings.training;
        let available = ThreadPlan::new(Threads::Auto);
        let device = device(training.backend);
        let model = seeded_init(&device, training.seed, init)?;
        let samples = self.task.samples();
        let plan = StepPlan::new(samples, training)?;
        let order = epoch_order(samples, training.seed, 1);
        let micro_batches = plan.micro_batches_per_step();
        let timed = micro_batches_to_time(micro_batches, plan.shards, available.threads);
        let group = &order[..(timed * plan.batch_size).min(samples)];
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
                task: self.task,
                plan: &plan,
                device: &device,
                compute: Compute::new(training.precision, training.backend),
                loss_scale: None,
                concurrent: candidate.concurrent,
                poller: Poller::new(training.idle_threads, candidate.threads, available.threads),
                step: 0,
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
    pub fn run<F>(
        &self,
        threads: ThreadPlan,
        calibration: Option<Calibration>,
        init: F,
    ) -> Result<Outcome<T::Model>>
    where
        F: Fn(&Device) -> Result<T::Model>,
    {
        let mut timing = RunTiming::start();
        let training = &self.settings.training;
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

        let mut order = EpochOrder::new(self.task.samples(), training.seed, state.epoch);
        let mut epoch_cpu = CpuMeter::start();
        while state.step < plan.total_steps {
            if order.follow(state.epoch) {
                epoch_cpu = CpuMeter::start();
            }
            progress.set_epoch(state.epoch, plan.epochs);
            let group = order.group(state.groups_done, plan.step_size);

            // One optimizer step: the summed gradients of the group's pieces, then the update.
            let clock = StepClock::start(self.options.record_steps);
            let pass = setup.pass(self.task, &device, &updater, state.step);
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
            } else if self.evaluation_due(&state, &plan) {
                let metrics = EpochMetrics {
                    mid_epoch: true,
                    ..self.score_epoch(&model, &device, &state, updater.lr, epoch_cpu, threads)
                };
                self.report_epoch(&metrics, threads, run_dir.as_ref(), &progress)?;
                state.record_evaluation(metrics);
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
                    self.settings,
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
        let plan = StepPlan::new(self.task.samples(), training)?;
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
    fn start(&self, model: T::Model, plan: &StepPlan) -> Result<Start<T::Model>> {
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
            clip: self.settings.optimizer.grad_clip,
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
    fn announce(
        &self,
        progress: &Progress,
        setup: &Setup,
        start: &Start<T::Model>,
        calibration: Option<&Calibration>,
    ) {
        let training = &self.settings.training;
        progress.log(format!(
            "allcores: training {} ({} parameters) on {} with {}{}{}",
            self.task.model_name(&start.model),
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
        for note in start.notes.iter().chain(self.task.warnings()) {
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
        if setup.plan.step_size > self.task.samples() {
            progress.log(format!(
                "warning: the effective batch ({} = training.batch_size x \
                 training.accumulation_steps) is larger than the {} training samples",
                thousands(setup.plan.step_size as f64),
                thousands(self.task.samples() as f64)
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
    fn summary(
        &self,
        setup: &Setup,
        state: &LoopState,
        last: EpochMetrics,
        model: &T::Model,
        updater: &Updater,
        timing: RunTiming,
    ) -> Summary {
        let training = &self.settings.training;
        let (plan, threads) = (setup.plan, setup.threads);
        let units = self.task.units_per_sample();
        let text = self.task.is_language_model();
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
            val_loss: text.then_some(last.test_loss),
            bits_per_char: text.then(|| crate::language::bits_per_char(last.test_loss)),
            tokens_per_second: text
                .then(|| (state.samples * units as u64) as f64 / state.train_seconds),
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
            model: self.task.model_name(model),
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
    fn score_epoch(
        &self,
        model: &T::Model,
        device: &Device,
        state: &LoopState,
        lr: f64,
        cpu: CpuMeter,
        threads: ThreadPlan,
    ) -> EpochMetrics {
        let cpu_utilization = cpu.utilization(threads.threads);
        let test = self
            .task
            .evaluate(model, device, self.settings.training.batch_size);
        EpochMetrics {
            epoch: state.epoch,
            steps: state.step,
            samples: state.samples,
            train_loss: state.train_loss_since_evaluation(),
            test_loss: test.loss,
            test_accuracy: test.accuracy,
            lr,
            samples_per_second: state.epoch_samples as f64 / state.epoch_seconds,
            cpu_utilization,
            mid_epoch: false,
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
        progress.log(self.describe(metrics, threads));
        match run_dir {
            Some(run_dir) => run_dir.append_metrics(metrics),
            None => Ok(()),
        }
    }

    /// The log line of an evaluation: the epoch's for a classifier, the step's for a language
    /// model (which counts its throughput in tokens and its loss in bits per character too).
    fn describe(&self, metrics: &EpochMetrics, threads: ThreadPlan) -> String {
        let held_out = self.task.held_out();
        let units = self.task.units_per_sample();
        let cpu = format!(
            "CPU {:.0}% of {} thread{}",
            metrics.cpu_utilization * 100.0,
            threads.threads,
            if threads.threads == 1 { "" } else { "s" },
        );
        if self.task.is_language_model() {
            return format!(
                "step {}: train loss {:.4} · {held_out} loss {:.4} ({:.3} bits/char) · {} \
                 tokens/s · {cpu}",
                metrics.steps,
                metrics.train_loss,
                metrics.test_loss,
                crate::language::bits_per_char(metrics.test_loss),
                thousands(metrics.samples_per_second * units as f64),
            );
        }
        format!(
            "epoch {}: train loss {:.4} · {held_out} loss {:.4} · {held_out} accuracy {:.2}% · \
             {} samples/s · {cpu}",
            metrics.epoch,
            metrics.train_loss,
            metrics.test_loss,
            metrics.test_accuracy * 100.0,
            thousands(metrics.samples_per_second),
        )
    }

    /// After the step just done (which did not end an epoch): is a `training.eval_every`
    /// evaluation due? Not at the run's last step, which is scored anyway.
    fn evaluation_due(&self, state: &LoopState, plan: &StepPlan) -> bool {
        self.settings
            .training
            .eval_every
            .is_some_and(|n| state.step.is_multiple_of(n))
            && state.step < plan.total_steps
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
            (Some(path), true) => check_resumable(path, self.settings, total_steps).map(Some),
            _ => Ok(None),
        }
    }

    /// The run folder, written from here on: created (and locked) for a new run; for a resume,
    /// reopened under the lock its checks were made under.
    fn prepare_run_dir(&self, start: &mut Start<T::Model>) -> Result<Option<RunDir>> {
        let Some(path) = &self.options.run_dir else {
            return Ok(None);
        };
        let run_dir = match start.lock.take() {
            Some(lock) => RunDir::reopen(path, lock, &start.state.metrics)?,
            None => RunDir::create(path, self.options.numbered_run_dir)?,
        };
        run_dir.write_settings(self.settings)?;
        self.task.write_run_files(run_dir.path())?;
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
            since_evaluation: (0.0, 0),
        }
    }

    fn record_step(&mut self, samples: usize, loss: f32, seconds: f64) {
        self.groups_done += 1;
        self.step += 1;
        self.samples += samples as u64;
        self.epoch_samples += samples as u64;
        self.epoch_loss_sum += loss as f64 * samples as f64;
        self.since_evaluation.0 += loss as f64 * samples as f64;
        self.since_evaluation.1 += samples as u64;
        self.train_seconds += seconds;
        self.epoch_seconds += seconds;
    }

    /// The mean training loss over the samples since the last evaluation (or the run's start).
    fn train_loss_since_evaluation(&self) -> f64 {
        self.since_evaluation.0 / self.since_evaluation.1.max(1) as f64
    }

    /// Records an evaluation inside an epoch (`training.eval_every`).
    fn record_evaluation(&mut self, metrics: EpochMetrics) {
        self.metrics.push(metrics);
        self.since_evaluation = (0.0, 0);
    }

    /// Records the epoch's metrics and moves to the start of the next epoch.
    fn finish_epoch(&mut self, metrics: EpochMetrics) {
        self.metrics.push(metrics);
        self.since_evaluation = (0.0, 0);
        self.epoch += 1;
        self.groups_done = 0;
        self.epoch_loss_sum = 0.0;
        self.epoch_samples = 0;
        self.epoch_seconds = 0.0;
    }
}

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
    fn pass<'a, T>(
        &'a self,
        task: &'a T,
        device: &'a Device,
        updater: &Updater,
        step: u64,
    ) -> Pass<'a, T> {
        Pass {
            task,
            plan: &self.plan,
            device,
            compute: self.compute,
            loss_scale: updater.loss_scale(),
            concurrent: self.concurrent,
            poller: self.poller,
            step,
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
fn restore<M: Module + ModuleSnapshot>(
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

fn save_checkpoint<M: Module + ModuleSnapshot>(
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
