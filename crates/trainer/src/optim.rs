//! burn's optimizers and learning-rate schedulers, built from the settings.

use burn::lr_scheduler::LrSchedulerConfig;
use burn::lr_scheduler::cosine::CosineAnnealingLrSchedulerConfig;
use burn::lr_scheduler::linear::LinearLrSchedulerConfig;
use burn::lr_scheduler::module_lr_scheduler::ModuleLrScheduler;
use burn::lr_scheduler::sequential::SequentialLrSchedulerConfig;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{ModuleOptimizer, SgdConfig};

use crate::error::{Error, Result};
use crate::optim_adam::{AdamVariant, FusedAdam, SharedReading};
use crate::precision::Unscaling;
use crate::settings::{OptimizerKind, OptimizerSettings, Schedule};

/// An optimizer built from the settings.
pub struct Optimizer {
    pub module: ModuleOptimizer,
    /// Set when the optimizer reads gradients in any format and unscales (and rounds) them as
    /// this says as it reads them (the fused Adam): it can be handed a scaled loss's
    /// half-precision gradients as they are.
    pub reading: Option<SharedReading>,
}

impl Optimizer {
    /// Where a step's gradients are divided by the loss scale: by the optimizer as it reads
    /// them when it can, else before it.
    pub fn unscaling(&self) -> Unscaling {
        match self.reading {
            Some(_) => Unscaling::ByOptimizer,
            None => Unscaling::Before,
        }
    }
}

/// The f32 values a training step holds for each parameter at the least (the weight, its
/// gradient, the optimizer's state), and what they are, as an error names them.
pub fn values_per_parameter(settings: &OptimizerSettings) -> (usize, &'static str) {
    match settings.kind {
        OptimizerKind::Adam | OptimizerKind::Adamw => {
            (4, "their f32 weights, gradients and Adam's two moments")
        }
        OptimizerKind::Sgd if settings.momentum > 0.0 => {
            (3, "their f32 weights, gradients and momentum")
        }
        OptimizerKind::Sgd => (2, "their f32 weights and gradients"),
    }
}

/// The optimizer the settings name.
pub fn optimizer(settings: &OptimizerSettings) -> Optimizer {
    let decay = (settings.weight_decay > 0.0).then_some(settings.weight_decay as f32);
    let variant = match settings.kind {
        OptimizerKind::Adam => AdamVariant::Adam { penalty: decay },
        OptimizerKind::Adamw => AdamVariant::AdamW {
            decay: decay.unwrap_or(0.0),
        },
        OptimizerKind::Sgd => {
            let sgd = SgdConfig::new()
                .with_momentum((settings.momentum > 0.0).then(|| {
                    // Plain heavy-ball momentum, as torch.optim.SGD: no dampening.
                    MomentumConfig::new()
                        .with_momentum(settings.momentum)
                        .with_dampening(0.0)
                }))
                .with_weight_decay(decay.map(WeightDecayConfig::new));
            return Optimizer {
                module: sgd.init(),
                reading: None,
            };
        }
    };
    // burn's Adam and AdamW, their arithmetic in one parallel pass.
    let reading = SharedReading::default();
    let adam = FusedAdam {
        beta_1: 0.9,
        beta_2: 0.999,
        epsilon: settings.epsilon as f32,
        variant,
        reading: reading.clone(),
    };
    Optimizer {
        module: ModuleOptimizer::from(adam),
        reading: Some(reading),
    }
}

/// The learning-rate schedule over `total_steps` optimizer steps.
///
/// `cosine`: `warmup_steps` steps of linear warm-up from near zero, then a cosine decay from
/// `lr` (reached at step `warmup_steps + 1`) to zero at `total_steps`.
pub fn schedule(settings: &OptimizerSettings, total_steps: u64) -> Result<ModuleLrScheduler> {
    let lr = settings.lr;
    let warmup = settings.warmup_steps as usize;
    let total = total_steps as usize;
    let scheduler = match settings.schedule {
        Schedule::Constant => Ok(ModuleLrScheduler::from(lr)),
        Schedule::Cosine if warmup == 0 => {
            CosineAnnealingLrSchedulerConfig::new(lr, total.max(1)).init()
        }
        Schedule::Cosine => {
            if warmup >= total {
                return Err(Error::setting(
                    "optimizer.warmup_steps",
                    format!("{warmup} warm-up steps leave none of the run's {total} for the decay"),
                ));
            }
            SequentialLrSchedulerConfig::new(
                vec![
                    LrSchedulerConfig::Linear(LinearLrSchedulerConfig::new(lr * 1e-6, lr, warmup)),
                    LrSchedulerConfig::Cosine(CosineAnnealingLrSchedulerConfig::new(
                        lr,
                        total - warmup,
                    )),
                ],
                vec![warmup],
            )
            .init()
        }
    };
    scheduler.map_err(|message| Error::setting("optimizer.schedule", message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rates(settings: &OptimizerSettings, total: u64) -> Vec<f64> {
        let mut scheduler = schedule(settings, total).unwrap();
        (0..total).map(|_| scheduler.step().base()).collect()
    }

    #[test]
    fn cosine_warms_up_then_decays_to_zero() {
        let settings = OptimizerSettings {
            lr: 0.1,
            schedule: Schedule::Cosine,
            warmup_steps: 4,
            ..OptimizerSettings::default()
        };
        let lr = rates(&settings, 20);
        // Warm-up: steps 1 to 4 climb from near zero; step 5 runs at the full rate.
        assert!(lr[0] < 1e-6, "{lr:?}");
        assert!(lr.windows(2).take(4).all(|w| w[1] > w[0]), "{lr:?}");
        assert!((lr[4] - 0.1).abs() < 1e-9, "{lr:?}");
        assert!(lr.windows(2).skip(4).all(|w| w[1] <= w[0]), "{lr:?}");
        assert!(lr[19] < 0.01, "{lr:?}");
    }

    #[test]
    fn warmup_longer_than_the_run_is_refused() {
        let settings = OptimizerSettings {
            schedule: Schedule::Cosine,
            warmup_steps: 50,
            ..OptimizerSettings::default()
        };
        let Err(err) = schedule(&settings, 50) else {
            panic!("accepted")
        };
        let err = err.to_string();
        assert!(err.starts_with("optimizer.warmup_steps"), "{err}");
    }
}
