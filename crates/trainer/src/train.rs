//! The training loop.
//!
//! One optimizer step takes `batch_size x accumulation_steps` samples of the epoch's seeded
//! order, in micro-batches of `batch_size`. Each micro-batch's mean loss is weighted by its
//! share of the step's samples before backward, so the summed gradient is exactly that of one
//! batch of all the step's samples (a short last micro-batch weighs what its samples weigh).
//! Everything runs inside a rayon pool of the configured size; no result depends on it.

use std::path::Path;
use std::time::Instant;

use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use burn::store::ModuleSnapshot;

use crate::data::{Splits, epoch_order};
use crate::error::{Error, Result};
use crate::model::{BuiltinModel, Classifier};
use crate::optim::{optimizer, schedule};
use crate::progress::{Progress, thousands};
use crate::run_dir::RunDir;
use crate::score::score;
use crate::settings::{Backend, Settings};
use crate::summary::{EpochMetrics, Summary};
use crate::threads::ThreadPlan;
use crate::usage::{CpuMeter, peak_rss_bytes};
use crate::weights::{self, weights_sha256};

/// How a run talks and where it writes.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// No log lines, no progress bar.
    pub quiet: bool,
    /// The run folder; `None` trains without writing anything.
    pub run_dir: Option<std::path::PathBuf>,
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
    pub fn fit_builtin(&self) -> Result<Summary> {
        let shape = self.data.train.shape();
        let classes = self.data.classes;
        let model = &self.settings.model;
        self.fit(|device| BuiltinModel::new(model, shape, classes, device))
    }

    /// Trains the model that `init` builds on the run's device (seeded from `training.seed`).
    pub fn fit<M, F>(&self, init: F) -> Result<Summary>
    where
        M: Classifier + ModuleSnapshot,
        F: FnOnce(&Device) -> Result<M> + Send,
    {
        let plan = ThreadPlan::new(self.settings.training.threads);
        let pool = plan.install()?;
        pool.install(|| self.run(plan, init))
    }

    fn run<M, F>(&self, plan: ThreadPlan, init: F) -> Result<Summary>
    where
        M: Classifier + ModuleSnapshot,
        F: FnOnce(&Device) -> Result<M>,
    {
        let started = Instant::now();
        let cpu = CpuMeter::start();
        let training = &self.settings.training;
        let device = device(training.backend);
        device.seed(training.seed);
        let mut model = init(&device)?;

        let train = &self.data.train;
        let batch_size = training.batch_size;
        let step_size = training.effective_batch_size();
        let steps_per_epoch = train.len().div_ceil(step_size) as u64;
        let total_steps = training
            .max_steps
            .map_or(steps_per_epoch * training.epochs, |max| {
                max.min(steps_per_epoch * training.epochs)
            });
        let epochs = total_steps.div_ceil(steps_per_epoch);
        let mut optimizer = optimizer(&self.settings.optimizer);
        let mut scheduler = schedule(&self.settings.optimizer, total_steps)?;
        let loss_fn = CrossEntropyLossConfig::new().init(&device);
        // Every check of the input is behind us: only now does the run folder appear.
        let run_dir = self.prepare_run_dir()?;

        let progress = Progress::new(total_steps, self.options.quiet);
        progress.log(format!(
            "allcores: training {} on {} with {}",
            self.settings.model.kind,
            training.backend,
            plan.describe(training.backend)
        ));
        if step_size > train.len() {
            progress.log(format!(
                "warning: the effective batch ({step_size} = training.batch_size x \
                 training.accumulation_steps) is larger than the {} training samples",
                train.len()
            ));
        }

        let (mut step, mut samples, mut train_seconds) = (0u64, 0u64, 0.0f64);
        let mut last_epoch = None;
        for epoch in 1..=epochs {
            progress.set_epoch(epoch, epochs);
            let epoch_cpu = CpuMeter::start();
            let epoch_started = Instant::now();
            let (mut loss_sum, mut epoch_samples, mut lr) = (0.0f64, 0u64, 0.0);
            let order = epoch_order(train.len(), training.seed, epoch);
            for group in order.chunks(step_size) {
                // One optimizer step over the group's micro-batches.
                let mut grads = GradientsAccumulator::new();
                let mut step_loss = 0.0f32;
                for micro in group.chunks(batch_size) {
                    let (x, y) = train.batch(micro, &device);
                    let share = micro.len() as f32 / group.len() as f32;
                    let loss = loss_fn.forward(model.forward(x), y).mul_scalar(share);
                    step_loss += loss.clone().into_scalar::<f32>();
                    grads.accumulate(&model, GradientsParams::from_grads(loss.backward(), &model));
                }
                step += 1;
                if !step_loss.is_finite() {
                    return Err(Error::Diverged {
                        step,
                        loss: step_loss,
                    });
                }
                let rate = scheduler.step();
                lr = rate.base();
                model = optimizer.step(rate, model, grads.grads());

                samples += group.len() as u64;
                epoch_samples += group.len() as u64;
                loss_sum += step_loss as f64 * group.len() as f64;
                let elapsed = train_seconds + epoch_started.elapsed().as_secs_f64();
                progress.step(step_loss, samples, samples as f64 / elapsed);
                if step == total_steps {
                    break;
                }
            }
            train_seconds += epoch_started.elapsed().as_secs_f64();
            last_epoch = Some(self.end_epoch(
                &model,
                &device,
                run_dir.as_ref(),
                (epoch, step, samples, lr),
                (loss_sum, epoch_samples, epoch_started, epoch_cpu, plan),
                &progress,
            )?);
        }
        progress.finish();

        let last = last_epoch.expect("a run has at least one step");
        let weights_sha256 = weights_sha256(&model);
        if let Some(run_dir) = &run_dir {
            weights::save(&model.valid(), &run_dir.weights_path())?;
        }
        let summary = Summary {
            test_accuracy: last.test_accuracy,
            test_loss: last.test_loss,
            train_loss: last.train_loss,
            epochs: last.epoch,
            steps: step,
            samples,
            wall_seconds: started.elapsed().as_secs_f64(),
            train_seconds,
            samples_per_second: samples as f64 / train_seconds,
            threads: plan.threads,
            threads_available: plan.available,
            cpu_utilization: cpu.utilization(plan.threads),
            backend: training.backend.to_string(),
            model: self.settings.model.kind.to_string(),
            batch_size,
            accumulation_steps: training.accumulation_steps,
            effective_batch_size: step_size,
            seed: training.seed,
            peak_rss_bytes: peak_rss_bytes(),
            weights_sha256,
            run_dir: run_dir.as_ref().map(|d| d.path().display().to_string()),
        };
        if let Some(run_dir) = &run_dir {
            run_dir.write_summary(&summary)?;
        }
        Ok(summary)
    }

    /// Scores the model on the test set, logs the epoch and appends it to the metrics file.
    #[allow(clippy::type_complexity)]
    fn end_epoch<M: Classifier>(
        &self,
        model: &M,
        device: &Device,
        run_dir: Option<&RunDir>,
        (epoch, steps, samples, lr): (u64, u64, u64, f64),
        (loss_sum, epoch_samples, started, cpu, plan): (f64, u64, Instant, CpuMeter, ThreadPlan),
        progress: &Progress,
    ) -> Result<EpochMetrics> {
        let seconds = started.elapsed().as_secs_f64();
        let cpu_utilization = cpu.utilization(plan.threads);
        let test = score(model, &self.data.test, self.data.classes, device);
        let metrics = EpochMetrics {
            epoch,
            steps,
            samples,
            train_loss: loss_sum / epoch_samples.max(1) as f64,
            test_loss: test.loss,
            test_accuracy: test.accuracy,
            lr,
            samples_per_second: epoch_samples as f64 / seconds,
            cpu_utilization,
        };
        progress.log(format!(
            "epoch {epoch}: train loss {:.4} · test loss {:.4} · test accuracy {:.2}% · {} \
             samples/s · CPU {:.0}% of {} thread{}",
            metrics.train_loss,
            metrics.test_loss,
            metrics.test_accuracy * 100.0,
            thousands(metrics.samples_per_second),
            cpu_utilization * 100.0,
            plan.threads,
            if plan.threads == 1 { "" } else { "s" },
        ));
        if let Some(run_dir) = run_dir {
            run_dir.append_metrics(&metrics)?;
        }
        Ok(metrics)
    }

    fn prepare_run_dir(&self) -> Result<Option<RunDir>> {
        let Some(path) = &self.options.run_dir else {
            return Ok(None);
        };
        let run_dir = RunDir::create(path)?;
        run_dir.write_settings(&self.settings)?;
        Ok(Some(run_dir))
    }
}

/// Loads the data the settings name and trains the built-in model: the whole `train` command.
pub fn train(settings: &Settings, options: Options) -> Result<Summary> {
    let data = Splits::load(&settings.data)?;
    Trainer::new(settings.clone(), data, options).fit_builtin()
}

/// Where a run folder goes when none is given: `runs/<config name>-<unix seconds>`.
pub fn default_run_dir(config: &Path) -> std::path::PathBuf {
    let stem = config
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "run".into());
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Path::new("runs").join(format!("{stem}-{stamp}"))
}
