//! The optimizers and learning-rate schedulers, built from the settings: burn's schedulers, and
//! burn's Adam, AdamW and SGD as fused updates of allcores' own ([`fused`]), each giving burn's
//! bits.

use burn::lr_scheduler::LrSchedulerConfig;
use burn::lr_scheduler::cosine::CosineAnnealingLrSchedulerConfig;
use burn::lr_scheduler::linear::LinearLrSchedulerConfig;
use burn::lr_scheduler::module_lr_scheduler::ModuleLrScheduler;
use burn::lr_scheduler::sequential::SequentialLrSchedulerConfig;
use burn::optim::ModuleOptimizer;

mod adam;
mod fused;
mod sgd;

use crate::error::{Error, Result};
use crate::settings::{OptimizerKind, OptimizerSettings, Schedule};
use adam::{AdamVariant, FusedAdam};
use fused::SharedReading;
use sgd::FusedSgd;

/// An optimizer built from the settings.
pub struct Optimizer {
    pub module: ModuleOptimizer,
    /// How the optimizer reads the next step's gradients: every fused update reads them in any
    /// format and unscales (and rounds) them as this says, so it can be handed a scaled loss's
    /// half-precision gradients as they are ([`crate::precision::GradientReading`]).
    pub reading: SharedReading,
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
    let reading = SharedReading::default();
    let adam = |variant| {
        ModuleOptimizer::from(FusedAdam {
            beta_1: settings.beta1 as f32,
            beta_2: settings.beta2 as f32,
            epsilon: settings.epsilon as f32,
            variant,
            reading: reading.clone(),
        })
    };
    let module = match settings.kind {
        OptimizerKind::Adam => adam(AdamVariant::Adam { penalty: decay }),
        OptimizerKind::Adamw => adam(AdamVariant::AdamW {
            decay: decay.unwrap_or(0.0),
        }),
        // Plain heavy-ball momentum, as torch.optim.SGD: no dampening.
        OptimizerKind::Sgd => ModuleOptimizer::from(FusedSgd {
            momentum: (settings.momentum > 0.0).then_some(settings.momentum as f32),
            penalty: decay,
            reading: reading.clone(),
        }),
    };
    Optimizer { module, reading }
}

/// The learning-rate schedule over `total_steps` optimizer steps.
///
/// `cosine`: `warmup_steps` steps of linear warm-up from near zero, then a cosine decay from
/// `lr` (reached at step `warmup_steps + 1`) to `min_lr` at `total_steps`.
pub fn schedule(settings: &OptimizerSettings, total_steps: u64) -> Result<ModuleLrScheduler> {
    let lr = settings.lr;
    let warmup = settings.warmup_steps as usize;
    let total = total_steps as usize;
    let scheduler = match settings.schedule {
        Schedule::Constant => Ok(ModuleLrScheduler::from(lr)),
        Schedule::Cosine if warmup == 0 => CosineAnnealingLrSchedulerConfig::new(lr, total.max(1))
            .with_min_lr(settings.min_lr)
            .init(),
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
                    LrSchedulerConfig::Cosine(
                        CosineAnnealingLrSchedulerConfig::new(lr, total - warmup)
                            .with_min_lr(settings.min_lr),
                    ),
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
